"""The "shapes" world: scenes with exact labels, sampled from a seed and rendered deterministically.

A :class:`Scene` holds everything needed to draw it (continuous positions, sizes, colours, defect
strengths), so :func:`render` is a pure function of the scene and :func:`sample_scene` a pure
function of its random generator. Images are 32x32 RGB, drawn at 4x and box-downsampled for clean
edges, as ``uint8`` arrays of shape ``(32, 32, 3)``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

Background = Literal["black", "white", "gray"]
Shape = Literal["circle", "square", "triangle", "cross"]
Color = Literal["red", "green", "blue", "yellow", "purple", "orange"]
Size = Literal["small", "large"]
Position = Literal["left", "right", "top", "bottom", "center"]
Defect = Literal["blurry", "noisy", "watermark"]

BACKGROUNDS: tuple[str, ...] = ("black", "white", "gray")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("left", "right", "top", "bottom", "center")
DEFECTS: tuple[str, ...] = ("blurry", "noisy", "watermark")

RESOLUTION = 32
SUPERSAMPLE = 4

BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "black": (0, 0, 0), "white": (255, 255, 255), "gray": (128, 128, 128),
}
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 80, 235),
    "yellow": (245, 225, 25),
    "purple": (150, 40, 205),
    "orange": (255, 135, 0),
}
# object centres in [0, 1] image coordinates (x to the right, y down)
POSITION_XY: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75), "center": (0.5, 0.5),
}
SIZE_RADIUS: dict[str, float] = {"small": 0.10, "large": 0.18}  # half extent, fraction of the image

# sampling priors
P_TWO_OBJECTS = 0.35
P_DEFECT: dict[str, float] = {"blurry": 0.15, "noisy": 0.15, "watermark": 0.15}
POSITION_JITTER = 0.03
SIZE_JITTER = 0.08
COLOR_JITTER = 12
MIN_GAP = 0.02  # between the bounding circles of two objects

# a small "logo + text" mark for the watermark, 4 x 9 pixels, drawn in the bottom-right corner
_WATERMARK = np.array(
    [
        [0, 1, 1, 0, 0, 1, 0, 1, 0],
        [1, 0, 0, 1, 0, 1, 0, 1, 0],
        [1, 0, 0, 1, 0, 1, 1, 1, 0],
        [0, 1, 1, 0, 0, 1, 0, 1, 1],
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class Obj:
    """One object: its labels, and the exact continuous parameters it is drawn with."""

    shape: str
    color: str
    size: str
    position: str
    cx: float
    cy: float
    radius: float
    rgb: tuple[int, int, int]


@dataclass(frozen=True)
class Scene:
    """A full image description: background, one or two objects at distinct positions, defects.

    ``defects`` maps each present defect to its strength (blur sigma in pixels, grain standard
    deviation in [0, 1] units, watermark opacity).
    """

    background: str
    objects: tuple[Obj, ...]
    defects: Mapping[str, float] = field(default_factory=dict)
    background_rgb: tuple[int, int, int] = (0, 0, 0)
    noise_seed: int = 0

    @property
    def defect_names(self) -> tuple[str, ...]:
        return tuple(d for d in DEFECTS if d in self.defects)

    def object_at(self, position: str) -> Obj | None:
        for o in self.objects:
            if o.position == position:
                return o
        return None


@dataclass(frozen=True)
class ObjectSpec:
    """Constraints for one object when sampling a scene; ``None`` = free."""

    shape: str | None = None
    color: str | None = None
    size: str | None = None
    position: str | None = None


def _check_choice(name: str, value: str | None, options: Sequence[str]) -> None:
    if value is not None and value not in options:
        raise ValueError(f"unknown {name} {value!r}; known: {', '.join(options)}")


def _overlaps(a: Obj, b: Obj) -> bool:
    return math.hypot(a.cx - b.cx, a.cy - b.cy) < a.radius + b.radius + MIN_GAP


def sample_scene(
    rng: np.random.Generator,
    *,
    objects: Sequence[ObjectSpec] | None = None,
    background: str | None = None,
    defects: Sequence[str] | None = None,
    max_tries: int = 200,
    p_two_objects: float | None = None,
) -> Scene:
    """Draw a scene from the prior, optionally constrained.

    Args:
        rng: the only source of randomness (``np.random.default_rng(seed)``).
        objects: one :class:`ObjectSpec` per object (fixes the number of objects and any attributes
            given); ``None`` draws one or two free objects.
        background: a fixed background, or ``None`` to draw one.
        defects: exactly these defects (``[]`` for a clean image), or ``None`` to draw them.
        p_two_objects: with ``objects=None``, the probability of two objects (default
            ``P_TWO_OBJECTS``); the same random draw decides it whatever the value.
    """
    _check_choice("background", background, BACKGROUNDS)
    if background is None:
        background = BACKGROUNDS[int(rng.integers(len(BACKGROUNDS)))]
    if objects is None:
        p2 = P_TWO_OBJECTS if p_two_objects is None else p_two_objects
        if not 0.0 <= p2 <= 1.0:
            raise ValueError(f"p_two_objects is a probability in [0, 1], got {p2}")
        objects = [ObjectSpec()] * (2 if rng.random() < p2 else 1)
    if not 1 <= len(objects) <= 2:
        raise ValueError(f"a scene holds one or two objects, got {len(objects)}")
    for spec in objects:
        _check_choice("shape", spec.shape, SHAPES)
        _check_choice("colour", spec.color, COLORS)
        _check_choice("size", spec.size, SIZES)
        _check_choice("position", spec.position, POSITIONS)
    fixed_pos = [s.position for s in objects if s.position is not None]
    if len(set(fixed_pos)) < len(fixed_pos):
        raise ValueError("two objects cannot share a position")

    placed: list[Obj] = []
    for _ in range(max_tries):
        placed = []
        taken = set(fixed_pos)
        for spec in objects:
            shape = spec.shape or SHAPES[int(rng.integers(len(SHAPES)))]
            color = spec.color or COLORS[int(rng.integers(len(COLORS)))]
            size = spec.size or SIZES[int(rng.integers(len(SIZES)))]
            if spec.position is not None:
                position = spec.position
            else:
                free = [p for p in POSITIONS if p not in taken]
                position = free[int(rng.integers(len(free)))]
                taken.add(position)
            x, y = POSITION_XY[position]
            cx = x + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
            cy = y + rng.uniform(-POSITION_JITTER, POSITION_JITTER)
            radius = SIZE_RADIUS[size] * (1.0 + rng.uniform(-SIZE_JITTER, SIZE_JITTER))
            base = np.array(COLOR_RGB[color])
            rgb = tuple(int(v) for v in np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255))
            placed.append(Obj(shape, color, size, position, float(cx), float(cy), float(radius), rgb))
        if len(placed) < 2 or not _overlaps(placed[0], placed[1]):
            break
    else:
        raise ValueError(
            "could not place the requested objects without overlap; choose positions further apart "
            "(e.g. left/right) or smaller sizes"
        )

    strengths: dict[str, float] = {}
    chosen = [d for d in DEFECTS if rng.random() < P_DEFECT[d]] if defects is None else list(defects)
    for d in chosen:
        _check_choice("defect", d, DEFECTS)
    for d in DEFECTS:  # fixed draw order: strengths do not depend on which others are present
        s = {"blurry": rng.uniform(0.9, 1.4), "noisy": rng.uniform(0.06, 0.10), "watermark": rng.uniform(0.35, 0.5)}[d]
        if d in chosen:
            strengths[d] = float(s)
    jitter = int(rng.integers(-6, 7)) if background == "gray" else 0
    bg_rgb = tuple(int(np.clip(v + jitter, 0, 255)) for v in BACKGROUND_RGB[background])
    return Scene(background, tuple(placed), strengths, bg_rgb, int(rng.integers(2**31)))


# ------------------------------------------------------------------------------------------------
# rendering
# ------------------------------------------------------------------------------------------------


def _coords() -> tuple[np.ndarray, np.ndarray]:
    n = RESOLUTION * SUPERSAMPLE
    c = (np.arange(n) + 0.5) / n
    return np.meshgrid(c, c)  # xx, yy (y down)


_XX, _YY = _coords()


def shape_mask(shape: str, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean mask of one shape on the supersampled canvas."""
    dx, dy = _XX - cx, _YY - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        h = r * 0.85
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        # upward triangle inscribed in the circle of radius r (apex at the top), centred vertically
        top, base = -r * 0.95, r * 0.75
        half_w = r * 1.0
        t = (dy - top) / (base - top)  # 0 at apex, 1 at base
        return (t >= 0) & (t <= 1) & (np.abs(dx) <= half_w * t)
    if shape == "cross":
        w = r * 0.32
        return ((np.abs(dx) <= r) & (np.abs(dy) <= w)) | ((np.abs(dy) <= r) & (np.abs(dx) <= w))
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def _blur_matrix(sigma: float, n: int = RESOLUTION) -> np.ndarray:
    """``n x n`` Gaussian blur operator with reflected borders (rows sum to 1)."""
    radius = int(math.ceil(3 * sigma))
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    m = np.zeros((n, n))
    for i in range(n):
        for o, w in zip(range(-radius, radius + 1), k):
            j = i + o
            j = -j - 1 if j < 0 else (2 * n - j - 1 if j >= n else j)
            m[i, j] += w
    return m


