"""Shared helpers for the issue-3 sampler tests: exact GMM ground truth, k-diffusion adapter,
noise recording for parity with reference implementations."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

import noisewise as nw
from noisewise.core.grid import Grid, Level
from noisewise.gmm import GaussianMixture

F64 = torch.float64
GMM = GaussianMixture.default(dim=2)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def vp() -> nw.DiscreteVP:
    return nw.DiscreteVP(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def flow(shift: float = 1.0) -> nw.RectifiedFlow:
    return nw.RectifiedFlow(shift=shift)


def noise(n: int, seed: int = 0, dim: int = 2) -> torch.Tensor:
    return torch.randn(n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def gens(n: int, seed: int = 0) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(1000 * seed + i) for i in range(n)]


def start_state(x: torch.Tensor, grid: Grid) -> torch.Tensor:
    """What ``nw.sample`` starts from (noise scaled to the first level's marginal std)."""
    return x * math.sqrt(grid[0].alpha ** 2 + grid[0].sigma ** 2)


def ode_reference(x: torch.Tensor, grid: Grid, gmm: GaussianMixture = GMM) -> torch.Tensor:
    """Exact probability-flow ODE solution from the grid's first level to its last."""
    return gmm.ode_solution(start_state(x, grid), grid[0], grid[-1])


# ------------------------------------------------------------------------------------------------
# k-diffusion
# ------------------------------------------------------------------------------------------------


def ve_sigmas(grid: Grid) -> torch.Tensor:
    return torch.tensor([lv.sigma / lv.alpha for lv in grid.levels], dtype=F64)


def k_model(grid: Grid, denoise: Callable[[torch.Tensor, Level], torch.Tensor]) -> Callable[..., torch.Tensor]:
    """A k-diffusion (variance-exploding) model for a denoiser on any schedule: ``y = x / alpha``,
    ``sigma_ve = sigma / alpha``; grid nodes map to themselves, other sigmas to the schedule's level."""
    nodes = {lv.sigma / lv.alpha: lv for lv in grid.levels if lv.sigma > 0 and lv.alpha > 0}

    def model(y: torch.Tensor, sigma: torch.Tensor, **kw: object) -> torch.Tensor:
        s = float(sigma.reshape(-1)[0])
        lv = nodes.get(s) or grid.level_at(-math.log(s))
        return denoise(y * lv.alpha, lv)

    return model


class KNoise:
    """A k-diffusion ``noise_sampler(sigma, sigma_next)`` that draws from one generator and keeps
    its draws, to be replayed into ours with :func:`noisewise.solvers.noise.replay`."""

    def __init__(self, shape: tuple[int, ...], seed: int) -> None:
        self.shape, self.g, self.draws = shape, torch.Generator().manual_seed(seed), []

    def __call__(self, sigma: object, sigma_next: object) -> torch.Tensor:
        z = torch.randn(self.shape, generator=self.g, dtype=F64)
        self.draws.append(z)
        return z


# ------------------------------------------------------------------------------------------------
# distribution checks
# ------------------------------------------------------------------------------------------------


def mode_stats(
    x: torch.Tensor, gmm: GaussianMixture = GMM, alpha: float = 1.0, sigma: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign each point to its most likely component of the noisy marginal at (alpha, sigma);
    per-component weight, mean, variance."""
    post, _, _ = gmm._posterior(x.to(F64), alpha, sigma, None)
    comp = post.argmax(dim=1)
    k = gmm.means.shape[0]
    w = torch.bincount(comp, minlength=k).to(F64) / len(x)
    nan = torch.full((x.shape[1],), math.nan, dtype=F64)
    mu = torch.stack([x[comp == j].mean(0) if (comp == j).sum() > 0 else nan for j in range(k)])
    var = torch.stack([x[comp == j].var(0) if (comp == j).sum() > 1 else nan for j in range(k)])
    return w, mu, var


def distribution_z_scores(
    x: torch.Tensor, gmm: GaussianMixture = GMM, alpha: float = 1.0, sigma: float = 0.0
) -> dict[str, float]:
    """Largest |z| of the per-mode weight, mean and variance against the exact marginal at level
    (alpha, sigma), ``sum_k w_k N(alpha mu_k, alpha^2 s_k^2 + sigma^2)`` (standard errors from the exact
    values and the sample size). At sigma = 0 it is the data distribution itself."""
    n = len(x)
    w, mu, var = mode_stats(x, gmm, alpha, sigma)
    w0, mu0, var0 = gmm.weights, alpha * gmm.means, alpha**2 * gmm.stds**2 + sigma**2
    nk = (w0 * n)[:, None]
    zw = (w - w0) / torch.sqrt(w0 * (1 - w0) / n)
    zm = (mu - mu0) / torch.sqrt(var0 / nk)
    zv = (var - var0) / (var0 * torch.sqrt(2.0 / (nk - 1)))
    return {"weight": float(zw.abs().max()), "mean": float(zm.abs().max()), "var": float(zv.abs().max())}
