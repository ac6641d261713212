#!/usr/bin/env python
"""Seconds per training step of the shipped denoiser architecture on this machine (AdamW, random
data: the network cost alone), for comparing a CPU "train from scratch" budget with the GPU run
(docs/benchmarks/models.md), in fp32 and with bf16 autocast and/or channels_last, in the same run
(variants interleaved step by step, so a change in the machine's load hits all alike); then the
loss behaviour: the same 30 steps of the real epsilon loss (shapes-vp's, batch 64) from the same
initial weights and the same noise in fp32 and in bf16 autocast.

    python bench/train_step_time.py                  # batch 64 and 512, 2 then 1 thread (the documented run)
    python bench/train_step_time.py --batches 64 --threads 2 --reps 2 --loss-steps 5 --out /tmp/x   # a quick look

Writes docs/benchmarks/models_train_step.md and models_train_step.json (``--name`` for another stem).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from noisewise.shapes import training as T

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
VARIANTS = {  # name -> (bf16 autocast, channels_last)
    "fp32": (False, False),
    "bf16 autocast": (True, False),
    "fp32 channels_last": (False, True),
    "bf16 autocast + channels_last": (True, True),
}


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def step_times(base: torch.nn.Module, bs: int, reps: int, variants: list[str]) -> dict[str, list[float]]:
    gen = torch.Generator().manual_seed(0)
    x, c = torch.randn(bs, 4, 8, 8, generator=gen), torch.randn(bs, 32, 384, generator=gen)
    t = torch.randint(0, 1000, (bs,), generator=gen)
    setups = {}
    for name in variants:
        bf16, cl = VARIANTS[name]
        unet = copy.deepcopy(base).train()
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        if cl:
            unet = unet.to(memory_format=torch.channels_last)
        setups[name] = (unet, torch.optim.AdamW(unet.parameters(), lr=1e-4), xx, bf16)
    times: dict[str, list[float]] = {k: [] for k in variants}
    for r in range(reps + 1):  # the first round warms up and is dropped
        for name, (unet, opt, xx, bf16) in setups.items():
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = (unet(xx, t, encoder_hidden_states=c).sample.float() - x).pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if r:
                times[name].append(time.perf_counter() - t0)
        print(f"  batch {bs} round {r}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items() if v and r),
              flush=True)
    return times


def loss_curves(base: torch.nn.Module, steps: int, bs: int = 64) -> dict[str, list[float]]:
    """The real shapes-vp loss (min-SNR-5 epsilon MSE) for ``steps`` AdamW steps from the same
    weights, with the same latents, captions states and noise, in fp32 and in bf16 autocast."""
    acp = T.vp_alphas_cumprod()
    data_gen = torch.Generator().manual_seed(1)
    z0 = torch.randn(steps, bs, 4, 8, 8, generator=data_gen)
    cond = torch.randn(steps, bs, 32, 384, generator=data_gen)
    out = {}
    for name, bf16 in (("fp32", False), ("bf16 autocast", True)):
        unet = copy.deepcopy(base).train()
        opt = torch.optim.AdamW(unet.parameters(), lr=5e-4, weight_decay=0.01, betas=(0.9, 0.99))
        gen = torch.Generator().manual_seed(2)
        losses = []
        for s in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = T.denoiser_loss("vp", unet, z0[s], cond[s], gen, acp)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
        out[name] = losses
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, nargs="+", default=[64, 512])
    ap.add_argument("--reps", type=int, default=None, help="timed steps per variant (default 6 at batch 64, 3 above)")
    ap.add_argument("--loss-steps", type=int, default=30)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="torch threads (one pass each)")
    ap.add_argument("--channels-last-max-batch", type=int, default=64,
                    help="time the channels_last variants only up to this batch size (they are slow to time)")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--name", default="models_train_step", help="file stem of the .md / .json written to --out")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = json.loads((Path(T.__file__).parent.parent / "weights" / "shapes-vp" / "unet" / "config.json").read_text())
    torch.manual_seed(0)
    base = UNet2DConditionModel.from_config(cfg)
    load = [os.getloadavg()[0]]
    t_start = time.time()
    rows = []
    for th in a.threads:
        torch.set_num_threads(th)
        for bs in a.batches:
            names = [k for k in VARIANTS if bs <= a.channels_last_max_batch or not VARIANTS[k][1]]
            times = step_times(base, bs, a.reps or (6 if bs <= 64 else 3), names)
            load.append(os.getloadavg()[0])
            ref = statistics.median(times["fp32"])
            for name, v in times.items():
                med = statistics.median(v)
                rows.append({"threads": th, "batch": bs, "variant": name, "median_s": med, "min_s": min(v),
                             "max_s": max(v), "ratio_to_fp32": med / ref, "load_after": load[-1], "times_s": v})
    torch.set_num_threads(a.threads[0])
    curves = loss_curves(base, a.loss_steps) if a.loss_steps else {}
    load.append(os.getloadavg()[0])
    rel = [abs(b - f) / f for f, b in zip(curves.get("fp32", []), curves.get("bf16 autocast", []))]
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)), "loadavg": load, "rows": rows,
        "loss_curves": curves, "loss_rel_diff_max": max(rel) if rel else None,
        "loss_rel_diff_mean": statistics.mean(rel) if rel else None,
    }
    (out / f"{a.name}.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = [f"Command: `{meta['command']}`; {meta['machine']}; {meta['when']}; load average (1 min) "
             + " -> ".join(f"{v:.1f}" for v in load) + " (start, after each batch size, end).", "",
             "| threads | batch | variant | s/step (median) | min | max | vs fp32 | load after |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {r['threads']} | {r['batch']} | {r['variant']} | {r['median_s']:.3f} | {r['min_s']:.3f} "
              f"| {r['max_s']:.3f} | {r['ratio_to_fp32']:.2f}x | {r['load_after']:.1f} |" for r in rows]
    if curves:
        f, b = curves["fp32"], curves["bf16 autocast"]
        k = max(1, len(f) // 3)
        lines += ["", f"Loss behaviour ({len(f)} steps, batch 64, {a.threads[0]} thread(s), shapes-vp loss, "
                  "same weights, data and noise): "
                  f"mean loss of the last {k} steps fp32 {statistics.mean(f[-k:]):.4f}, bf16 autocast "
                  f"{statistics.mean(b[-k:]):.4f}; per-step relative difference mean {meta['loss_rel_diff_mean']:.4f},"
                  f" max {meta['loss_rel_diff_max']:.4f}."]
    md = "\n".join(lines) + "\n"
    (out / f"{a.name}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
