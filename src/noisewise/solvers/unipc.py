"""UniPC: unified predictor-corrector (Zhao et al. 2023), data-prediction form, B(h) = bh1 or bh2."""

from __future__ import annotations

import math

from ..core.grid import Grid, Level
from .base import Callback, SolverGen, StepInfo, Tensor, check_order, ddim_step, lincomb, register, to_final
from .stiffness import stiffness_guard


def _coefficients(rks: list[float], h: float, order: int, variant: str) -> tuple[float, float, list[float]]:
    """``h_phi_1``, ``B(h)`` and the right-hand side ``b`` of the UniPC linear system (eq. 8);
    ``hh = -h`` (data prediction)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    b_h = hh if variant == "bh1" else math.expm1(hh)
    factorial = 1
    b = []
    for i in range(1, order + 1):
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return h_phi_1, b_h, b


def _solve(rks: list[float], b: list[float]) -> list[float]:
    """Solve ``sum_j rks[j]**i rho_j = b[i]`` (i = 0 .. n-1; n <= 3) by Gaussian elimination in
    Python floats: no tensor, no device, exact to float64 round-off."""
    n = len(b)
    A = [[rks[j] ** i for j in range(n)] + [b[i]] for i in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(A[r][c]))
        A[c], A[p] = A[p], A[c]
        for r in range(c + 1, n):
            f = A[r][c] / A[c][c]
            for k in range(c, n + 1):
                A[r][k] -= f * A[c][k]
    rho = [0.0] * n
    for r in range(n - 1, -1, -1):
        rho[r] = (A[r][n] - sum(A[r][k] * rho[k] for k in range(r + 1, n))) / A[r][r]
    return rho


@register(
    "unipc",
    "Zhao et al. 2023, UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion "
    "Models (UniP-p predictor + UniC corrector, Algorithms 2-3, B(h) = bh1 or bh2)",
    order=None,
    options=("order", "variant", "lower_order_final", "disable_corrector", "max_step_ratio", "stiff_guard"),
    notes="The corrector reuses the next step's evaluation: one evaluation per step, order+1 accuracy.",
)
def unipc(
    x: Tensor,
    grid: Grid,
    *,
    order: int = 2,
    variant: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: tuple[int, ...] = (),
    max_step_ratio: float | None = 3.0,
    stiff_guard: float | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """UniPC-p with B(h) = h (``bh1``) or e^h - 1 (``bh2``). Each step first corrects the state it
    starts from with UniC (using the evaluation just made there), then predicts with UniP."""
    check_order(order, 1, 3, "unipc")
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"unipc: variant must be 'bh1' or 'bh2', got {variant!r}")
    ms: list[Tensor] = []
    lvs: list[Level] = []
    last_x: Tensor | None = None
    this_order = 1
    steps = grid.steps
    guard = stiffness_guard(stiff_guard)
    for i in range(steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        guard.observe(x, x0, cur)
        # UniC: correct x at `cur` with the evaluation made there.
        # (a step out of alpha = 0 is kept as predicted: its first-order step is the exact limit)
        if last_x is not None and (i - 1) not in disable_corrector and math.isfinite(lvs[-1].lam):
            x_corr = _corrector(last_x, x0, ms, lvs, cur, this_order, variant)
            # under guidance: no correction for samples whose ODE was stiff over that step, or whose
            # correction exceeds the noise level by far (stiffness.py)
            x = guard.choose(cur.lam - lvs[-1].lam, this_order + 1, x_corr, x, sigma=cur.sigma)
        ms, lvs = (ms + [x0])[-order:], (lvs + [cur])[-order:]
        k = min(order, steps - i) if lower_order_final else order
        this_order = min(k, len(ms))
        if this_order > 1 and max_step_ratio is not None and nxt.sigma > 0:
            # a step much longer than the last one would amplify the extrapolated differences
            if (nxt.lam - cur.lam) > max_step_ratio * (cur.lam - lvs[-2].lam):
                this_order = 1
        last_x = x
        # UniP: predict the next state.
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        elif this_order == 1 or not math.isfinite(lvs[-this_order].lam):
            # out of alpha = 0 (lambda = -inf) only the first-order step has a finite limit
            this_order = 1
            x = ddim_step(x, x0, cur, nxt)
        else:
            x_pred = _predictor(x, ms, lvs, nxt, this_order, variant)
            x = guard.choose_ddim(this_order, x_pred, x, x0, cur, nxt)
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


def _update(
    x: Tensor, ms: list[Tensor], lvs: list[Level], t: Level, order: int, variant: str, m_t: Tensor | None
) -> Tensor:
    """The UniPC update from ``lvs[-1]`` to ``t`` (eq. 8 of the paper, data prediction):
    ``x_t = (s_t/s_0) x - a_t phi1 m0 - a_t B(h) sum_k rho_k D_k`` with ``D_k = (m_k - m0) / r_k``
    over the history (predictor, UniP), plus ``rho_t (m_t - m0)`` for the corrector (UniC)."""
    s0, m0 = lvs[-1], ms[-1]
    h = t.lam - s0.lam
    rks = [(lvs[-(k + 1)].lam - s0.lam) / h for k in range(1, order)] + [1.0]
    h_phi_1, b_h, b = _coefficients(rks, h, order, variant)
    if m_t is None:  # UniP: order-1 history terms; order 2 uses rho = 1/2 as the paper
        rhos = [] if order == 1 else ([0.5] if order == 2 else _solve(rks[:-1], b[:-1]))
    else:  # UniC: the history terms plus the new evaluation
        rhos = [0.5] if order == 1 else _solve(rks, b)
    w0 = -t.alpha * h_phi_1
    terms: list[tuple[Tensor, float]] = []
    for k, (rho, rk) in enumerate(zip(rhos, rks[: order - 1]), start=1):
        c = -t.alpha * b_h * rho / rk
        terms.append((ms[-(k + 1)], c))
        w0 -= c
    if m_t is not None:
        c = -t.alpha * b_h * rhos[-1]
        terms.append((m_t, c))
        w0 -= c
    return lincomb(x, t.sigma / s0.sigma, (m0, w0), *terms)


def _predictor(x: Tensor, ms: list[Tensor], lvs: list[Level], t: Level, order: int, variant: str) -> Tensor:
    return _update(x, ms, lvs, t, order, variant, None)


def _corrector(
    x: Tensor, m_t: Tensor, ms: list[Tensor], lvs: list[Level], t: Level, order: int, variant: str
) -> Tensor:
    """UniC: re-do the step s0 -> t that produced the current state ``t`` from ``x`` (the state at
    s0), now also using the evaluation ``m_t`` made at the predicted state."""
    return _update(x, ms, lvs, t, order, variant, m_t)
