"""SDE samplers in the DPM-Solver++ family: dpmpp_sde (single-step), dpmpp_2m_sde, dpmpp_3m_sde.

All updates are written in ``(alpha, sigma, lambda)``, so they run on VP, VE and flow schedules alike
and coincide with k-diffusion's variance-exploding formulas there. For the multistep SDE solvers,
with ``h = lam' - lam`` and noise strength ``eta`` (Lu et al. 2023, SDE-DPM-Solver++; Gonzalez et al.
2023, SEEDS), the first-order part is

    x' = (sigma'/sigma) e^{-eta h} x + alpha' (1 - e^{-(1+eta) h}) x0 + sigma' sqrt(1 - e^{-2 eta h}) z,

which at eta = 1 is the DDPM posterior step and at eta = 0 the DDIM / DPM-Solver++ step.
A step out of alpha = 0 (lam = -inf) is taken in its exact first-order limit and is not used as
history by the multistep corrections.
"""

from __future__ import annotations

import math
from typing import Literal

from ..core.grid import Grid, Level
from .ancestral import ancestral_split, check_eta
from .base import Callback, SolverGen, StepInfo, Tensor, ddim_step, register, to_final
from .noise import Generators, NoiseName, NoiseSampler, resolve
from .stiffness import stiffness_guard


@register(
    "dpmpp_sde",
    "Lu et al. 2023, DPM-Solver++ (2S, data prediction) with ancestral noise in both stages, as "
    "k-diffusion's sample_dpmpp_sde / diffusers' DPMSolverSDEScheduler",
    order=2,
    stochastic=True,
    evals_per_step=2,
    options=("eta", "s_noise", "r", "noise_sampler"),
    notes="order: of the eta = 0 limit. Default noise is Brownian-tree noise (needs torchsde), as in the "
    "references, because the two stages draw over overlapping intervals; noise_sampler='gaussian' avoids it.",
)
def dpmpp_sde(
    x: Tensor,
    grid: Grid,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    r: float = 0.5,
    generator: Generators = None,
    noise_sampler: NoiseName | NoiseSampler | None = "brownian",
    callback: Callback | None = None,
) -> SolverGen:
    """Stage 1: ancestral first-order step to ``lam + r h`` and evaluate there; stage 2: ancestral step
    to ``lam'`` with the blended prediction ``(1 - 1/(2r)) x0 + 1/(2r) x0_mid``."""
    eta = check_eta(eta, "dpmpp_sde")
    if not 0.0 < r < 1.0:
        raise ValueError(f"dpmpp_sde: r (position of the intermediate evaluation) must lie in (0, 1), got {r!r}")
    noise = resolve(noise_sampler, generator)
    fac = 1.0 / (2.0 * r)
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        elif cur.alpha == 0.0:
            # out of alpha = 0 no intermediate lambda exists: exact first-order ancestral step
            down, c = ancestral_split(cur, nxt, eta)
            x_next = ddim_step(x, x0, cur, down)
            x = x_next + (s_noise * c) * noise(x, cur, nxt) if c > 0.0 else x_next
        else:
            mid = grid.level_at(cur.lam + r * (nxt.lam - cur.lam))
            # Step 1.
            down, c = ancestral_split(cur, mid, eta)
            x_mid = ddim_step(x, x0, cur, down)
            if c > 0.0:
                x_mid = x_mid + (s_noise * c) * noise(x, cur, mid)
            x0_mid = yield x_mid, mid
            # Step 2.
            down, c = ancestral_split(cur, nxt, eta)
            x_next = ddim_step(x, (1.0 - fac) * x0 + fac * x0_mid, cur, down)
            x = x_next + (s_noise * c) * noise(x, cur, nxt) if c > 0.0 else x_next
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


def _sde_first_order(x: Tensor, x0: Tensor, cur: Level, nxt: Level, eta: float, h: float) -> tuple[Tensor, float]:
    """``(sigma'/sigma) e^{-eta h} x + alpha' g x0`` and ``g = 1 - e^{-(1+eta) h}`` (finite at h = inf)."""
    decay = math.exp(-eta * h) if eta > 0.0 else 1.0
    g = -math.expm1(-(1.0 + eta) * h)
    return (nxt.sigma / cur.sigma * decay) * x + (nxt.alpha * g) * x0, g


def _history_ok(h: float, h_prev: float, max_step_ratio: float | None) -> bool:
    """A multistep correction may use the previous step: both finite, and (with a guard) this step no
    longer than ``max_step_ratio`` times it (extrapolating further amplifies its differences)."""
    if not (math.isfinite(h) and math.isfinite(h_prev)):
        return False
    return max_step_ratio is None or h <= max_step_ratio * h_prev


def _sde_noise_std(nxt: Level, eta: float, h: float) -> float:
    return nxt.sigma * math.sqrt(-math.expm1(-2.0 * eta * h)) if eta > 0.0 else 0.0


