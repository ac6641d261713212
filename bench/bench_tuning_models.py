"""Tuned step schedules on the shipped text-to-image models (issue 8), measured by the shipped
evaluator: attribute accuracy, Fréchet distance (evaluator features) to renders of the same prompts,
and the latent distance to a fine solve of the same noise, tuned vs hand spacings.

    python bench/bench_tuning_models.py                 # shapes-vp and shapes-flow, NFE 4 6 8 10
    python bench/bench_tuning_models.py --models shapes-vp --nfes 6 --prompts 16   # a quick look

Tuning: ``nw.tune_schedule(pipe.model_fn, ...)`` with the model's default guidance (scale and
negative prompt), ``--batch`` calibration prompts (``nw.tuning.calibration_prompts``, seed 40_000,
disjoint from the benchmark prompts) and calibration noise (derived seed); evaluation: the first
``--prompts`` of ``benchmark_prompts()`` (seed 20_000), image i from ``manual_seed(i)`` noise, as the
pipeline draws it. Writes docs/benchmarks/tuning_models.md and tuning_models.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import noisewise as nw
from noisewise.pipeline import Pipeline
from noisewise.shapes.captions import parse_prompt, scene_for_request
from noisewise.shapes.evaluator import Evaluator, attribute_accuracy, benchmark_prompts, frechet_distance
from noisewise.shapes.world import render
from noisewise.tuning import REFERENCE_SAMPLERS, calibration_prompts, reference_grid, tune_schedule

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {"dpmpp_2m": ("dpmpp_2m", {}), "ipndm3": ("ipndm", {"order": 3})}


def label(sampler: str, opts: dict[str, Any]) -> str:
    return sampler + "".join(f" {k}={v}" for k, v in opts.items())


def run_model(name: str, a: argparse.Namespace, ev: Evaluator) -> list[dict[str, Any]]:
    pipe = Pipeline.from_pretrained(name)
    w = float(pipe.defaults["guidance_scale"])
    neg = pipe.defaults["negative_prompt"]
    prompts = benchmark_prompts(a.prompts)
    requests = [parse_prompt(p) for p in prompts]
    renders = np.stack([render(scene_for_request(r, np.random.default_rng([1, i, 0]))) for i, r in enumerate(requests)])
    f_ref = ev.features(renders)
    noise = pipe.initial_noise(list(range(len(prompts))))  # seeds 0..P-1, as pipe(prompts, seed=0)
    cond, uncond = pipe.encode_prompt(prompts), pipe.encode_prompt([neg] * len(prompts))

    def solve(**kw: Any) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), a.chunk):
            sl = slice(i, i + a.chunk)
            out.append(nw.sample(pipe.model_fn, noise[sl], schedule=pipe.schedule, cond=cond[sl], uncond=uncond[sl],
                                 guidance_scale=w, **kw))
        return torch.cat(out)

    t = time.time()
    # the tuner's own kind of reference (LMS-3, extrapolated to sigma = 0), from the noisiest level
    ref_sampler, ref_opts = REFERENCE_SAMPLERS["extrapolate"]
    fine = solve(sampler=ref_sampler, grid=reference_grid(pipe.schedule, pipe.schedule.t_max, a.fine_steps),
                 **ref_opts)
    fine_s = time.time() - t

    def measure(lat: torch.Tensor) -> dict[str, Any]:
        imgs = pipe.decode(lat)
        acc = attribute_accuracy(requests, ev.predict(imgs))
        keep = {k: acc[k] for k in ("all", "color", "shape", "position", "size", "background", "defect_rate")}
        keep["fd"] = frechet_distance(ev.features(imgs), f_ref)
        keep["latent_dist"] = float((lat - fine).flatten(1).norm(dim=1).median())
        return keep

    rows = [dict(model=name, config=f"fine solve (lms order=3, {a.fine_steps} steps)", nfe=a.fine_steps,
                 seconds_sampling=round(fine_s, 1), **measure(fine))]
    print(name, rows[-1], flush=True)
    cal = calibration_prompts(a.batch)
    ccond, cuncond = pipe.encode_prompt(cal), pipe.encode_prompt([neg] * a.batch)
    for nfe in a.nfes:
        for sampler, opts in (SAMPLERS[k] for k in a.samplers):
            tuned = tune_schedule(pipe.model_fn, schedule=pipe.schedule, sampler=sampler, nfe=nfe,
                                  shape=pipe.latent_shape, batch=a.batch, cond=ccond, uncond=cuncond, guidance_scale=w,
                                  reference_steps=a.reference_steps, max_evals=a.max_evals, cache=False, **opts)
            default = "trailing" if pipe.schedule.discrete else "linspace"  # the pipeline's default spacing
            hands = list(dict.fromkeys([tuned.start] + ([default] if sampler == "dpmpp_2m" else [])))
            for sp in hands:
                r = dict(model=name, config=f"{label(sampler, opts)} [{sp}]", nfe=nfe,
                         **measure(solve(sampler=sampler, steps=nfe, spacing=sp, **opts)))
                rows.append(r)
                print(name, r, flush=True)
            r = dict(model=name, config=f"{label(sampler, opts)} [tuned]", nfe=nfe,
                     **measure(solve(spacing=tuned)), tune_seconds=round(tuned.seconds, 1),
                     tune_solves=tuned.evaluations, tune_calls=tuned.model_calls, start=tuned.start,
                     calibration_loss=f"{tuned.start_loss:.3f} -> {tuned.loss:.3f}")
            rows.append(r)
            print(name, r, flush=True)
    return rows


def write(rows: list[dict[str, Any]], a: argparse.Namespace, total_s: float) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    cmd = "python bench/bench_tuning_models.py " + " ".join(sys.argv[1:])
    machine = f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU, torch {torch.__version__}"
    (OUT / "tuning_models.json").write_text(json.dumps({"command": cmd, "machine": machine, "rows": rows}, indent=1))
    L = [
        "# Tuned step schedules on the shipped models (issue 8)",
        "",
        f"Produced by `{cmd.strip()}` on {machine}, {time.strftime('%Y-%m-%d')}, in {total_s / 60:.0f} min. "
        "Data: `tuning_models.json`. Method: [../tuning.md](../tuning.md); the exact-ODE benchmark: "
        "[tuning.md](tuning.md).",
        "",
        f"Each model with its default guidance (scale 7.5, negative prompt \"blurry, noisy, watermark\"). "
        f"**Evaluation**: the first {a.prompts} `benchmark_prompts()`, image i from `manual_seed(i)` noise. "
        f"**Calibration**: {a.batch} other prompts (`nw.tuning.calibration_prompts`) and noise from "
        f"`tune_schedule(seed=0)` (derived seed); reference {a.reference_steps} steps, at most {a.max_evals} "
        "cheap solves. Columns: accuracy of all attributes a prompt names (`all`), Fréchet distance of the "
        f"evaluator's features to renders of the same prompts (`FD`; {a.prompts} images, so biased upwards and "
        "noisy: compare rows, not with models.md), and the median latent L2 distance to a fine solve of the same "
        f"noise (the tuner's kind of reference: LMS-3, {a.fine_steps} steps, extrapolated to sigma = 0; the latent "
        f"has {4 * 8 * 8} numbers). `(start)` marks the hand spacing with the lowest calibration loss (the "
        "tuner's start), `[trailing]` / `[linspace]` is the pipeline's default spacing (VP / flow).",
        "",
        "| model | NFE | config | all | color | shape | position | size | FD | latent dist. to fine | "
        "tuning cost |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    starts = {(r["model"], r["nfe"], r["config"].rsplit(" [", 1)[0]): r["start"] for r in rows if "start" in r}
    for r in rows:
        base, _, sp = r["config"].rpartition(" [")
        if starts.get((r["model"], r["nfe"], base)) == sp.rstrip("]"):
            r = {**r, "config": r["config"] + " (start)"}
        cost = (f"{r['tune_seconds']:.0f} s, {r['tune_solves']} solves, {r['tune_calls']} calls "
                f"(loss {r['calibration_loss']})" if "tune_seconds" in r else "")
        L.append(f"| {r['model']} | {r['nfe']} | {r['config']} | {r['all']:.3f} | {r['color']:.3f} | "
                 f"{r['shape']:.3f} | {r['position']:.3f} | {r['size']:.3f} | {r['fd']:.2f} | "
                 f"{r['latent_dist']:.3f} | {cost} |")
    L += ["", "DDPM-1000 was not run: 1000 guided network calls per image batch cost ~35 min per model on this "
          "CPU; the fine ODE solve stands in as the quality reference.", ""]
    (OUT / "tuning_models.md").write_text("\n".join(L))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes-vp", "shapes-flow"])
    ap.add_argument("--nfes", nargs="+", type=int, default=[4, 6, 8, 10])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--samplers", nargs="+", default=["dpmpp_2m"], choices=sorted(SAMPLERS))
    ap.add_argument("--batch", type=int, default=32, help="calibration prompts / noise samples")
    ap.add_argument("--max-evals", type=int, default=40)
    ap.add_argument("--reference-steps", type=int, default=48)
    ap.add_argument("--fine-steps", type=int, default=100)
    ap.add_argument("--chunk", type=int, default=64, help="images per network call when evaluating")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    ev = Evaluator.from_pretrained()
    rows: list[dict[str, Any]] = []
    for name in a.models:
        rows += run_model(name, a, ev)
        write(rows, a, time.time() - t0)
    print(f"done in {time.time() - t0:.0f} s -> {OUT}/tuning_models.md")


if __name__ == "__main__":
    main()
