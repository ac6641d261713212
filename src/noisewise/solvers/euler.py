"""First-order and Heun samplers: DDIM, Euler (VE coordinates), Heun, flow Euler."""

from __future__ import annotations

from ..core.grid import Grid
from .ancestral import ancestral_ddim_step, check_eta
from .base import Callback, SolverGen, StepInfo, Tensor, ddim_step, register, to_final
from .noise import Generators, NoiseName, NoiseSampler, resolve


@register(
    "ddim",
    "Song, Meng & Ermon 2021, Denoising Diffusion Implicit Models, eq. 12 (eta = 0) and eq. 16 (eta > 0)",
    order=1,
    options=("eta", "noise_sampler"),
    notes="Stochastic only with eta > 0 (then it takes generator= / noise_sampler=); eta = 1 is DDPM.",
)
def ddim(
    x: Tensor,
    grid: Grid,
    *,
    eta: float = 0.0,
    generator: Generators = None,
    noise_sampler: NoiseName | NoiseSampler | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """DDIM with eta = 0: ``x' = alpha' x0 + sigma' eps_hat``, ``eps_hat = (x - alpha x0) / sigma``; with
    eta > 0: ``x' = alpha' x0 + sqrt(sigma'^2 - c^2) eps_hat + c z``, ``c = eta sigma' sqrt(1 - e^{-2h})``."""
    eta = check_eta(eta, "ddim")
    noise = resolve(noise_sampler, generator) if eta > 0 else None
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        elif noise is not None:
            x = ancestral_ddim_step(x, x0, cur, nxt, eta, noise)
        else:
            eps = (x - cur.alpha * x0) / cur.sigma
            x = nxt.alpha * x0 + nxt.sigma * eps
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


@register(
    "euler",
    "Karras et al. 2022 (EDM), Algorithm 1 without churn: Euler on dx/dsigma = (x - D(x)) / sigma "
    "in variance-exploding coordinates (x / alpha, sigma / alpha)",
    order=1,
)
def euler(x: Tensor, grid: Grid, *, callback: Callback | None = None) -> SolverGen:
    """Euler in VE coordinates ``y = x / alpha``, ``s = sigma / alpha``: ``y' = y + (s' - s) d``,
    ``d = (y - x0) / s``. A step from alpha = 0 (s = inf) is taken in its exact limit, the DDIM step."""
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        elif cur.alpha == 0.0:
            x = ddim_step(x, x0, cur, nxt)
        else:
            s, s_next = cur.sigma / cur.alpha, nxt.sigma / nxt.alpha
            y = x / cur.alpha
            d = (y - x0) / s
            x = (y + (s_next - s) * d) * nxt.alpha
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


@register(
    "heun",
    "Karras et al. 2022 (EDM), Algorithm 1 (deterministic Heun, 2nd order) in VE coordinates",
    order=2,
    evals_per_step=2,
    options=("max_sigma_ratio",),
    notes="2 evaluations per step; the last step (into sigma = 0), a step out of alpha = 0 and a step that "
    "shrinks sigma/alpha by more than max_sigma_ratio (default 8) are first order.",
)
def heun(
    x: Tensor, grid: Grid, *, max_sigma_ratio: float | None = 8.0, callback: Callback | None = None
) -> SolverGen:
    """Heun's method on the VE probability-flow ODE: Euler predictor, trapezoid corrector.

    The corrector is explicit, so it is unstable when one step shrinks sigma by a large factor
    (the slope at the end grows like 1/sigma'); such steps keep the Euler predictor."""
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        elif cur.alpha == 0.0:
            x = ddim_step(x, x0, cur, nxt)
        else:
            s, s_next = cur.sigma / cur.alpha, nxt.sigma / nxt.alpha
            y = x / cur.alpha
            d = (y - x0) / s
            # Euler step.
            y_next = y + (s_next - s) * d
            if max_sigma_ratio is None or s <= max_sigma_ratio * s_next:
                # Apply 2nd order correction.
                x0_next = yield y_next * nxt.alpha, nxt
                d_next = (y_next - x0_next) / s_next
                y_next = y + (s_next - s) * 0.5 * (d + d_next)
            x = y_next * nxt.alpha
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


@register(
    "flow_euler",
    "Lipman et al. 2023 (Flow Matching) / Liu et al. 2023 (Rectified Flow): Euler on dx/dt = v "
    "in flow coordinates (x / (alpha + sigma), t = sigma / (alpha + sigma))",
    order=1,
)
def flow_euler(x: Tensor, grid: Grid, *, callback: Callback | None = None) -> SolverGen:
    """Euler on the rectified-flow ODE ``dz/dt = v = (z - x0) / t`` with ``z = x / (alpha + sigma)``,
    ``t = sigma / (alpha + sigma)``; on a flow schedule (alpha + sigma = 1) this is exactly
    ``x' = x + (t' - t) v``. Works on any schedule by that change of variables."""
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
            x = (z + (t_next - t) * v) * c_next
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x
