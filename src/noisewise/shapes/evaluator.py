"""The shapes evaluator: a classifier that reads every attribute and defect of a 32x32 image, and
whose features give a Fréchet distance (FD) between sets of images.

Outputs, per image: the background, for each of the five positions whether an object is there
and its shape, colour and size, and the three defects. Trained on renders from
:mod:`noisewise.shapes.world` (``noisewise.shapes.training.train_evaluator``); the shipped weights
live in ``noisewise/weights/shapes-evaluator``.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .captions import Request
from .world import BACKGROUNDS, COLORS, DEFECTS, POSITIONS, SHAPES, SIZES

Tensor = torch.Tensor

EVALUATOR_CONFIG: dict[str, Any] = {"channels": [32, 64, 128], "features": 256}
HEADS: dict[str, int] = {
    "background": len(BACKGROUNDS),
    "defects": len(DEFECTS),
    "shape": len(POSITIONS) * (len(SHAPES) + 1),  # per slot: nothing + 4 shapes
    "color": len(POSITIONS) * len(COLORS),
    "size": len(POSITIONS) * len(SIZES),
}


def shipped_evaluator_path() -> Path:
    return Path(__file__).resolve().parent.parent / "weights" / "shapes-evaluator"


class ShapesClassifier(nn.Module):
    """A small VGG-style CNN: three conv stages, a 256-d feature layer, one linear head per label."""

    def __init__(self, channels: Sequence[int] = (32, 64, 128), features: int = 256) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3
        for c in channels:
            layers += [
                nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = c
        self.convs = nn.Sequential(*layers)
        side = 32 // 2 ** len(channels)
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(c_in * side * side, features), nn.ReLU(inplace=True))
        self.heads = nn.ModuleDict({k: nn.Linear(features, n) for k, n in HEADS.items()})

    def features(self, x: Tensor) -> Tensor:
        """``x``: float ``(B, 3, 32, 32)`` in [0, 1] -> ``(B, features)``."""
        return self.fc(self.convs((x - 0.5) / 0.25))

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        f = self.features(x)
        out = {k: h(f) for k, h in self.heads.items()}
        b = x.shape[0]
        out["shape"] = out["shape"].view(b, len(POSITIONS), len(SHAPES) + 1)
        out["color"] = out["color"].view(b, len(POSITIONS), len(COLORS))
        out["size"] = out["size"].view(b, len(POSITIONS), len(SIZES))
        out["features"] = f
        return out


def classifier_loss(out: dict[str, Tensor], labels: dict[str, Tensor]) -> Tensor:
    """Sum of the per-label losses; ``labels`` as :func:`noisewise.shapes.world.labels` (batched)."""
    f = nn.functional
    present = labels["shape"] >= 0
    loss = f.cross_entropy(out["background"], labels["background"])
    loss = loss + f.binary_cross_entropy_with_logits(out["defects"], labels["defects"].float())
    loss = loss + f.cross_entropy(out["shape"].flatten(0, 1), (labels["shape"] + 1).flatten())
    if bool(present.any()):
        loss = loss + f.cross_entropy(out["color"][present], labels["color"][present])
        loss = loss + f.cross_entropy(out["size"][present], labels["size"][present])
    return loss


@dataclass(frozen=True)
class PredictedObject:
    shape: str
    color: str
    size: str
    position: str


@dataclass(frozen=True)
class Prediction:
    background: str
    objects: tuple[PredictedObject, ...]
    defects: tuple[str, ...]


def _images(images: np.ndarray | Tensor) -> Tensor:
    from ..pipeline.vae import images_to_tensor

    return images_to_tensor(images)


class Evaluator:
    """Loads the classifier and scores images: attributes, defects, features, FD."""

    def __init__(self, model: ShapesClassifier, device: str | torch.device = "cpu") -> None:
        self.model = model.eval().to(device)
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str] | None = None, device: str = "cpu") -> Evaluator:
        from safetensors.torch import load_file

        folder = Path(path) if path is not None else shipped_evaluator_path()
        cfg_file, weights = folder / "config.json", folder / "model.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"no evaluator weights at {weights}")
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else dict(EVALUATOR_CONFIG)
        model = ShapesClassifier(cfg["channels"], cfg["features"])
        state = {k: v.float() for k, v in load_file(str(weights)).items()}
        model.load_state_dict(state)
        return cls(model, device)

    @torch.no_grad()
    def logits(self, images: np.ndarray | Tensor, batch_size: int = 512) -> dict[str, Tensor]:
        x = _images(images)
        outs = [self.model(x[i : i + batch_size].to(self.device)) for i in range(0, len(x), batch_size)]
        return {k: torch.cat([o[k] for o in outs]).float().cpu() for k in outs[0]}

    def features(self, images: np.ndarray | Tensor) -> Tensor:
        return self.logits(images)["features"]

    def predict(self, images: np.ndarray | Tensor) -> list[Prediction]:
        out = self.logits(images)
        bg = out["background"].argmax(-1)
        shape = out["shape"].argmax(-1) - 1
        color, size = out["color"].argmax(-1), out["size"].argmax(-1)
        defects = out["defects"] > 0
        preds = []
        for i in range(len(bg)):
            objs = tuple(
                PredictedObject(
                    SHAPES[int(shape[i, p])], COLORS[int(color[i, p])], SIZES[int(size[i, p])], POSITIONS[p]
                )
                for p in range(len(POSITIONS)) if int(shape[i, p]) >= 0
            )
            found = tuple(d for d, on in zip(DEFECTS, defects[i]) if on)
            preds.append(Prediction(BACKGROUNDS[int(bg[i])], objs, found))
        return preds


ATTRIBUTES: tuple[str, ...] = ("background", "shape", "color", "size", "position")


def match_objects(request: Request, pred: Prediction) -> list[PredictedObject | None]:
    """For each of the (first two) requested objects, the predicted object it is scored against:
    the assignment that satisfies the most requested attributes (the first such in order); ``None``
    where no predicted object is left for it."""
    req = list(request.objects[:2])
    if not req:
        return []
    cands: list[PredictedObject | None] = list(pred.objects) + [None] * len(req)
    best: list[PredictedObject | None] = []
    best_n = -1
    for perm in itertools.permutations(range(len(cands)), len(req)):
        chosen = [cands[j] for j in perm]
        n = sum(o is not None and getattr(o, a) == getattr(r, a)
                for r, o in zip(req, chosen) for a in ("shape", "color", "size", "position"))
        if n > best_n:
            best, best_n = chosen, n
    return best


def score(request: Request, pred: Prediction) -> dict[str, list[bool]]:
    """For every attribute the request names: was it satisfied? Requested objects are matched to
    predicted objects by :func:`match_objects` (an object with no match fails all its attributes)."""
    result: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    if request.background is not None:
        result["background"].append(pred.background == request.background)
    for r, o in zip(request.objects[:2], match_objects(request, pred)):
        for a in ("shape", "color", "size", "position"):
            if getattr(r, a) is not None:
                result[a].append(o is not None and getattr(o, a) == getattr(r, a))
    return result


def frechet_distance(f1: Tensor, f2: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` (float64 maths)."""
    a, b = f1.double(), f2.double()
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s1)
    s1h = (v * w.clamp(min=0).sqrt()) @ v.T
    m = s1h @ s2 @ s1h
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    return float((mu1 - mu2).pow(2).sum() + s1.trace() + s2.trace() - 2 * tr_sqrt)


