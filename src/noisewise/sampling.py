"""``noisewise.sample``: the one entry point that composes schedule, grid, denoiser and solver."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .core.grid import Grid, make_grid
from .core.schedules import Schedule
from .models.denoiser import ModelDenoiser
from .solvers.base import Callback, SamplerSpec, get_sampler, run

Tensor = torch.Tensor


@dataclass(frozen=True)
class SampleResult:
    """A sample and what it cost: ``nfe`` network calls carrying ``rows`` batch rows in all."""

    x: Tensor
    nfe: int
    rows: int
    grid: Grid
    sampler: str
    steps: int


def recommended(schedule: Schedule, nfe: int | None) -> tuple[str, dict[str, Any], str]:
    """The default (sampler, options, spacing) for a budget; chosen from docs/benchmarks.md."""
    spacing = schedule.default_spacing
    n = 20 if nfe is None else nfe
    if n <= 4:
        return "dpmpp_2m", {}, spacing
    return "unipc", {"order": 2, "variant": "bh2"}, spacing


def _check_noise(noise: Any) -> Tensor:
    if not isinstance(noise, Tensor):
        raise TypeError(f"noise must be a torch.Tensor, got {type(noise).__name__}")
    if not noise.is_floating_point():
        raise TypeError(f"noise must be a floating-point tensor, got {noise.dtype}")
    if noise.ndim < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise must have a batch dimension first, got shape {tuple(noise.shape)}")
    if not bool(torch.isfinite(noise).all()):
        raise ValueError("noise contains NaN or Inf")
    return noise


def _check_options(spec: SamplerSpec, options: dict[str, Any]) -> None:
    params = inspect.signature(spec.fn).parameters
    valid = [p for p in params if params[p].kind == inspect.Parameter.KEYWORD_ONLY and p != "callback"]
    unknown = [k for k in options if k not in valid]
    if unknown:
        known = ", ".join(valid) if valid else "none"
        raise TypeError(f"sampler {spec.name!r} takes no option {unknown[0]!r}; its options: {known}")


def sample(
    model: Callable[..., Tensor] | None,
    noise: Tensor,
    *,
    schedule: Schedule | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    nfe: int | None = None,
    spacing: Any = None,
    spacing_options: dict[str, Any] | None = None,
    prediction_type: str | None = None,
    shift: float | None = None,
    image_seq_len: int | None = None,
    final: Literal["zero", "none"] = "zero",
    grid: Grid | None = None,
    denoiser: Callable[[Tensor, Any], Tensor] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    model_dtype: torch.dtype | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callback | None = None,
    check_finite: bool = True,
    return_info: bool = False,
    **sampler_options: Any,
) -> Tensor | SampleResult:
    """Sample from a diffusion or flow model.

    Args:
        model: ``model(x, model_time, **model_kwargs)`` returning the raw prediction
            (``prediction_type``: epsilon, v_prediction, sample or flow). ``model_time`` is 1-D,
            one value per sample. Alternatively pass ``denoiser=D`` with ``D(x, level) -> x0``.
        noise: standard normal noise, batch first; the start is ``noise * sqrt(alpha^2 + sigma^2)``
            at the first level (1 on VP and flow schedules).
        schedule: the training schedule (e.g. ``Schedule.from_diffusers(cfg)``).
        sampler: a name from :func:`noisewise.samplers`; default: the recommendation for the budget.
        steps / nfe: number of steps, or a budget of model evaluations (not both; default 20 steps).
        spacing: a name from :func:`noisewise.spacings`, a callable ``f(schedule, n)`` or an explicit
            list of model times (descending). Default: the schedule's.
        shift: inference shift (lambda offset ``-log(shift)``); default the schedule's.
        final: ``'zero'`` appends the final denoise to sigma = 0; ``'none'`` ends at the last level.
        grid: an explicit :class:`Grid` (overrides schedule spacing/steps).
        generator: one ``torch.Generator`` per sample for stochastic samplers.
        callback: called after every step with a :class:`StepInfo` ``(i, level, x, x0)``.
        return_info: return a :class:`SampleResult` (x, nfe, rows, grid ...) instead of a tensor.
        **sampler_options: e.g. ``order=3`` for unipc/dpm_solver.
    """
    noise = _check_noise(noise)
    if steps is not None and nfe is not None:
        raise ValueError("give steps= or nfe=, not both")
    for name, v in (("steps", steps), ("nfe", nfe)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if grid is None and schedule is None:
        raise ValueError("pass schedule= (e.g. noisewise.Schedule.from_diffusers(config)) or an explicit grid=")
    if sampler is None:
        name, defaults, default_spacing = recommended(schedule, nfe if nfe is not None else steps) if schedule \
            else ("unipc", {}, None)
        sampler_options = {**defaults, **sampler_options}
        spacing = default_spacing if spacing is None else spacing
    else:
        name = sampler
    spec = get_sampler(name)
    _check_options(spec, sampler_options)
    if spec.stochastic or "generator" in inspect.signature(spec.fn).parameters:  # e.g. ddim with eta > 0
        sampler_options["generator"] = generator

    if grid is None:
        assert schedule is not None
        explicit = spacing is not None and not isinstance(spacing, str) and not callable(spacing)
        if explicit:
            n = len(torch.as_tensor(spacing).reshape(-1))
        elif nfe is not None:
            n = spec.steps_for_nfe(nfe)
        else:
            n = 20 if steps is None else steps
        grid = make_grid(
            schedule, n, spacing, shift=shift, image_seq_len=image_seq_len, final=final,
            spacing_options=spacing_options,
        )

    work = torch.float64 if noise.dtype == torch.float64 else torch.float32
    first = grid[0]
    x = noise.to(work) * math.sqrt(first.alpha**2 + first.sigma**2)

    if denoiser is None:
        if model is None:
            raise ValueError("pass a model or a denoiser")
        pt = prediction_type or (schedule.prediction_type if schedule is not None else None)
        if pt is None:
            raise ValueError("pass prediction_type= ('epsilon', 'v_prediction', 'sample' or 'flow')")
        if pt == "epsilon" and first.alpha == 0.0:
            raise ValueError(
                "the first level has alpha = 0 (pure noise), where an epsilon-prediction model cannot predict x0; "
                "use spacing='leading' or 'linspace', a sigma spacing ('karras', 'uniform_lambda'), or a "
                "v_prediction model (zero-terminal-SNR schedules need one)"
            )
        denoiser = ModelDenoiser(
            model, pt, model_kwargs=model_kwargs, model_dtype=model_dtype, check_finite=check_finite
        )
    gen = spec.fn(x, grid, callback=callback, **sampler_options)
    with torch.no_grad():  # sampling never needs the autograd graph
        out, calls = run(gen, denoiser)
    if isinstance(denoiser, ModelDenoiser):
        denoiser.raise_if_nonfinite()
        rows = denoiser.rows
    else:
        rows = calls * noise.shape[0]
    if check_finite and not bool(torch.isfinite(out).all()):
        raise FloatingPointError(
            f"sampler {name!r} produced NaN/Inf; unless the model is unstable this is a noisewise bug: please report"
        )
    out = out.to(noise.dtype)
    if return_info:
        return SampleResult(out, calls, rows, grid, name, grid.steps)
    return out
