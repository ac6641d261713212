"""GuidedDenoiser: a guided denoiser is a denoiser.

It wraps a *conditional* denoiser ``D(x, level, cond) -> x0`` (built from a network
``model(x, model_time, cond)`` by :func:`conditional_denoiser`) and returns ``D(x, level) -> x0``,
so every sampler works with every guidance option. Per evaluation:

1. the rows that need a guiding branch are gathered (all samples whose scale is not the identity,
   inside the guidance interval);
2. the conditional rows and the guiding rows (unconditional or negative conditioning) go through
   the network in **one** batched call (split into chunks of at most ``max_batch`` rows only when
   asked); autoguidance, a different network, costs a second call;
3. the branches are converted to the combiner's space (x0, eps, v or flow), combined per sample,
   rescaled, converted back to x0 and thresholded.

It also counts what it spent: ``nfe`` (network evaluations, each branch counted once per step: a
guided step costs 2, 3 with a separately weighted negative), ``calls`` (forward passes actually made)
and ``rows`` (batch rows sent).
One instance serves one sampling run (APG's momentum lives in it); :meth:`bind` starts a new run.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..core.grid import Grid, Level
from ..models.denoiser import ModelDenoiser
from ..models.parameterization import check_prediction_type, to_x0
from .methods import (
    APG,
    CFG,
    Autoguidance,
    CFGPlusPlus,
    CFGZeroStar,
    DynamicThreshold,
    GuidanceOption,
    Interval,
    Rescale,
    apg,
    cfg,
    cfg_zero_star,
    cfgpp_scale,
    dynamic_threshold,
    parse_guidance,
    rescale,
)

Tensor = torch.Tensor
CondDenoise = Callable[[Tensor, Level, Any], Tensor]
log = logging.getLogger(__name__)

_SPACE_TO_PREDICTION = {"x0": "sample", "eps": "epsilon", "v": "v_prediction", "flow": "flow"}


# -- conditioning trees: a tensor, or a tuple/list/dict of tensors (non-tensors pass through) ------
def _leaves(c: Any) -> list[Tensor]:
    if isinstance(c, Tensor):
        return [c]
    if isinstance(c, Mapping):
        return [t for v in c.values() for t in _leaves(v)]
    if isinstance(c, (tuple, list)):
        return [t for v in c for t in _leaves(v)]
    return []


def _map(fn: Callable[..., Any], *trees: Any) -> Any:
    first = trees[0]
    if isinstance(first, Tensor):
        return fn(*trees)
    if isinstance(first, Mapping):
        return {k: _map(fn, *(t[k] for t in trees)) for k in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_map(fn, *parts) for parts in zip(*trees))
    return first


def _structure(c: Any) -> Any:
    if isinstance(c, Tensor):
        return ("T", tuple(c.shape[1:]))
    if isinstance(c, Mapping):
        return ("D", tuple((k, _structure(v)) for k, v in c.items()))
    if isinstance(c, (tuple, list)):
        return ("L", tuple(_structure(v) for v in c))
    return ("O", None)


def _describe(c: Any) -> str:
    shapes = [tuple(t.shape) for t in _leaves(c)]
    return str(shapes[0]) if len(shapes) == 1 else str(shapes)


def _is_empty(c: Any) -> bool:
    if c is None:
        return True
    leaves = _leaves(c)
    return bool(leaves) and all(t.numel() == 0 for t in leaves)


def _check_cond(c: Any, name: str, batch: int) -> Any:
    leaves = _leaves(c)
    if not leaves:
        raise TypeError(
            f"{name} must be a batch-aligned tensor (or a tuple/dict of them), got {type(c).__name__}; "
            "the model receives it as model(x, model_time, cond)"
        )
    for t in leaves:
        if t.ndim < 1 or t.shape[0] not in (1, batch):
            raise ValueError(
                f"{name} must have the batch dimension first with {batch} rows (or 1, shared by all samples); "
                f"got shape {tuple(t.shape)}"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or Inf")
    return _map(lambda t: t.expand(batch, *t.shape[1:]) if t.shape[0] == 1 else t, c)


def _same_layout(a: Any, b: Any, na: str, nb: str) -> None:
    if _structure(a) != _structure(b):
        raise ValueError(
            f"{na} and {nb} must have the same shape apart from the batch dimension (the network gets them in "
            f"one batch); got {na} {_describe(a)} and {nb} {_describe(b)}"
        )


def _cat(trees: Sequence[Any]) -> Any:
    return _map(lambda *ts: torch.cat(ts, dim=0), *trees)


def _take(tree: Any, idx: Tensor | None) -> Any:
    return tree if idx is None else _map(lambda t: t.index_select(0, idx.to(t.device)), tree)


def _slice(tree: Any, a: int, b: int) -> Any:
    return _map(lambda t: t[a:b], tree)


# -- scales ---------------------------------------------------------------------------------------
def check_scale(scale: Any, batch: int, name: str = "guidance_scale") -> Tensor:
    """A per-sample scale as a float64 host tensor of shape (batch,), validated."""
    if isinstance(scale, bool):
        raise TypeError(f"{name} must be a number or a 1-D tensor of per-sample values, got a bool")
    if isinstance(scale, (int, float)):
        w = torch.full((batch,), float(scale), dtype=torch.float64)
    else:
        try:
            w = torch.as_tensor(scale).detach().to("cpu", torch.float64)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(
                f"{name} must be a number or a 1-D tensor of per-sample values, got {type(scale).__name__}"
            ) from e
        if w.ndim == 0:
            w = w.expand(batch).clone()
        if w.ndim != 1 or w.shape[0] not in (1, batch):
            raise ValueError(
                f"{name} must be a number or hold one value per sample ({batch}); got shape {tuple(w.shape)}"
            )
        w = w.expand(batch).clone()
    if not bool(torch.isfinite(w).all()):
        raise ValueError(f"{name} must be finite, got {scale!r}")
    if bool((w < 0).any()):
        raise ValueError(
            f"{name} must be >= 0 (1 = no guidance, 0 = the guiding branch alone), got {w.min().item():g}; "
            "to push away from a concept use negative= rather than a negative scale"
        )
    return w


# -- spaces ---------------------------------------------------------------------------------------
def to_space(x0: Tensor, x: Tensor, level: Level, space: str) -> Tensor:
    """The prediction of ``space`` (x0, eps, v or flow) equivalent to the data prediction ``x0``."""
    if space == "x0":
        return x0
    eps = (x - level.alpha * x0) / level.sigma
    if space == "eps":
        return eps
    if space == "v":
        return level.alpha * eps - level.sigma * x0
    return eps - x0  # flow velocity


def from_space(pred: Tensor, x: Tensor, level: Level, space: str) -> Tensor:
    return to_x0(pred, x, level.alpha, level.sigma, _SPACE_TO_PREDICTION[space])


def _usable(space: str, level: Level) -> str:
    # eps cannot be turned back into x0 at alpha = 0 (pure noise); x0 gives the same result for affine rules
    return "x0" if space == "eps" and level.alpha == 0.0 else space


def _bshape(w: Tensor, like: Tensor) -> Tensor:
    return w.to(like.device, like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


# -- building the conditional branch from a network -----------------------------------------------
def conditional_denoiser(model_denoiser: ModelDenoiser) -> CondDenoise:
    """``D(x, level, cond)`` from a :class:`ModelDenoiser`: the network gets ``cond`` as its third
    positional argument, ``model(x, model_time, cond, **model_kwargs)``."""

    def D(x: Tensor, level: Level, cond: Any) -> Tensor:
        md = model_denoiser
        pred = md.raw(x, md.model_time(x, level), cond, *md.model_args, **md.model_kwargs)
        return to_x0(pred, x, level.alpha, level.sigma, md.prediction_type)

    return D


class _ChunkedForward:
    """Network calls of a guided denoiser: at most ``max_batch`` rows per call (None: one call),
    counted in ``calls`` and ``rows``."""

    max_batch: int | None
    calls: int
    rows: int

    def _set_max_batch(self, max_batch: int | None) -> None:
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1):
            raise ValueError(f"max_batch must be an integer >= 1 (rows per network call), got {max_batch!r}")
        self.max_batch = max_batch

    def _forward(self, fn: CondDenoise, x: Tensor, level: Level, cond: Any) -> Tensor:
        n = x.shape[0]
        if self.max_batch is None or n <= self.max_batch:
            self.calls += 1
            self.rows += n
            return fn(x, level, cond)
        outs = []
        for a in range(0, n, self.max_batch):
            b = min(n, a + self.max_batch)
            self.calls += 1
            self.rows += b - a
            outs.append(fn(x[a:b], level, _slice(cond, a, b)))
        return torch.cat(outs, dim=0)


class GuidedDenoiser(_ChunkedForward):
    """Classifier-free guidance (and its family) around a conditional denoiser; itself a denoiser
    ``D(x, level) -> x0``.

    Args:
        denoise: ``D(x, level, cond) -> x0`` doing one network call per invocation (see
            :func:`conditional_denoiser`), or a :class:`ModelDenoiser` (wrapped for you).
        cond: the conditioning, batch-aligned (a tensor, or a tuple/dict of tensors; batch 1 is
            shared by all samples).
        uncond: the unconditional conditioning (same layout as ``cond``).
        negative: a negative conditioning; it replaces ``uncond`` as the guiding branch. ``None`` or an
            empty tensor falls back to ``uncond``.
        negative_scale: ``s``: give the negative conditioning its own weight instead of letting it
            replace ``uncond``: ``D(u) + w (D(c) - D(u)) - s (D(n) - D(u))`` (one more row per sample;
            the guidance method combines ``c`` and ``u``, the negative term is added before
            rescaling). Replacing ``uncond`` is the special case ``s = w - 1``. Needs ``uncond`` and
            ``negative``; None: ``negative`` replaces ``uncond``.
        negative_above: with ``negative_scale``: the negative term acts only at noise levels
            ``sigma / alpha`` at or above this (its rows are skipped below); 0 (the default): at every
            level. A negative prompt against defects such as blur then steers the coarse image without
            retouching colours at low noise.
        negative_perpendicular: with ``negative_scale``: subtract only the part of the negative
            direction ``D(n) - D(u)`` perpendicular to the guided direction (per sample), so the
            negative cannot push along, or against, what the prompt asks for (Perp-Neg, Armandpour et
            al. 2023). A plain negative that points against the prompt otherwise raises the effective
            guidance scale. No extra rows.
        guidance_scale: ``w`` (a number or one value per sample; 1 = no guidance, no extra rows).
            For CFG++ it is the paper's ``lambda``.
        guidance: the options (see :func:`~noisewise.guidance.parse_guidance`).
        max_batch: most rows per network call (None = all rows of a step in one call).
        batch: the number of samples.
    """

    def __init__(
        self,
        denoise: CondDenoise | ModelDenoiser,
        *,
        cond: Any,
        uncond: Any = None,
        negative: Any = None,
        negative_scale: float | None = None,
        negative_above: float = 0.0,
        negative_perpendicular: bool = False,
        guidance_scale: Any = 1.0,
        guidance: Any = None,
        max_batch: int | None = None,
        batch: int | None = None,
        grid: Grid | None = None,
    ) -> None:
        self.model_denoiser = denoise if isinstance(denoise, ModelDenoiser) else None
        self.denoise: CondDenoise = conditional_denoiser(denoise) if isinstance(denoise, ModelDenoiser) else denoise
        if not callable(self.denoise):
            raise TypeError("denoise must be callable as D(x, level, cond) -> x0")
        if cond is None:
            raise ValueError("guidance needs cond= (the conditioning the model receives as model(x, t, cond))")
        if batch is None:
            batch = _leaves(cond)[0].shape[0] if _leaves(cond) else 1
        self.batch = batch
        self.options = parse_guidance(guidance)
        self.combiner = next(o for o in self.options if o.kind == "combiner")
        self.rescale = next((o for o in self.options if isinstance(o, Rescale)), None)
        self.interval = next((o for o in self.options if isinstance(o, Interval)), None)
        self.threshold = next((o for o in self.options if isinstance(o, DynamicThreshold)), None)
        self.auto = next((o for o in self.options if isinstance(o, Autoguidance)), None)
        self.cond = _check_cond(cond, "cond", batch)

        if negative is not None and not isinstance(negative, Tensor) and not _leaves(negative):
            raise TypeError(f"negative must be a tensor like cond (or None), got {type(negative).__name__}")
        negative, weighted, self.negative_scale = split_negative(uncond, negative, negative_scale)
        self.negative_above = check_negative_above(negative_above, negative_scale)
        self.negative_perpendicular = check_negative_perpendicular(negative_perpendicular, negative_scale)
        self.neg_cond = None
        if weighted is not None:  # uncond stays the guiding branch; the negative gets its own rows
            if isinstance(self.combiner, CFGPlusPlus) or self.auto is not None:
                raise ValueError(f"negative_scale= adds a plain negative term and cannot be used with "
                                 f"{'autoguidance' if self.auto is not None else 'CFG++'}: leave it out (the "
                                 "negative prompt then replaces the unconditional branch)")
            self.neg_cond = _check_cond(weighted, "negative", batch)
            _same_layout(self.cond, self.neg_cond, "cond", "negative")
        guide_cond = negative if negative is not None else uncond
        self.guide_cond = None
        if guide_cond is not None:
            if self.auto is not None:
                raise ValueError(
                    "autoguidance guides with the weaker model on the same conditioning: do not pass uncond= or "
                    "negative= with it"
                )
            which = "negative" if negative is not None else "uncond"
            gc = _check_cond(guide_cond, which, batch)
            _same_layout(self.cond, gc, "cond", which)
            self.guide_cond = gc
        if uncond is not None and negative is not None:
            _same_layout(self.cond, _check_cond(uncond, "uncond", batch), "cond", "uncond")

        self.scale = check_scale(guidance_scale, batch)
        if isinstance(self.combiner, CFGPlusPlus):
            needs = torch.ones(batch, dtype=torch.bool)  # no lambda reduces CFG++ to the conditional model
        else:
            needs = self.scale != 1.0
        if self.neg_cond is not None:
            needs = torch.ones(batch, dtype=torch.bool)  # every sample gets its negative term
        if bool(needs.any()) and self.guide_cond is None and self.auto is None:
            raise ValueError(
                f"guidance_scale={self._scale_repr()} needs a guiding branch: pass uncond= (the unconditional "
                "conditioning, e.g. the empty prompt's embedding) or negative=, or use guidance=Autoguidance(guide=...)"
            )
        self._needs = needs
        self._all = bool(needs.all())
        self._any = bool(needs.any())
        self._idx_host = None if self._all else needs.nonzero().reshape(-1)
        self._idx: dict[torch.device, Tensor | None] = {}
        self._guided_scale = self.scale if self._idx_host is None else self.scale[self._idx_host]
        self._scale_on: dict[tuple[torch.device, torch.dtype], Tensor] = {}

        if self.auto is not None:
            self.guide: CondDenoise | None = self._build_guide(self.auto)
        else:
            self.guide = None
        self._set_max_batch(max_batch)
        self.nfe = 0
        self.calls = 0
        self.rows = 0
        self._running: Tensor | None = None
        self._grid: Grid | None = None
        self._index: dict[Level, int] = {}
        self._lams: list[float] = []
        if grid is not None:
            self.bind(grid)

    # -- set-up -----------------------------------------------------------------------------------
    def _scale_repr(self) -> str:
        w = self.scale
        return f"{w[0].item():g}" if bool((w == w[0]).all()) else f"per-sample {w.tolist()}"

    def _build_guide(self, auto: Autoguidance) -> CondDenoise:
        md = self.model_denoiser
        if md is None:  # sampling with denoiser=: the guide is a conditional denoiser too
            return auto.guide  # type: ignore[return-value]
        pt = check_prediction_type(auto.prediction_type or md.prediction_type)
        guide_md = ModelDenoiser(
            auto.guide,  # type: ignore[arg-type]
            pt,
            model_kwargs=dict(auto.model_kwargs or md.model_kwargs),
            model_dtype=None,
            check_finite=md.check_finite,
        )
        self._guide_md = guide_md
        return conditional_denoiser(guide_md)

    def bind(self, grid: Grid) -> GuidedDenoiser:
        """Start a run on ``grid``: resets the counters and APG's momentum; CFG++ and CFG-Zero*
        read the step structure from it."""
        self._grid = grid
        self._index = {lv: i for i, lv in enumerate(grid.levels[:-1])}
        self._lams = [lv.lam for lv in grid.levels]
        self._running = None
        self.nfe = self.calls = self.rows = 0
        return self

    def stiffness_scale(self) -> Tensor:
        """Per-sample guidance scale the samplers' stiffness guard sizes its long-step limit by."""
        return self.scale

    def raise_if_nonfinite(self) -> None:
        for md in (self.model_denoiser, getattr(self, "_guide_md", None)):
            if md is not None:
                md.raise_if_nonfinite()

    # -- per level --------------------------------------------------------------------------------
    def step_of(self, level: Level) -> tuple[int, float]:
        """(index of the grid step this evaluation belongs to, its size in lambda)."""
        if self._grid is None:
            raise RuntimeError(
                f"{self.combiner.name} needs the step grid: call GuidedDenoiser.bind(grid) before sampling "
                "(noisewise.sample does this for you)"
            )
        i = self._index.get(level)
        if i is None:  # an off-grid evaluation (e.g. a midpoint): the step that contains it
            i = min(max(bisect.bisect_right(self._lams, level.lam) - 1, 0), self._grid.steps - 1)
        return i, self._lams[i + 1] - self._lams[i]

    def guided_here(self, level: Level) -> bool:
        """Whether the guiding branch is evaluated at this level (any sample guided, inside the interval)."""
        if not self._any:
            return False
        if self.interval is not None:
            ve = level.sigma / level.alpha if level.alpha > 0 else math.inf
            return self.interval.active(ve)
        return True

    def _index_on(self, device: torch.device) -> Tensor | None:
        if device not in self._idx:
            self._idx[device] = None if self._idx_host is None else self._idx_host.to(device)
        return self._idx[device]

    def __call__(self, x: Tensor, level: Level) -> Tensor:
        B = x.shape[0]
        if B != self.batch:
            raise ValueError(f"this GuidedDenoiser was built for {self.batch} samples, got a batch of {B}")
        comb = self.combiner
        if isinstance(comb, CFGZeroStar) and comb.zero_init_steps > 0 and self.step_of(level)[0] < comb.zero_init_steps:
            # zero-init: zero flow velocity, i.e. x0 = x / (alpha + sigma); the network is not called
            out = x / (level.alpha + level.sigma)
            return self._finish(out)
        guided = self.guided_here(level)
        idx = self._index_on(x.device) if guided else None
        neg = guided and self.neg_cond is not None and level.ve_sigma >= self.negative_above
        self.nfe += (3 if neg else 2) if guided else 1
        if not guided:
            return self._finish(self._forward(self.denoise, x, level, self.cond))
        xg = x if idx is None else x.index_select(0, idx)
        n = None
        if self.guide is not None:  # autoguidance: a second network
            c = self._forward(self.denoise, x, level, self.cond)
            u = self._forward(self.guide, xg, level, _take(self.cond, idx))
        else:  # all branches in one batched call
            rows = torch.cat([x, xg, xg] if neg else [x, xg], dim=0)
            conds = _cat([self.cond, _take(self.guide_cond, idx)] + ([self.neg_cond] if neg else []))
            out = self._forward(self.denoise, rows, level, conds)
            k = xg.shape[0]
            c, u = out[:B], out[B : B + k]
            if neg:
                n = out[B + k :]
        cg = c if idx is None else c.index_select(0, idx)
        g = self.combine(cg, u, xg, level, self._guided_scale, negative=n)
        out = g if idx is None else c.index_copy(0, idx, g)
        return self._finish(out)

    def _on_device(self, scale: Tensor, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._scale_on:  # one host-to-device copy per run, not per step
            self._scale_on[key] = _bshape(scale, like)
        return self._scale_on[key]

    def _finish(self, x0: Tensor) -> Tensor:
        if self.threshold is not None:
            x0 = dynamic_threshold(x0, self.threshold.percentile, self.threshold.max_value)
        return x0

    def combine(self, c: Tensor, u: Tensor, x: Tensor, level: Level, scale: Tensor,
                negative: Tensor | None = None) -> Tensor:
        """Guided data prediction from the conditional and guiding data predictions ``c`` and ``u``
        (at state ``x``, with per-sample ``scale``), less ``negative_scale * (negative - u)`` when
        the negative prediction is given (only its part perpendicular to the guided direction with
        ``negative_perpendicular``), then rescaled."""
        comb = self.combiner
        if isinstance(comb, CFGPlusPlus):
            _, h = self.step_of(level)
            w = _bshape(cfgpp_scale(scale, h), c)  # type: ignore[arg-type]
            g = cfg(c, u, w)
        else:
            w = self._on_device(scale, c) if scale is self._guided_scale else _bshape(scale, c)
            space = _usable(comb.space, level)  # type: ignore[attr-defined]
            cs, us = to_space(c, x, level, space), to_space(u, x, level, space)
            if isinstance(comb, CFG):
                gs = cfg(cs, us, w)
            elif isinstance(comb, APG):
                gs, self._running = apg(
                    cs, us, w, eta=comb.eta, norm_threshold=comb.norm_threshold, running=self._running,
                    momentum=comb.momentum,
                )
            elif isinstance(comb, CFGZeroStar):
                gs = cfg_zero_star(cs, us, w)
            else:  # pragma: no cover - parse_guidance admits only the combiners above
                raise AssertionError(comb)
            g = from_space(gs, x, level, space)
        if negative is not None and self.negative_scale:  # weights summing to zero: the same in every space
            d = negative - u
            if self.negative_perpendicular:
                d = perpendicular_part(d, g - u)
            g = g - self.negative_scale * d
        if self.rescale is not None and self.rescale.phi > 0:
            space = _usable(self.rescale.space, level)
            gs = rescale(to_space(g, x, level, space), to_space(c, x, level, space), self.rescale.phi)
            g = from_space(gs, x, level, space)
        return g


def check_negative_scale(s: Any) -> float | None:
    """``negative_scale`` checked: None, or a finite number >= 0."""
    if s is None:
        return None
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0:
        raise ValueError(f"negative_scale must be a finite number >= 0 (or None: the negative prompt replaces the "
                         f"unconditional branch), got {s!r}")
    return float(s)


def check_noise_level(v: Any, name: str) -> float:
    """``v`` as a noise level ``sigma / alpha`` where something starts or stops: a finite number >= 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < float("inf"):
        raise ValueError(f"{name} must be a finite number >= 0 (a noise level sigma / alpha; 0 = off), got {v!r}")
    return float(v)


def check_negative_above(v: Any, negative_scale: Any) -> float:
    """``negative_above`` checked: a noise level (:func:`check_noise_level`); above 0 it gates the
    negative's own term, so it needs a ``negative_scale``."""
    above = check_noise_level(v, "negative_above")
    if above > 0 and negative_scale is None:
        raise ValueError("negative_above= gates the negative prompt's own term: give negative_scale= too "
                         "(negative_scale = guidance_scale - 1 equals replacing the unconditional branch)")
    return above


def check_flag(v: Any, name: str) -> bool:
    """``v`` as an on/off option: exactly True or False (not 0, 1 or a string)."""
    if not isinstance(v, bool):
        raise ValueError(f"{name} must be True or False, got {v!r}")
    return v


def check_negative_perpendicular(v: Any, negative_scale: Any) -> bool:
    """``negative_perpendicular`` checked: a flag (:func:`check_flag`); True projects the negative's
    own term, so it needs a ``negative_scale``."""
    if check_flag(v, "negative_perpendicular") and negative_scale is None:
        raise ValueError("negative_perpendicular=True projects the negative prompt's own term: give "
                         "negative_scale= too (negative_scale = guidance_scale - 1 equals replacing the "
                         "unconditional branch)")
    return v


def perpendicular_part(d: Tensor, direction: Tensor) -> Tensor:
    """``d`` less its projection on ``direction``, per sample (over all but the first dimension):
    ``d - (<d, p> / <p, p>) p``. Both are differences of two predictions at the same state, so the
    result does not depend on the space (x0, eps, v, flow) they are taken in. A sample whose
    ``direction`` is zero keeps ``d``."""
    dt = torch.promote_types(d.dtype, torch.float32)  # half-precision rows are summed in float32
    dd, pp = d.flatten(1).to(dt), direction.flatten(1).to(dt)
    norm = (pp * pp).sum(1, keepdim=True)
    coef = torch.where(norm > 0, (dd * pp).sum(1, keepdim=True) / norm.clamp_min(torch.finfo(dt).tiny), 0.0)
    return d - (coef.to(d.dtype).reshape(-1, *([1] * (d.ndim - 1))) * direction)


def split_negative(uncond: Any, negative: Any, negative_scale: Any) -> tuple[Any, Any, float | None]:
    """``(replacing, weighted, s)``: the negative conditioning that replaces ``uncond`` as the guiding
    branch (None: ``uncond`` guides), the one weighted by its own ``negative_scale`` ``s`` (None: no
    such term), and ``s`` checked. An empty negative is none; ``s = 0`` drops the negative (plain CFG
    against ``uncond``, no extra rows); a weighted negative needs ``uncond``."""
    s = check_negative_scale(negative_scale)
    if (negative is not None and _is_empty(negative)) or s == 0.0:
        negative = None
    if not s or negative is None:
        return negative, None, s
    if uncond is None:
        raise ValueError("negative_scale= weighs the negative conditioning against the unconditional one: "
                         "pass uncond= too (e.g. the empty prompt's embedding)")
    return None, negative, s


def describe(options: Sequence[GuidanceOption]) -> str:
    """One line per option: its name, settings and paper (for logs and metadata)."""
    lines = []
    for o in options:
        settings = {k: v for k, v in vars(o).items() if k not in ("guide",)}
        lines.append(f"{o.name} {settings} - {o.paper}")
    return "\n".join(lines)

