"""Noise for stochastic samplers: one generator per sample, optional Brownian-tree noise.

Every stochastic sampler takes ``noise_sampler=`` and ``generator=``. A noise sampler is a callable
``noise_sampler(x, cur, nxt) -> Tensor`` returning standard normal noise shaped like ``x`` for the
move from level ``cur`` to level ``nxt``; a sampler calls it once per draw, in order, and never
otherwise touches a random number generator. What you may pass as ``noise_sampler``:

- ``None`` or ``"gaussian"``: fresh normal noise, drawn per sample from ``generator`` (a list with
  one ``torch.Generator`` per sample, so a sample never depends on its batch companions; a single
  generator draws the whole batch at once, as diffusers does; ``None`` uses torch's global RNG).
  The per-sample draws are those of diffusers' ``randn_tensor``, so the same generators give the
  same noise as a diffusers scheduler that draws at the same points.
- ``"brownian"``: increments of one Brownian motion per sample (``torchsde.BrownianTree``, seeded
  from that sample's generator), in the time :func:`brownian_time` (in [0, 1] on every schedule).
  Noise over overlapping or nested intervals is then consistent, which makes SDE samplers converge
  to one path as steps grow (as k-diffusion's ``BrownianTreeNoiseSampler``).
- any callable of that signature, e.g. :func:`replay` to inject a known noise sequence (parity
  tests against k-diffusion / diffusers), or :class:`Recorder` around another noise sampler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch

from ..core.grid import Level

Tensor = torch.Tensor
NoiseSampler = Callable[[Tensor, Level, Level], Tensor]
Generators = torch.Generator | Sequence[torch.Generator] | None
NoiseName = Literal["gaussian", "brownian"]


def _check_generators(generator: Generators, batch: int) -> None:
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch:
            raise ValueError(
                f"got {len(generator)} generators for a batch of {batch}: pass one torch.Generator per sample "
                "(or a single generator for the whole batch)"
            )
        for g in generator:
            if not isinstance(g, torch.Generator):
                raise TypeError(f"generator list must hold torch.Generator objects, got {type(g).__name__}")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(
            "generator must be a torch.Generator, a list of them (one per sample) or None, got "
            f"{type(generator).__name__}"
        )


def randn_like(x: Tensor, generator: Generators = None) -> Tensor:
    """Standard normal noise shaped like ``x``; with a list of generators, row ``i`` comes from
    ``generator[i]`` alone (drawn on the generator's device, then moved to ``x``'s)."""
    _check_generators(generator, x.shape[0])
    if isinstance(generator, (list, tuple)):
        if len(generator) == 1:
            generator = generator[0]
        else:
            rows = [
                torch.randn((1, *x.shape[1:]), generator=g, device=g.device, dtype=x.dtype) for g in generator
            ]
            return torch.cat(rows).to(x.device)
    if generator is None:
        return torch.randn(x.shape, dtype=x.dtype, device=x.device)
    return torch.randn(x.shape, generator=generator, device=generator.device, dtype=x.dtype).to(x.device)


def gaussian(generator: Generators = None) -> NoiseSampler:
    """Fresh normal noise at every draw, per sample from ``generator`` (see :func:`randn_like`)."""

    def noise(x: Tensor, cur: Level, nxt: Level) -> Tensor:
        return randn_like(x, generator)

    return noise


def brownian_time(level: Level) -> float:
    """The Brownian-tree time of a level: ``1 / (1 + e^{lambda / 2})`` in [0, 1] (0 = clean, 1 = pure
    noise), i.e. ``sqrt(sigma) / (sqrt(alpha) + sqrt(sigma))``: finite on every schedule and spread out
    enough that neighbouring levels stay far apart compared with the tree's tolerance."""
    return math.sqrt(level.sigma) / (math.sqrt(level.alpha) + math.sqrt(level.sigma))


