"""Step spacings: where the inference levels sit.

A spacing is a small function ``f(schedule, n, **options) -> model_times`` returning ``n``
descending model_time values, the start of each step; the grid appends the final node
(sigma = 0) itself. So ``n`` steps means ``n`` evaluations for a first-order sampler, as in
k-diffusion and diffusers' ``final_sigmas_type="zero"``.

Timestep spacings (``leading``, ``trailing``, ``linspace``) follow diffusers' semantics on
discrete schedules. Sigma/lambda spacings (``karras``, ``exponential``, ``uniform_lambda``,
``beta``) work in the variance-exploding sigma ``sigma / alpha`` (equivalently lambda); on a
schedule whose noisiest level has alpha = 0 (flow t = 1, zero terminal SNR) they start at the
noisiest *finite* level (``Schedule``-dependent ``lam_lo``, see :func:`lambda_range`), where
``alpha`` is below 1e-3.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

from .schedules import DiscreteVP, Schedule

SpacingName = Literal[
    "leading",
    "trailing",
    "linspace",
    "karras",
    "exponential",
    "uniform_lambda",
    "time_quadratic",
    "beta",
]

_F64 = torch.float64
SPACINGS: dict[str, Callable[..., torch.Tensor]] = {}


def _register(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    SPACINGS[fn.__name__] = fn
    return fn


def spacings() -> list[str]:
    """Names accepted by ``sample(..., spacing=NAME)``."""
    return sorted(SPACINGS)


def get_spacing(name: str) -> Callable[..., torch.Tensor]:
    if name in SPACINGS:
        return SPACINGS[name]
    if name == "tuned":
        raise ValueError(
            "spacing 'tuned' is looked up per model: use nw.sample(model, ..., spacing='tuned') after "
            "nw.tune_schedule(model, ...), or pass the TunedSchedule it returned as the spacing (docs/tuning.md)"
        )
    close = difflib.get_close_matches(name, list(SPACINGS), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown spacing {name!r}{hint} Known: {', '.join(spacings())}")


def _ends_at_zero(schedule: Schedule) -> bool:
    """True when the schedule's cleanest trained level already has sigma = 0 (flow t = 0)."""
    return float(schedule.sigma(schedule.t_min)) == 0.0


def lambda_range(schedule: Schedule) -> tuple[float, float]:
    """Finite (lam_lo, lam_hi) for sigma/lambda spacings.

    lam_lo is the noisiest finite trained level: the schedule's own top, or where that top has
    alpha = 0, the next training step (discrete) or t = 1 - 1/1000 (continuous). lam_hi is the
    cleanest level with sigma > 0 (flow: t = 1/1000).
    """
    lo = schedule.lam_min
    if not math.isfinite(lo):
        if isinstance(schedule, DiscreteVP):
            lo = float(schedule.lam(schedule.t_max - 1))
        else:
            lo = float(schedule.lam(schedule.t_max - (schedule.t_max - schedule.t_min) * 1e-3))
    hi = schedule.lam_max
    if not math.isfinite(hi):
        hi = float(schedule.lam(schedule.t_min + (schedule.t_max - schedule.t_min) * 1e-3))
    return lo, hi


def _require_discrete(schedule: Schedule, name: str) -> DiscreteVP:
    if not isinstance(schedule, DiscreteVP):
        raise ValueError(
            f"spacing {name!r} places integer training steps and needs a discrete schedule; "
            f"{type(schedule).__name__} is continuous: use 'linspace', 'uniform_lambda' or 'karras'"
        )
    return schedule


@_register
def leading(schedule: Schedule, n: int, steps_offset: int = 0) -> torch.Tensor:
    """diffusers 'leading': ``arange(n) * (T // n)`` reversed, plus ``steps_offset`` (SD1.x uses 1)."""
    s = _require_discrete(schedule, "leading")
    ratio = s.num_train_timesteps // n
    if ratio < 1:
        raise ValueError(f"'leading' needs steps <= num_train_timesteps ({s.num_train_timesteps}), got {n}")
    ts = torch.arange(n, dtype=_F64) * ratio + steps_offset
    return ts.flip(0).clamp(max=s.t_max)


