"""train/pack_for_device.py: the packed text encoder gives bit-identical token states for every text
made of the kept tokens (checked against the unpacked original through noisewise's TextEncoder), texts
with other tokens are reported, and the slim wheel drops only model-specific pipelines."""

from __future__ import annotations

import importlib.util
import zipfile
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("pack_for_device", ROOT / "train" / "pack_for_device.py")
pack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(pack)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory) -> Path:
    """A small random BertModel in fp16 with the bundled MiniLM's tokenizer (same vocabulary)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from noisewise.pipeline.text import default_text_encoder_path

    src = Path(default_text_encoder_path())
    d = tmp_path_factory.mktemp("bert")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    BertModel(cfg).half().save_pretrained(d)
    AutoTokenizer.from_pretrained(str(src)).save_pretrained(d)
    return d


def test_packed_encoder_is_bit_identical_on_kept_tokens(tiny_bert, tmp_path):
    from noisewise.pipeline.text import TextEncoder

    texts = ["a big violet disc in the middle and a small red plus sign on the left", "blurry, watermark",
             "two shapes: a green box, a tiny yellow triangle at the top on a grey background", ""]
    info = pack.pack_minilm(tiny_bert, tmp_path / "packed", texts)
    assert len(info["kept_ids"]) < 100
    pack.unpack_minilm(tmp_path / "packed", tmp_path / "rebuilt")
    for dtype in (torch.float32, torch.float16):
        a = TextEncoder(str(tiny_bert), max_length=32, cache_size=0, dtype=dtype).encode_uncached(texts, warn=False)
        b = TextEncoder(str(tmp_path / "rebuilt"), max_length=32, cache_size=0, dtype=dtype).encode_uncached(
            texts, warn=False)
        assert torch.equal(a, b)
    other = "an elephant"
    assert pack.missing_tokens(tmp_path / "packed", [*texts, other]) == [other]
    packed_size = sum(f.stat().st_size for f in (tmp_path / "packed").iterdir() if f.suffix in (".xz", ".safetensors"))
    assert packed_size < (tiny_bert / "model.safetensors").stat().st_size / 10  # the word embedding dominated


def test_caption_texts_cover_the_caption_vocabulary():
    texts = pack.caption_texts(n_random=50)
    joined = " ".join(texts)
    for w in ("violet", "grey", "disk", "plus sign", "watermarked", "centered", "against", "low quality"):
        assert w in joined


def test_slim_wheel_drops_model_pipelines_only(tmp_path):
    src = tmp_path / "diffusers-0.0.1-py3-none-any.whl"
    keep = ["diffusers/__init__.py", "diffusers/pipelines/__init__.py", "diffusers/pipelines/pipeline_utils.py",
            "diffusers/models/unets/unet_2d_condition.py", "diffusers/modular_pipelines/__init__.py"]
    drop = ["diffusers/pipelines/flux/pipeline_flux.py", "diffusers/modular_pipelines/wan/x.py"]
    record = "\n".join(f"{f},sha256=x,1" for f in keep + drop) + "\ndiffusers-0.0.1.dist-info/RECORD,,\n"
    with zipfile.ZipFile(src, "w") as z:
        for f in keep + drop:
            z.writestr(f, "# " + f)
        z.writestr("diffusers-0.0.1.dist-info/RECORD", record)
    out = pack.slim_wheel(src, tmp_path / "slim")
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        rec = z.read("diffusers-0.0.1.dist-info/RECORD").decode()
    assert set(keep) <= names and not set(drop) & names
    assert all(f in rec for f in keep) and not any(f in rec for f in drop)
