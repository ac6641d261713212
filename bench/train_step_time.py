#!/usr/bin/env python
"""Seconds per training step of the shipped denoiser architecture on this machine (AdamW, fp32, random
data: the network cost alone), for comparing a CPU "train from scratch" budget with the GPU run
(docs/benchmarks/models.md).

    python bench/train_step_time.py
"""
import json
import os
import time

import torch
from diffusers import UNet2DConditionModel

torch.set_num_threads(2)
cfg = json.load(open(os.path.join(os.path.dirname(__file__), "..", "src/noisewise/weights/shapes-vp/unet/config.json")))
unet = UNet2DConditionModel.from_config(cfg)
opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
for bs in (64, 512):
    x, c, t = torch.randn(bs, 4, 8, 8), torch.randn(bs, 32, 384), torch.randint(0, 1000, (bs,))
    times = []
    for _k in range(4 if bs == 64 else 3):
        t0 = time.perf_counter()
        loss = (unet(x, t, encoder_hidden_states=c).sample - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    print(bs, [round(v, 3) for v in times], "load", os.getloadavg())
