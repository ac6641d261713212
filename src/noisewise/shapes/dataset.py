"""Rendered shapes datasets: images, exact labels and captions, deterministic per index.

Image ``i`` of a dataset with seed ``s`` depends on ``(s, i)`` only (``np.random.default_rng([s, i])``),
so a dataset renders identically in any number of worker processes and any chunking.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .captions import caption
from .world import Scene, labels, render, sample_scene

LABEL_KEYS: tuple[str, ...] = ("background", "shape", "color", "size", "defects")


def scene_at(seed: int, index: int) -> Scene:
    return sample_scene(np.random.default_rng([seed, index]))


def captions_at(scene: Scene, seed: int, index: int, n: int) -> list[str]:
    return [caption(scene, np.random.default_rng([seed, index, 1 + k])) for k in range(n)]


@dataclass
class ShapesData:
    """``images``: uint8 ``(N, 32, 32, 3)``; ``labels``: arrays as :func:`world.labels`, batched;
    ``captions``: ``n_captions`` captions per image."""

    images: np.ndarray
    labels: dict[str, np.ndarray]
    captions: list[list[str]]
    seed: int

    def __len__(self) -> int:
        return len(self.images)

    def save(self, folder: str | os.PathLike[str]) -> None:
        f = Path(folder)
        f.mkdir(parents=True, exist_ok=True)
        np.save(f / "images.npy", self.images)
        np.savez(f / "labels.npz", **self.labels)
        (f / "captions.json").write_text(json.dumps({"seed": self.seed, "captions": self.captions}))

    @classmethod
    def load(cls, folder: str | os.PathLike[str], mmap: bool = False) -> ShapesData:
        f = Path(folder)
        images = np.load(f / "images.npy", mmap_mode="r" if mmap else None)
        with np.load(f / "labels.npz") as z:
            lab = {k: z[k] for k in z.files}
        meta = json.loads((f / "captions.json").read_text())
        return cls(images, lab, meta["captions"], int(meta["seed"]))


def _render_chunk(
    args: tuple[int, int, int, int, bool, float | None],
) -> tuple[np.ndarray, dict[str, np.ndarray], list[list[str]]]:
    seed, start, stop, n_captions, clean, p_two = args
    imgs = np.empty((stop - start, 32, 32, 3), dtype=np.uint8)
    labs: dict[str, list[np.ndarray]] = {k: [] for k in LABEL_KEYS}
    caps = []
    for j, i in enumerate(range(start, stop)):
        rng = np.random.default_rng([seed, i])
        scene = sample_scene(rng, defects=[] if clean else None, p_two_objects=p_two)
        imgs[j] = render(scene)
        for k, v in labels(scene).items():
            labs[k].append(v)
        caps.append(captions_at(scene, seed, i, n_captions))
    return imgs, {k: np.stack(v) for k, v in labs.items()}, caps


def build_dataset(
    n: int, seed: int = 0, *, n_captions: int = 2, workers: int = 1, clean: bool = False, chunk: int = 2000,
    p_two_objects: float | None = None,
) -> ShapesData:
    """Render ``n`` scenes (index ``0 .. n-1`` of seed ``seed``) with labels and captions.

    ``clean=True`` draws no defects (for held-out accuracy on clean renders). ``p_two_objects``:
    the share of two-object scenes (default ``world.P_TWO_OBJECTS``, 0.35).
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    jobs = [(seed, s, min(n, s + chunk), n_captions, clean, p_two_objects) for s in range(0, n, chunk)]
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(workers) as ex:
            parts = list(ex.map(_render_chunk, jobs))
    else:
        parts = [_render_chunk(j) for j in jobs]
    images = np.concatenate([p[0] for p in parts])
    lab = {k: np.concatenate([p[1][k] for p in parts]) for k in LABEL_KEYS}
    caps = [c for p in parts for c in p[2]]
    return ShapesData(images, lab, caps, seed)


def render_scenes(scenes: Sequence[Scene]) -> np.ndarray:
    return np.stack([render(s) for s in scenes]) if scenes else np.zeros((0, 32, 32, 3), np.uint8)
