"""The ranges that the user-facing entry points accept for a request's numbers: ``noisewise generate``,
the HTTP API's schema (a server may set lower limits on steps and images, ``noisewise serve --max-steps``)
and ``noisewise batch`` files and options. One table, so the three agree. Then the bounds of the
server's operator settings (:data:`SERVER_SETTINGS`), which ``ServerConfig`` and ``noisewise serve``
both check.

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


# the server's operator settings (noisewise.server.ServerConfig, noisewise serve): field ->
# (whole number?, lowest, highest or None, lowest excluded?)
SERVER_SETTINGS: dict[str, tuple[bool, float, float | None, bool]] = {
    "max_active": (True, 1, None, False),
    "max_queue": (True, 0, None, False),  # 0: no request waits; one beyond max_active gets 429
    "max_batch": (True, 1, None, False),
    "max_wait_s": (False, 0.0, None, False),
    "max_steps": (True, 1, STEPS[1], False),
    "max_images": (True, 1, NUM_IMAGES[1], False),
    "max_prompt_chars": (True, 1, 2000, False),  # the request schema's own limit is 2000 characters
    "request_timeout_s": (False, 0.0, None, True),
    "max_body_bytes": (True, 1024, None, False),
    "max_image_bytes": (True, 1, None, False),
    "max_image_pixels": (True, 1, None, False),
    "shutdown_grace_s": (False, 0.0, None, False),
    "torch_threads": (True, 1, None, False),
}


def check_setting(field: str, value: Any, name: str | None = None) -> int | float:
    """``value`` checked against ``SERVER_SETTINGS[field]``: the value as int or float, or ValueError
    naming ``name`` (default: the field) and what it takes. A float with no fraction is a whole number."""
    whole, lo, hi, strict = SERVER_SETTINGS[field]
    span = (f"above {lo:g}" if strict else f"at least {lo:g}") + ("" if hi is None else f" and at most {hi:g}")
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and whole:
        ok = isinstance(value, int) or float(value).is_integer()
    if ok:
        ok = (value > lo if strict else value >= lo) and (hi is None or value <= hi)
    if not ok:
        raise ValueError(f"{name or field} must be {'a whole number' if whole else 'a number'} {span}, got {value!r}")
    return int(value) if whole else float(value)
