"""The step grid: every inference level computed once, on the host, in float64.

Solvers read plain Python floats from it, so no step ever synchronises with an accelerator.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .schedules import Schedule
from .spacing import apply_shift, resolve_spacing

_F64 = torch.float64


@dataclass(frozen=True)
class Level:
    """One noise level: ``x = alpha * x0 + sigma * eps``, ``lam = log(alpha / sigma)``,
    and the value the network is conditioned on (``model_time``)."""

    alpha: float
    sigma: float
    lam: float
    model_time: float

    @property
    def ve_sigma(self) -> float:
        """``sigma / alpha`` (inf where alpha = 0)."""
        return self.sigma / self.alpha if self.alpha > 0 else math.inf

    @property
    def flow_t(self) -> float:
        """``sigma / (alpha + sigma)``: the equivalent rectified-flow time."""
        return self.sigma / (self.alpha + self.sigma)


@dataclass(frozen=True)
class Grid:
    """Levels ``0 .. n`` of an ``n``-step solve; level ``n`` is the end (normally sigma = 0).

    ``schedule`` (optional) is the schedule the levels come from; solvers that evaluate the model
    between grid nodes (dpm_2, dpmpp_sde, dpm_adaptive ...) use it through :meth:`level_at`."""

    levels: tuple[Level, ...]
    schedule: Schedule | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if len(self.levels) < 2:
            raise ValueError("a grid needs at least 2 levels (one step)")
        for a, b in zip(self.levels[:-1], self.levels[1:]):
            if not b.lam > a.lam:
                raise ValueError(
                    "grid levels must go strictly from noisy to clean (increasing lambda); got "
                    f"lambda {a.lam:.6g} then {b.lam:.6g} (model_time {a.model_time:.6g} -> {b.model_time:.6g}). "
                    "Pass model times in descending order of noise, with no repeats."
                )
        for lv in self.levels:
            if lv.alpha < 0 or lv.sigma < 0 or (lv.alpha == 0 and lv.sigma == 0):
                raise ValueError(f"invalid level {lv}")

    @property
    def steps(self) -> int:
        return len(self.levels) - 1

    def __len__(self) -> int:
        return len(self.levels)

    def __getitem__(self, i: int) -> Level:
        return self.levels[i]

    @property
    def alphas(self) -> list[float]:
        return [lv.alpha for lv in self.levels]

    @property
    def sigmas(self) -> list[float]:
        return [lv.sigma for lv in self.levels]

    @property
    def lams(self) -> list[float]:
        return [lv.lam for lv in self.levels]

    @property
    def model_times(self) -> list[float]:
        return [lv.model_time for lv in self.levels]

    def level_at(self, lam: float) -> Level:
        """The schedule's level at half-logSNR ``lam`` (model_time from ``inverse_lambda``)."""
        if self.schedule is None:
            raise ValueError(
                "this sampler evaluates the model between grid levels and needs the schedule: build the grid "
                "with make_grid / Grid.from_model_times, or pass schedule= to Grid.from_arrays"
            )
        t = self.schedule.inverse_lambda(torch.tensor([lam], dtype=_F64))
        a, s, l = (float(f(t)[0]) for f in (self.schedule.alpha, self.schedule.sigma, self.schedule.lam))
        return Level(a, s, l, float(t[0]))

    @staticmethod
    def from_arrays(
        alphas: Sequence[float],
        sigmas: Sequence[float],
        model_times: Sequence[float],
        schedule: Schedule | None = None,
    ) -> Grid:
        """A grid from explicit per-level values (the last level is where sampling ends); pass the
        ``schedule`` they come from for samplers that evaluate between levels."""
        if not len(alphas) == len(sigmas) == len(model_times):
            raise ValueError("alphas, sigmas and model_times must have the same length")
        levels = []
        for a, s, t in zip(alphas, sigmas, model_times):
            a, s = float(a), float(s)
            lam = math.inf if s == 0 else (-math.inf if a == 0 else math.log(a) - math.log(s))
            levels.append(Level(a, s, lam, float(t)))
        return Grid(tuple(levels), schedule)

    @staticmethod
    def from_model_times(
        schedule: Schedule, model_times: Any, final: Literal["zero", "none"] = "zero"
    ) -> Grid:
        """Levels at the given model times (descending) plus, with ``final='zero'``, the final
        node sigma = 0 (the last step then returns the denoised sample)."""
        ts = torch.as_tensor(model_times, dtype=_F64).reshape(-1)
        if len(ts) == 0:
            raise ValueError("no model times given")
        if not bool(torch.isfinite(ts).all()):
            raise ValueError("model times must be finite")
        lo, hi = min(schedule.t_min, schedule.t_max), max(schedule.t_min, schedule.t_max)
        if float(ts.min()) < lo - 1e-9 or float(ts.max()) > hi + 1e-9:
            raise ValueError(
                f"model times must lie in the schedule's range [{lo}, {hi}]; got "
                f"[{float(ts.min())}, {float(ts.max())}]"
            )
        a = schedule.alpha(ts).tolist()
        s = schedule.sigma(ts).tolist()
        lam = schedule.lam(ts).tolist()
        levels = [Level(float(ai), float(si), float(li), float(ti)) for ai, si, li, ti in zip(a, s, lam, ts.tolist())]
        if final == "zero":
            if levels[-1].sigma > 0:
                levels.append(Level(1.0, 0.0, math.inf, float(schedule.t_min)))
        elif final != "none":
            raise ValueError(f"final must be 'zero' or 'none', got {final!r}")
        if len(levels) < 2:
            raise ValueError("one level is not a grid: with final='none' give at least two model times")
        return Grid(tuple(levels), schedule)