def attribute_accuracy(requests: Sequence[Request], predictions: Sequence[Prediction]) -> dict[str, Any]:
    """Accuracy of every requested attribute over a set of (request, prediction) pairs, per
    attribute (``color`` ...), with counts (``n_color`` ...), ``all`` (every attribute of a prompt
    right) and ``defect_rate`` (share of images with any defect detected)."""
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    whole = []
    for r, p in zip(requests, predictions):
        s = score(r, p)
        for a in ATTRIBUTES:
            hits[a] += s[a]
        whole.append(all(all(v) for v in s.values()))
    out: dict[str, Any] = {}
    for a in ATTRIBUTES:
        out[a] = float(np.mean(hits[a])) if hits[a] else float("nan")
        out[f"n_{a}"] = len(hits[a])
    out["all"] = float(np.mean(whole)) if whole else float("nan")
    out["defect_rate"] = float(np.mean([bool(p.defects) for p in predictions])) if predictions else float("nan")
    for d in DEFECTS:
        out[f"rate_{d}"] = float(np.mean([d in p.defects for p in predictions])) if predictions else float("nan")
    return out


def benchmark_prompts(n: int = 200, seed: int = 20_000) -> list[str]:
    """``n`` distinct, non-empty captions of clean scenes (they name objects, never defects)."""
    from .captions import caption, parse_prompt
    from .world import sample_scene

    out: list[str] = []
    i = 0
    while len(out) < n:
        rng = np.random.default_rng([seed, i])
        c = caption(sample_scene(rng, defects=[]), rng)
        i += 1
        if c and parse_prompt(c).objects and c not in out:
            out.append(c)
    return out
