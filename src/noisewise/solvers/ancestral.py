"""Ancestral samplers: DDPM, Euler ancestral, DPM-Solver++(2S) ancestral.

One noise split serves every schedule. Stepping from level ``(alpha, sigma, lam)`` to
``(alpha', sigma', lam')`` with ``h = lam' - lam``, the DDPM posterior ``q(x' | x, x0)`` has standard
deviation ``sigma' sqrt(1 - e^{-2h})``. An ancestral step with strength ``eta`` adds noise
``c = eta sigma' sqrt(1 - e^{-2h})`` (capped at ``sigma'``) and moves the rest of the way
deterministically, to the "down" level ``(alpha', sqrt(sigma'^2 - c^2))`` (same alpha, less noise;
``lam_down = lam' + h`` at eta = 1). On variance-exploding coordinates this is exactly k-diffusion's
``get_ancestral_step`` (``sigma_up``, ``sigma_down``); on a VP schedule it is DDIM's eta (eq. 16 of
Song et al. 2021); on a flow schedule it is the same posterior, so eta = 1 is DDPM on every schedule.
"""

from __future__ import annotations

import math
from typing import Literal

from ..core.grid import Grid, Level
from .base import Callback, SolverGen, StepInfo, Tensor, ddim_step, register, to_final
from .noise import Generators, NoiseName, NoiseSampler, resolve

VarianceType = Literal["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"]


def one_minus_exp_m2h(cur: Level, nxt: Level) -> float:
    """``1 - e^{-2h}``, ``h = lam' - lam`` (1 when leaving alpha = 0, where h = inf)."""
    return -math.expm1(-2.0 * (nxt.lam - cur.lam))


def check_eta(eta: float, name: str) -> float:
    if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
        raise ValueError(
            f"{name}: eta must be a finite number >= 0 (0 = deterministic, 1 = DDPM posterior), got {eta!r}"
        )
    return float(eta)


def ancestral_split(cur: Level, nxt: Level, eta: float) -> tuple[Level, float]:
    """The deterministic target ("down" level) and the noise std ``c`` of an ancestral step.

    ``c = min(sigma', eta sigma' sqrt(1 - e^{-2h}))``; down = ``(alpha', sqrt(sigma'^2 - c^2))``, computed
    as ``sigma' sqrt((1 - eta^2) + eta^2 e^{-2h})`` so that no cancellation occurs. The down level is
    not a schedule level; it is only a target for a deterministic step, never a model input."""
    if eta == 0.0 or nxt.sigma == 0.0:
        return nxt, 0.0
    e2h = math.exp(-2.0 * (nxt.lam - cur.lam))  # e^{-2h}, 0 when leaving alpha = 0
    c = nxt.sigma * min(1.0, eta * math.sqrt(-math.expm1(-2.0 * (nxt.lam - cur.lam))))
    frac = (1.0 - eta * eta) + eta * eta * e2h if eta <= 1.0 else max(0.0, 1.0 - (c / nxt.sigma) ** 2)
    sigma_down = nxt.sigma * math.sqrt(max(frac, 0.0))
    if sigma_down == 0.0:
        return Level(nxt.alpha, 0.0, math.inf, nxt.model_time), c
    lam_down = math.log(nxt.alpha) - math.log(sigma_down) if nxt.alpha > 0 else -math.inf
    return Level(nxt.alpha, sigma_down, lam_down, nxt.model_time), c


def ancestral_ddim_step(
    x: Tensor, x0: Tensor, cur: Level, nxt: Level, eta: float, noise: NoiseSampler, s_noise: float = 1.0
) -> Tensor:
    """One DDIM(eta) / Euler-ancestral step: ``x' = alpha' x0 + sigma_down eps_hat + c z``."""
    down, c = ancestral_split(cur, nxt, eta)
    x_next = ddim_step(x, x0, cur, down)
    if c > 0.0:
        x_next = x_next + (s_noise * c) * noise(x, cur, nxt)
    return x_next


