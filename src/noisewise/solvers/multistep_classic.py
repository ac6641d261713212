"""Classic linear multistep samplers: LMS, DEIS (tAB, log-rho), iPNDM.

All three integrate the probability-flow ODE in variance-exploding coordinates ``y = x / alpha``
against ``rho = sigma / alpha``, where it reads ``dy/drho = eps_hat = (y - x0) / rho``; they differ in
how they extrapolate ``eps_hat`` from past steps:

- ``lms``: Lagrange polynomial in rho, integrated exactly (variable-step Adams-Bashforth);
- ``deis``: Lagrange polynomial in log rho, integrated exactly against d rho (DEIS's ``logrho`` tAB);
- ``ipndm``: fixed Adams-Bashforth weights (1; 3/2, -1/2; 23/12 ...; 55/24 ...), as in iPNDM.

The last step of LMS and iPNDM into sigma = 0 is a genuine multistep step (rho' = 0 is an ordinary
endpoint of a polynomial in rho, as in k-diffusion and diffusers). DEIS's polynomial lives in log rho,
which is -inf there, so its step into sigma = 0 is the plain denoise (diffusers' DEIS never steps to
sigma = 0: it ends at training step 0); it also lowers its order at the end like diffusers. A step out
of alpha = 0 (rho = inf) is the exact DDIM limit; LMS and DEIS then keep no history from it.
"""

from __future__ import annotations

import math

from ..core.grid import Grid
from .base import Callback, SolverGen, StepInfo, Tensor, check_order, ddim_step, register, to_final
from .dpm_solver import _multistep_order
from .stiffness import stiffness_guard

GUARD_NOTE = (" stiff_guard (on under guidance): samples whose guided ODE is stiff at a step take the first-order "
              "(DDIM) step instead of the extrapolation (see noisewise.solvers.stiffness).")



def _basis(nodes: list[float], j: int, shift: float) -> tuple[list[float], float]:
    """Lagrange basis polynomial ``L_j`` over ``nodes`` as ascending coefficients in ``v = t - shift``,
    divided by its denominator (returned separately for accuracy)."""
    poly = [1.0]
    denom = 1.0
    for k, tk in enumerate(nodes):
        if k == j:
            continue
        c = tk - shift
        # poly *= (v - c)
        poly = [-c * poly[0]] + [poly[m - 1] - c * poly[m] for m in range(1, len(poly))] + [poly[-1]]
        denom *= nodes[j] - tk
    return poly, denom


def lagrange_integrals(nodes: list[float], a: float, b: float) -> list[float]:
    """``int_a^b L_j(t) dt`` for each Lagrange basis polynomial over ``nodes`` (exact)."""
    out = []
    span = b - a
    for j in range(len(nodes)):
        poly, denom = _basis(nodes, j, a)
        out.append(sum(p * span ** (m + 1) / (m + 1) for m, p in enumerate(poly)) / denom)
    return out


def log_lagrange_integrals(nodes: list[float], a: float, b: float) -> list[float]:
    """``int_{e^a}^{e^b} L_j(log rho) d rho`` for the Lagrange basis over ``nodes`` (values of
    ``u = log rho``); exact: ``int p(u) e^u du = [e^u (p - p' + p'' - ...)]``. ``b = -inf`` allowed."""
    out = []
    for j in range(len(nodes)):
        poly, denom = _basis(nodes, j, a)  # in v = u - a
        # Q = p - p' + p'' - ... (ascending coefficients)
        q = [0.0] * len(poly)
        deriv = list(poly)
        sign = 1.0
        while deriv:
            for m, c in enumerate(deriv):
                q[m] += sign * c
            deriv = [c * (m + 1) for m, c in enumerate(deriv[1:])]
            sign = -sign
        at_b = 0.0 if b == -math.inf else math.exp(b - a) * sum(c * (b - a) ** m for m, c in enumerate(q))
        out.append(math.exp(a) * (at_b - q[0]) / denom)
    return out