@register(
    "dpmpp_2m_sde",
    "Lu et al. 2023, DPM-Solver++(2M) with SDE-DPM-Solver++ noise (k-diffusion's sample_dpmpp_2m_sde, "
    "diffusers' DPMSolverMultistepScheduler algorithm_type='sde-dpmsolver++', solver_order=2)",
    order=2,
    stochastic=True,
    options=("eta", "s_noise", "solver_type", "max_step_ratio", "stiff_guard", "noise_sampler"),
    notes="order: of the eta = 0 limit (equals dpmpp_2m there). max_step_ratio (default 3): a step longer "
    "than that many times the previous one (in lambda) is first order; None = k-diffusion's behaviour. "
    "stiff_guard (on under guidance): samples whose guided ODE is stiff at a step drop the multistep "
    "correction (noisewise.solvers.stiffness).",
)
def dpmpp_2m_sde(
    x: Tensor,
    grid: Grid,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: Literal["midpoint", "heun"] = "midpoint",
    max_step_ratio: float | None = 3.0,
    stiff_guard: float | None = None,
    generator: Generators = None,
    noise_sampler: NoiseName | NoiseSampler | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """First-order SDE step plus the 2M correction ``(0.5 g or 1 - g/((1+eta)h)) (x0 - x0_prev) / r``,
    ``r = h_prev / h``, plus ``sigma' sqrt(1 - e^{-2 eta h}) z``."""
    eta = check_eta(eta, "dpmpp_2m_sde")
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"dpmpp_2m_sde: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise = resolve(noise_sampler, generator)
    guard = stiffness_guard(stiff_guard)
    x0_prev: Tensor | None = None
    h_prev = math.inf
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        guard.observe(x, x0, cur)
        h = nxt.lam - cur.lam
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        else:
            x_next, g = _sde_first_order(x, x0, cur, nxt, eta, h)
            if x0_prev is not None and _history_ok(h, h_prev, max_step_ratio):
                r = h_prev / h
                w = 0.5 * g if solver_type == "midpoint" else 1.0 - g / ((1.0 + eta) * h)
                x_next = guard.choose(h, 2, x_next + (nxt.alpha * w / r) * (x0 - x0_prev), x_next, sigma=nxt.sigma)
            std = _sde_noise_std(nxt, eta, h)
            if std > 0.0:
                x_next = x_next + (s_noise * std) * noise(x, cur, nxt)
            x = x_next
        x0_prev, h_prev = x0, h
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


@register(
    "dpmpp_3m_sde",
    "Lu et al. 2023, DPM-Solver++(3M) with SDE-DPM-Solver++ noise (k-diffusion's sample_dpmpp_3m_sde)",
    order=3,
    stochastic=True,
    options=("eta", "s_noise", "variant", "lower_order_final", "max_step_ratio", "max_eta_h", "stiff_guard",
             "noise_sampler"),
    notes="order: of the eta = 0 limit (equals dpmpp_3m there). variant='exact' uses the exact weight of the "
    "second divided difference; variant='k-diffusion' reproduces k-diffusion, whose weight is half of it "
    "(second order in practice). Guards for short, coarse or uneven grids: lower_order_final (below 15 steps "
    "the step before the final denoise is at most second order, as diffusers), max_step_ratio (default 1.5, "
    "stricter than the ODE solvers' 3) and max_eta_h (the third-order term only where eta * h <= 1). Along an "
    "SDE path the data predictions carry the injected noise, which the third-order extrapolation amplifies "
    "on long or growing steps and over-disperses the modes (see docs/samplers.md). lower_order_final=False, "
    "max_step_ratio=None, max_eta_h=None is k-diffusion's behaviour. stiff_guard (on under guidance): samples "
    "whose guided ODE is stiff at a step drop the multistep correction (noisewise.solvers.stiffness).",
)
def dpmpp_3m_sde(
    x: Tensor,
    grid: Grid,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    variant: Literal["exact", "k-diffusion"] = "exact",
    lower_order_final: bool = True,
    max_step_ratio: float | None = 1.5,
    max_eta_h: float | None = 1.0,
    stiff_guard: float | None = None,
    generator: Generators = None,
    noise_sampler: NoiseName | NoiseSampler | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """First-order SDE step plus ``alpha' (phi_2 D1 - c phi_3 D2)`` with divided differences D1, D2 in
    lambda, ``phi_2 = (e^{-H} - 1)/H + 1``, ``phi_3 = phi_2 / H - 1/2``, ``H = (1 + eta) h``; c = 2 (exact)."""
    eta = check_eta(eta, "dpmpp_3m_sde")
    if variant not in ("exact", "k-diffusion"):
        raise ValueError(f"dpmpp_3m_sde: variant must be 'exact' or 'k-diffusion', got {variant!r}")
    c2 = 2.0 if variant == "exact" else 1.0
    noise = resolve(noise_sampler, generator)
    guard = stiffness_guard(stiff_guard)
    x0_1: Tensor | None = None
    x0_2: Tensor | None = None
    h_1 = h_2 = math.inf
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        guard.observe(x, x0, cur)
        h = nxt.lam - cur.lam
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        else:
            x_next, _ = _sde_first_order(x, x0, cur, nxt, eta, h)
            if x0_1 is not None and _history_ok(h, h_1, max_step_ratio):
                h_eta = (1.0 + eta) * h
                phi_2 = math.expm1(-h_eta) / h_eta + 1.0
                second_last = lower_order_final and grid.steps < 15 and i == grid.steps - 2
                noisy = max_eta_h is not None and eta * h > max_eta_h
                if x0_2 is not None and math.isfinite(h_2) and not second_last and not noisy:
                    r0, r1 = h_1 / h, h_2 / h
                    d1_0 = (x0 - x0_1) / r0
                    d1_1 = (x0_1 - x0_2) / r1
                    d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))
                    d2 = (d1_0 - d1_1) / (r0 + r1)
                    phi_3 = phi_2 / h_eta - 0.5
                    x_high = x_next + (nxt.alpha * phi_2) * d1 - (c2 * nxt.alpha * phi_3) * d2
                    x_next = guard.choose(h, 3, x_high, x_next, sigma=nxt.sigma)
                else:
                    x_next = guard.choose(h, 2, x_next + (nxt.alpha * phi_2 * h / h_1) * (x0 - x0_1), x_next,
                                          sigma=nxt.sigma)
            std = _sde_noise_std(nxt, eta, h)
            if std > 0.0:
                x_next = x_next + (s_noise * std) * noise(x, cur, nxt)
            x = x_next
        x0_1, x0_2 = x0, x0_1
        h_1, h_2 = h, h_1
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x
