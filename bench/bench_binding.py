#!/usr/bin/env python
"""Training-free remedies for attribute binding in two-object prompts (issue 5; the errors are
measured in docs/benchmarks/models_errors.md): composable guidance over the object phrases
(Liu et al. 2022), phrase-wise text states (after Feng et al. 2023), regional prompting and its
low-noise context phrases (``regions-context*``), against plain CFG (``base``), at each model's
shipped sampler, steps, guidance scale and negative prompt.

For every variant: the evaluator's accuracy on the two-object prompts of ``benchmark_prompts(N)``
(and on the one-object prompts unless ``--two-only``), the binding table of
:func:`noisewise.shapes.errors.error_breakdown`, FD on evaluator features against renders of the
same prompts, network rows per image and seconds.

    python bench/bench_binding.py --two-only --limit 40 --seeds 1 --out /tmp/binding   # choose a variant
    python bench/bench_binding.py --variants base regions-context0 regions-context0.6 --seeds 2  # composition.md
    python bench/bench_binding.py --two-only --seed-offset 500 --variants regions-context0 regions-context0.6

Writes ``binding.md`` and ``binding.json`` to ``--out`` (default docs/benchmarks/).
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

from noisewise.pipeline import Pipeline
from noisewise.shapes.captions import parse_prompt, scene_for_request
from noisewise.shapes.errors import error_breakdown
from noisewise.shapes.evaluator import Evaluator, benchmark_prompts, frechet_distance
from noisewise.shapes.world import render

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"

# name -> pipeline keyword arguments (on top of the model's shipped defaults; every variant names its compose mode)
VARIANTS: dict[str, dict[str, Any]] = {
    "base": {"compose": "off"},  # plain CFG (the shipped default before regions)
    "phrase-replace": {"compose": "off", "phrase_states": "replace"},
    "phrase-mean": {"compose": "off", "phrase_states": "mean"},
    "compose-full0-c1": {"compose": "objects", "compose_full_scale": 0.0, "compose_scale": 1.0},
    "compose-full0-c2": {"compose": "objects", "compose_full_scale": 0.0, "compose_scale": 2.0},
    "compose-full1-c0.5": {"compose": "objects", "compose_full_scale": 1.0, "compose_scale": 0.5},
    "compose-full1-c1": {"compose": "objects", "compose_full_scale": 1.0, "compose_scale": 1.0},
    "compose-full2-c0.5": {"compose": "objects", "compose_full_scale": 2.0, "compose_scale": 0.5},
    "compose-full2-c1": {"compose": "objects", "compose_full_scale": 2.0, "compose_scale": 1.0},
    "compose-full2-c2": {"compose": "objects", "compose_full_scale": 2.0, "compose_scale": 2.0},
    "compose-full0-c1.5": {"compose": "objects", "compose_full_scale": 0.0, "compose_scale": 1.5},
    "compose-full1-c1+phrase": {"compose": "objects", "compose_full_scale": 1.0, "compose_scale": 1.0,
                                "phrase_states": "replace"},
    "compose-full2-c1+phrase": {"compose": "objects", "compose_full_scale": 2.0, "compose_scale": 1.0,
                                "phrase_states": "replace"},
}
for _s in (0.5, 1.0, 2.0, 4.0):
    VARIANTS[f"binding-s{_s:g}"] = {"compose": "binding", "compose_scale": _s}
    VARIANTS[f"binding-exchanged-s{_s:g}"] = {"compose": "binding-exchanged", "compose_scale": _s}
for _s in (0.5, 1.0):
    for _sig in (0.12, 0.18):
        VARIANTS[f"regions-s{_s:g}-sig{_sig:g}"] = {"compose": "regions", "compose_scale": _s, "region_sigma": _sig}
        VARIANTS[f"regions-named-s{_s:g}-sig{_sig:g}"] = {"compose": "regions-named", "compose_scale": _s,
                                                         "region_sigma": _sig}
VARIANTS["regions-s1.25-sig0.12"] = {"compose": "regions", "compose_scale": 1.25, "region_sigma": 0.12}
VARIANTS["regions-s1-sig0.1"] = {"compose": "regions", "compose_scale": 1.0, "region_sigma": 0.1}
VARIANTS["regions-s1-sig0.14"] = {"compose": "regions", "compose_scale": 1.0, "region_sigma": 0.14}
VARIANTS["layout-only"] = {"compose": "layout"}  # the layout's prompt, plain CFG
VARIANTS["regions-s1-sig0.09"] = {"compose": "regions", "compose_scale": 1.0, "region_sigma": 0.09}
VARIANTS["regions-s1.5-sig0.12"] = {"compose": "regions", "compose_scale": 1.5, "region_sigma": 0.12}
VARIANTS["regions-s1-sig0.12-w3"] = {"compose": "regions", "compose_scale": 1.0, "region_sigma": 0.12,
                                     "guidance_scale": 3.0}
for _w in (1.5, 2.5):  # the regions default at other guidance scales
    VARIANTS[f"regions-w{_w:g}"] = {"compose": "regions", "guidance_scale": _w}
for _n in (15, 20):  # ... and with more sampling steps
    VARIANTS[f"regions-steps{_n}"] = {"compose": "regions", "steps": _n}
# the variants above were measured before the regions default named the other object at low noise: pinned to 0
for _k, _v in VARIANTS.items():
    if _v["compose"].startswith("regions"):
        _v.setdefault("region_context_below", 0.0)
for _c in (0.0, 0.3, 0.6, 1.2, 100.0):  # the noise level below which each region's phrase names the other object
    VARIANTS[f"regions-context{_c:g}"] = {"compose": "regions", "region_context_below": _c}  # 100: every finite level
for _s, _sig in ((1.25, 0.12), (1.5, 0.12), (1.0, 0.15), (1.0, 0.09)):  # the current default at other weights/widths
    VARIANTS[f"regions-context0.6-s{_s:g}-sig{_sig:g}"] = {"compose": "regions", "region_context_below": 0.6,
                                                            "compose_scale": _s, "region_sigma": _sig}
for _n in (15, 20):
    VARIANTS[f"regions-context0.6-steps{_n}"] = {"compose": "regions", "region_context_below": 0.6, "steps": _n}
for _w in (2.5, 3.0):
    VARIANTS[f"regions-context0.6-w{_w:g}"] = {"compose": "regions", "region_context_below": 0.6, "guidance_scale": _w}
ATTRS = ("color", "shape", "position", "size", "all")


class RowCounter:
    """``model(x, t, cond)`` stand-in that counts the rows sent through the network."""

    def __init__(self, pipe: Pipeline) -> None:
        self.pipe, self.rows = pipe, 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        self.rows += x.shape[0]
        return self.pipe.model_fn(x, t, cond)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes-vp", "shapes-flow"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--prompts", type=int, default=200, help="benchmark_prompts(N); its two-object prompts are used")
    ap.add_argument("--limit", type=int, default=None, help="at most this many two-object prompts")
    ap.add_argument("--two-only", action="store_true", help="skip the one-object prompts")
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--seed-offset", type=int, default=0,
                    help="image i of a batch uses seed offset + 1000 s + i (noise no default run used: e.g. 500)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load0, t_start = os.getloadavg()[0], time.time()
    ev = Evaluator.from_pretrained()
    allp = benchmark_prompts(a.prompts)
    two = [p for p in allp if len(parse_prompt(p).objects) == 2][: a.limit]
    one = [] if a.two_only else [p for p in allp if len(parse_prompt(p).objects) == 1]
    prompts = two + one
    rep = [p for p in prompts for _ in range(a.seeds)]
    ref = np.stack([render(scene_for_request(parse_prompt(p), np.random.default_rng([1, allp.index(p), s])))
                    for p in prompts for s in range(a.seeds)])
    f_ref = ev.features(ref)
    results: dict[str, dict[str, Any]] = {}
    for name in a.models:
        pipe = Pipeline.from_pretrained(name)
        for v in a.variants:
            counter = RowCounter(pipe)
            t = time.time()
            imgs = []
            for s in range(a.seeds):
                for i in range(0, len(prompts), a.batch):
                    imgs.append(pipe(prompts[i : i + a.batch], seed=a.seed_offset + 1000 * s, model=counter,
                                     **VARIANTS[v]).images)
            secs = time.time() - t
            x = np.concatenate(imgs)  # seed-major -> prompt-major (rows p * seeds + s)
            x = x.reshape(a.seeds, len(prompts), *x.shape[1:]).transpose(1, 0, 2, 3, 4).reshape(-1, *x.shape[1:])
            b = error_breakdown(rep, ev.predict(x))
            n2 = len(two) * a.seeds
            r: dict[str, Any] = {
                "by_objects": {k: {m: acc[m] for m in ATTRS} for k, acc in b["by_objects"].items()},
                "binding_images": b["binding_images"], "binding": b["binding"], "missing": b["missing"],
                "fd": frechet_distance(ev.features(x), f_ref),
                "fd_two": frechet_distance(ev.features(x[:n2]), f_ref[:n2]),
                "rows_per_image": counter.rows / len(rep), "seconds": secs, "images": len(rep),
            }
            results[f"{name} | {v}"] = r
            print(f"{name} | {v}", json.dumps({k: {m: round(val, 3) for m, val in acc.items()}
                                                for k, acc in r["by_objects"].items()}),
                  f"missing(2) {b['missing'].get('2', [0, 0])} "
                  f"fd {r['fd']:.1f} fd2 {r['fd_two']:.1f} rows/img {r['rows_per_image']:.1f} {secs:.0f}s", flush=True)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, {a.threads} torch thread(s), "
                   f"torch {torch.__version__}",
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)),
        "loadavg_start": load0, "loadavg_end": os.getloadavg()[0],
        "two_object_prompts": len(two), "one_object_prompts": len(one), "seeds": a.seeds,
        "variants": {v: VARIANTS[v] for v in a.variants}, "results": results,
    }
    (out / "binding.json").write_text(json.dumps(meta, indent=1) + "\n")
    lines = [f"Command: `{meta['command']}`; {meta['machine']}; {meta['when']}, load average {load0:.1f} at the "
             f"start, {meta['loadavg_end']:.1f} at the end; {len(two)} two-object and {len(one)} one-object prompts "
             f"x {a.seeds} seed(s).", "",
             "| model | variant | 2-obj colour | 2-obj shape | 2-obj position | 2-obj size | 2-obj all | 1-obj all "
             "| colour both right | colour same value | shape both right | shape same value | FD (all) | FD (2-obj) "
             "| rows / image | s |", "|---" * 16 + "|"]
    for key, r in results.items():
        m, v = key.split(" | ")
        t2, t1 = r["by_objects"].get("2", {}), r["by_objects"].get("1", {})
        bc, bs = r["binding_images"]["color"], r["binding_images"]["shape"]
        lines.append(f"| {m} | {v} | " + " | ".join(f"{t2.get(k, float('nan')):.3f}" for k in ATTRS)
                     + f" | {t1.get('all', float('nan')):.3f} | {bc['both right']}/{bc['images']} "
                     f"| {bc['same value']} | {bs['both right']}/{bs['images']} | {bs['same value']} "
                     f"| {r['fd']:.1f} | {r['fd_two']:.1f} | {r['rows_per_image']:.1f} | {r['seconds']:.0f} |")
    md = "\n".join(lines) + "\n"
    (out / "binding.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