class BrownianTreeNoise:
    """Brownian-motion increments, one ``torchsde.BrownianTree`` per sample, over time
    :func:`brownian_time` in [0, 1]; each call returns ``(W(t1) - W(t0)) / sqrt(|t1 - t0|)``.

    Seeds: ``seeds`` (one int per sample, or one for the batch), or drawn from ``generator`` on first
    use: a list of generators gives one tree per sample; a single generator (or None) one tree for the
    whole batch, which is much faster for large batches.
    Intervals shorter than ``100 * tol`` (degenerate steps) get fresh normal noise from a per-sample
    generator derived from the seed instead (torchsde recurses without end on them).
    Needs the optional dependency ``torchsde`` (``pip install torchsde``).
    """

    def __init__(self, generator: Generators = None, seeds: Sequence[int] | None = None, tol: float = 1e-10) -> None:
        self.generator = generator
        self.seeds = None if seeds is None else [int(s) for s in seeds]
        self.tol = tol
        self._trees: list[Any] | None = None
        self._fallback: list[torch.Generator] = []
        self._batched = True

    def _build(self, x: Tensor) -> None:
        try:
            import torchsde
        except ImportError as e:  # pragma: no cover - exercised only without the extra
            raise ImportError("noise_sampler='brownian' needs torchsde: pip install torchsde") from e
        b = x.shape[0]
        seeds = self.seeds
        if seeds is None:
            _check_generators(self.generator, b)
            if isinstance(self.generator, (list, tuple)):
                seeds = [int(torch.randint(0, 2**62, (), generator=g)) for g in self.generator]
            else:  # one tree for the whole batch (a single generator couples the batch anyway)
                seeds = [int(torch.randint(0, 2**62, (), generator=self.generator))]
        elif len(seeds) not in (1, b):
            raise ValueError(f"got {len(seeds)} seeds for a batch of {b}: pass one per sample (or one)")
        self._batched = len(seeds) > 1 or b == 1
        w0 = torch.zeros_like(x[0] if self._batched else x)
        self._trees = [torchsde.BrownianTree(0.0, w0, 1.0, entropy=s, tol=self.tol) for s in seeds]
        self._fallback = [torch.Generator().manual_seed(s ^ 0x5DEECE66D) for s in seeds]

    def __call__(self, x: Tensor, cur: Level, nxt: Level) -> Tensor:
        if self._trees is None:
            self._build(x)
        assert self._trees is not None
        t0, t1 = brownian_time(cur), brownian_time(nxt)
        lo, hi = min(t0, t1), max(t0, t1)
        if hi - lo < 100 * self.tol:
            return randn_like(x, self._fallback if len(self._fallback) > 1 else self._fallback[0])
        w = torch.stack([tree(lo, hi) for tree in self._trees]) if self._batched else self._trees[0](lo, hi)
        return (w / math.sqrt(hi - lo)).to(x.dtype)


def replay(noises: Sequence[Tensor]) -> NoiseSampler:
    """A noise sampler that returns ``noises`` in order (e.g. the draws a reference implementation
    made), and raises when asked for more than it holds."""
    queue = list(noises)
    pos = [0]

    def noise(x: Tensor, cur: Level, nxt: Level) -> Tensor:
        if pos[0] >= len(queue):
            raise RuntimeError(f"replay noise exhausted after {len(queue)} draws")
        z = queue[pos[0]]
        pos[0] += 1
        if z.shape != x.shape:
            raise ValueError(f"replayed noise {pos[0] - 1} has shape {tuple(z.shape)}, expected {tuple(x.shape)}")
        return z.to(dtype=x.dtype, device=x.device)

    return noise


class Recorder:
    """Wraps a noise sampler and keeps every draw (``.draws``) with its levels (``.levels``)."""

    def __init__(self, inner: NoiseSampler) -> None:
        self.inner = inner
        self.draws: list[Tensor] = []
        self.levels: list[tuple[Level, Level]] = []

    def __call__(self, x: Tensor, cur: Level, nxt: Level) -> Tensor:
        z = self.inner(x, cur, nxt)
        self.draws.append(z)
        self.levels.append((cur, nxt))
        return z


def resolve(noise_sampler: NoiseName | NoiseSampler | None, generator: Generators) -> NoiseSampler:
    """Turn a sampler's ``noise_sampler`` / ``generator`` options into a noise sampler."""
    if noise_sampler is None or noise_sampler == "gaussian":
        return gaussian(generator)
    if noise_sampler == "brownian":
        return BrownianTreeNoise(generator)
    if isinstance(noise_sampler, str):
        raise ValueError(
            f"unknown noise_sampler {noise_sampler!r}; pass 'gaussian', 'brownian' or a callable "
            "noise_sampler(x, cur_level, next_level) -> standard normal tensor shaped like x"
        )
    if not callable(noise_sampler):
        raise TypeError(f"noise_sampler must be a name or a callable, got {type(noise_sampler).__name__}")
    return noise_sampler


__all__ = [
    "NoiseSampler",
    "randn_like",
    "gaussian",
    "brownian_time",
    "BrownianTreeNoise",
    "replay",
    "Recorder",
    "resolve",
]
