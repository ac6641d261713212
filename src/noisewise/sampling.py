"""``noisewise.sample``: the one entry point that composes schedule, grid, denoiser and solver."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch

from .core.grid import Grid, make_grid, strength_start, truncate_grid
from .core.schedules import Schedule
from .guidance.guided import GuidedDenoiser
from .models.denoiser import ModelDenoiser
from .solvers.base import Callback, SamplerSpec, get_sampler, run
from .solvers.stiffness import StiffGuard, long_step_limit

Tensor = torch.Tensor
DEFAULT_STIFF_GUARD = 0.5  # stiffness guard of the multistep solvers under guidance (docs/guidance.md)


@dataclass(frozen=True)
class SampleResult:
    """A sample and what it cost: ``nfe`` network evaluations carrying ``rows`` batch rows in all.

    With guidance, each branch counts: a guided step costs 2 NFE (cond + uncond) even though both go
    through the network in one batched call; ``calls`` is the number of forward passes made."""

    x: Tensor
    nfe: int
    rows: int
    grid: Grid
    sampler: str
    steps: int
    calls: int | None = None


def _guard_under_guidance(option: Any, scale: Tensor) -> Any:
    """The ``stiff_guard`` a guided run gets: the given safety factor (0.5 by default) with the long-step
    limit where a sample's guidance scale is large (``solvers.stiffness.long_step_limit``); ``None``
    stays off, and a :class:`StiffGuard` with its own ``max_step`` is used as given."""
    if option is None or (isinstance(option, StiffGuard) and option.max_step is not None):
        return option
    safety = option.safety if isinstance(option, StiffGuard) else option
    return StiffGuard(safety, long_step_limit(scale))


# The recommended default per budget, read off docs/benchmarks/samplers.md (exact Gaussian mixture,
# error against the exact ODE solution): at every measured NFE (5, 6, 8, 10, 15, 20) the entry here
# is at least as accurate as the best diffusers or k-diffusion configuration in the same run.
# (max NFE of the row, sampler, options, spacing)
_RECOMMENDED_VP: tuple[tuple[int, str, dict[str, Any], str], ...] = (
    (6, "dpm_solver", {"order": 3}, "time_quadratic"),
    (12, "unipc", {"order": 2, "variant": "bh2"}, "uniform_lambda"),
    (17, "unipc", {"order": 2, "variant": "bh1"}, "uniform_lambda"),
    (10**9, "unipc", {"order": 3, "variant": "bh2"}, "time_quadratic"),
)
_RECOMMENDED_FLOW: tuple[tuple[int, str, dict[str, Any], str], ...] = (
    (5, "dpm_solver", {"order": 2}, "time_quadratic"),
    (10**9, "dpm_solver", {"order": 3}, "time_quadratic"),
)


def recommended(schedule: Schedule | None, nfe: int | None) -> tuple[str, dict[str, Any], str | None]:
    """The default ``(sampler, options, spacing)`` for a budget of ``nfe`` model evaluations
    (20 when None). Flow schedules and the rest (VP, VE) have separate tables; see
    ``docs/samplers.md#the-recommended-default``."""
    from .core.schedules import RectifiedFlow

    n = 20 if nfe is None else nfe
    table = _RECOMMENDED_FLOW if isinstance(schedule, RectifiedFlow) else _RECOMMENDED_VP
    for max_nfe, name, opts, spacing in table:
        if n <= max_nfe:
            return name, dict(opts), spacing if schedule is not None else None
    raise AssertionError("unreachable")


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
    cond: Any = None,
    uncond: Any = None,
    negative: Any = None,
    negative_scale: float | None = None,
    negative_above: float = 0.0,
    negative_perpendicular: bool = False,
    guidance_scale: float | Tensor | None = None,
    guidance: Any = None,
    composition: Any = None,
    max_batch: int | None = None,
    generator: torch.Generator | list[torch.Generator] | None = None,
    callback: Callback | None = None,
    check_finite: bool = True,
    return_info: bool = False,
    init: Tensor | None = None,
    strength: float | None = None,
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
        init / strength: start from a noised ``init`` (a clean sample, e.g. an encoded image) instead
            of pure noise (image-to-image): of the ``steps``-step grid only the last
            ``int(steps * strength)`` steps run (diffusers' rule), from
            ``alpha * init + sigma * noise`` at the first of them. ``strength=1`` (the default when
            ``init`` is given) runs every step; ``strength=0`` runs none and returns ``init``.
        cond / uncond: conditioning for classifier-free guidance, batch-aligned (batch 1 is shared);
            the network is called as ``model(x, model_time, cond)`` with both branches concatenated
            (or ``denoiser(x, level, cond) -> x0``). See ``docs/guidance.md``.
        negative: a negative conditioning that replaces ``uncond`` (None or empty: ``uncond``).
        negative_scale: ``s``: the negative gets its own weight instead of replacing ``uncond``:
            ``D(u) + w (D(c) - D(u)) - s (D(n) - D(u))``, one more row per sample (replacing is
            ``s = w - 1``); needs ``uncond`` and ``negative``. Not with CFG++ or autoguidance.
        negative_above: with ``negative_scale``: that term (and its rows) only at noise levels
            ``sigma / alpha`` at or above this; 0 (the default): at every level.
        negative_perpendicular: with ``negative_scale``: only the part of ``D(n) - D(u)``
            perpendicular to the guided direction is subtracted, per sample (Perp-Neg), so the
            negative does not act as extra guidance along or against the prompt.
        guidance_scale: ``w``, a number or one per sample (default 1: the conditional model, no
            unconditional rows).
        guidance: guidance options: a name, an option (``nw.APG()``), a dict or a list of them;
            see :func:`noisewise.guidance_methods`.
        composition: a :class:`noisewise.guidance.compose.Composition` (component conditionings,
            e.g. the object phrases of a prompt): composable guidance
            ``D = D(u) + w (D(c) - D(u)) + sum_i w_i (D(c_i) - D(u))`` in one batched forward per step,
            ``u`` = ``negative`` or ``uncond``; needs ``guidance`` None (plain CFG).
        max_batch: at most this many rows per network call (cond + uncond rows are split only then).
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
    if grid is None and (isinstance(spacing, str) and spacing == "tuned" or getattr(spacing, "shift_applied", False)):
        from .tuning import use_tuned  # spacing="tuned" or a TunedSchedule (docs/tuning.md)

        spacing, sampler, sampler_options = use_tuned(
            spacing, model=denoiser if denoiser is not None else model, schedule=schedule, sampler=sampler,
            sampler_options=sampler_options, steps=steps, nfe=nfe, prediction_type=prediction_type,
            denoiser_given=denoiser is not None, shift=shift, image_seq_len=image_seq_len,
            guidance_scale=guidance_scale, guidance=guidance,
        )
    if sampler is None:
        name, defaults, default_spacing = recommended(schedule, nfe if nfe is not None else steps)
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
    if init is not None or strength is not None:
        if init is None:
            raise ValueError("strength= needs init= (the clean sample to noise and start from: image-to-image)")
        if not isinstance(init, Tensor) or not init.is_floating_point():
            raise TypeError(f"init must be a floating-point torch.Tensor, got {getattr(init, 'dtype', type(init))}")
        if not bool(torch.isfinite(init).all()):
            raise ValueError("init contains NaN or Inf")
        if init.shape != noise.shape:
            raise ValueError(f"init shape {tuple(init.shape)} must match the noise shape {tuple(noise.shape)}")
        full = grid
        grid = truncate_grid(grid, strength_start(grid.steps, 1.0 if strength is None else strength))
        if grid is None:  # strength 0 (or too small to make one step): nothing to denoise
            out0 = init.to(noise.dtype).clone()
            return SampleResult(out0, 0, 0, full, name, 0, 0) if return_info else out0
    first = grid[0]
    if init is not None:
        x = init.to(work) * first.alpha + noise.to(work) * first.sigma
    else:
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
    if composition is not None:
        if guidance is not None:
            raise ValueError("composition= combines plain CFG terms; it cannot be used with guidance= options")
        from .guidance.compose import ComposedDenoiser
        from .guidance.guided import split_negative

        replacing, weighted, s = split_negative(uncond, negative, negative_scale)
        denoiser = ComposedDenoiser(
            denoiser, cond=cond, guide=uncond if replacing is None else replacing,
            guidance_scale=1.0 if guidance_scale is None else guidance_scale, composition=composition,
            max_batch=max_batch, batch=noise.shape[0], negative=weighted, negative_scale=s,
            negative_above=negative_above, negative_perpendicular=negative_perpendicular,
        )
    elif any(v is not None for v in (cond, uncond, negative, guidance_scale, guidance)):
        denoiser = GuidedDenoiser(
            denoiser, cond=cond, uncond=uncond, negative=negative, negative_scale=negative_scale,
            negative_above=negative_above, negative_perpendicular=negative_perpendicular,
            guidance_scale=1.0 if guidance_scale is None else guidance_scale, guidance=guidance,
            max_batch=max_batch, batch=noise.shape[0],
        )
    elif max_batch is not None:
        raise ValueError("max_batch= splits the guidance branches; it needs cond= (and uncond=)")
    guided = denoiser if isinstance(denoiser, GuidedDenoiser) or composition is not None else None
    if guided is not None:
        guided.bind(grid)
        if "stiff_guard" in inspect.signature(spec.fn).parameters:
            sampler_options["stiff_guard"] = _guard_under_guidance(
                sampler_options.get("stiff_guard", DEFAULT_STIFF_GUARD), guided.stiffness_scale()
            )
    gen = spec.fn(x, grid, callback=callback, **sampler_options)
    with torch.no_grad():  # sampling never needs the autograd graph
        out, calls = run(gen, denoiser)
    passes = calls
    if guided is not None:
        guided.raise_if_nonfinite()
        calls, rows, passes = guided.nfe, guided.rows, guided.calls
    elif isinstance(denoiser, ModelDenoiser):
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
        return SampleResult(out, calls, rows, grid, name, grid.steps, passes)
    return out