def render(scene: Scene) -> np.ndarray:
    """Draw a scene: ``uint8`` array ``(32, 32, 3)``."""
    n = RESOLUTION * SUPERSAMPLE
    canvas = np.empty((n, n, 3))
    canvas[:] = np.array(scene.background_rgb, dtype=np.float64) / 255.0
    for o in scene.objects:
        canvas[shape_mask(o.shape, o.cx, o.cy, o.radius)] = np.array(o.rgb) / 255.0
    img = canvas.reshape(RESOLUTION, SUPERSAMPLE, RESOLUTION, SUPERSAMPLE, 3).mean(axis=(1, 3))
    d = scene.defects
    if "blurry" in d:
        b = _blur_matrix(d["blurry"])
        img = np.stack([b @ img[..., c] @ b.T for c in range(3)], axis=-1)
    if "watermark" in d:
        h, w = _WATERMARK.shape
        mark = 1.0 if scene.background != "white" else 0.15
        y0, x0 = RESOLUTION - h - 2, RESOLUTION - w - 2
        a = d["watermark"] * _WATERMARK[..., None]
        img[y0 : y0 + h, x0 : x0 + w] = (1 - a) * img[y0 : y0 + h, x0 : x0 + w] + a * mark
    if "noisy" in d:
        grain = np.random.default_rng(scene.noise_seed).standard_normal(img.shape)
        img = img + d["noisy"] * grain
    return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------
# exact labels as arrays (for classifiers)
# ------------------------------------------------------------------------------------------------

NO_OBJECT = -1


def labels(scene: Scene) -> dict[str, np.ndarray]:
    """Exact labels as integer arrays, one slot per position (``-1`` = nothing there):

    ``background`` (), ``shape`` / ``color`` / ``size`` (5,) in :data:`POSITIONS` order,
    ``defects`` (3,) 0/1 in :data:`DEFECTS` order.
    """
    shape = np.full(len(POSITIONS), NO_OBJECT, dtype=np.int64)
    color, size = shape.copy(), shape.copy()
    for o in scene.objects:
        p = POSITIONS.index(o.position)
        shape[p], color[p], size[p] = SHAPES.index(o.shape), COLORS.index(o.color), SIZES.index(o.size)
    return {
        "background": np.array(BACKGROUNDS.index(scene.background), dtype=np.int64),
        "shape": shape,
        "color": color,
        "size": size,
        "defects": np.array([d in scene.defects for d in DEFECTS], dtype=np.int64),
    }
