#!/usr/bin/env python
"""Attribute accuracy of a training run's denoiser, for short A/B tests of training settings.

Exports ``<run>/export`` to ``<run>/weights`` (as ``train_shapes.py export`` does), generates one image
per prompt and seed with ``--kind``'s model, and reads them with an evaluator; prints and appends one
json line to ``--out``. The prompts are ``train_shapes.py defaults``' (seed 40,000), not the
benchmark's, so a setting chosen on them is not chosen on the benchmark::

    python bench/probe_denoiser.py --run /tmp/ab/r1a --kind vp --evaluator /tmp/cpu2h-c/models/shapes-evaluator

(docs/benchmarks/models_cpu2h.md has the A/B runs it measured.)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "train"))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="a train_shapes.py run folder with export/unet-<kind>.safetensors")
    p.add_argument("--kind", choices=["vp", "flow"], required=True)
    p.add_argument("--evaluator", required=True, help="an evaluator folder (e.g. <run>/models/shapes-evaluator)")
    p.add_argument("--n-prompts", type=int, default=200)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--negative-prompt", default=None,
                   help="default: the model's (the defaults stage probes guidance scales with \"\": none)")
    p.add_argument("--negative-scale", type=float, default=None, help="default: the model's")
    p.add_argument("--negative-above", type=float, default=None,
                   help="with a negative scale: the negative acts only at noise levels sigma/alpha at or above this "
                        "(default: the model's)")
    p.add_argument("--negative-perpendicular", action=argparse.BooleanOptionalAction, default=None,
                   help="with a negative scale: subtract only the negative's part perpendicular to the prompt's "
                        "direction (default: the model's)")
    p.add_argument("--two-objects", action="store_true",
                   help="keep only those of the --n-prompts prompts that name two objects (where colours leak "
                        "between objects)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="append the result as a json line here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)

    import train_shapes as TS

    run = Path(a.run)
    meta = json.loads((run / "export" / f"unet-{a.kind}.json").read_text())
    probe = TS._Probe(argparse.Namespace(run=a.run, device="cpu", n_prompts=a.n_prompts, text_encoder=None),
                      prompt_seed=TS.DEFAULTS_PROMPT_SEED, evaluator=a.evaluator)
    if a.two_objects:
        keep = [i for i, r in enumerate(probe.requests) if len(r.objects) == 2]
        if not keep:
            raise SystemExit(f"none of the {a.n_prompts} prompts names two objects: raise --n-prompts")
        probe.prompts, probe.requests = [probe.prompts[i] for i in keep], [probe.requests[i] for i in keep]
    pipe = probe.pipeline(run / "weights" / f"shapes-{a.kind}")
    t0 = time.time()
    mean = {k: v for k, v in probe.seed_mean(pipe, a.seeds, guidance_scale=a.guidance,
                                             negative_prompt=a.negative_prompt,
                                             negative_scale=a.negative_scale,
                                             negative_above=a.negative_above,
                                             negative_perpendicular=a.negative_perpendicular).items()
            if not k.startswith("rate_")}
    negative, scale, above, perp = pipe.resolve_negative(a.negative_prompt, a.negative_scale, a.negative_above,
                                                         negative_perpendicular=a.negative_perpendicular)
    row = {"run": str(run), "kind": a.kind, "steps": meta["steps"], "batch_size": meta["batch_size"],
           "lr": meta["lr"], "guidance": a.guidance,
           "negative_prompt": negative,
           "negative_scale": scale,
           "negative_above": above,
           "negative_perpendicular": perp,
           "seeds": a.seeds, "n_prompts": len(probe.prompts), "two_objects": a.two_objects,
           "evaluator": a.evaluator, **{k: round(v, 4) for k, v in mean.items()},
           "seconds": round(time.time() - t0, 1)}
    print(json.dumps(row))
    if a.out:
        with open(a.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
