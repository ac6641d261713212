#!/usr/bin/env python
"""Inference optimizations on the shipped models: speed as a ratio against plain FP32 in the same
run, and what each costs in quality (evaluator attribute accuracy, FD).

Every optimization is a ``Variant``: a name and a function that transforms a freshly loaded FP32
pipeline (in place or returning a new one). Adding one is one entry in ``VARIANTS``. Each variant
is timed on (1) one denoiser call (the UNet forward of a guided batch) and (2) end-to-end
generation of the prompt set, interleaved with FP32 chunk by chunk so machine load hits all alike.

Also: the text-embedding cache (repeated-prompt encode vs encoding), a sampler/steps/guidance sweep
(where the presets come from) and the end-to-end latency of each preset.

    python bench/bench_inference.py                       # the documented run (both models, compile on shapes-vp)
    python bench/bench_inference.py --prompts 16 --no-compile --models shapes-vp   # a quick look

Writes docs/benchmarks/inference.md, inference.csv and inference.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisewise.pipeline import Pipeline
from noisewise.pipeline.optimize import compile_unet, quantize_int8, set_precision, warm_up
from noisewise.pipeline.presets import PRESETS, prepare
from noisewise.shapes.captions import parse_prompt, scene_for_request
from noisewise.shapes.evaluator import Evaluator, attribute_accuracy, benchmark_prompts, frechet_distance
from noisewise.shapes.world import render

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
ATTRS = ("color", "shape", "position", "size")
FINDINGS = "## Findings"  # inference.md from this heading on is hand-written and kept across runs


@dataclass
class Variant:
    """``setup(pipe) -> pipe`` turns a freshly loaded FP32 pipeline into the variant."""

    name: str
    setup: Callable[[Pipeline], Pipeline]
    note: str = ""
    quality_chunks: int | None = None  # evaluate quality on only this many chunks (slow variants)
    needs_compile: bool = False  # skipped with --no-compile
    models: tuple[str, ...] | None = None  # None: every benchmarked model


def _int8_all(p: Pipeline) -> Pipeline:
    return quantize_int8(p, text_encoder=True)


def _int8_unet_only(p: Pipeline) -> Pipeline:
    return quantize_int8(p, text_encoder=False)


VARIANTS: list[Variant] = [
    Variant("fp32", lambda p: p, "baseline: plain FP32"),
    Variant("bf16", lambda p: set_precision(p, "bfloat16"), "UNet, VAE, text encoder in bfloat16"),
    Variant("fp16", lambda p: set_precision(p, "float16"), "UNet, VAE, text encoder in float16", quality_chunks=1),
    Variant("int8", _int8_all, "dynamic INT8 nn.Linear in UNet + text encoder"),
    Variant("int8-unet", _int8_unet_only, "dynamic INT8 nn.Linear in the UNet only"),
    Variant("compile", lambda p: compile_unet(p), "torch.compile(unet, dynamic=False)", needs_compile=True,
            models=("shapes-vp",)),
    Variant("compile+bf16", lambda p: compile_unet(set_precision(p, "bfloat16")), "bfloat16, then torch.compile",
            needs_compile=True, models=("shapes-vp",)),
]

# (label, sampler, steps, guidance_scale): the sweep the presets are read from
SWEEP: list[tuple[str, str, int, float]] = [
    ("dpmpp_2m 4 steps w=2", "dpmpp_2m", 4, 2.0),
    ("dpmpp_2m 6 steps w=1 (no CFG)", "dpmpp_2m", 6, 1.0),
    ("dpmpp_2m 6 steps w=2", "dpmpp_2m", 6, 2.0),
    ("dpmpp_2m 8 steps w=2", "dpmpp_2m", 8, 2.0),
    ("dpmpp_2m 12 steps w=2", "dpmpp_2m", 12, 2.0),
    ("dpmpp_2m 20 steps w=2 (model default)", "dpmpp_2m", 20, 2.0),
    ("dpmpp_2m 30 steps w=2", "dpmpp_2m", 30, 2.0),
    ("unipc 12 steps w=2", "unipc", 12, 2.0),
]


def machine() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return (f"{platform.machine()} CPU ({platform.processor() or 'unknown'}), {os.cpu_count()} cores, no GPU, "
            f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); load average at start "
            f"{load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (other agents' jobs share the machine)")


class Quality:
    """Evaluator scores of generated images against the prompts (and renders of them for FD)."""

    def __init__(self, ev: Evaluator, prompts: list[str]) -> None:
        self.ev = ev
        self.requests = [parse_prompt(p) for p in prompts]
        renders = np.stack([render(scene_for_request(r, np.random.default_rng([1, i, 0])))
                            for i, r in enumerate(self.requests)])
        self.f_ref = ev.features(renders)

    def __call__(self, images: np.ndarray, ref_images: np.ndarray | None = None) -> dict[str, Any]:
        n = len(images)
        acc = attribute_accuracy(self.requests[:n], self.ev.predict(images))
        out = {"n_images": n, "all": acc["all"], "attr_mean": float(np.mean([acc[a] for a in ATTRS])),
               **{a: acc[a] for a in ATTRS}, "defect_rate": acc["defect_rate"]}
        out["fd"] = frechet_distance(self.ev.features(images), self.f_ref[:n]) if n >= 16 else float("nan")
        if ref_images is not None:
            d = np.abs(images.astype(np.float32) - ref_images[:n].astype(np.float32))
            out["pixel_mad_vs_fp32"] = float(d.mean())
        return out


def timed(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, float]:
    t = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t


def dynamo_counts() -> dict[str, int]:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover
        return {}
    return {"unique_graphs": int(counters["stats"]["unique_graphs"]),
            "recompiles": int(sum(counters["recompiles"].values()))}


def bench_variants(name: str, a: argparse.Namespace, quality: Quality, prompts: list[str]) -> list[dict[str, Any]]:
    chosen = [v for v in VARIANTS if (v.models is None or name in v.models) and (a.compile or not v.needs_compile)
              and (a.variants is None or v.name in a.variants or v.name == "fp32")]
    B = a.chunk
    pipes: dict[str, Pipeline] = {}
    setup_s: dict[str, float] = {}
    for v in chosen:
        pipe = Pipeline.from_pretrained(name)
        before = dynamo_counts()
        pipe, s = timed(v.setup, pipe)
        if v.needs_compile:  # the compile happens at the first call: warm up at the benchmark's shapes
            _, s2 = timed(warm_up, pipe, B)
            s += s2
        setup_s[v.name] = s
        pipes[v.name] = pipe
        print(f"{name}: {v.name} ready in {s:.1f} s {dynamo_counts() if v.needs_compile else ''}", flush=True)
        del before

    # (1) one denoiser call, B images guided = 2B rows, interleaved
    base = pipes["fp32"]
    g = torch.Generator().manual_seed(0)
    x = torch.randn((2 * B, *base.latent_shape), generator=g)
    t = torch.full((2 * B,), float(base.schedule.t_max) * 0.5)
    cond = base.encode_prompt((prompts * 2)[: 2 * B])
    call_t: dict[str, list[float]] = {v.name: [] for v in chosen}
    ref = base.model_fn(x, t, cond).float()
    err: dict[str, float] = {}
    with torch.no_grad():
        for v in chosen:
            out = pipes[v.name].model_fn(x, t, cond).float()  # also a warm-up
            err[v.name] = float((out - ref).norm() / ref.norm())
        for _ in range(a.repeats):
            for v in chosen:
                call_t[v.name].append(timed(pipes[v.name].model_fn, x, t, cond)[1])

    # (2) end to end: the prompt set in chunks of B, variants interleaved per chunk
    chunks = [prompts[i : i + B] for i in range(0, len(prompts), B)]
    imgs: dict[str, list[np.ndarray]] = {v.name: [] for v in chosen}
    e2e_t: dict[str, list[float]] = {v.name: [] for v in chosen}
    graphs_before = dynamo_counts()
    for ci, ch in enumerate(chunks):
        for v in chosen:
            if v.quality_chunks is not None and ci >= v.quality_chunks:
                continue
            res, s = timed(pipes[v.name], ch, seed=ci * B)
            imgs[v.name].append(res.images)
            e2e_t[v.name].append(s)
        print(f"{name}: chunk {ci + 1}/{len(chunks)} done", flush=True)
    graphs_after = dynamo_counts()

    ref_imgs = np.concatenate(imgs["fp32"])
    rows = []
    base_call = statistics.median(call_t["fp32"])
    base_e2e = statistics.median(e2e_t["fp32"])
    for v in chosen:
        im = np.concatenate(imgs[v.name])
        q = quality(im, ref_imgs)
        qb = quality(ref_imgs[: len(im)]) if len(im) < len(ref_imgs) else None
        call = statistics.median(call_t[v.name])
        e2e = statistics.median(e2e_t[v.name])
        row = {
            "section": "variant", "model": name, "config": v.name, "note": v.note,
            "denoiser_call_s": round(call, 4), "denoiser_speedup": round(base_call / call, 3),
            "e2e_chunk_s": round(e2e, 3), "e2e_speedup": round(base_e2e / e2e, 3),
            "rel_err_vs_fp32": round(err[v.name], 5), "setup_s": round(setup_s[v.name], 1),
            **{k: (round(val, 4) if isinstance(val, float) else val) for k, val in q.items()},
        }
        if qb is not None:  # quality of FP32 on the same subset, to compare like with like
            row["fp32_all_same_subset"] = round(qb["all"], 4)
            row["fp32_attr_mean_same_subset"] = round(qb["attr_mean"], 4)
        if v.needs_compile:
            row["dynamo"] = f"graphs {graphs_before.get('unique_graphs')}->{graphs_after.get('unique_graphs')}, " \
                            f"recompiles {graphs_before.get('recompiles')}->{graphs_after.get('recompiles')}"
        rows.append(row)
        print(row, flush=True)
    return rows


def bench_cache(a: argparse.Namespace) -> list[dict[str, Any]]:
    pipe = Pipeline.from_pretrained("shapes-vp")
    te = pipe.text_encoder
    rows = []
    for batch in (1, 8):
        ps = benchmark_prompts(batch + 100)[100:]
        te.encode_uncached(ps)  # load + warm
        te.encode(ps)
        unc, hit = [], []
        for _ in range(a.repeats * 4):
            unc.append(timed(te.encode_uncached, ps)[1])
            hit.append(timed(te.encode, ps)[1])
        u, h = statistics.median(unc), statistics.median(hit)
        rows.append({"section": "cache", "model": "MiniLM text encoder", "config": f"{batch} prompt(s), repeated",
                     "encode_s": round(u, 6), "cached_s": round(h, 7), "speedup": round(u / h, 1),
                     "note": f"cache {te.cache_info()}"})
        print(rows[-1], flush=True)
    return rows


def bench_sweep(name: str, a: argparse.Namespace, quality: Quality, prompts: list[str]) -> list[dict[str, Any]]:
    """Sampler/steps/guidance configurations and the presets: quality on the prompt set, latency of
    one image (median of interleaved repeats) and of a chunk."""
    pipe = Pipeline.from_pretrained(name)
    sweep = SWEEP if not a.only_presets else [("dpmpp_2m 20 steps w=2 (model default, preset run)", "dpmpp_2m", 20,
                                                2.0)]
    configs: list[tuple[str, dict[str, Any], Pipeline]] = [
        (lab, {"sampler": s, "steps": n, "guidance_scale": w}, pipe) for lab, s, n, w in sweep]
    for p in PRESETS.values():
        pp = prepare(Pipeline.from_pretrained(name), p.name) if p.optimizations else pipe
        configs.append((f"preset {p.name}", {"preset": p.name}, pp))
    B = a.chunk
    out = []
    lat: dict[str, list[float]] = {c[0]: [] for c in configs}
    for _ in range(a.repeats):
        for lab, kw, pp in configs:
            lat[lab].append(timed(pp, "a red circle on the left", seed=0, **kw)[1])
    for lab, kw, pp in configs:
        ims, ts = [], []
        for i in range(0, len(prompts), B):
            res, s = timed(pp, prompts[i : i + B], seed=i, **kw)
            ims.append(res.images)
            ts.append(s)
        q = quality(np.concatenate(ims))
        section = "preset" if lab.startswith("preset") or a.only_presets else "sweep"
        row = {"section": section, "model": name, "config": lab,
               "latency_1_image_s": round(statistics.median(lat[lab]), 3),
               "s_per_image_batched": round(sum(ts) / len(prompts), 4), "nfe": res.nfe,
               **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in q.items()}}
        if lab.startswith("preset"):
            p = PRESETS[lab.split()[1]]
            row["note"] = (f"{p.sampler}, {p.steps} steps, w={p.guidance_scale}, "
                           f"optimizations {p.optimizations or 'none'}")
        out.append(row)
        print(row, flush=True)
    return out


def fmt(v: Any) -> str:
    if isinstance(v, float):
        if v != 0 and abs(v) < 0.01:
            return f"{v:.2e}"
        return f"{v:.3f}" if abs(v) < 1000 else f"{v:.1f}"
    return "" if v is None else str(v)


def table(rows: list[dict[str, Any]], cols: list[str]) -> str:
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def merge(rows: list[dict[str, Any]], info: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Add this run's rows to inference.json's, replacing rows of the same section, model and config."""
    old = json.loads((OUT / "inference.json").read_text())
    runs = old.get("runs") or [{k: old[k] for k in ("command", "machine", "date", "minutes")}]
    for r in old["rows"]:
        r.setdefault("run", 1)
    runs.append(info)
    for r in rows:
        r["run"] = len(runs)
    new = {(r["section"], r["model"], r["config"]) for r in rows}
    kept = [r for r in old["rows"] if (r["section"], r["model"], r["config"]) not in new]
    return kept + rows, runs


