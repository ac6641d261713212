"""The ranges that the user-facing entry points accept for a request's numbers: ``noisewise generate``,
the HTTP API's schema (a server may set lower limits on steps and images, ``noisewise serve --max-steps``)
and ``noisewise batch`` files and options. One table, so the three agree.

The Python API checks only what has a meaning (a negative scale must be finite and >= 0, steps >= 1):
research code may go past these ranges on purpose.
"""

from __future__ import annotations

import math
from typing import Any

STEPS = (1, 1000)
GUIDANCE_SCALE = (0.0, 50.0)
NEGATIVE_SCALE = (0.0, 50.0)
NEGATIVE_ABOVE = (0.0, 1000.0)  # a noise level sigma / alpha (docs/guidance.md)
SEED = (0, 2**62)
NUM_IMAGES = (1, 64)
# image-to-image: how an init image of another size becomes the model's (noisewise.pipeline.img2img)
RESIZE_MODES = ("auto", "crop", "stretch", "off")


def check_int(value: Any, bounds: tuple[int, int], name: str) -> int:
    """``value`` as an int within ``bounds`` (inclusive); ValueError naming ``name`` otherwise. A float
    with no fraction (``4.0``) is taken; ``True`` and text are not."""
    lo, hi = bounds
    ok = not isinstance(value, bool) and (isinstance(value, int) or isinstance(value, float) and value.is_integer())
    if not ok:
        raise ValueError(f"{name} must be a whole number from {lo} to {hi}, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be from {lo} to {hi}, got {int(value)}")
    return int(value)


def check_float(value: Any, bounds: tuple[float, float], name: str) -> float:
    """``value`` as a float within ``bounds`` (inclusive); ValueError naming ``name`` otherwise."""
    lo, hi = bounds
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}")
    if not lo <= value <= hi:
        raise ValueError(f"{name} must be from {lo:g} to {hi:g}, got {value:g}")
    return float(value)