@register(
    "ddpm",
    "Ho, Jain & Abbeel 2020, Denoising Diffusion Probabilistic Models, Algorithm 2 with the posterior "
    "q(x_s | x_t, x0) of eq. 6-7 between the grid's levels",
    order=1,
    stochastic=True,
    options=("variance_type", "noise_sampler"),
    notes="Works on any schedule (flow included): the posterior is written in (alpha, sigma, lambda). "
    "order is that of the mean update (weak order 1). 'learned'/'learned_range' variances need a model "
    "that predicts them and are refused.",
)
def ddpm(
    x: Tensor,
    grid: Grid,
    *,
    variance_type: VarianceType = "fixed_small",
    generator: Generators = None,
    noise_sampler: NoiseName | NoiseSampler | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """Ancestral sampling ``x' = mu + std z`` with posterior mean
    ``mu = (alpha_ts sigma'^2 / sigma^2) x + (alpha' sigma_ts^2 / sigma^2) x0``, ``alpha_ts = alpha / alpha'``,
    ``sigma_ts^2 = sigma^2 - alpha_ts^2 sigma'^2``; variance ``sigma_ts^2 sigma'^2 / sigma^2`` (fixed_small,
    the posterior's) or ``sigma_ts^2`` (fixed_large, beta_t in the paper)."""
    if variance_type in ("learned", "learned_range"):
        raise ValueError(
            f"ddpm: variance_type={variance_type!r} needs a network that predicts its variance; noisewise "
            "denoisers return x0 only. Use 'fixed_small' (posterior variance) or 'fixed_large' (beta_t)."
        )
    if variance_type not in ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"):
        raise ValueError(
            f"ddpm: unknown variance_type {variance_type!r}; known: 'fixed_small', 'fixed_small_log', "
            "'fixed_large', 'fixed_large_log'"
        )
    large = variance_type.startswith("fixed_large")
    noise = resolve(noise_sampler, generator)
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        else:
            a_ts = cur.alpha / nxt.alpha
            s2_ts = cur.sigma**2 * one_minus_exp_m2h(cur, nxt)  # = sigma^2 - a_ts^2 sigma'^2
            r = nxt.sigma**2 / cur.sigma**2
            mean = (a_ts * r) * x + (nxt.alpha * s2_ts / cur.sigma**2) * x0
            var = s2_ts if large else s2_ts * r
            x = mean + math.sqrt(var) * noise(x, cur, nxt)
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


@register(
    "euler_ancestral",
    "Song et al. 2021 (Score-Based Generative Modeling through SDEs) ancestral sampling with Euler "
    "steps, as k-diffusion's sample_euler_ancestral (Karras et al. 2022 framework)",
    order=1,
    stochastic=True,
    options=("eta", "s_noise", "noise_sampler"),
    notes="eta = 1 adds the DDPM posterior noise; the same step as ddim(eta) on every schedule.",
)
def euler_ancestral(
    x: Tensor,
    grid: Grid,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generators = None,
    noise_sampler: NoiseName | NoiseSampler | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """Euler step to the down level ``sigma_down``, then add ``s_noise * sigma_up * z``."""
    eta = check_eta(eta, "euler_ancestral")
    noise = resolve(noise_sampler, generator)
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        else:
            x = ancestral_ddim_step(x, x0, cur, nxt, eta, noise, s_noise)
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x


@register(
    "dpmpp_2s_ancestral",
    "Lu et al. 2023, DPM-Solver++ (single-step 2S, data prediction, r = 1/2) with ancestral noise, "
    "as k-diffusion's sample_dpmpp_2s_ancestral",
    order=2,
    stochastic=True,
    evals_per_step=2,
    options=("eta", "s_noise", "noise_sampler"),
    notes="order: of the eta = 0 limit. The intermediate evaluation sits at the lambda-midpoint to the down "
    "level. A step out of alpha = 0 and a step whose down level is sigma = 0 are first order (one evaluation).",
)
def dpmpp_2s_ancestral(
    x: Tensor,
    grid: Grid,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    generator: Generators = None,
    noise_sampler: NoiseName | NoiseSampler | None = None,
    callback: Callback | None = None,
) -> SolverGen:
    """DPM-Solver++(2S) to the down level (midpoint ``lam + h_down / 2``), then ``+ s_noise sigma_up z``."""
    eta = check_eta(eta, "dpmpp_2s_ancestral")
    noise = resolve(noise_sampler, generator)
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        x0 = yield x, cur
        if nxt.sigma == 0.0:
            x = to_final(x0, nxt)
        else:
            down, c = ancestral_split(cur, nxt, eta)
            if down.sigma == 0.0 or cur.alpha == 0.0:
                # first order: the exact limit out of alpha = 0, or straight to the data prediction
                x_next = ddim_step(x, x0, cur, down)
            else:
                mid = grid.level_at(cur.lam + 0.5 * (down.lam - cur.lam))
                # DPM-Solver++(2S): first-order step to the midpoint, then the full step with its prediction.
                x_mid = ddim_step(x, x0, cur, mid)
                x0_mid = yield x_mid, mid
                x_next = ddim_step(x, x0_mid, cur, down)
            if c > 0.0:
                x_next = x_next + (s_noise * c) * noise(x, cur, nxt)
            x = x_next
        if callback is not None:
            callback(StepInfo(i, nxt, x, x0))
    return x
