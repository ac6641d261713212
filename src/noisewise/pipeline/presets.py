"""Latency/quality presets: ``pipe(prompt, preset="balanced")``, ``noisewise generate --preset``,
``{"preset": "balanced"}`` in the HTTP API.

A preset fixes the sampler, steps and sampler options of a call, and the guidance scale where it
names one (None: the model's own default, so a preset picks the latency/quality point without
changing what a user's checkpoint was tuned for; explicit arguments override each).
``optimizations`` lists the pipeline-level transforms measured with it
(:func:`noisewise.pipeline.optimize.apply`; they change the loaded model, so a call does not apply
them: the CLI does with ``--preset``, a program calls :func:`prepare`). The values were chosen
from ``bench/bench_inference.py`` on the shipped models (``docs/benchmarks/inference.md``).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    name: str
    sampler: str
    steps: int
    guidance_scale: float | None = None  # None: the model's default scale
    sampler_options: dict[str, Any] = field(default_factory=dict)
    optimizations: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def nfe(self) -> int:
        """Network evaluations per image for a multistep sampler (2 per step with guidance; a preset
        that leaves the scale to the model counts as guided)."""
        return self.steps * (1 if self.guidance_scale == 1.0 else 2)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset("realtime", "dpmpp_2m", 6,
               description="lowest latency at the default's accuracy: 6 guided steps"),
        Preset("balanced", "dpmpp_2m", 12, description="12 guided steps in float32"),
        Preset("quality", "dpmpp_2m", 30, description="30 guided steps in float32"),
    )
}


def presets() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> Preset:
    if isinstance(name, Preset):
        return name
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), list(PRESETS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint} Presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_preset(
    name: str, sampler: str | None, steps: int | None, guidance_scale: float | None,
    sampler_options: dict[str, Any],
) -> tuple[str, int, float, dict[str, Any]]:
    """Fill what the caller left unset from the preset. The preset's sampler options apply only
    when its sampler is used (an explicit other sampler takes none of them)."""
    p = get_preset(name)
    opts = dict(sampler_options)
    if sampler is None or sampler == p.sampler:
        opts = {**p.sampler_options, **opts}
    return (
        sampler if sampler is not None else p.sampler,
        steps if steps is not None else p.steps,
        guidance_scale if guidance_scale is not None else p.guidance_scale,
        opts,
    )


def prepare(pipe: Any, name: str, **overrides: Any) -> Any:
    """Apply the preset's pipeline-level optimizations (e.g. bfloat16) to ``pipe`` in place."""
    from .optimize import apply

    opts = {**get_preset(name).optimizations, **overrides}
    return apply(pipe, **opts) if opts else pipe
