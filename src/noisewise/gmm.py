"""Gaussian-mixture data: the exact denoiser and the exact probability-flow ODE solution.

For data ``x0 ~ sum_k w_k N(mu_k, diag(s_k^2))`` and ``x = alpha x0 + sigma eps``, the posterior
mean ``E[x0 | x]`` is closed-form, so every sampler can be checked against ground truth:

- :meth:`GaussianMixture.denoiser` is an exact ``D(x, level) -> x0_hat`` for any schedule;
- :meth:`GaussianMixture.model` wraps it as a raw network of any prediction type;
- :meth:`GaussianMixture.ode_solution` integrates the probability-flow ODE between two levels with
  an adaptive 8th-order Runge-Kutta method (scipy's DOP853) to ~1e-10, in two well-conditioned
  coordinate systems: ``z = x / sigma`` against ``u = alpha / sigma`` (``dz/du = D``, finite at
  alpha = 0), then ``y = x / alpha`` against ``s = sigma / alpha`` (``dy/ds = (y - D) / s``, finite
  at sigma = 0).

Components may belong to classes (``component_class``): the denoiser then takes a per-sample class
(``-1`` = unconditional), which gives exact conditional and unconditional denoisers for guidance.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .core.grid import Level
from .core.schedules import Schedule
from .models.parameterization import from_x0

Tensor = torch.Tensor
_F64 = torch.float64


@dataclass
class GaussianMixture:
    """A mixture of diagonal Gaussians, in float64."""

    means: Tensor  # (K, D)
    stds: Tensor  # (K, D)
    weights: Tensor  # (K,)
    component_class: Tensor | None = None  # (K,) class index of each component

    def __post_init__(self) -> None:
        self.means = torch.as_tensor(self.means, dtype=_F64)
        self.stds = torch.as_tensor(self.stds, dtype=_F64).expand_as(self.means).clone()
        w = torch.as_tensor(self.weights, dtype=_F64)
        self.weights = w / w.sum()
        if self.component_class is not None:
            self.component_class = torch.as_tensor(self.component_class, dtype=torch.long)
        if bool((self.stds <= 0).any()):
            raise ValueError("component standard deviations must be > 0")

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def num_classes(self) -> int:
        return 0 if self.component_class is None else int(self.component_class.max()) + 1

    @staticmethod
    def default(dim: int = 2, seed: int = 0) -> GaussianMixture:
        """The benchmark mixture: 8 components of unequal weight and width on a ring of radius ~1
        (plus small random offsets in higher dims), data scale ~1; components 0-3 are class 0,
        4-7 class 1."""
        g = torch.Generator().manual_seed(seed)
        k = 8
        ang = torch.arange(k, dtype=_F64) * (2 * math.pi / k)
        means = torch.zeros(k, dim, dtype=_F64)
        means[:, 0], means[:, 1] = torch.cos(ang), torch.sin(ang)
        if dim > 2:
            means[:, 2:] = 0.5 * torch.randn(k, dim - 2, generator=g, dtype=_F64)
        stds = 0.05 + 0.15 * torch.rand(k, dim, generator=g, dtype=_F64)
        weights = 0.5 + torch.rand(k, generator=g, dtype=_F64)
        cls = torch.tensor([0, 1, 0, 1, 0, 1, 0, 1])
        return GaussianMixture(means, stds, weights, cls)

    # -- data ---------------------------------------------------------------------------------
    def sample(self, n: int, generator: torch.Generator | None = None, cls: int | None = None) -> tuple[Tensor, Tensor]:
        """``n`` exact data samples and their component indices (optionally from one class)."""
        w = self._class_weights(None if cls is None else torch.full((1,), cls))[0]
        comp = torch.multinomial(w, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        return self.means[comp] + self.stds[comp] * eps, comp

    def _class_weights(self, cls: Tensor | None) -> Tensor:
        """(B or 1, K) prior component weights given per-sample class (-1 = unconditional)."""
        if cls is None:
            return self.weights[None]
        if self.component_class is None:
            raise ValueError("this mixture has no classes (component_class is None)")
        cls = torch.as_tensor(cls).reshape(-1, 1)
        mask = (self.component_class[None] == cls) | (cls < 0)
        w = self.weights[None] * mask
        return w / w.sum(dim=1, keepdim=True)

    # -- exact posterior ----------------------------------------------------------------------
    def _posterior(self, xs: Tensor, a: float, b: float, cls: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """For ``xs ~ N(a mu_k, a^2 S_k + b^2 I)``: posterior weights (B, K), per-component gain
        ``a S_k / (a^2 S_k + b^2)`` (K, D) and variance (K, D)."""
        var = a * a * self.stds**2 + b * b  # (K, D)
        diff = xs[:, None, :] - a * self.means[None]  # (B, K, D)
        logp = -0.5 * ((diff**2) / var[None]).sum(-1) - 0.5 * torch.log(var).sum(-1)[None]
        logw = torch.log(self._class_weights(cls)) + logp
        post = torch.softmax(logw, dim=1)
        gain = a * self.stds**2 / var
        return post, gain, diff

    def posterior_mean(self, x: Tensor, alpha: float, sigma: float, cls: Tensor | None = None) -> Tensor:
        """Exact ``E[x0 | alpha x0 + sigma eps = x]`` (x: (B, D) float64)."""
        shape = x.shape
        xs = x.reshape(shape[0], -1).to(_F64)
        post, gain, diff = self._posterior(xs, alpha, sigma, cls)
        comp_mean = self.means[None] + gain[None] * diff
        return (post[:, :, None] * comp_mean).sum(1).reshape(shape).to(x.dtype)

    def _ve_velocity(self, y: Tensor, s: float, cls: Tensor | None) -> Tensor:
        """``(y - D) / s`` in VE coordinates, in a form finite at s = 0."""
        post, _, diff = self._posterior(y, 1.0, s, cls)
        var = self.stds**2 + s * s
        v = s * diff / var[None]
        return (post[:, :, None] * v).sum(1)

    def denoiser(self, cls: Tensor | None = None) -> Callable[[Tensor, Level], Tensor]:
        """Exact data-prediction denoiser ``D(x, level)`` (per-sample class optional)."""

        def D(x: Tensor, level: Level) -> Tensor:
            return self.posterior_mean(x, level.alpha, level.sigma, cls)

        return D

    def model(self, schedule: Schedule, prediction_type: str | None = None) -> Callable[..., Tensor]:
        """A raw 'network' ``model(x, model_time, cls=None)`` of the given prediction type whose
        outputs are exact. All samples of a call must share one model_time."""
        pt = prediction_type or schedule.prediction_type

        def model(x: Tensor, model_time: Tensor, cls: Tensor | None = None) -> Tensor:
            t = model_time.reshape(-1)
            out = torch.empty_like(x)
            for tv in torch.unique(t).tolist():
                idx = (t == tv).nonzero().reshape(-1)
                a, s = float(schedule.alpha(tv)), float(schedule.sigma(tv))
                xi = x[idx]
                ci = None if cls is None else torch.as_tensor(cls).reshape(-1)[idx]
                x0 = self.posterior_mean(xi, a, s, ci)
                out[idx] = from_x0(x0, xi, a, s, pt)
            return out

        return model

    # -- exact probability-flow ODE -----------------------------------------------------------
    def ode_solution(
        self,
        x: Tensor,
        start: Level,
        end: Level,
        cls: Tensor | None = None,
        rtol: float = 1e-11,
        atol: float = 1e-12,
    ) -> Tensor:
        """Solve the probability-flow ODE from ``x`` at level ``start`` to level ``end`` (which may
        have sigma = 0) with DOP853. Returns float64 (B, D)."""
        from scipy.integrate import solve_ivp

        xs = x.reshape(x.shape[0], -1).to(_F64)
        B, D = xs.shape
        u0 = start.alpha / start.sigma
        u1 = math.inf if end.sigma == 0 else end.alpha / end.sigma
        if not u1 > u0:
            raise ValueError("end must be cleaner than start")
        # Phase 1: z = x / sigma on u in [u0, min(u1, 1)]
        z = xs / start.sigma
        u_mid = min(u1, 1.0)
        if u0 < u_mid:

            def f1(u: float, zf: Any) -> Any:
                zt = torch.from_numpy(zf).reshape(B, D)
                return self.posterior_mean(zt, u, 1.0, cls).reshape(-1).numpy()

            sol = solve_ivp(f1, (u0, u_mid), z.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
            if not sol.success:
                raise RuntimeError(f"ODE integration failed: {sol.message}")
            z = torch.from_numpy(sol.y[:, -1]).reshape(B, D)
            u0 = u_mid
        if u1 <= 1.0:
            return (z * end.sigma).reshape(x.shape)
        # Phase 2: y = x / alpha on s in [1/u0, 1/u1]
        y = z / u0  # y = x/alpha = (x/sigma) * (sigma/alpha)
        s0, s1 = 1.0 / u0, (0.0 if math.isinf(u1) else 1.0 / u1)

        def f2(s: float, yf: Any) -> Any:
            yt = torch.from_numpy(yf).reshape(B, D)
            return self._ve_velocity(yt, s, cls).reshape(-1).numpy()

        sol = solve_ivp(f2, (s0, s1), y.reshape(-1).numpy(), method="DOP853", rtol=rtol, atol=atol)
        if not sol.success:
            raise RuntimeError(f"ODE integration failed: {sol.message}")
        y = torch.from_numpy(sol.y[:, -1]).reshape(B, D)
        return (y * end.alpha).reshape(x.shape)


def sliced_wasserstein(a: Tensor, b: Tensor, n_proj: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between two equal-size point clouds (B, D)."""
    if a.shape != b.shape:
        raise ValueError("point clouds must have the same shape")
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(a.shape[1], n_proj, generator=g, dtype=_F64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa = torch.sort(a.to(_F64) @ dirs, dim=0).values
    pb = torch.sort(b.to(_F64) @ dirs, dim=0).values
    return float((pa - pb).abs().mean())


def levels_of(schedule: Schedule, model_times: Sequence[float]) -> list[Level]:
    """Levels at explicit model times (for tests)."""
    out = []
    for t in model_times:
        a, s, l = float(schedule.alpha(t)), float(schedule.sigma(t)), float(schedule.lam(t))
        out.append(Level(a, s, l, float(t)))
    return out
