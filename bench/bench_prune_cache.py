#!/usr/bin/env python
"""Speed and quality cost of DeepCache step caching and importance-based structured pruning on the
shipped shapes models, each against the plain FP32 network in the same run.

Variants (per model): plain; DeepCache interval 2 and 3 (default branch: the first resolution
level) and interval 3 with the shallowest branch; attention heads pruned by measured importance
(12.5 %, 25 %); whole transformers pruned by importance (1 and 3 of 11); and a control that prunes
the 25 % *most* important heads (does the measurement matter?).

Latency: the denoising loop (``noisewise.sample``, default sampler, ``--steps`` steps, CFG batched; text
encoding and VAE decoding excluded, they do not change), batch 1 and batch 8 prompts, variants
interleaved in every repetition (rotated order); the ratio is the median over repetitions of
plain's time over the variant's in the same repetition.
Quality: ``--prompts`` benchmark prompts x 1 seed through the whole pipeline, attribute accuracy and
Fréchet distance (evaluator features) against renders of the same prompts, and the RMS difference of
the images from the plain model's (same seeds).

    python bench/bench_prune_cache.py                       # the documented run
    python bench/bench_prune_cache.py --prompts 16 --reps 2 # a quick look
    python bench/bench_prune_cache.py --selection           # how the pruned units are chosen (quality only)

``--selection`` compares, at equal pruning, the ways of choosing the units: single-shot importance
by output change (the main run's), by the change of the denoised estimate (``metric='x0'``), greedy
rounds with x0 (``greedy_select``) and the most-important control; quality only, written to
``prune_cache_selection.{json,md}``.

``--forward`` times single network calls instead of whole loops (the same variants; a DeepCache
variant's full and shallow call separately), many interleaved repetitions, and reports the ratio of
the minimum times as well as the median of paired ratios: less exposed to other jobs on the machine.
Written to ``prune_cache_forward.{json,md}``.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisewise import sample
from noisewise.pipeline import Pipeline
from noisewise.pipeline.deepcache import DeepCacheUNet
from noisewise.pipeline.prune import (
    calibration_batch,
    count_parameters,
    greedy_select,
    measure_importance,
    model_fn_for,
    prunable_units,
    prune_unet,
    select_units,
)
from noisewise.shapes.captions import parse_prompt, scene_for_request
from noisewise.shapes.evaluator import Evaluator, attribute_accuracy, benchmark_prompts, frechet_distance
from noisewise.shapes.world import render

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def variants(pipe: Pipeline, scores: list) -> dict[str, dict[str, Any]]:
    unet = pipe.unet
    n_params = count_parameters(unet)
    most_first = sorted(scores, key=lambda us: -us[1])
    out: dict[str, dict[str, Any]] = {"plain": {"model": pipe.model_fn, "params": n_params}}
    for interval, branch in ((2, None), (3, None), (3, 0)):
        dc = DeepCacheUNet(unet, interval=interval, branch=branch)
        out[f"deepcache i{interval} b{dc.branch}"] = {"model": dc, "params": n_params}
    for label, sel in (
        ("heads -12.5%", select_units(scores, heads=0.125)),
        ("heads -25%", select_units(scores, heads=0.25)),
        ("transformers -1", select_units(scores, transformers=1)),
        ("transformers -3", select_units(scores, transformers=3)),
        ("heads -25% most important (control)", select_units(most_first, heads=0.25)),
    ):
        net = prune_unet(unet, sel)
        out[label] = {"model": model_fn_for(net), "params": count_parameters(net), "units": [str(u) for u in sel]}
    return out


def time_loop(pipe: Pipeline, models: dict[str, dict[str, Any]], batch: int, reps: int,
              steps: int) -> dict[str, list[float]]:
    prompts = benchmark_prompts(batch, seed=77)
    cond = pipe.encode_prompt(prompts)
    uncond = pipe.encode_prompt([pipe.defaults["negative_prompt"]] * batch)
    noise = pipe.initial_noise(list(range(batch)))
    d = pipe.defaults
    kw = dict(schedule=pipe.schedule, sampler=d["sampler"], steps=steps, cond=cond, uncond=uncond,
              guidance_scale=d["guidance_scale"])
    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    for n in names:  # warm-up
        m = models[n]["model"]
        getattr(m, "reset", lambda: None)()
        sample(m, noise, **kw)
    for r in range(reps):
        order = names[r % len(names):] + names[: r % len(names)]
        for n in order:
            m = models[n]["model"]
            getattr(m, "reset", lambda: None)()
            t0 = time.perf_counter()
            sample(m, noise, **kw)
            times[n].append(time.perf_counter() - t0)
    return times


def selection_study(a: Any, out: Path, ev: Evaluator, prompts: list[str], reqs: list, f_ref: torch.Tensor,
                    results: dict[str, Any]) -> None:
    rows = []
    for name in a.models:
        pipe = Pipeline.from_pretrained(name)
        calib = calibration_batch(pipe, n=a.calib)
        units = prunable_units(pipe.unet)
        t0 = time.time()
        s_out = measure_importance(pipe.unet, units, calib, metric="output")
        s_x0 = measure_importance(pipe.unet, units, calib, metric="x0")
        t_single = (time.time() - t0) / 2
        n_heads = round(0.25 * sum(u.kind == "head" for u in units))
        t0 = time.time()
        greedy_h = greedy_select(pipe.unet, calib, heads=n_heads, rounds=a.rounds, metric="x0")
        t_greedy_h = time.time() - t0
        greedy_t = greedy_select(pipe.unet, calib, transformers=3, rounds=3, metric="x0")
        choices = {
            "plain": [],
            "heads -25%, output single-shot": select_units(s_out, heads=0.25),
            "heads -25%, x0 single-shot": select_units(s_x0, heads=0.25),
            f"heads -25%, x0 greedy {a.rounds} rounds": greedy_h,
            "heads -25%, most important (control)": select_units(sorted(s_out, key=lambda us: -us[1]), heads=0.25),
            "transformers -3, output single-shot": select_units(s_out, transformers=3),
            "transformers -3, x0 greedy 3 rounds": greedy_t,
        }
        res_m: dict[str, Any] = {"single_shot_seconds": t_single, "greedy_heads_seconds": t_greedy_h, "variants": {}}
        plain_imgs = None
        for label, sel in choices.items():
            net = prune_unet(pipe.unet, sel)
            imgs = pipe(prompts, seed=0, steps=a.steps, model=None if not sel else model_fn_for(net)).images
            plain_imgs = imgs if plain_imgs is None else plain_imgs
            acc = attribute_accuracy(reqs, ev.predict(imgs))
            r = {"params_ratio": count_parameters(net) / count_parameters(pipe.unet),
                 "fd": frechet_distance(ev.features(imgs), f_ref),
                 "rmse_vs_plain": float(np.sqrt(np.mean((imgs.astype(np.float64) - plain_imgs) ** 2))),
                 **{k: acc[k] for k in ("color", "background", "shape", "position", "size", "all", "defect_rate")},
                 "units": [str(u) for u in sel]}
            res_m["variants"][label] = r
            rows.append({"model": name, "variant": label, **{k: v for k, v in r.items() if k != "units"}})
            print(name, label, json.dumps({k: round(v, 4) for k, v in rows[-1].items() if isinstance(v, float)}),
                  flush=True)
        results[name] = res_m
    meta = {"command": "python " + " ".join(sys.argv),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
                       "CPU shared with other jobs",
            "prompts": a.prompts, "calib": a.calib, "results": results}
    (out / "prune_cache_selection.json").write_text(json.dumps(meta, indent=1) + "\n")
    cols = ["params_ratio", "all", "color", "shape", "position", "size", "defect_rate", "fd", "rmse_vs_plain"]
    lines = []
    for name in a.models:
        lines += [f"\n**{name}**\n", "| selection | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        lines += [f"| {rw['variant']} | " + " | ".join(f"{rw[c]:.1f}" if c in ("fd", "rmse_vs_plain") else
                                                     f"{rw[c]:.3f}" for c in cols) + " |"
                  for rw in rows if rw["model"] == name]
    table = "\n".join(lines)
    print(table)
    (out / "prune_cache_selection.md").write_text(table.lstrip() + "\n")


def forward_study(a: Any, out: Path) -> None:
    reps = 5 * a.reps  # calls are short: five times the loop repetitions
    rows = []
    for name in a.models:
        pipe = Pipeline.from_pretrained(name)
        calib = calibration_batch(pipe, n=a.calib)
        scores = measure_importance(pipe.unet, prunable_units(pipe.unet), calib, metric=a.metric)
        models = variants(pipe, scores)
        for b in (2, 16):  # rows per call: 1 and 8 prompts with classifier-free guidance
            g = torch.Generator().manual_seed(b)
            x, c = torch.randn(b, 4, 8, 8, generator=g), torch.randn(b, 32, 384, generator=g)
            t = torch.full((b,), 500.0)
            calls: dict[str, Callable[[], Any]] = {}
            for vname, v in models.items():
                m = v["model"]
                if isinstance(m, DeepCacheUNet):
                    if f"deepcache shallow call, branch {m.branch}" in calls:
                        continue
                    shallow = DeepCacheUNet(pipe.unet, interval=10**9, branch=m.branch)
                    shallow(x, t, c)  # fills the cache; later calls are shallow
                    if m.branch == models_default_branch(models):
                        calls["deepcache full call (the wrapper's walk)"] = shallow.forward_full
                    calls[f"deepcache shallow call, branch {m.branch}"] = shallow
                else:
                    calls[vname] = m
            names = list(calls)
            times: dict[str, list[float]] = {n: [] for n in names}
            with torch.no_grad():
                for n in names:
                    calls[n](x, t, c)
                for r in range(reps):
                    for n in names[r % len(names):] + names[: r % len(names)]:
                        t0 = time.perf_counter()
                        calls[n](x, t, c)
                        times[n].append(time.perf_counter() - t0)
            for n in names:
                rows.append({"model": name, "rows": b, "variant": n, "min_ms": 1e3 * min(times[n]),
                             "median_ms": 1e3 * statistics.median(times[n]),
                             "min_ratio": min(times["plain"]) / min(times[n]),
                             "paired_ratio": statistics.median(p / q for p, q in zip(times["plain"], times[n]))})
                print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}),
                      flush=True)
    meta = {"command": "python " + " ".join(sys.argv),
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
                       "CPU shared with other jobs", "reps": reps, "rows": rows}
    (out / "prune_cache_forward.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = ["| model | rows | call | min ms | median ms | ratio (min) | ratio (paired median) |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['model']} | {r['rows']} | {r['variant']} | {r['min_ms']:.1f} | {r['median_ms']:.1f} | "
              f"{r['min_ratio']:.2f}x | {r['paired_ratio']:.2f}x |" for r in rows]
    table = "\n".join(lines)
    print(table)
    (out / "prune_cache_forward.md").write_text(table + "\n")


def models_default_branch(models: dict[str, dict[str, Any]]) -> int:
    return next(v["model"].branch for v in models.values() if isinstance(v["model"], DeepCacheUNet))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes-vp", "shapes-flow"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20,
                    help="sampling steps (the documented runs: 20, the shipped default when they ran)")
    ap.add_argument("--calib", type=int, default=32, help="calibration rows for the importance measurement")
    ap.add_argument("--reps", type=int, default=8, help="timed repetitions per variant at batch 1 (batch 8: half)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--metric", default="output", choices=["output", "x0", "loss"],
                    help="importance metric of the main run and --forward (the documented run: output; "
                         "--selection compares output and x0)")
    ap.add_argument("--selection", action="store_true", help="compare ways of choosing units (quality only)")
    ap.add_argument("--rounds", type=int, default=3, help="greedy rounds for --selection")
    ap.add_argument("--forward", action="store_true", help="time single network calls (many repetitions)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.forward:
        forward_study(a, out)
        return
    ev = Evaluator.from_pretrained()
    prompts = benchmark_prompts(a.prompts)
    reqs = [parse_prompt(p) for p in prompts]
    refs = [np.stack([render(scene_for_request(r, np.random.default_rng([k, i, 0]))) for i, r in enumerate(reqs)])
            for k in (1, 2)]
    f_ref = ev.features(refs[0])
    results: dict[str, Any] = {"renders": {"fd_floor": frechet_distance(f_ref, ev.features(refs[1])),
                                           **attribute_accuracy(reqs, ev.predict(refs[0]))}}
    if a.selection:
        selection_study(a, out, ev, prompts, reqs, f_ref, results)
        return
    rows = []
    for name in a.models:
        pipe = Pipeline.from_pretrained(name)
        t0 = time.time()
        calib = calibration_batch(pipe, n=a.calib)
        units = prunable_units(pipe.unet)
        scores = measure_importance(pipe.unet, units, calib, metric=a.metric)
        t_imp = time.time() - t0
        print(f"{name}: importance of {len(units)} units on {a.calib} rows in {t_imp:.0f} s", flush=True)
        models = variants(pipe, scores)
        lat = {b: time_loop(pipe, models, b, a.reps if b == 1 else max(2, a.reps // 2), a.steps) for b in (1, 8)}
        plain_imgs = None
        res_m: dict[str, Any] = {"importance_seconds": t_imp, "units": len(units),
                                 "least_important": [(str(u), s) for u, s in scores[:8]],
                                 "most_important": [(str(u), s) for u, s in scores[-8:]],
                                 "transformer_scores": [(str(u), s) for u, s in scores if u.kind == "transformer"],
                                 "variants": {}}
        for vname, v in models.items():
            m = v["model"]
            if isinstance(m, DeepCacheUNet):
                m.reset_counters()
            t0 = time.time()
            imgs = pipe(prompts, seed=0, steps=a.steps, model=None if vname == "plain" else m).images
            gen_s = time.time() - t0
            if plain_imgs is None:
                plain_imgs = imgs
            acc = attribute_accuracy(reqs, ev.predict(imgs))
            r = {
                "params": v["params"], "params_ratio": v["params"] / models["plain"]["params"],
                **{f"b{b}_median_s": statistics.median(lat[b][vname]) for b in lat},
                **{f"b{b}_ratio": statistics.median(p / q for p, q in zip(lat[b]["plain"], lat[b][vname]))
                   for b in lat},
                **{f"b{b}_times": lat[b][vname] for b in lat},
                "fd": frechet_distance(ev.features(imgs), f_ref),
                "rmse_vs_plain": float(np.sqrt(np.mean((imgs.astype(np.float64) - plain_imgs) ** 2))),
                "generate_seconds": gen_s, **{k: acc[k] for k in ("color", "background", "shape", "position", "size",
                                                                    "all", "defect_rate")},
            }
            if isinstance(m, DeepCacheUNet):
                r["full_calls"], r["shallow_calls"] = m.full_calls, m.shallow_calls
            if "units" in v:
                r["pruned_units"] = v["units"]
            res_m["variants"][vname] = r
            rows.append({"model": name, "variant": vname, **{k: r[k] for k in (
                "params", "params_ratio", "b1_median_s", "b1_ratio", "b8_median_s", "b8_ratio", "color",
                "background", "shape", "position", "size", "all", "defect_rate", "fd", "rmse_vs_plain")}})
            print(name, vname, json.dumps({k: round(x, 4) for k, x in rows[-1].items() if isinstance(x, float)}),
                  flush=True)
        results[name] = res_m
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
                   "CPU shared with other jobs",
        "prompts": a.prompts, "calib": a.calib, "reps": a.reps, "results": results,
    }
    (out / "prune_cache.json").write_text(json.dumps(meta, indent=1) + "\n")
    with open(out / "prune_cache.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["params_ratio", "b1_ratio", "b8_ratio", "all", "color", "shape", "position", "size", "fd",
            "rmse_vs_plain"]
    lines = []
    for name in a.models:
        lines += [f"\n**{name}**\n", "| variant | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for rw in rows:
            if rw["model"] == name:
                lines.append(f"| {rw['variant']} | " + " | ".join(
                    f"{rw[c]:.2f}x" if c.endswith("ratio") else f"{rw[c]:.1f}" if c in ("fd", "rmse_vs_plain")
                    else f"{rw[c]:.3f}" for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    (out / "prune_cache-table.md").write_text(table.lstrip() + "\n")


if __name__ == "__main__":
    main()
