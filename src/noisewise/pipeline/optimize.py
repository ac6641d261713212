"""Inference optimizations for a :class:`~noisewise.pipeline.Pipeline`, each a function
``pipe -> pipe`` (in place) that benchmarks and presets can compose:

- :func:`set_precision`: networks in float16 / bfloat16, solver state in float32
  (``pipe.to(dtype=...)``; the half VAE decode falls back to float32 on NaN/black images).
- :func:`quantize_int8`: PyTorch dynamic INT8 quantization (``torch.ao.quantization.quantize_dynamic``)
  of every ``nn.Linear`` in the denoiser (and optionally the text encoder) (weights int8 per tensor,
  activations quantized per call). Convolutions stay float: PyTorch 2.13 has no dynamic conv
  quantization, and its static PT2E flow moved to the optional ``torchao`` package.
- :func:`compile_unet`: ``torch.compile(unet, dynamic=False)`` with a warm-up, so the graph is
  specialised to the batch the pipeline runs and is not recompiled per step.

See ``docs/inference.md`` for when each pays (``docs/benchmarks/inference.md`` for measurements).
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
          "half": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
        return dtype
    key = str(dtype).lower().replace("torch.", "")
    if key not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; use one of float32, float16 (fp16), bfloat16 (bf16)")
    return DTYPES[key]


def set_precision(pipe: Any, dtype: str | torch.dtype, *, text_encoder: bool = True) -> Any:
    """Run the UNet and VAE (and the text encoder unless ``text_encoder=False``) in ``dtype``;
    the sampler keeps its state and arithmetic in float32."""
    dt = parse_dtype(dtype)
    if is_quantized(pipe.unet):
        raise ValueError("the denoiser is INT8-quantized; set the precision before quantize_int8()")
    pipe.unet.to(dtype=dt)
    pipe.codec.vae.to(dtype=dt)
    if text_encoder:
        pipe.text_encoder.to(dtype=dt)
    return pipe


def is_quantized(module: Any) -> bool:
    return any("quantized" in type(m).__module__ for m in getattr(module, "modules", lambda: [])())


def _quantize_linears(module: torch.nn.Module) -> torch.nn.Module:
    from torch.ao.quantization import quantize_dynamic

    if next(module.parameters()).dtype != torch.float32:
        raise ValueError("INT8 dynamic quantization needs a float32 module; load the pipeline in float32")
    if torch.backends.quantized.engine == "none":  # pragma: no cover - exotic builds
        raise RuntimeError("this PyTorch build has no quantized engine (fbgemm/x86/qnnpack)")
    with warnings.catch_warnings():  # torch 2.13 deprecates quantized tensors in favour of torchao
        warnings.simplefilter("ignore")
        return quantize_dynamic(module, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)


def count_linears(module: torch.nn.Module) -> tuple[int, int]:
    """(``nn.Linear`` parameters, all parameters): how much of a network dynamic INT8 can reach."""
    lin = sum(p.numel() for m in module.modules() if isinstance(m, torch.nn.Linear) for p in m.parameters())
    return lin, sum(p.numel() for p in module.parameters())


def quantize_int8(pipe: Any, *, unet: bool = True, text_encoder: bool = False) -> Any:
    """Dynamic INT8 quantization of the ``nn.Linear`` layers of the denoiser and, with
    ``text_encoder=True``, the text encoder (CPU only: PyTorch's quantized kernels are CPU kernels).

    The text encoder is off by default: on the bundled MiniLM, per-tensor (and per-channel) dynamic
    INT8 moves the token states by ~50% (relative L2; activation outliers), and with the embedding
    cache the encoder hardly runs anyway (docs/benchmarks/inference.md)."""
    if pipe.device.type != "cpu":
        raise ValueError("PyTorch dynamic INT8 quantization runs on the CPU; move the pipeline with pipe.to('cpu')")
    if unet and not is_quantized(pipe.unet):
        pipe.unet = _quantize_linears(pipe.unet)
    te = pipe.text_encoder
    if text_encoder and hasattr(te, "model") and not te.variant.startswith("int8"):
        q = _quantize_linears(te.model)
        te.variant = "int8-dynamic"
        te.model = q  # resets the encoder's cache key: states of the float encoder are not reused
    return pipe


def compile_unet(pipe: Any, *, mode: str | None = None, warmup_batch: int | None = None,
                 fullgraph: bool = False) -> Any:
    """``torch.compile`` the denoiser with static shapes (``dynamic=False``). With ``warmup_batch``
    (the number of images per call), one guided step is run at once so the first generation does
    not pay the compile; another batch size compiles another graph (once)."""
    if hasattr(pipe.unet, "_orig_mod"):
        return pipe
    pipe.unet = torch.compile(pipe.unet, dynamic=False, mode=mode, fullgraph=fullgraph)
    if warmup_batch:
        warm_up(pipe, warmup_batch)
    return pipe


@torch.no_grad()
def warm_up(pipe: Any, batch: int, guided: bool = True) -> None:
    """One network call at the shapes a generation of ``batch`` images uses (2x rows with CFG)."""
    rows = 2 * batch if guided else batch
    x = torch.zeros((rows, *pipe.latent_shape), device=pipe.device)
    cond = pipe.encode_prompt([""] * rows)
    t = torch.full((rows,), float(pipe.schedule.t_max) * 0.5, device=pipe.device)
    pipe.model_fn(x, t, cond)


def apply(pipe: Any, *, dtype: str | torch.dtype | None = None, int8: bool = False, compile: bool = False,
          warmup_batch: int | None = None) -> Any:
    """Apply optimizations in a valid order (precision, then INT8, then compile)."""
    if dtype is not None and parse_dtype(dtype) != torch.float32:
        set_precision(pipe, dtype)
    if int8:
        quantize_int8(pipe)
    if compile:
        compile_unet(pipe, warmup_batch=warmup_batch)
    return pipe
