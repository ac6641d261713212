"""DPM-Solver (single-step, Lu et al. 2022) and DPM-Solver++ multistep (Lu et al. 2023).

All updates are exponential integrators in half-logSNR lambda, ``h = lam' - lam``. Data-prediction
form (``++``): ``x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D0 + ...``.
A step into sigma = 0 returns the data prediction (first order), and a step out of alpha = 0
(lambda = -inf) is the exact DDIM step, so no coefficient is ever inf * 0.
"""

from __future__ import annotations

import math

from ..core.grid import Grid, Level
from .base import (
    Callback,
    SolverGen,
    StepInfo,
    Tensor,
    check_order,
    ddim_step,
    lincomb,
    register,
    to_final,
)
from .stiffness import stiffness_guard

Algorithm = str  # "dpmsolver++" (data prediction) or "dpmsolver" (noise prediction)


def _eps(x: Tensor, x0: Tensor, lv: Level) -> Tensor:
    return (x - lv.alpha * x0) / lv.sigma


def singlestep_orders(steps: int, order: int, lower_order_final: bool = True) -> list[int]:
    """Order of each step: groups (1, 2, .., order) share a start point. With
    ``lower_order_final`` the tail uses lower orders so the last step is first order (diffusers'
    DPMSolverSinglestep rule); otherwise a short tail group just ends early."""
    if not lower_order_final:
        return ([1, 2, 3][:order] * steps)[:steps]
    if order == 3:
        if steps % 3 == 0:
            orders = [1, 2, 3] * (steps // 3 - 1) + [1, 2] + [1]
        elif steps % 3 == 1:
            orders = [1, 2, 3] * (steps // 3) + [1]
        else:
            orders = [1, 2, 3] * (steps // 3) + [1, 2]
    elif order == 2:
        orders = [1, 2] * (steps // 2 - 1) + [1, 1] if steps % 2 == 0 else [1, 2] * (steps // 2) + [1]
    else:
        orders = [1] * steps
    return orders[:steps]


@register(
    "dpm_solver",
    "Lu et al. 2022, DPM-Solver: A Fast ODE Solver for Diffusion Probabilistic Model Sampling in "
    "Around 10 Steps (Algorithms 1-2, single-step order 1-3); data-prediction form by default "
    "(Lu et al. 2023, DPM-Solver++)",
    order=None,
    options=("order", "algorithm", "lower_order_final", "max_step_ratio", "stiff_guard"),
    notes="Intermediate points of each order-k group are grid nodes: one evaluation per step.",
)
def dpm_solver(
    x: Tensor,
    grid: Grid,
    *,
    order: int = 2,
    algorithm: Algorithm = "dpmsolver++",
    lower_order_final: bool = True,
    max_step_ratio: float | None = 3.0,
    stiff_guard: float | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """Single-step DPM-Solver-k: steps are grouped (1, 2, .., k); the k-th step of a group goes
    from the group's start point using the k data (or noise) predictions taken inside the group
    (the 'midpoint' forms of the paper: DPM-Solver-2 eq. (3.7)-type and DPM-Solver-3 Alg. 2)."""
    check_order(order, 1, 3, "dpm_solver")
    if algorithm not in ("dpmsolver++", "dpmsolver"):
        raise ValueError(f"dpm_solver: algorithm must be 'dpmsolver++' or 'dpmsolver', got {algorithm!r}")
    orders = singlestep_orders(grid.steps, order, lower_order_final)
    x_start = x
    start = 0
    ms: list[Tensor] = []
    guard = stiffness_guard(stiff_guard)
    for i in range(grid.steps):
        k = orders[i]
        if k == 1:
            x_start, start, ms = x, i, []
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        guard.observe(x, x0, cur)
        ms.append(x0 if algorithm == "dpmsolver++" else _eps(x, x0, cur))
        s = grid[start]
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        elif k == 1 or s.alpha == 0.0 or (
            max_step_ratio is not None and (nxt.lam - cur.lam) > max_step_ratio * (cur.lam - grid[i - 1].lam)
        ):
            # first order: a new group, a group out of alpha = 0 (the exact DDIM limit), or a last
            # sub-step so much longer than the one before that extrapolating would overshoot
            x = ddim_step(x, x0, cur, nxt)
        else:
            x_high = _singlestep_update(x_start, ms, [grid[j] for j in range(start, i + 1)], nxt, algorithm)
            # under guidance: samples whose ODE is stiff here take the first-order step (stiffness.py)
            x = guard.choose_ddim(k, x_high, x, x0, cur, nxt)
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


def _singlestep_update(x: Tensor, ms: list[Tensor], lvs: list[Level], t: Level, algorithm: str) -> Tensor:
    """Order-2/3 single-step update from ``lvs[0]`` to ``t``; ``ms`` are data predictions
    (``dpmsolver++``) or noise predictions (``dpmsolver``) at the nodes ``lvs``."""
    s = lvs[0]
    h = t.lam - s.lam
    r = (lvs[-1].lam - s.lam) / h
    if algorithm == "dpmsolver++":
        phi1 = math.expm1(-h)  # e^{-h} - 1
        scale, w0 = t.sigma / s.sigma, -t.alpha * phi1
        # order 2: - a' phi1 (m1 - m0) / (2 r);  order 3: + a' (phi1 / h + 1) (m2 - m0) / r
        c = -0.5 * t.alpha * phi1 / r if len(ms) == 2 else t.alpha * (phi1 / h + 1.0) / r
    else:
        phi1 = math.expm1(h)  # e^{h} - 1
        scale, w0 = t.alpha / s.alpha, -t.sigma * phi1
        c = -0.5 * t.sigma * phi1 / r if len(ms) == 2 else -t.sigma * (phi1 / h - 1.0) / r
    return lincomb(x, scale, (ms[0], w0 - c), (ms[-1], c))


def _multistep_order(i: int, steps: int, order: int, history: int, lower_order_final: bool) -> int:
    """diffusers' DPMSolverMultistep rule: warm up from order 1; with ``lower_order_final`` and
    fewer than 15 steps, first order on the last step and at most second order on the one before.
    (A step into sigma = 0 is always the final denoise, whatever this says.)"""
    k = min(order, history + 1)
    if lower_order_final and steps < 15:
        if i == steps - 1:
            k = 1
        elif i == steps - 2:
            k = min(k, 2)
    return k


def _dpmpp_multistep(
    x: Tensor,
    grid: Grid,
    order: int,
    lower_order_final: bool,
    callback: Callback | None,
    variant: str = "exact",
    max_step_ratio: float | None = 3.0,
    stiff_guard: float | None = None,
) -> SolverGen:
    ms: list[Tensor] = []
    lvs: list[Level] = []
    guard = stiffness_guard(stiff_guard)
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        guard.observe(x, x0, cur)
        ms, lvs = (ms + [x0])[-order:], (lvs + [cur])[-order:]
        # history usable for higher order: previous points with finite lambda
        usable = sum(1 for lv in lvs[:-1] if math.isfinite(lv.lam))
        k = _multistep_order(i, grid.steps, order, usable, lower_order_final)
        if k > 1 and max_step_ratio is not None and nxt.sigma > 0 and usable:
            # Extrapolating the history over a step much longer than the last one amplifies its
            # differences by (h / h_prev)^(k-1): on such grids (e.g. 'beta' spacing on a wide sigma
            # range) take the first-order step, which cannot overshoot.
            if (nxt.lam - cur.lam) > max_step_ratio * (cur.lam - lvs[-2].lam):
                k = 1
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        elif k == 1 or cur.alpha == 0.0:
            x = ddim_step(x, x0, cur, nxt)
        else:
            # x' = (s'/s) x - a' phi1 D0 + [2M] -a' phi1 D1/2 | [3M] a' phi2 D1 - c2 a' phi3 D2, with
            # D1, D2 divided differences of the data predictions in lambda; the weights of the
            # individual predictions are folded into floats so the update is a single lincomb.
            h = nxt.lam - cur.lam
            phi1 = math.expm1(-h)
            r0 = (cur.lam - lvs[-2].lam) / h
            w0, w1, w2 = -nxt.alpha * phi1, 0.0, 0.0  # weights of x0, ms[-2], ms[-3]
            if k == 2:
                c = -0.5 * nxt.alpha * phi1 / r0  # times d1_0 = (x0 - m1) / r0
                w0, w1 = w0 + c, -c
            else:
                r1 = (lvs[-2].lam - lvs[-3].lam) / h
                # d1_0 = (x0 - m1)/r0, d1_1 = (m1 - m2)/r1,
                # d1 = d1_0 + r0/(r0+r1) (d1_0 - d1_1), d2 = (d1_0 - d1_1)/(r0+r1)
                # D2 ~ h^2 x0''/2, whose exact weight is alpha' (1 - 2 (e^{-h} - 1 + h) / h^2). diffusers
                # and k-diffusion use half of it (variant="diffusers"), which makes 3M second order.
                c2 = 2.0 if variant == "exact" else 1.0
                p1 = nxt.alpha * (phi1 / h + 1.0)
                p2 = -c2 * nxt.alpha * ((phi1 + h) / h**2 - 0.5)
                a_d10 = p1 * (1 + r0 / (r0 + r1)) + p2 / (r0 + r1)  # weight of d1_0
                a_d11 = -p1 * r0 / (r0 + r1) - p2 / (r0 + r1)  # weight of d1_1
                w0 += a_d10 / r0
                w1 += -a_d10 / r0 + a_d11 / r1
                w2 += -a_d11 / r1
            terms = [(x0, w0), (ms[-2], w1)] + ([(ms[-3], w2)] if k == 3 else [])
            x_high = lincomb(x, nxt.sigma / cur.sigma, *terms)
            # under guidance: samples whose ODE is stiff here take the first-order step (stiffness.py)
            x = guard.choose_ddim(k, x_high, x, x0, cur, nxt)
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


@register(
    "dpmpp_2m",
    "Lu et al. 2023, DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic Models, "
    "Algorithm 2 (multistep, 2nd order, data prediction)",
    order=2,
    options=("lower_order_final", "max_step_ratio", "stiff_guard"),
    notes="max_step_ratio (default 3): a step longer than that many times the previous one (in lambda) "
    "is taken at first order; None disables the guard (diffusers' behaviour).",
)
def dpmpp_2m(
    x: Tensor,
    grid: Grid,
    *,
    lower_order_final: bool = True,
    max_step_ratio: float | None = 3.0,
    stiff_guard: float | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """DPM-Solver++(2M): ``x' = (s'/s) x - alpha' (e^{-h}-1) (D0 + (D0 - D_prev) / (2 r))``,
    ``r = h_prev / h``."""
    return (yield from _dpmpp_multistep(x, grid, 2, lower_order_final, callback, "exact", max_step_ratio, stiff_guard))


@register(
    "dpmpp_3m",
    "Lu et al. 2023, DPM-Solver++ (multistep, 3rd order, data prediction; the 3M update of "
    "DPM-Solver v2/diffusers)",
    order=3,
    options=("lower_order_final", "variant", "max_step_ratio", "stiff_guard"),
    notes="variant='exact' (default) is third order; variant='diffusers' reproduces diffusers/k-diffusion, "
    "whose D2 weight is half the exact one (second order in practice).",
)
def dpmpp_3m(
    x: Tensor,
    grid: Grid,
    *,
    lower_order_final: bool = True,
    variant: str = "exact",
    max_step_ratio: float | None = 3.0,
    stiff_guard: float | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """DPM-Solver++(3M): third-order multistep with divided differences D1, D2 in lambda."""
    if variant not in ("exact", "diffusers"):
        raise ValueError(f"dpmpp_3m: variant must be 'exact' or 'diffusers', got {variant!r}")
    return (yield from _dpmpp_multistep(x, grid, 3, lower_order_final, callback, variant, max_step_ratio, stiff_guard))
