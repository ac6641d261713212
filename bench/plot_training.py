#!/usr/bin/env python
"""Training curves of the shipped shapes models, from docs/benchmarks/models_training.json, and of
the 2-hour CPU runs, from docs/benchmarks/models_cpu2h.json.

    python bench/plot_training.py          # -> docs/benchmarks/models_training.png
    python bench/plot_training.py --cpu2h  # -> docs/benchmarks/models_cpu2h_training.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

DOCS = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


def main() -> None:
    data = json.loads((DOCS / "models_training.json").read_text())
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.4))
    for ax, key, title in zip(axes, ["vae", "evaluator", "unet-vp", "unet-flow"],
                              ["VAE (MSE + grain + KL)", "evaluator (sum of CE)", "shapes-vp (min-SNR eps MSE)",
                               "shapes-flow (velocity MSE)"]):
        h = data[key]["history"]
        ax.plot([p["step"] for p in h], [p["loss"] for p in h])
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("training loss (mean of 100 steps)")
    for ax in axes[2:]:
        ax.axvline(_resume_step(data, ax.get_title()),
                   color="gray", ls=":", lw=1)
    fig.tight_layout()
    fig.savefig(DOCS / "models_training.png", dpi=110)
    print("wrote", DOCS / "models_training.png")


def _resume_step(data: dict, title: str) -> int:
    """The step where the second device run resumed (the time column restarts there)."""
    h = data["unet-vp" if title.startswith("shapes-vp") else "unet-flow"]["history"]
    for a, b in zip(h, h[1:]):
        if b["time"] < a["time"]:
            return a["step"]
    return h[-1]["step"]


CPU2H_RUNS = {"run_e_session12": "cpu-2h, flow at t-location 0.5 (run E, session 12)",
              "run_d_session10": "cpu-2h, batch 64 at 2e-3 (run D, session 10)",
              "recipe_cpu_2h": "cpu-2h, batch 128 at 5e-4, two lanes (run C, session 8)",
              "second_attempt_one_stage_at_a_time": "cpu-2h, one stage at a time (session 7)"}


def cpu2h() -> None:
    """Loss against training seconds, per stage, for the 2-hour CPU runs: the same budget, the steps
    each arrangement fits in it."""
    data = json.loads((DOCS / "models_cpu2h.json").read_text())
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    for ax, key in zip(axes, ["vae", "evaluator", "unet-vp", "unet-flow"]):
        for run, label in CPU2H_RUNS.items():
            if run not in data or key not in data[run]:
                continue
            h = data[run][key]["history"]
            ax.plot([p["time"] for p in h], [p["loss"] for p in h], label=f"{label}: {h[-1]['step']:,} steps")
        ax.set_yscale("log")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("training seconds")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="upper right")
    axes[0].set_ylabel("training loss (mean of 100 steps)")
    fig.tight_layout()
    fig.savefig(DOCS / "models_cpu2h_training.png", dpi=110)
    print("wrote", DOCS / "models_cpu2h_training.png")


if __name__ == "__main__":
    if "--cpu2h" in sys.argv[1:]:
        cpu2h()
    else:
        main()
