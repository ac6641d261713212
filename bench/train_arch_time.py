#!/usr/bin/env python
"""Seconds per training step of the shapes VAE and UNet at three sizes, fp32 and bf16 autocast:
the measurement behind ``train_shapes.py all --recipe cpu-2h`` (docs/benchmarks/models_cpu2h.md).

    python bench/train_arch_time.py vae    # AutoencoderKL, batch 64: shipped, half, quarter channels
    python bench/train_arch_time.py unet   # UNet2DConditionModel, batch 128: shipped, 1 layer/block, half, both

Random data, AdamW, the real training losses, 2 torch threads. VAE: ``vae_loss``, backward, AdamW,
mean of 4 steps after 2 warm-up steps. UNet: ``training.time_denoiser_steps``, the whole training
step (clipping and EMA too), about 8 s after 3 warm-up steps. Prints one line per configuration.
(The ``half`` UNet rows use the shipped 8 attention heads; the recipe's ``small`` UNet keeps the
shipped head width with 4 heads.)
"""
from __future__ import annotations

import sys
import time
from collections.abc import Callable

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from noisewise.shapes import training as T

CPU = torch.device("cpu")


def mean_seconds(fn: Callable[[], None], n: int = 4, warm: int = 2) -> float:
    for _ in range(warm):
        fn()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t) / n


def vae_step(cfg: dict, bs: int, prec: str) -> tuple[float, int]:
    vae = AutoencoderKL(**cfg).train()
    opt = torch.optim.AdamW(vae.parameters(), 1e-4)
    x = torch.rand(bs, 3, 32, 32) * 2 - 1

    def f() -> None:
        with T._autocast(CPU, prec):
            loss = T.vae_loss(vae, x, None, 1e-6, 4.0)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return mean_seconds(f), sum(p.numel() for p in vae.parameters())


def unet_step(cfg: dict, bs: int, prec: str, kind: str = "vp") -> tuple[float, int]:
    """``training.time_denoiser_steps``: the training step ``train_denoiser`` takes (clipping and EMA
    included), timed for about 8 s after 3 warm-up steps."""
    s = T.time_denoiser_steps(kind, [bs], seconds=8.0, precision=prec, config=cfg, warmup=3)[bs]
    return s, sum(p.numel() for p in UNet2DConditionModel(**cfg).parameters())


def main() -> None:
    torch.set_num_threads(2)
    what = sys.argv[1] if len(sys.argv) > 1 else "vae"
    if what == "vae":
        for name, ch, ng in [("ship", [64, 128, 128], 32), ("half", [32, 64, 64], 16), ("quarter", [16, 32, 32], 8)]:
            cfg = dict(T.VAE_CONFIG, block_out_channels=ch, norm_num_groups=ng)
            for prec in ["fp32", "bf16"]:
                s, n = vae_step(cfg, 64, prec)
                print(f"vae {name} params {n / 1e6:.2f}M bs64 {prec}: {s * 1e3:.0f} ms/step", flush=True)
    elif what == "unet":
        sizes = [("ship", [64, 128], 2, 32), ("lpb1", [64, 128], 1, 32), ("half", [32, 64], 2, 16),
                 ("half-lpb1", [32, 64], 1, 16)]
        for name, ch, lpb, ng in sizes:
            cfg = dict(T.UNET_CONFIG, block_out_channels=ch, layers_per_block=lpb, norm_num_groups=ng)
            for prec in ["fp32", "bf16"]:
                s, n = unet_step(cfg, 128, prec)
                print(f"unet {name} params {n / 1e6:.2f}M bs128 {prec}: {s * 1e3:.0f} ms/step", flush=True)
    else:
        raise SystemExit(f"unknown model {what!r}: give 'vae' or 'unet'")


if __name__ == "__main__":
    main()
