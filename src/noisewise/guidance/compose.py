"""Composable guidance (Liu et al. 2022, "Compositional Visual Generation with Composable
Diffusion Models"): several conditions steer one sample, all in one batched forward per step.

For a sample with full conditioning ``c``, guiding (unconditional or negative) conditioning ``u``
and component conditionings ``c_1 .. c_k`` (e.g. the object phrases of a two-object prompt), the
data prediction is

    D = D(u) + w (D(c) - D(u)) + sum_i w_i (D(c_i) - D(u))

``w = guidance_scale`` and no components is plain classifier-free guidance; ``w = 0`` and ``w_i = 1``
is the product of the component conditionals ``p(x | c_1) ... p(x | c_k) / p(x)^(k-1)`` (the
paper's AND). The weights on the data predictions sum to one, so combining in x0, epsilon, v or
flow space gives the same result: the combination is done on x0.

Samples of one batch may have different numbers of components (a one-object prompt has none and
gets plain CFG). Rows per step: ``B`` guiding rows, the full-prompt rows of the samples with
``w != 0``, and one row per component.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..core.grid import Level
from ..models.denoiser import ModelDenoiser
from .guided import (
    CondDenoise,
    _cat,
    _check_cond,
    _ChunkedForward,
    _leaves,
    _map,
    _same_layout,
    _take,
    check_negative_above,
    check_negative_perpendicular,
    check_noise_level,
    check_scale,
    conditional_denoiser,
    perpendicular_part,
    split_negative,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class Composition:
    """Component conditionings of a batch: ``cond`` has one row per component (a tensor or a
    tuple/dict of them, laid out like the full conditioning), ``owner[r]`` is the sample row ``r``
    steers and ``weight[r]`` its weight ``w_r``. Build it with :meth:`from_lists`.

    ``mask`` (optional, ``(R, ...)`` broadcastable to one sample, e.g. ``(R, 1, H, W)``): a spatial
    weight per component (regional prompting). ``relative``: ``"guide"`` adds
    ``w_r m_r (D(c_r) - D(u))``; ``"cond"`` adds ``w_r m_r (D(c_r) - D(c))``, so that with
    ``w_r = w`` and ``m_r = 1`` the component's prompt replaces the full prompt there.

    ``low_noise_cond`` (optional, laid out like ``cond``): the component conditionings used instead
    of ``cond`` at the levels with ``sigma / alpha <= low_noise_below`` (regional prompting names
    the other objects there, so a one-object phrase does not erase what is already drawn)."""

    cond: Any
    owner: Sequence[int]
    weight: Sequence[float]
    mask: Tensor | None = None
    relative: str = "guide"
    low_noise_cond: Any = None
    low_noise_below: float = 0.0

    @classmethod
    def from_lists(cls, conds: Sequence[Sequence[Any]], weights: Sequence[Sequence[float]] | float) -> Composition:
        """``conds[b]``: the component conditionings of sample ``b`` (each with a leading batch
        dimension of 1, or none), ``weights[b][i]`` their weights (or one number for all)."""
        rows, owner, weight = [], [], []
        for b, cs in enumerate(conds):
            ws = [float(weights)] * len(cs) if isinstance(weights, (int, float)) else list(weights[b])
            if len(ws) != len(cs):
                raise ValueError(f"sample {b}: {len(cs)} components but {len(ws)} weights")
            for c, w in zip(cs, ws):
                rows.append(_map(lambda t: t if t.ndim and t.shape[0] == 1 else t.unsqueeze(0), c))
                owner.append(b)
                weight.append(w)
        return cls(_cat(rows) if rows else None, owner, weight)

    def __len__(self) -> int:
        return len(self.owner)


class ComposedDenoiser(_ChunkedForward):
    """Composable guidance around a conditional denoiser; itself a denoiser ``D(x, level) -> x0``.

    Args:
        denoise: ``D(x, level, cond) -> x0`` (one network call per invocation), or a
            :class:`ModelDenoiser` (wrapped with :func:`conditional_denoiser`).
        cond: the full conditioning of each sample (batch-aligned).
        guide: the guiding conditioning (unconditional or negative), same layout.
        guidance_scale: ``w`` on the full conditioning, a number or one per sample (``0`` drops the
            full-prompt rows of those samples).
        composition: the component rows (:class:`Composition`); ``None`` or empty = plain CFG.
        max_batch: most rows per network call (None: all rows of a step in one call).
        negative / negative_scale: a negative conditioning with its own weight ``s``: the sum gets
            ``- s (D(n) - D(guide))`` (one more row per sample; ``guide`` is then the unconditional
            conditioning). None or 0: no such term.
        negative_above: that term (and its rows) only at noise levels ``sigma / alpha`` at or above
            this; 0: at every level.
        negative_perpendicular: subtract only the part of ``D(n) - D(guide)`` perpendicular to the
            sum of the positive terms, per sample (Perp-Neg; see
            :class:`~noisewise.guidance.GuidedDenoiser`).

    Counts like :class:`~noisewise.guidance.GuidedDenoiser`: ``nfe`` (branches per step, the
    largest number any sample uses, summed over steps), ``calls`` (forward passes) and ``rows``.
    """

    def __init__(
        self,
        denoise: CondDenoise | ModelDenoiser,
        *,
        cond: Any,
        guide: Any,
        guidance_scale: Any = 1.0,
        composition: Composition | None = None,
        max_batch: int | None = None,
        batch: int | None = None,
        negative: Any = None,
        negative_scale: float | None = None,
        negative_above: float = 0.0,
        negative_perpendicular: bool = False,
    ) -> None:
        self.model_denoiser = denoise if isinstance(denoise, ModelDenoiser) else None
        self.denoise: CondDenoise = conditional_denoiser(denoise) if isinstance(denoise, ModelDenoiser) else denoise
        if cond is None or guide is None:
            raise ValueError("composable guidance needs cond= (the full prompt) and a guiding branch (uncond= or "
                             "negative=)")
        if batch is None:
            batch = _leaves(cond)[0].shape[0]
        self.batch = batch
        self.cond = _check_cond(cond, "cond", batch)
        self.guide = _check_cond(guide, "guide", batch)
        _same_layout(self.cond, self.guide, "cond", "guide")
        replacing, weighted, self.negative_scale = split_negative(self.guide, negative, negative_scale)
        self.negative_above = check_negative_above(negative_above, negative_scale)
        self.negative_perpendicular = check_negative_perpendicular(negative_perpendicular, negative_scale)
        if replacing is not None:
            raise ValueError("negative= is the negative with its own weight: give negative_scale= too, or pass a "
                             "negative that replaces the unconditional branch as guide=")
        self.neg = None  # a separately weighted negative: - s (D(n) - D(u)), one more row per sample
        if weighted is not None:
            self.neg = _check_cond(weighted, "negative", batch)
            _same_layout(self.cond, self.neg, "cond", "negative")
        self.scale = check_scale(guidance_scale, batch)
        comp = composition if composition is not None and len(composition) else None
        if comp is not None:
            owner = torch.as_tensor(list(comp.owner), dtype=torch.long)
            if owner.ndim != 1 or bool((owner < 0).any()) or bool((owner >= batch).any()):
                raise ValueError(f"composition owners must be sample indices in [0, {batch}), got {owner.tolist()}")
            weight = torch.as_tensor(list(comp.weight), dtype=torch.float64)
            if weight.shape != owner.shape or not bool(torch.isfinite(weight).all()):
                raise ValueError("composition weights must be finite, one per component row")
            n = int(owner.numel())
            self.comp_cond = _check_cond(comp.cond, "composition cond", n)
            _same_layout(self.cond, self.comp_cond, "cond", "composition cond")
            self.owner, self.comp_weight = owner, weight
            if comp.relative not in ("guide", "cond"):
                raise ValueError(f"composition relative must be 'guide' or 'cond', got {comp.relative!r}")
            self.relative = comp.relative
            if comp.mask is not None and (not isinstance(comp.mask, Tensor) or comp.mask.shape[0] != n):
                raise ValueError(f"composition mask must be a tensor with one row per component ({n})")
            self.mask = comp.mask
            below = check_noise_level(comp.low_noise_below, "composition low_noise_below")
            self.low_cond = None
            if comp.low_noise_cond is not None:
                self.low_cond = _check_cond(comp.low_noise_cond, "composition low_noise_cond", n)
                _same_layout(self.comp_cond, self.low_cond, "composition cond", "composition low_noise_cond")
            self.low_below = below if self.low_cond is not None else 0.0
        else:
            self.comp_cond, self.owner, self.comp_weight = None, torch.zeros(0, dtype=torch.long), torch.zeros(0)
            self.relative, self.mask, self.low_cond, self.low_below = "guide", None, None, 0.0
        full = self.scale != 0.0
        if self.relative == "cond":  # the components are measured from D(c): every full row is needed
            full = torch.ones_like(full)
        self._full_idx = None if bool(full.all()) else full.nonzero().reshape(-1)
        counts = torch.bincount(self.owner, minlength=batch) if self.owner.numel() else torch.zeros(batch)
        self.branches = int((1 + full.long() + counts.long()).max()) + (self.neg is not None)
        self._set_max_batch(max_batch)
        self.nfe = self.calls = self.rows = 0
        self._dev: dict[tuple[torch.device, torch.dtype], tuple[Any, ...]] = {}

    def bind(self, grid: Any) -> ComposedDenoiser:
        self.nfe = self.calls = self.rows = 0
        return self

    def stiffness_scale(self) -> Tensor:
        """Per-sample total guidance weight, what the samplers' stiffness guard sizes its long-step
        limit by: ``w`` plus the sample's component weights (their sum; the largest one with region
        masks, where each place is steered by its own region's component)."""
        extra = torch.zeros(self.batch, dtype=torch.float64)
        if self.owner.numel():
            wts = self.comp_weight.abs().to(torch.float64)
            if self.mask is None:
                extra.index_add_(0, self.owner, wts)
            else:
                extra.scatter_reduce_(0, self.owner, wts, reduce="amax")
        return self.scale.abs() + extra

    def raise_if_nonfinite(self) -> None:
        if self.model_denoiser is not None:
            self.model_denoiser.raise_if_nonfinite()

    def _on(self, like: Tensor) -> tuple[Any, ...]:
        key = (like.device, like.dtype)
        if key not in self._dev:
            shape = (-1, *([1] * (like.ndim - 1)))
            fi = None if self._full_idx is None else self._full_idx.to(like.device)
            ws = self.scale if fi is None else self.scale[self._full_idx]
            wc = self.comp_weight.to(like.device, like.dtype).reshape(shape)
            if self.mask is not None:
                wc = wc * self.mask.to(like.device, like.dtype)
            self._dev[key] = (fi, ws.to(like.device, like.dtype).reshape(shape), self.owner.to(like.device), wc)
        return self._dev[key]

    def __call__(self, x: Tensor, level: Level) -> Tensor:
        B = x.shape[0]
        if B != self.batch:
            raise ValueError(f"this ComposedDenoiser was built for {self.batch} samples, got a batch of {B}")
        fi, w, owner, wc = self._on(x)
        xs, conds = [x], [self.guide]
        neg = self.neg is not None and level.ve_sigma >= self.negative_above
        if neg:
            xs.append(x)
            conds.append(self.neg)
        xf = x if fi is None else x.index_select(0, fi)
        nf = xf.shape[0]
        if nf:
            xs.append(xf)
            conds.append(_take(self.cond, fi))
        nc = int(owner.numel())
        if nc:
            xs.append(x.index_select(0, owner))
            low = self.low_cond is not None and level.ve_sigma <= self.low_below
            conds.append(self.low_cond if low else self.comp_cond)
        out = self._forward(self.denoise, torch.cat(xs, dim=0), level, _cat(conds))
        self.nfe += self.branches - (self.neg is not None and not neg)
        u = out[:B]
        d = None
        if neg:
            d = out[B : 2 * B] - u
            out = torch.cat([u, out[2 * B :]])  # the rows below as without a negative
        g = u.clone()
        if nf:
            df = w * (out[B : B + nf] - (u if fi is None else u.index_select(0, fi)))
            g = g + df if fi is None else g.index_add(0, fi, df)
        if nc:
            base = out[B : B + nf] if self.relative == "cond" else u  # nf == B when relative to cond
            g = g.index_add(0, owner, wc * (out[B + nf :] - base.index_select(0, owner)))
        if d is not None:
            if self.negative_perpendicular:
                d = perpendicular_part(d, g - u)
            g = g - self.negative_scale * d
        return g


# -- splitting prompts into components --------------------------------------------------------------
AND_SEPARATOR = re.compile(r"\s*(?<!\S)AND(?!\S)\s*")


def split_and(prompt: str) -> list[str]:
    """The parts of a prompt joined by an upper-case ``AND`` (Automatic1111's syntax); one part =
    no composition (returns ``[]``)."""
    parts = [p.strip() for p in AND_SEPARATOR.split(prompt)]
    if len(parts) < 2:
        return []
    if any(not p for p in parts):
        raise ValueError(f"empty part in the composed prompt {prompt!r}: write 'A AND B' with text on both sides")
    return parts


def full_prompt(prompt: str) -> str:
    """The prompt the full-conditioning branch reads: ``AND`` separators as plain ``and``."""
    return AND_SEPARATOR.sub(" and ", prompt)