def write(rows: list[dict[str, Any]], a: argparse.Namespace, info: dict[str, Any]) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    if a.merge and (OUT / "inference.json").is_file():
        rows, runs = merge(rows, info)
    else:
        runs = [info]
        for r in rows:
            r["run"] = 1
    (OUT / "inference.json").write_text(json.dumps({"runs": runs, "rows": rows}, indent=1) + "\n")
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(OUT / "inference.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    var = [r for r in rows if r["section"] == "variant"]
    parts = [
        "# Inference optimizations on the shipped models",
        "",
        "Produced by " + "; ".join(
            f"run {i + 1}: `{r['command']}` on {r['machine']}, {r['date']}, in {r['minutes']:.0f} min"
            for i, r in enumerate(runs)) + ". The `run` column says which run measured a row; compare timings "
        "only within one run. Data: `inference.json`, `inference.csv`. How to use each option: "
        "[../inference.md](../inference.md). The tables are regenerated by the script; the findings below "
        "them are written by hand.",
        "",
        "## Variants against FP32 (same run, interleaved)",
        "",
        f"Denoiser call: one UNet forward of {2 * a.chunk} rows ({a.chunk} images with guidance), median of "
        f"{a.repeats}. End to end: `pipe(prompts, seed)` on chunks of {a.chunk} of the first {a.prompts} "
        "`benchmark_prompts()` (dpmpp_2m, 20 steps, w = 2, the models' defaults), median chunk time. "
        "Quality: evaluator attribute accuracy (`all` = every attribute of a prompt right, `attr_mean` = mean of "
        "colour/shape/position/size accuracy), FD of evaluator features to renders of the same prompts, mean absolute "
        "pixel difference to the FP32 images of the same seeds (0-255).",
        "",
        table(var, ["run", "model", "config", "denoiser_speedup", "e2e_speedup", "denoiser_call_s", "e2e_chunk_s",
                    "rel_err_vs_fp32", "n_images", "all", "attr_mean", "fd", "pixel_mad_vs_fp32", "setup_s",
                    "fp32_all_same_subset", "dynamo"]),
        "",
        "## Text-embedding cache",
        "",
        table([r for r in rows if r["section"] == "cache"],
              ["run", "model", "config", "encode_s", "cached_s", "speedup"]),
        "",
        "## Sampler / steps / guidance sweep and presets (FP32 unless the preset says otherwise)",
        "",
        table([r for r in rows if r["section"] in ("sweep", "preset")],
              ["run", "model", "config", "nfe", "latency_1_image_s", "s_per_image_batched", "n_images", "all",
               "attr_mean", "fd", "defect_rate", "note"]),
        "",
    ]
    page = OUT / "inference.md"
    old = page.read_text() if page.is_file() else ""
    keep = old[old.index(FINDINGS):] if FINDINGS in old else FINDINGS + "\n\n(to be written from the tables above)\n"
    page.write_text("\n".join(parts) + "\n" + keep)
    print("\n".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes-vp", "shapes-flow"])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--chunk", type=int, default=16, help="images per pipeline call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", nargs="+", default=None, help="only these variants (fp32 always runs)")
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--skip", nargs="*", default=[], choices=["variants", "cache", "sweep"])
    ap.add_argument("--only-presets", action="store_true",
                    help="in the sweep section, measure only the presets (and the model default beside them)")
    ap.add_argument("--merge", action="store_true",
                    help="add this run's rows to the existing inference.json (same section/model/config replaced)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    t0 = time.time()
    info = {"command": "python " + " ".join(["bench/bench_inference.py", *sys.argv[1:]]), "machine": machine(),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    ev = Evaluator.from_pretrained()
    prompts = benchmark_prompts(a.prompts)
    quality = Quality(ev, prompts)
    rows: list[dict[str, Any]] = []
    if "cache" not in a.skip:
        rows += bench_cache(a)
    for name in a.models:
        if "variants" not in a.skip:
            rows += bench_variants(name, a, quality, prompts)
        if "sweep" not in a.skip:
            rows += bench_sweep(name, a, quality, prompts)
    load = os.getloadavg()
    info["machine"] += f"; load average at end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}"
    info["minutes"] = (time.time() - t0) / 60
    write(rows, a, info)


if __name__ == "__main__":
    main()
