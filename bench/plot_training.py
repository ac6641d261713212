#!/usr/bin/env python
"""Training curves of the shipped shapes models, from docs/benchmarks/models_training.json.

    python bench/plot_training.py      # -> docs/benchmarks/models_training.png
"""

from __future__ import annotations

import json
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


if __name__ == "__main__":
    main()
