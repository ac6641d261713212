"""Stiffness guard for the multistep solvers (on by default under guidance).

Multistep solvers extrapolate the recent data predictions ``D`` over the next step. That is
accurate while ``D`` varies slowly along the trajectory, and unstable when the probability-flow
ODE is stiff: classifier-free guidance multiplies the Jacobian of ``D`` by about ``w``, and at
large steps the extrapolated differences then grow from step to step (DPM-Solver++(3M) and
UniPC-3 reach errors of several data scales where DDIM stays below one).

Per sample, a higher-order update is kept only where it passes two tests; elsewhere the sample
takes the first-order (DDIM) step, which cannot overshoot (a UniC correction is dropped likewise).

1. Stability. The guard estimates the Lipschitz constant of ``D`` along the trajectory from
   consecutive evaluations, in variance-exploding coordinates ``y = x / alpha``:
   ``L = |D_i - D_{i-1}| / |y_i - y_{i-1}|``. An order-``k`` update over a step ``h`` (in lambda) is
   kept where ``h * g * L <= safety * bound[k]``, with ``L`` the largest estimate over the ``k - 1``
   intervals the extrapolation spans, ``g = max(1, h / h_last)`` the growth of the step over the
   last interval (the estimate lags by one step, and stiffness grows as the noise falls), and
   ``bound`` the real-axis stability limit of the ``k``-th order Adams-Bashforth extrapolation
   (1, 6/11, 3/10 for k = 2, 3, 4).
2. Size of the correction. The high-order result may differ from the DDIM result of the same step
   by at most ``CORRECTION_BOUND`` times the noise level ``sigma'`` it lands on (root mean square
   over the sample's elements). The difference is the multistep correction itself, an embedded
   estimate of DDIM's local error; a correction larger than the noise left in the sample moves it
   by more than the resolution the step works at, which a Taylor extrapolation of ``D`` is not
   accurate for (e.g. UniPC with B(h) = h over the few long steps of a 4-step run, or a sample
   whose ``D`` jumped between evaluations while ``L`` stayed small).

3. Length of the step, at large guidance scales only. With ``max_step`` (per sample; set by
   :func:`noisewise.sample` to ``LONG_STEP`` where the guidance scale is at least ``STIFF_SCALE``),
   a higher-order update over a step longer than ``max_step`` in lambda is not kept. At such scales
   the guided ODE stiffens faster as the noise falls than the one-step-old ``L`` estimate follows,
   and a long step's extrapolation is a coin flip: DDIM's own error there is one to three data
   scales, and the higher-order steps lost to it as often as they won (docs/guidance.md).

The choice is per sample (``torch.where``, no host synchronisation, no extra evaluation), so a
sample's result does not depend on its batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..core.grid import Level
from .base import ddim_step

Tensor = torch.Tensor

# real-axis stability limits |h L| of Adams-Bashforth order k
AB_BOUND: dict[int, float] = {1: math.inf, 2: 1.0, 3: 6.0 / 11.0, 4: 0.3}
# largest accepted |x_high - x_ddim| (rms per element), in units of the noise level sigma' of the step's target
CORRECTION_BOUND = 3.5
# at guidance scales >= STIFF_SCALE, higher-order updates over lambda steps longer than LONG_STEP are not kept
STIFF_SCALE = 10.0
LONG_STEP = 0.9


@dataclass(frozen=True)
class StiffGuard:
    """The ``stiff_guard`` option in full: the safety factor of the stability test and ``max_step``,
    the longest step (in lambda) a higher-order update may take, a number or one per sample
    (``None``: :func:`noisewise.sample` sets it from the guidance scale, ``LONG_STEP`` where it is at
    least ``STIFF_SCALE``; ``math.inf``: no limit). A plain number for ``stiff_guard`` is
    ``StiffGuard(number)``."""

    safety: float = 0.5
    max_step: Any = None


def long_step_limit(scale: torch.Tensor) -> torch.Tensor | None:
    """Per-sample ``max_step`` for guidance scales ``scale`` (shape ``(batch,)``): ``LONG_STEP`` where
    the scale is at least ``STIFF_SCALE``, no limit elsewhere; None when no sample needs one."""
    big = scale.abs() >= STIFF_SCALE
    if not bool(big.any()):
        return None
    return torch.where(big, LONG_STEP, math.inf).to(torch.float64)


def _norm(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).norm(dim=1).reshape(-1, *([1] * (t.ndim - 1)))


def _rms(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], -1).pow(2).mean(dim=1).sqrt().reshape(-1, *([1] * (t.ndim - 1)))


def correction_ok(x_high: Tensor, x_low: Tensor, sigma: float) -> Tensor | None:
    """Per-sample mask: where the high-order correction ``x_high - x_low`` is at most
    ``CORRECTION_BOUND`` times the noise level ``sigma`` (rms per element). None at ``sigma = 0``
    (a final denoise, where the two agree)."""
    if not sigma > 0:
        return None
    return _rms(x_high - x_low) <= CORRECTION_BOUND * sigma


class StiffnessGuard:
    """Per-sample stiffness test; ``safety`` scales the stability limits (0.5 by default in
    :func:`noisewise.sample` under guidance)."""

    def __init__(self, safety: float, max_step: Any = None) -> None:
        if isinstance(safety, bool) or not isinstance(safety, (int, float)) or not safety > 0:
            raise ValueError(f"stiff_guard must be a number > 0 (a safety factor, e.g. 0.5), a StiffGuard or None, "
                             f"got {safety!r}")
        self.safety = float(safety)
        self.max_step = _check_max_step(max_step)
        self._max_step_on: dict[torch.device, Tensor] = {}
        self.lipschitz: list[Tensor] = []  # estimates over the last intervals, newest last
        self._y: Tensor | None = None
        self._d: Tensor | None = None
        self._lam: float | None = None
        self._h_last: float | None = None

    def observe(self, x: Tensor, x0: Tensor, level: Level) -> None:
        """Record an evaluation ``x0 = D(x)`` at ``level`` and update the Lipschitz estimate."""
        if not level.alpha > 0:
            self._y = self._d = None
            self.lipschitz = []
            return
        y = x / level.alpha
        if self._y is not None:
            tiny = torch.finfo(y.dtype).tiny
            est = _norm(x0 - self._d) / _norm(y - self._y).clamp_min(tiny)
            self.lipschitz = (self.lipschitz + [est])[-3:]
            self._h_last = level.lam - self._lam
        self._y, self._d, self._lam = y, x0, level.lam

    def accept(self, h: float, order: int) -> Tensor | None:
        """Per-sample mask: where an order-``order`` step of size ``h`` is stable (None: no estimate yet).
        An order-k step extrapolates over the last k - 1 intervals: the largest of their estimates counts."""
        if not self.lipschitz or order <= 1:
            return None
        recent = self.lipschitz[-(order - 1):]
        lip = recent[0] if len(recent) == 1 else torch.stack(recent).amax(0)
        grow = max(1.0, h / self._h_last) if self._h_last else 1.0
        return (h * grow * lip) <= self.safety * AB_BOUND[min(order, 4)]

    @staticmethod
    def pick(ok: Tensor, x_high: Tensor, x_low: Tensor) -> Tensor:
        """``x_high`` where ``ok`` (the high-order step is trusted), else ``x_low`` (first order)."""
        return torch.where(ok, x_high, x_low)

    def short_enough(self, h: float, x: Tensor) -> Tensor | None:
        """Per-sample mask: where a step of size ``h`` is within ``max_step`` (None: no limit)."""
        if self.max_step is None:
            return None
        if isinstance(self.max_step, float):
            return None if h <= self.max_step else torch.zeros((x.shape[0],) + (1,) * (x.ndim - 1), dtype=torch.bool,
                                                                 device=x.device)
        lim = self._max_step_on.get(x.device)
        if lim is None:
            if self.max_step.shape[0] != x.shape[0]:
                raise ValueError(f"stiff_guard max_step holds {self.max_step.shape[0]} values for a batch of "
                                 f"{x.shape[0]}: give one per sample or a number")
            lim = self.max_step.to(x.device, torch.float32).reshape(-1, *([1] * (x.ndim - 1)))
            self._max_step_on[x.device] = lim
        return lim >= h

    def choose(self, h: float, order: int, x_high: Tensor, x_low: Tensor, sigma: float | None = None) -> Tensor:
        """The order-``order`` result ``x_high`` of a step of size ``h``, or per sample the lower-order
        result ``x_low`` where that step is unstable, longer than ``max_step``, or (with ``sigma``,
        the noise level of the state both describe) where the two differ by more than
        ``CORRECTION_BOUND * sigma``."""
        if order <= 1:
            return x_high
        ok = None
        for m in (self.accept(h, order), self.short_enough(h, x_high),
                  correction_ok(x_high, x_low, sigma) if sigma is not None else None):
            if m is not None:
                ok = m if ok is None else ok & m
        return x_high if ok is None else self.pick(ok, x_high, x_low)

    def choose_ddim(self, order: int, x_high: Tensor, x: Tensor, x0: Tensor, cur: Level, nxt: Level) -> Tensor:
        """:meth:`choose` with the DDIM step ``cur -> nxt`` as the fallback and ``nxt.sigma`` as the
        noise level: both tests apply."""
        if order <= 1:
            return x_high
        return self.choose(nxt.lam - cur.lam, order, x_high, ddim_step(x, x0, cur, nxt), sigma=nxt.sigma)


class _NoGuard:
    """The guard when it is off (no guidance, or ``stiff_guard=None``): every step is kept."""

    def observe(self, x: Tensor, x0: Tensor, level: Level) -> None:
        pass

    def choose(self, h: float, order: int, x_high: Tensor, x_low: Tensor, sigma: float | None = None) -> Tensor:
        return x_high

    def choose_ddim(self, order: int, x_high: Tensor, x: Tensor, x0: Tensor, cur: Level, nxt: Level) -> Tensor:
        return x_high


def _check_max_step(max_step: Any) -> float | Tensor | None:
    if max_step is None:
        return None
    if isinstance(max_step, bool):
        raise ValueError("stiff_guard max_step must be a number > 0, one per sample, or None; got a bool")
    if isinstance(max_step, (int, float)):
        if not max_step > 0:
            raise ValueError(f"stiff_guard max_step must be > 0 (math.inf: no limit), got {max_step!r}")
        return None if math.isinf(max_step) else float(max_step)
    t = torch.as_tensor(max_step, dtype=torch.float64)
    if t.ndim != 1 or not bool((t > 0).all()) or bool(torch.isnan(t).any()):
        raise ValueError("stiff_guard max_step must be a number > 0 or a 1-D tensor of them, one per sample "
                         "(math.inf: no limit)")
    return None if bool(torch.isinf(t).all()) else t


def stiffness_guard(option: float | StiffGuard | None) -> StiffnessGuard | _NoGuard:
    """What a solver's ``stiff_guard`` option makes: a :class:`StiffnessGuard` with that safety
    factor (and, from a :class:`StiffGuard`, its ``max_step``), or a guard that keeps every step (None)."""
    if option is None:
        return _NoGuard()
    if isinstance(option, StiffGuard):
        return StiffnessGuard(option.safety, option.max_step)
    return StiffnessGuard(option)