@register(
    "lms",
    "Linear multistep (variable-step Adams-Bashforth) on the probability-flow ODE in VE coordinates "
    "(Karras et al. 2022 framework), as k-diffusion's sample_lms / diffusers' LMSDiscreteScheduler",
    order=4,
    options=("order", "stiff_guard"),
    notes="order = the option (default 4), reached once order-1 past steps exist; the first steps warm up "
    "from order 1. The last step integrates the polynomial down to sigma = 0, as the references do." + GUARD_NOTE,
)
def lms(
    x: Tensor, grid: Grid, *, order: int = 4, stiff_guard: float | None = None, callback: Callback | None = None
) -> SolverGen:
    """``y' = y + sum_j c_j d_j``, ``c_j = int_rho^rho' L_j``, Lagrange basis over the last ``order`` rhos."""
    check_order(order, 1, 4, "lms")
    guard = stiffness_guard(stiff_guard)
    rhos: list[float] = []
    ds: list[Tensor] = []
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        guard.observe(x, x0, cur)
        if cur.alpha == 0.0:
            x = ddim_step(x, x0, cur, nxt)
        else:
            rho, rho_next = cur.sigma / cur.alpha, nxt.sigma / nxt.alpha
            y = x / cur.alpha
            rhos, ds = (rhos + [rho])[-order:], (ds + [(y - x0) / rho])[-order:]
            coeffs = lagrange_integrals(rhos[::-1], rho, rho_next)
            for c, d in zip(coeffs, reversed(ds)):
                y = y + c * d
            x = guard.choose_ddim(len(ds), y * nxt.alpha, x, x0, cur, nxt)
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


@register(
    "deis",
    "Zhang & Chen 2023, Fast Sampling of Diffusion Models with Exponential Integrator (DEIS), tAB-DEIS "
    "with the 'logrho' polynomial, as diffusers' DEISMultistepScheduler",
    order=3,
    options=("order", "lower_order_final", "stiff_guard"),
    notes="order = the option (1-3, default 3). lower_order_final as diffusers: below 15 steps the last "
    "step is first order and the one before at most second order. A step into sigma = 0 is the plain denoise."
    + GUARD_NOTE,
)
def deis(
    x: Tensor, grid: Grid, *, order: int = 3, lower_order_final: bool = True, stiff_guard: float | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """``y' = y + sum_j c_j eps_j``, ``c_j = int_rho^rho' L_j(log rho) d rho`` over the last k log-rhos."""
    check_order(order, 1, 3, "deis")
    guard = stiffness_guard(stiff_guard)
    logs: list[float] = []
    eps: list[Tensor] = []
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        guard.observe(x, x0, cur)
        if cur.alpha == 0.0:
            x = ddim_step(x, x0, cur, nxt)
        else:
            logs = (logs + [-cur.lam])[-order:]
            eps = (eps + [(x - cur.alpha * x0) / cur.sigma])[-order:]
            k = _multistep_order(i, grid.steps, order, len(logs) - 1, lower_order_final)
            if nxt.sigma == 0.0:
                # the log-rho polynomial would be extrapolated to log rho = -inf: denoise instead
                x = to_final(x0, nxt)
            else:
                y = x / cur.alpha
                coeffs = log_lagrange_integrals(logs[-k:][::-1], -cur.lam, -nxt.lam)
                for c, e in zip(coeffs, reversed(eps[-k:])):
                    y = y + c * e
                x = guard.choose_ddim(k, y * nxt.alpha, x, x0, cur, nxt)
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


_AB = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


@register(
    "ipndm",
    "Zhang & Chen 2023 (DEIS paper, Sec. 4 / App.), improved PNDM (Liu et al. 2022): Adams-Bashforth with "
    "fixed weights on eps in VE coordinates, as diffusers' IPNDMScheduler",
    order=None,
    options=("order", "stiff_guard"),
    notes="Fixed weights assume equal steps in rho: order = the option (max 4) on grids uniform in "
    "sigma / alpha, at most 2 on other smooth grids. The eps taken at alpha = 0 enters the history, as in "
    "diffusers." + GUARD_NOTE,
)
def ipndm(
    x: Tensor, grid: Grid, *, order: int = 4, stiff_guard: float | None = None, callback: Callback | None = None
) -> SolverGen:
    """``y' = y + (rho' - rho) sum_j w_j eps_{i-j}`` with Adams-Bashforth weights ``w`` of order <= 4."""
    check_order(order, 1, 4, "ipndm")
    guard = stiffness_guard(stiff_guard)
    eps: list[Tensor] = []
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        guard.observe(x, x0, cur)
        eps = (eps + [(x - cur.alpha * x0) / cur.sigma])[-order:]
        if cur.alpha == 0.0:
            x = ddim_step(x, x0, cur, nxt)  # first step: k = 1, the exact limit
        else:
            w = _AB[len(eps)]
            e = w[0] * eps[-1]
            for wj, ej in zip(w[1:], reversed(eps[:-1])):
                e = e + wj * ej
            rho, rho_next = cur.sigma / cur.alpha, nxt.sigma / nxt.alpha
            x_high = (x / cur.alpha + (rho_next - rho) * e) * nxt.alpha
            x = guard.choose_ddim(len(eps), x_high, x, x0, cur, nxt)
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x