@_register
def trailing(schedule: Schedule, n: int) -> torch.Tensor:
    """diffusers 'trailing' (Lin et al. 2023): ``round(T - i T / n) - 1``; always starts at T - 1.

    Computed as diffusers does (``np.arange(T, 0, -T / n).round()``), so where ``T - i T / n`` is a
    tie (x.5) the float error of arange picks the same integer as diffusers. For some n (61, 103 ..)
    that arange yields n + 1 values, the last being -1; diffusers then runs n + 1 steps, the last at
    timestep -1 (the noisiest alphas_cumprod entry); here the first n are kept."""
    s = _require_discrete(schedule, "trailing")
    T = s.num_train_timesteps
    ts = torch.from_numpy(np.arange(T, 0, -T / n).round()[:n].astype(np.float64)) - 1
    return ts.clamp(min=0)


@_register
def linspace(schedule: Schedule, n: int) -> torch.Tensor:
    """Uniform in model_time. Discrete: diffusers DDIM's ``linspace(0, T-1, n).round()`` reversed.
    Flow: ``linspace(t_max, 0, n + 1)`` without its final 0 (Flux/SD3 before shifting)."""
    if isinstance(schedule, DiscreteVP):
        # numpy's linspace, as diffusers: its round-off decides ties (999 * 13 / 26 -> 499, not 500)
        return torch.from_numpy(np.linspace(0, schedule.t_max, n).round()[::-1].copy())
    if _ends_at_zero(schedule):
        return torch.linspace(schedule.t_max, schedule.t_min, n + 1, dtype=_F64)[:-1]
    return torch.linspace(schedule.t_max, schedule.t_min, n, dtype=_F64)


def _from_ve_sigmas(schedule: Schedule, sigmas: torch.Tensor) -> torch.Tensor:
    return schedule.inverse_lambda(-torch.log(sigmas))


def _sigma_range(
    schedule: Schedule, sigma_min: float | None, sigma_max: float | None
) -> tuple[float, float]:
    lo, hi = lambda_range(schedule)
    smax = math.exp(-lo) if sigma_max is None else float(sigma_max)
    smin = math.exp(-hi) if sigma_min is None else float(sigma_min)
    if not 0 < smin < smax:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={smin}, sigma_max={smax}")
    return smin, smax


@_register
def karras(
    schedule: Schedule, n: int, rho: float = 7.0, sigma_min: float | None = None, sigma_max: float | None = None
) -> torch.Tensor:
    """Karras et al. 2022 (EDM) eq. 5: ``(smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho``
    in the VE sigma ``sigma/alpha``, from the schedule's sigma_max to sigma_min."""
    smin, smax = _sigma_range(schedule, sigma_min, sigma_max)
    if n == 1:
        return _from_ve_sigmas(schedule, torch.tensor([smax], dtype=_F64))
    ramp = torch.linspace(0, 1, n, dtype=_F64)
    a, b = smax ** (1 / rho), smin ** (1 / rho)
    return _from_ve_sigmas(schedule, (a + ramp * (b - a)) ** rho)


@_register
def exponential(
    schedule: Schedule, n: int, sigma_min: float | None = None, sigma_max: float | None = None
) -> torch.Tensor:
    """Uniform in log VE sigma from sigma_max to sigma_min (k-diffusion ``get_sigmas_exponential``)."""
    smin, smax = _sigma_range(schedule, sigma_min, sigma_max)
    if n == 1:
        return _from_ve_sigmas(schedule, torch.tensor([smax], dtype=_F64))
    sig = torch.exp(torch.linspace(math.log(smax), math.log(smin), n, dtype=_F64))
    return _from_ve_sigmas(schedule, sig)


