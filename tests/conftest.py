import os

import torch

# Tests use small tensors: one intra-op thread is fastest and immune to a busy machine.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
