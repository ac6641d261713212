#!/usr/bin/env python
"""Where the shipped shapes models' attribute errors are (issue 5: colour, shape and position miss
their goals). At each model's shipped default (sampler, steps, guidance, negative prompt) and with
the shipped evaluator, splits the attribute accuracy by one vs two objects in the prompt, per
requested colour / shape / size / position (confusion matrices: requested -> read), per prompt word
(synonyms such as violet, grey, disc against the values' own names), and measures attribute
binding in two-object prompts (a wrong colour that is the other object's). The ceiling the VAE
imposes: the same analysis of VAE reconstructions (encode + decode, posterior mean) of renders of
the same prompts.

    python bench/bench_model_errors.py                         # 200 prompts x 2 seeds (the documented run)
    python bench/bench_model_errors.py --prompts 20 --seeds 1 --out /tmp/x   # a quick look
    python bench/bench_model_errors.py --missing-grid missing.png   # also: images with a requested object not drawn

Writes docs/benchmarks/models_errors.md and models_errors.json (every count).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_models import generate, save_grid  # noqa: E402
from noisewise.pipeline import Pipeline  # noqa: E402
from noisewise.pipeline.vae import tensor_to_images  # noqa: E402
from noisewise.shapes.captions import parse_prompt, scene_for_request  # noqa: E402
from noisewise.shapes.errors import OBJECT_ATTRIBUTES, error_breakdown, rate  # noqa: E402
from noisewise.shapes.evaluator import Evaluator, benchmark_prompts, match_objects  # noqa: E402
from noisewise.shapes.world import COLORS, POSITIONS, SHAPES, SIZES, render  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"
VALUES = {"shape": SHAPES, "color": COLORS, "size": SIZES, "position": POSITIONS}


def renders(prompts: list[str], seeds: int) -> np.ndarray:
    """Renders of the prompts, rows ``p * seeds + s`` (the scenes bench_models.py uses as reference)."""
    reqs = [parse_prompt(p) for p in prompts]
    return np.stack([render(scene_for_request(r, np.random.default_rng([1, i, s])))
                     for i, r in enumerate(reqs) for s in range(seeds)])


@torch.no_grad()
def vae_roundtrip(pipe: Pipeline, images: np.ndarray, batch: int = 200) -> np.ndarray:
    out = [tensor_to_images(pipe.codec.decode(pipe.codec.encode(images[i : i + batch])))
           for i in range(0, len(images), batch)]
    return np.concatenate(out)


def f3(v: float) -> str:
    return "-" if v != v else f"{v:.3f}"


def markdown(meta: dict[str, Any]) -> str:
    runs: dict[str, dict[str, Any]] = meta["runs"]
    names = list(runs)
    lines = [f"Command: `{meta['command']}`; {meta['machine']}; {meta['when']}, load average "
             f"{meta['loadavg_start']:.1f} at the start, {meta['loadavg_end']:.1f} at the end; "
             f"{meta['prompts']} prompts x {meta['seeds']} seeds per run "
             f"({meta['images_per_run']} images); models at their shipped default "
             f"({meta['defaults']}).", ""]
    lines += ["### Accuracy by the number of objects in the prompt", "",
              "| run | objects | images | color | shape | position | size | background | all | objects missing |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        b = runs[n]
        for k, acc in b["by_objects"].items():
            miss = b["missing"][k]
            lines.append(f"| {n} | {k} | {acc['n_images']} | " + " | ".join(
                f3(acc[a]) for a in ("color", "shape", "position", "size", "background", "all"))
                + f" | {f3(rate(miss))} |")
    lines += ["", "### Requested objects not drawn, by the size the prompt asked for", "",
              "Two-object prompts: requested objects matched to no drawn object / objects requested.", "",
              "| run | small | large | size not named |", "|---|---|---|---|"]
    for n in names:
        ms = runs[n].get("missing_by_size", {}).get("2", {})
        lines.append(f"| {n} | " + " | ".join(
            (f"{ms[s][0]}/{ms[s][1]} ({f3(rate(ms[s]))})" if s in ms else "-") for s in ("small", "large", "unnamed"))
            + " |")
    lines += ["", "### Binding in two-object prompts", "",
              "Object reads in two-object prompts that give the two objects different values of the attribute: "
              "how many are wrong, and how many of those wrong reads are the value the prompt gave the *other* "
              "object. Then per image (both objects drawn): both right, the two values exchanged, both objects "
              "drawn with one of the two values, anything else.", "",
              "| run | attribute | reads | wrong | wrong = other object's | images | both right | exchanged "
              "| same value | other |", "|---|---|---|---|---|---|---|---|---|---|"]
    for n in names:
        for attr in ("color", "shape", "position", "size"):
            c, im = runs[n]["binding"][attr], runs[n]["binding_images"][attr]
            lines.append(f"| {n} | {attr} | {c['pairs']} | {c['errors']} | {c['swapped']} | {im['images']} "
                         f"| {im['both right']} | {im['exchanged']} | {im['same value']} | {im['other']} |")
    for attr in ("color", "shape", "position", "size"):
        vals = VALUES[attr]
        lines += ["", f"### {attr.capitalize()}: requested (rows) -> read by the evaluator (columns), counts", ""]
        for n in names:
            conf = runs[n]["confusion"][attr]
            cols = list(vals) + ["none"]
            lines += [f"{n}:", "", f"| requested | {' | '.join(cols)} | accuracy |", "|---" * (len(cols) + 2) + "|"]
            for v in vals:
                row = conf.get(v, {})
                tot = sum(row.values())
                lines.append(f"| {v} | " + " | ".join(str(row.get(c, 0)) for c in cols)
                             + f" | {f3(row.get(v, 0) / tot if tot else float('nan'))} |")
            lines.append("")
    lines += ["### Synonyms: accuracy by the word the prompt used", "",
              "All prompts, per word; then the values' own names against their synonyms (violet, grey, disc/disk, "
              "box/block, plus, big, little/tiny, middle/centered) separately in one- and two-object prompts.", "",
              "| attribute | word | " + " | ".join(names) + " | n (per run) |", "|---" * (len(names) + 3) + "|"]
    for attr in (*OBJECT_ATTRIBUTES, "background"):
        words = sorted(runs[names[0]]["by_word"][attr])
        for w in words:
            lines.append(f"| {attr} | {w} | " + " | ".join(f3(rate(runs[n]['by_word'][attr][w])) for n in names)
                         + f" | {runs[names[0]]['by_word'][attr][w][1]} |")
        for k in sorted(runs[names[0]]["synonyms_by_objects"]):
            for kind in ("own name", "synonym"):
                pair0 = runs[names[0]]["synonyms_by_objects"][k].get(attr, {}).get(kind, [0, 0])
                lines.append(f"| {attr} | **{kind}s, {k}-object prompts** | " + " | ".join(
                    f3(rate(runs[n]["synonyms_by_objects"][k].get(attr, {}).get(kind, [0, 0]))) for n in names)
                    + f" | {pair0[1]} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["shapes-vp", "shapes-flow"])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--missing-grid", default=None, metavar="PNG",
                    help="also save, one row per model, up to 16 images in which a requested object was not drawn")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    load0, t_start = os.getloadavg()[0], time.time()
    ev = Evaluator.from_pretrained(device=a.device)
    prompts = benchmark_prompts(a.prompts)
    rep = [p for p in prompts for _ in range(a.seeds)]
    ref = renders(prompts, a.seeds)
    runs: dict[str, dict[str, Any]] = {}
    seconds: dict[str, float] = {}
    defaults = ""

    missing_rows: list[np.ndarray] = []

    def analyse(name: str, images: np.ndarray) -> None:
        preds = ev.predict(images)
        b = error_breakdown(rep, preds)
        if name not in ("renders", "VAE reconstructions"):
            idx = [i for i, (p, pr) in enumerate(zip(rep, preds)) if None in match_objects(parse_prompt(p), pr)]
            row = np.full((16, *images.shape[1:]), 255, np.uint8)
            row[: min(16, len(idx))] = images[idx[:16]]
            missing_rows.append(row)
        for k, acc in b["by_objects"].items():
            acc["n_images"] = sum(len(parse_prompt(p).objects[:2]) == int(k) for p in rep)
        runs[name] = b
        print(name, {k: {x: round(v[x], 3) for x in ("color", "shape", "position", "all")}
                     for k, v in b["by_objects"].items()}, flush=True)

    analyse("renders", ref)
    for i, name in enumerate(a.models):
        pipe = Pipeline.from_pretrained(name, device=a.device)
        if i == 0:  # the models share the VAE
            t = time.time()
            analyse("VAE reconstructions", vae_roundtrip(pipe, ref))
            seconds["VAE reconstructions"] = time.time() - t
        d = pipe.defaults
        defaults = (f"{d['sampler']}, {d['steps']} steps, guidance {d['guidance_scale']}, "
                    f"negative prompt \"{d['negative_prompt']}\"")
        t = time.time()
        imgs = generate(pipe, prompts, a.seeds, a.batch)
        seconds[name] = time.time() - t
        analyse(name, imgs)
    meta = {
        "command": "python " + " ".join(sys.argv),
        "machine": (f"{platform.machine()} CPU, {os.cpu_count()} cores, {a.threads} torch thread(s), "
                    f"{a.device}, torch {torch.__version__}"),
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t_start)),
        "loadavg_start": load0, "loadavg_end": os.getloadavg()[0], "seconds": seconds,
        "prompts": a.prompts, "seeds": a.seeds, "images_per_run": len(rep), "defaults": defaults, "runs": runs,
    }
    (out / "models_errors.json").write_text(json.dumps(meta, indent=1) + "\n")
    if a.missing_grid:
        save_grid(np.concatenate(missing_rows), 16, Path(a.missing_grid))
    md = markdown(meta)
    (out / "models_errors.md").write_text("# Where the shapes models' errors are\n\n"
                                          "(`bench/bench_model_errors.py`; summary in models.md.)\n\n" + md)
    print(md)


if __name__ == "__main__":
    main()
