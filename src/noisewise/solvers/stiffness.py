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

The choice is per sample (``torch.where``, no host synchronisation, no extra evaluation), so a
sample's result does not depend on its batch.
"""

from __future__ import annotations

import math

import torch

from ..core.grid import Level
from .base import ddim_step

Tensor = torch.Tensor

# real-axis stability limits |h L| of Adams-Bashforth order k
AB_BOUND: dict[int, float] = {1: math.inf, 2: 1.0, 3: 6.0 / 11.0, 4: 0.3}
# largest accepted |x_high - x_ddim| (rms per element), in units of the noise level sigma' of the step's target
CORRECTION_BOUND = 3.5


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

    def __init__(self, safety: float) -> None:
        if isinstance(safety, bool) or not isinstance(safety, (int, float)) or not safety > 0:
            raise ValueError(f"stiff_guard must be a number > 0 (a safety factor, e.g. 0.5) or None, got {safety!r}")
        self.safety = float(safety)
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

    def choose(self, h: float, order: int, x_high: Tensor, x_low: Tensor, sigma: float | None = None) -> Tensor:
        """The order-``order`` result ``x_high`` of a step of size ``h``, or per sample the lower-order
        result ``x_low`` where that step is unstable, or (with ``sigma``, the noise level of the
        state both describe) where the two differ by more than ``CORRECTION_BOUND * sigma``."""
        if order <= 1:
            return x_high
        ok = self.accept(h, order)
        if sigma is not None:
            small = correction_ok(x_high, x_low, sigma)
            ok = small if ok is None else (ok if small is None else ok & small)
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


def stiffness_guard(safety: float | None) -> StiffnessGuard | _NoGuard:
    """What a solver's ``stiff_guard`` option makes: a :class:`StiffnessGuard` with that safety
    factor, or a guard that keeps every step (None)."""
    return _NoGuard() if safety is None else StiffnessGuard(safety)
