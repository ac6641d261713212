"""Error-controlled DPM-Solver: DPM-Solver-12 and -23 with adaptive step size (Lu et al. 2022, Sec. 3.4
and App. C), for VP, VE and flow schedules.

Each attempt from ``lam_s`` with step ``h`` computes a lower- and a higher-order DPM-Solver result
(orders 1 and 2, or 2 and 3, sharing their model evaluations), measures their difference against
``max(atol, rtol * max(|x_low|, |x_prev|))`` in variance-exploding coordinates ``x / alpha`` (as
k-diffusion does), accepts or rejects, and lets a PID controller (Soderlind 2003, as in
k-diffusion's ``PIDStepSizeController``) propose the next ``h``.

Flow schedules (and zero-terminal-SNR VP) start at alpha = 0, where lambda = -inf and no step in
lambda exists. The first step there is taken in ``u = alpha / sigma = e^lambda`` instead, where the
probability-flow ODE is ``d(x / sigma) / du = x0_hat`` (finite at u = 0): the same embedded pair as
ordinary Runge-Kutta (RK2 with c = 1/3 or 1/2 against Heun's RK3), with its own accept/reject.
From there on the solver steps in lambda.

The evaluation at the step's start is kept across rejections (k-diffusion re-evaluates it, one wasted
model call per rejection), so ``nfe = 1 + sum over attempts of (order - 1) + (1 if it ends at sigma = 0)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Generator
from typing import Literal

import torch

from ..core.grid import Grid, Level
from ..core.spacing import lambda_range
from .base import Callback, SolverGen, StepInfo, Tensor, check_order, register, to_final

log = logging.getLogger(__name__)

_Stage = Generator[tuple[Tensor, Level], Tensor, tuple[Tensor, Tensor]]


class PIDController:
    """Step-size controller ``h <- h * limiter(e0^b1 e1^b2 e2^b3)`` on inverse errors (Soderlind 2003);
    the default (pcoeff, icoeff, dcoeff) = (0, 1, 0) is the classic integral controller."""

    def __init__(
        self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float, accept_safety: float
    ) -> None:
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2.0 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.inv_errors: list[float] = []

    def propose(self, error: float) -> bool:
        """Update ``h`` from the scaled error of the last attempt; True if that attempt is accepted."""
        inv = 1.0 / (error + 1e-8)
        if not self.inv_errors:
            self.inv_errors = [inv, inv, inv]
        self.inv_errors[0] = inv
        e0, e1, e2 = self.inv_errors
        factor = e0**self.b1 * e1**self.b2 * e2**self.b3
        factor = 1.0 + math.atan(factor - 1.0)
        accept = factor >= self.accept_safety
        if accept:
            self.inv_errors[2], self.inv_errors[1] = e1, e0
        self.h *= factor
        return accept


def _pair_lambda(
    x: Tensor, x0: Tensor, s: Level, t: Level, order: int, algorithm: str, grid: Grid
) -> _Stage:
    """Lower/higher-order DPM-Solver results from ``s`` to ``t`` (finite lambdas)."""
    h = t.lam - s.lam
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    s1 = grid.level_at(s.lam + r1 * h)
    if algorithm == "dpmsolver++":
        phi1 = math.expm1(-h)
        base = (t.sigma / s.sigma) * x - (t.alpha * phi1) * x0
        u1 = (s1.sigma / s.sigma) * x - (s1.alpha * math.expm1(-r1 * h)) * x0
        m1 = yield u1, s1
        second = base - (t.alpha * phi1 / (2.0 * r1)) * (m1 - x0)
        if order == 2:
            return base, second
        r2 = 2.0 / 3.0
        s2 = grid.level_at(s.lam + r2 * h)
        phi12 = math.expm1(-r2 * h)
        u2 = (
            (s2.sigma / s.sigma) * x
            - (s2.alpha * phi12) * x0
            + (r2 / r1 * s2.alpha * (phi12 / (r2 * h) + 1.0)) * (m1 - x0)
        )
        m2 = yield u2, s2
        third = base + (t.alpha * (phi1 / h + 1.0) / r2) * (m2 - x0)
        return second, third
    # noise prediction (DPM-Solver, as k-diffusion's DPMSolver)
    e0 = (x - s.alpha * x0) / s.sigma
    phi1 = math.expm1(h)
    base = (t.alpha / s.alpha) * x - (t.sigma * phi1) * e0
    u1 = (s1.alpha / s.alpha) * x - (s1.sigma * math.expm1(r1 * h)) * e0
    m1 = yield u1, s1
    e1 = (u1 - s1.alpha * m1) / s1.sigma
    second = base - (t.sigma * phi1 / (2.0 * r1)) * (e1 - e0)
    if order == 2:
        return base, second
    r2 = 2.0 / 3.0
    s2 = grid.level_at(s.lam + r2 * h)
    phi12 = math.expm1(r2 * h)
    u2 = (
        (s2.alpha / s.alpha) * x
        - (s2.sigma * phi12) * e0
        - (s2.sigma * (r2 / r1) * (phi12 / (r2 * h) - 1.0)) * (e1 - e0)
    )
    m2 = yield u2, s2
    e2 = (u2 - s2.alpha * m2) / s2.sigma
    third = base - (t.sigma / r2 * (phi1 / h - 1.0)) * (e2 - e0)
    return second, third


def _pair_u(x: Tensor, x0: Tensor, s: Level, t: Level, order: int, grid: Grid) -> _Stage:
    """The same pair out of alpha = 0, as Runge-Kutta in ``u = e^lambda`` on ``z = x / sigma``."""
    du = math.exp(t.lam)
    z = x / s.sigma
    r1 = 0.5 if order == 2 else 1.0 / 3.0
    s1 = grid.level_at(math.log(r1 * du))
    z1 = z + (r1 * du) * x0
    k1 = yield z1 * s1.sigma, s1
    low = z + du * x0
    second = low + (du / (2.0 * r1)) * (k1 - x0)
    if order == 2:
        return low * t.sigma, second * t.sigma
    r2 = 2.0 / 3.0
    s2 = grid.level_at(math.log(r2 * du))
    z2 = z + (r2 * du) * (x0 + (r2 / (2.0 * r1)) * (k1 - x0))
    k2 = yield z2 * s2.sigma, s2
    third = z + du * x0 + (du / (2.0 * r2)) * (k2 - x0)
    return second * t.sigma, third * t.sigma


def _scaled_error(
    low: Tensor, high: Tensor, prev: Tensor | None, rtol: float, atol: float, norm: str
) -> float:
    scale = low.abs() if prev is None else torch.maximum(low.abs(), prev.abs())
    delta = torch.clamp(rtol * scale, min=atol)
    ratio = (low - high) / delta
    if norm == "batch_rms":
        return float(torch.linalg.vector_norm(ratio) / math.sqrt(ratio.numel()))
    per = ratio.reshape(ratio.shape[0], -1)
    return float((per.square().mean(dim=1).sqrt()).max())


@register(
    "dpm_adaptive",
    "Lu et al. 2022, DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in Around 10 "
    "Steps, Sec. 3.4 / App. C (DPM-Solver-12 and -23, adaptive step size); as k-diffusion's sample_dpm_adaptive",
    order=None,
    options=(
        "order", "rtol", "atol", "h_init", "u_init", "algorithm", "error_norm",
        "pcoeff", "icoeff", "dcoeff", "accept_safety", "max_attempts",
    ),
    notes="Picks its own steps: uses the grid's first level as start and its last as end (a grid ending at "
    "sigma = 0 is solved to the schedule's cleanest trained level, then denoised), ignoring inner nodes, so "
    "steps= / nfe= do not set its cost: rtol / atol do. Reports the model evaluations it spent through "
    "sample(..., return_info=True).nfe. Step sizes are shared by the batch.",
)
def dpm_adaptive(
    x: Tensor,
    grid: Grid,
    *,
    order: int = 3,
    rtol: float = 0.05,
    atol: float = 0.0078,
    h_init: float = 0.05,
    u_init: float = 0.25,
    algorithm: Literal["dpmsolver++", "dpmsolver"] = "dpmsolver++",
    error_norm: Literal["sample_max", "batch_rms"] = "sample_max",
    pcoeff: float = 0.0,
    icoeff: float = 1.0,
    dcoeff: float = 0.0,
    accept_safety: float = 0.81,
    max_attempts: int = 10_000,
    callback: Callback | None = None,
) -> SolverGen:
    """Adaptive DPM-Solver-(order-1)(order): accept when the PID factor >= accept_safety.

    ``error_norm='sample_max'`` makes every sample meet the tolerance (RMS within a sample, max over the
    batch); ``'batch_rms'`` is k-diffusion's RMS over the whole batch. ``algorithm='dpmsolver'`` uses noise
    prediction as k-diffusion does; ``'dpmsolver++'`` (default) data prediction. ``u_init`` is the first
    step out of alpha = 0, in ``u = alpha / sigma``; ``h_init`` the first step in lambda."""
    check_order(order, 2, 3, "dpm_adaptive")
    if algorithm not in ("dpmsolver++", "dpmsolver"):
        raise ValueError(f"dpm_adaptive: algorithm must be 'dpmsolver++' or 'dpmsolver', got {algorithm!r}")
    if error_norm not in ("sample_max", "batch_rms"):
        raise ValueError(f"dpm_adaptive: error_norm must be 'sample_max' or 'batch_rms', got {error_norm!r}")
    for name, v in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
            raise ValueError(f"dpm_adaptive: {name} must be a finite number >= 0, got {v!r}")
    if rtol == 0 and atol == 0:
        raise ValueError("dpm_adaptive: rtol and atol cannot both be 0")
    for name, v in (("h_init", h_init), ("u_init", u_init)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise ValueError(f"dpm_adaptive: {name} must be a finite number > 0, got {v!r}")
    if grid.schedule is None:
        raise ValueError(
            "dpm_adaptive evaluates at levels it chooses and needs the schedule: build the grid with make_grid / "
            "Grid.from_model_times, or pass schedule= to Grid.from_arrays"
        )

    start, last = grid[0], grid[-1]
    final_zero = last.sigma == 0.0
    if final_zero:
        end_lam = max(lambda_range(grid.schedule)[1], grid[-2].lam)
        end = grid[-2] if end_lam == grid[-2].lam else grid.level_at(end_lam)
    else:
        end = last
    pid = PIDController(u_init if start.alpha == 0.0 else h_init, pcoeff, icoeff, dcoeff, order, accept_safety)
    cur = start
    x_prev = None if start.alpha == 0.0 else x / start.alpha  # VE coordinates
    x0: Tensor | None = None
    attempts = accepted = 0
    while cur.lam < end.lam - 1e-5:
        if attempts >= max_attempts:
            raise RuntimeError(
                f"dpm_adaptive: no convergence after {max_attempts} attempts (rtol={rtol}, atol={atol}); "
                "loosen the tolerances or raise max_attempts"
            )
        attempts += 1
        if x0 is None:
            x0 = yield x, cur
        if cur.alpha == 0.0:
            lam_t = math.log(pid.h)
            t = end if lam_t >= end.lam else grid.level_at(lam_t)
            low, high = yield from _pair_u(x, x0, cur, t, order, grid)
        else:
            lam_t = cur.lam + pid.h
            t = end if lam_t >= end.lam else grid.level_at(lam_t)
            low, high = yield from _pair_lambda(x, x0, cur, t, order, algorithm, grid)
        y_low, y_high = low / t.alpha, high / t.alpha
        error = _scaled_error(y_low, y_high, x_prev, rtol, atol, error_norm)
        if not math.isfinite(error):
            raise FloatingPointError(f"dpm_adaptive: non-finite error estimate at lambda={cur.lam:.4g}")
        was_u = cur.alpha == 0.0
        if pid.propose(error):
            if callback is not None:
                callback(StepInfo(accepted, t, high, x0))
            accepted += 1
            x, x_prev, x0 = high, y_low, None
            if was_u:
                # continue in lambda with the step the controller proposed in u
                pid.h = math.log1p(pid.h / math.exp(t.lam))
            cur = t
        elif pid.h <= 1e-10:
            raise RuntimeError(f"dpm_adaptive: step size underflow at lambda={cur.lam:.4g}")
    log.debug("dpm_adaptive: %d attempts, %d accepted, end lambda %.4g", attempts, accepted, cur.lam)
    if final_zero:
        x0 = yield x, cur
        x = to_final(x0, last)
        if callback is not None:
            callback(StepInfo(accepted, last, x, x0))
    return x