_GRID_CACHE_SIZE = 64


def make_grid(
    schedule: Schedule,
    steps: int,
    spacing: Any = None,
    *,
    shift: float | None = None,
    image_seq_len: int | None = None,
    final: Literal["zero", "none"] = "zero",
    spacing_options: dict[str, Any] | None = None,
) -> Grid:
    """Build the grid for ``steps`` steps with the given spacing (name, callable or explicit
    model times), applying the schedule's inference shift (or ``shift``).

    Grids from a spacing name are cached on the schedule (they are immutable), so a server that
    samples the same configuration again pays nothing for the grid."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    spacing = schedule.default_spacing if spacing is None else spacing
    s = schedule.shift_for(image_seq_len) if shift is None else float(shift)
    key = None
    if isinstance(spacing, str):
        try:
            key = (steps, spacing, s, final, tuple(sorted((spacing_options or {}).items())))
            hash(key)
        except TypeError:
            key = None
    cache: dict[Any, Grid] = schedule.__dict__.setdefault("_grid_cache", {})
    if key is not None and key in cache:
        return cache[key]
    ts = resolve_spacing(schedule, spacing, steps, spacing_options)
    if not getattr(spacing, "shift_applied", False):  # a TunedSchedule's levels already include the shift
        ts = apply_shift(schedule, ts, s)
    grid = Grid.from_model_times(schedule, ts, final=final)
    if key is not None:
        if len(cache) >= _GRID_CACHE_SIZE:
            cache.pop(next(iter(cache)))
        cache[key] = grid
    return grid


def strength_start(steps: int, strength: float) -> int:
    """Index of the grid level where an image-to-image solve with ``strength`` starts.

    Same rule as diffusers' img2img pipelines (``get_timesteps``): ``int(steps * strength)`` of the
    ``steps`` steps are run, the last ones, so the solve starts at level ``steps - int(steps * strength)``.
    ``strength = 1`` starts at the first (noisiest) level, ``strength = 0`` runs no step."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be a number from 0 to 1 (1 = start from pure noise), got {strength!r}")
    run_steps = min(int(steps * float(strength)), steps)
    return steps - run_steps


def truncate_grid(grid: Grid, start: int) -> Grid | None:
    """The grid from level ``start`` on (the same levels, fewer steps); None when no step is left."""
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= grid.steps:
        raise ValueError(f"start must be an integer level index from 0 to {grid.steps}, got {start!r}")
    if start == grid.steps:
        return None
    return grid if start == 0 else Grid(grid.levels[start:], grid.schedule)
