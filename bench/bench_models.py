#!/usr/bin/env python
"""Quality of the shipped shapes models, measured by the shipped evaluator.

For each model at its recommended settings: accuracy of every attribute the prompt names, the
share of images with a detected defect with the default negative prompt and without one, and the
Fréchet distance (evaluator features) between generated images and renders of the same prompts.
Writes ``docs/benchmarks/models.md``, ``models.json`` and sample grids.

    python bench/bench_models.py                      # 200 prompts x 4 seeds (the documented run)
    python bench/bench_models.py --prompts 20 --seeds 1   # a quick look
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from noisewise.pipeline import Pipeline
from noisewise.shapes.captions import parse_prompt, scene_for_request
from noisewise.shapes.evaluator import Evaluator, attribute_accuracy, benchmark_prompts, frechet_distance
from noisewise.shapes.world import render

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
GRID_PROMPTS = [
    "a large red circle on the left", "a small blue square at the top", "a green triangle in the center",
    "a yellow cross on the right on a black background", "a purple disc at the bottom on a white background",
    "a big orange box in the middle on a gray background",
    "a red circle on the left and a blue triangle on the right", "two shapes: a green cross and a yellow triangle",
]
GOALS = {"color": 0.98, "background": 0.98, "shape": 0.95, "position": 0.95, "size": 0.90}


def save_grid(images: np.ndarray, cols: int, path: Path, scale: int = 4) -> None:
    from PIL import Image

    n, h, w, _ = images.shape
    rows = (n + cols - 1) // cols
    g = np.full((rows * (h + 2), cols * (w + 2), 3), 255, np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        g[r * (h + 2) + 1 : r * (h + 2) + 1 + h, c * (w + 2) + 1 : c * (w + 2) + 1 + w] = im
    Image.fromarray(g).resize((g.shape[1] * scale, g.shape[0] * scale), Image.NEAREST).save(path)


def generate(pipe: Pipeline, prompts: list[str], seeds: int, batch: int, **kw) -> np.ndarray:
    """Image (prompt p, seed s) uses seed s for every prompt: rows p * seeds + s."""
    out = []
    for s in range(seeds):
        for i in range(0, len(prompts), batch):
            out.append(pipe(prompts[i : i + batch], seed=1000 * s, **kw).images)
    imgs = np.concatenate(out)  # order: seed-major
    return imgs.reshape(seeds, len(prompts), *imgs.shape[1:]).transpose(1, 0, 2, 3, 4).reshape(-1, *imgs.shape[1:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes-vp", "shapes-flow"])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--seeds-no-negative", type=int, default=None,
                    help="seeds for the run without a negative prompt (default: --seeds)")
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--evaluator", default=None,
                    help="evaluator folder (default: the shipped one), e.g. one a training run exported")
    ap.add_argument("--second-evaluator", default=None,
                    help="also read the same images with this evaluator folder (e.g. a training run's own); "
                         "its accuracies go under 'second_evaluator' in models.json")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    ev = Evaluator.from_pretrained(a.evaluator, device=a.device)
    ev2 = Evaluator.from_pretrained(a.second_evaluator, device=a.device) if a.second_evaluator else None
    prompts = benchmark_prompts(a.prompts)
    requests = [parse_prompt(p) for p in prompts]
    def reqs_for(seeds: int) -> list:
        return [r for r in requests for _ in range(seeds)]

    reqs = reqs_for(a.seeds)
    # reference: renders of the same prompts (the defects the prompt names: none), and a second set for the floor
    refs = [np.stack([render(scene_for_request(r, np.random.default_rng([k, i, s]))) for i, r in enumerate(requests)
                      for s in range(a.seeds)]) for k in (1, 2)]
    f_ref = [ev.features(x) for x in refs]

    def f_sub(seeds: int):  # reference features of the first `seeds` renders of every prompt
        return f_ref[0].view(len(prompts), a.seeds, -1)[:, :seeds].reshape(len(prompts) * seeds, -1)

    results: dict[str, dict] = {
        "renders": {**attribute_accuracy(reqs, ev.predict(refs[0])), "fd": frechet_distance(f_ref[0], f_ref[1])},
    }
    for name in a.models:
        pipe = Pipeline.from_pretrained(name, device=a.device)
        d = pipe.defaults
        for label, neg in (("default negative prompt", None), ("no negative prompt", "")):
            seeds = a.seeds if neg is None or a.seeds_no_negative is None else a.seeds_no_negative
            t = time.time()
            imgs = generate(pipe, prompts, seeds, a.batch, negative_prompt=neg)
            secs = time.time() - t
            n = len(prompts) * seeds
            seed_reqs = reqs_for(seeds)
            acc = attribute_accuracy(seed_reqs, ev.predict(imgs))
            acc["fd"] = frechet_distance(ev.features(imgs), f_ref[0][: n] if seeds == a.seeds else f_sub(seeds))
            acc["images"] = n
            acc["seconds"] = secs
            key = f"{name} ({label})"
            results[key] = {**acc, "sampler": d["sampler"], "steps": d["steps"], "guidance_scale": d["guidance_scale"],
                            "negative_prompt": d["negative_prompt"] if neg is None else "",
                            **({"negative_scale": d["negative_scale"], "negative_above": d.get("negative_above", 0.0),
                                "negative_perpendicular": d.get("negative_perpendicular", False)}
                               if neg is None and d.get("negative_scale") is not None else {})}
            print(key, json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in acc.items()}), flush=True)
            if ev2 is not None:
                results[key]["second_evaluator"] = attribute_accuracy(seed_reqs, ev2.predict(imgs))
                print(f"{key}, second evaluator", json.dumps({k: round(v, 4) for k, v in
                                                              results[key]["second_evaluator"].items()}), flush=True)
            if neg is None:
                grid = pipe([p for p in GRID_PROMPTS for _ in range(8)], seed=0).images
                save_grid(grid, 8, out / f"samples-{Path(name).name}.png")
    meta = {
        "command": "python bench/bench_models.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.machine()}, {a.device}, torch {torch.__version__}",
        "evaluator": a.evaluator or "shipped", "second_evaluator": a.second_evaluator,
        "prompts": a.prompts, "seeds": a.seeds, "results": results,
    }
    (out / "models.json").write_text(json.dumps(meta, indent=1) + "\n")
    cols = ["color", "background", "shape", "position", "size", "all", "defect_rate", "fd"]
    lines = ["| run | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for k, r in results.items():
        lines.append(f"| {k} | " + " | ".join(f"{r[c]:.3f}" if c != "fd" else f"{r[c]:.2f}" for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    (out / "models-table.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