@_register
def uniform_lambda(
    schedule: Schedule, n: int, lam_min: float | None = None, lam_max: float | None = None
) -> torch.Tensor:
    """Uniform in half-logSNR lambda (Lu et al. 2022, 'logSNR' steps): ``n`` levels from lam_min
    (noisiest) up to, and including, lam_max; the final step then denoises to sigma = 0."""
    lo, hi = lambda_range(schedule)
    lo = lo if lam_min is None else float(lam_min)
    hi = hi if lam_max is None else float(lam_max)
    if not lo < hi:
        raise ValueError(f"need lam_min < lam_max, got {lo} and {hi}")
    if n == 1:
        return schedule.inverse_lambda(torch.tensor([lo], dtype=_F64))
    return schedule.inverse_lambda(torch.linspace(lo, hi, n, dtype=_F64))


@_register
def time_quadratic(schedule: Schedule, n: int) -> torch.Tensor:
    """Quadratic in model_time (Lu et al. 2022 'time_quadratic'): dense near the clean end.
    Discrete schedules are rounded to integer steps (duplicates are then spread apart)."""
    lo, hi = schedule.t_min, schedule.t_max
    m = n + 1 if _ends_at_zero(schedule) else n
    u = torch.linspace(1, 0, m, dtype=_F64)
    ts = lo + (hi - lo) * u**2
    ts = ts[:n]
    if isinstance(schedule, DiscreteVP):
        ts = _distinct_integers(ts.round(), schedule.t_max)
    return ts


def _distinct_integers(ts: torch.Tensor, t_max: float) -> torch.Tensor:
    """Make descending rounded steps strictly descending, keeping them within [0, t_max]."""
    out = ts.clone()
    for i in range(len(out) - 2, -1, -1):
        if out[i] <= out[i + 1]:
            out[i] = out[i + 1] + 1
    if float(out[0]) > t_max:
        raise ValueError("too many steps for this discrete schedule")
    return out


def _beta_ppf(q: torch.Tensor, a: float, b: float) -> torch.Tensor:
    try:
        from scipy.stats import beta as _beta
    except ImportError as e:  # pragma: no cover - scipy is a declared dependency
        raise ImportError("spacing 'beta' needs scipy (pip install scipy)") from e
    return torch.as_tensor(_beta.ppf(q.numpy(), a, b), dtype=_F64)


@_register
def beta(
    schedule: Schedule,
    n: int,
    a: float = 0.6,
    b: float = 0.6,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
) -> torch.Tensor:
    """Lee et al. 2024, 'Beta Sampling is All You Need': levels at the quantiles of Beta(a, b),
    denser at both ends, in VE sigma between sigma_max and sigma_min (as diffusers'
    ``use_beta_sigmas``)."""
    smin, smax = _sigma_range(schedule, sigma_min, sigma_max)
    q = 1.0 - torch.linspace(0, 1, n, dtype=_F64)
    u = _beta_ppf(q, a, b)
    sig = smin + u * (smax - smin)
    return _from_ve_sigmas(schedule, sig)


def apply_shift(schedule: Schedule, ts: torch.Tensor, shift: float) -> torch.Tensor:
    """Shift levels by a constant lambda offset ``-log(shift)`` (SD3/Flux's ``s t / (1 + (s-1) t)``
    on a flow schedule). Levels with alpha = 0 or sigma = 0 stay where they are."""
    if shift == 1.0:
        return ts
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    lam = schedule.lam(ts)
    finite = torch.isfinite(lam)
    shifted = schedule.inverse_lambda(torch.where(finite, lam - math.log(shift), torch.zeros_like(lam)))
    return torch.where(finite, shifted, ts)


def resolve_spacing(
    schedule: Schedule, spacing: str | Callable[..., Any] | Any, n: int, options: dict[str, Any] | None = None
) -> torch.Tensor:
    """Model times for ``n`` steps from a spacing name, a callable, or an explicit list."""
    options = options or {}
    if isinstance(spacing, str):
        fn = get_spacing(spacing)
        return torch.as_tensor(fn(schedule, n, **options), dtype=_F64)
    if callable(spacing):
        return torch.as_tensor(spacing(schedule, n, **options), dtype=_F64)
    ts = torch.as_tensor(spacing, dtype=_F64).reshape(-1)
    return ts


__all__ = [
    "SPACINGS",
    "spacings",
    "get_spacing",
    "lambda_range",
    "apply_shift",
    "resolve_spacing",
]
