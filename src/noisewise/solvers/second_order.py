"""Two-evaluation deterministic samplers: DPM-Solver-2 in the Karras form (dpm_2), flow Heun."""

from __future__ import annotations

import math

from ..core.grid import Grid
from .base import Callback, SolverGen, StepInfo, Tensor, ddim_step, register, to_final


@register(
    "dpm_2",
    "Karras et al. 2022 (EDM), Algorithm 2 with DPM-Solver-2's midpoint (Lu et al. 2022): Euler to the "
    "log-sigma midpoint, then a full step with the midpoint's slope, as k-diffusion's sample_dpm_2 / "
    "diffusers' KDPM2DiscreteScheduler",
    order=2,
    evals_per_step=2,
    options=("max_sigma_ratio",),
    notes="2 evaluations per step; the last step (into sigma = 0), a step out of alpha = 0 and a step that "
    "shrinks sigma/alpha by more than max_sigma_ratio (default 8, as heun) are first order. Evaluates between grid "
    "nodes, so the grid must carry its schedule.",
)
def dpm_2(
    x: Tensor, grid: Grid, *, max_sigma_ratio: float | None = 8.0, callback: Callback | None = None
) -> SolverGen:
    """In VE coordinates ``y = x / alpha``, ``s = sigma / alpha``: ``y_mid = y + (s_mid - s) d``,
    ``y' = y + (s' - s) d_mid`` with ``s_mid = sqrt(s s')`` (lambda midpoint) and ``d = (y - x0) / s``.

    This is noise-prediction DPM-Solver-2, whose midpoint slope is amplified by ``sqrt(s / s')`` in the
    full step: a step shrinking sigma/alpha by more than ``max_sigma_ratio`` is taken first order
    (``None`` never does, as k-diffusion and diffusers)."""
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        elif cur.alpha == 0.0 or (max_sigma_ratio is not None and nxt.lam - cur.lam > math.log(max_sigma_ratio)):
            x = ddim_step(x, x0, cur, nxt)
        else:
            mid = grid.level_at(0.5 * (cur.lam + nxt.lam))
            s, s_mid, s_next = cur.sigma / cur.alpha, mid.sigma / mid.alpha, nxt.sigma / nxt.alpha
            y = x / cur.alpha
            d = (y - x0) / s
            # Euler step to the midpoint.
            y_mid = y + (s_mid - s) * d
            # Full step with the midpoint's slope.
            x0_mid = yield y_mid * mid.alpha, mid
            d_mid = (y_mid - x0_mid) / s_mid
            x = (y + (s_next - s) * d_mid) * nxt.alpha
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


@register(
    "flow_heun",
    "Heun's method on the rectified-flow ODE dx/dt = v (Liu et al. 2023; Esser et al. 2024), as diffusers' "
    "FlowMatchHeunDiscreteScheduler, in flow coordinates (x / (alpha + sigma), t = sigma / (alpha + sigma))",
    order=2,
    evals_per_step=2,
    options=("max_t_ratio",),
    notes="2 evaluations per step; the last step (into sigma = 0) and a step that shrinks the flow time t by "
    "more than max_t_ratio (default 8, as heun's max_sigma_ratio) are first order. Finite at alpha = 0 "
    "(flow t = 1), so the first step is second order too.",
)
def flow_heun(
    x: Tensor, grid: Grid, *, max_t_ratio: float | None = 8.0, callback: Callback | None = None
) -> SolverGen:
    """``z_e = z + (t' - t) v``; ``z' = z + (t' - t) (v + v(z_e, t')) / 2`` with ``v = (z - x0) / t``.

    The corrector's slope at ``t'`` divides by ``t'``: on a step that shrinks t more than ``max_t_ratio``
    times it amplifies the predictor's error, and the step keeps the Euler predictor (``None``: never,
    as diffusers)."""
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        else:
            c, c_next = cur.alpha + cur.sigma, nxt.alpha + nxt.sigma
            t, t_next = cur.sigma / c, nxt.sigma / c_next
            z = x / c
            v = (z - x0) / t
            # Euler step.
            z_e = z + (t_next - t) * v
            if max_t_ratio is None or t <= max_t_ratio * t_next:
                # Apply 2nd order correction.
                x0_e = yield z_e * c_next, nxt
                v_e = (z_e - x0_e) / t_next
                z_e = z + (t_next - t) * 0.5 * (v + v_e)
            x = z_e * c_next
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x
