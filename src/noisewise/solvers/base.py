"""What every solver shares: the generator protocol, the registry, and the final-step rule.

A solver is a generator function ``solver(x, grid, *, callback=None, **options)``. It yields a
``(x, level)`` pair whenever it needs the data prediction at ``x`` and receives ``x0_hat`` back
through ``send``; it returns the final sample. It keeps no state between calls, so one solver
can serve many requests, and an outside driver (a server batching many requests into one
forward pass) can step it one model evaluation at a time. :func:`run` is the plain driver.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from ..core.grid import Level

Tensor = torch.Tensor
SolverGen = Generator[tuple[Tensor, Level], Tensor, Tensor]
Denoise = Callable[[Tensor, Level], Tensor]


class StepInfo(NamedTuple):
    """What a step callback receives after step ``i``: the level just reached, the new x and
    the data prediction the step used last."""

    i: int
    level: Level
    x: Tensor
    x0: Tensor


Callback = Callable[[StepInfo], Any]


@dataclass(frozen=True)
class SamplerSpec:
    name: str
    fn: Callable[..., SolverGen]
    paper: str
    order: int | None = None  # convergence order of the deterministic solver (None = depends on options)
    stochastic: bool = False
    evals_per_step: int = 1  # for nfe <-> steps: heun-type solvers spend 2 per step (1 on the last)
    options: tuple[str, ...] = ()
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def nfe(self, steps: int) -> int:
        """Model evaluations for ``steps`` steps ending at sigma = 0."""
        return steps if self.evals_per_step == 1 else self.evals_per_step * steps - (self.evals_per_step - 1)

    def steps_for_nfe(self, nfe: int) -> int:
        if self.evals_per_step == 1:
            return nfe
        return max(1, (nfe + self.evals_per_step - 1) // self.evals_per_step)


SAMPLERS: dict[str, SamplerSpec] = {}


def register(
    name: str,
    paper: str,
    order: int | None = None,
    stochastic: bool = False,
    evals_per_step: int = 1,
    options: tuple[str, ...] = (),
    notes: str = "",
) -> Callable[[Callable[..., SolverGen]], Callable[..., SolverGen]]:
    def deco(fn: Callable[..., SolverGen]) -> Callable[..., SolverGen]:
        SAMPLERS[name] = SamplerSpec(name, fn, paper, order, stochastic, evals_per_step, options, notes)
        return fn

    return deco


def samplers() -> list[str]:
    """Names accepted by ``sample(..., sampler=NAME)``."""
    return sorted(SAMPLERS)


def get_sampler(name: str) -> SamplerSpec:
    if not isinstance(name, str):
        raise TypeError(f"sampler must be a name (str), got {type(name).__name__}")
    if name in SAMPLERS:
        return SAMPLERS[name]
    normal = name.lower().replace("+", "p").replace("-", "_").replace(" ", "_")
    if normal in SAMPLERS:
        hint = f"; did you mean {normal!r}?"
    else:
        close = difflib.get_close_matches(normal, list(SAMPLERS), n=1, cutoff=0.5)
        hint = f"; did you mean {close[0]!r}?" if close else ""
    raise ValueError(f"unknown sampler {name!r}{hint} Known: {', '.join(samplers())}")


def run(gen: SolverGen, denoise: Denoise) -> tuple[Tensor, int]:
    """Drive a solver generator to the end with ``denoise``; returns (x, model evaluations)."""
    nfe = 0
    try:
        x, level = next(gen)
        while True:
            x0 = denoise(x, level)
            nfe += 1
            x, level = gen.send(x0)
    except StopIteration as stop:
        return stop.value, nfe


def to_final(x0: Tensor, nxt: Level) -> Tensor:
    """The step into sigma = 0: the data prediction itself (scaled by alpha, which is 1 on every
    schedule here). Taken by every solver, so no solver divides by sigma = 0 or meets an
    infinite step in lambda at the end."""
    return x0 * nxt.alpha if nxt.alpha != 1.0 else x0


def lincomb(x: Tensor, a: float, *terms: tuple[Tensor, float]) -> Tensor:
    """``a x + sum(c t)`` with one new tensor and one fused multiply-add per term: the solvers
    compute their coefficients as Python floats (float64, on the host) and combine tensors here."""
    out = x * a
    for t, c in terms:
        if c != 0.0:
            out.add_(t, alpha=c)
    return out


def ddim_step(x: Tensor, x0: Tensor, cur: Level, nxt: Level) -> Tensor:
    """First-order exponential-integrator step (DDIM, eta = 0) in data-prediction form:
    ``x' = (sigma'/sigma) x + (alpha' - alpha sigma'/sigma) x0``. Exact at alpha = 0 and sigma' = 0."""
    if nxt.sigma == 0.0:
        return to_final(x0, nxt)
    ratio = nxt.sigma / cur.sigma
    return lincomb(x, ratio, (x0, nxt.alpha - cur.alpha * ratio))


def h_of(cur: Level, nxt: Level) -> float:
    """Step size in lambda (may be inf at alpha = 0 or sigma' = 0)."""
    return nxt.lam - cur.lam


def finite(*levels: Level) -> bool:
    return all(math.isfinite(lv.lam) for lv in levels)


def check_order(order: int, lo: int, hi: int, name: str) -> None:
    if isinstance(order, bool) or not isinstance(order, int) or not lo <= order <= hi:
        raise ValueError(f"{name}: order must be an integer in [{lo}, {hi}], got {order!r}")
