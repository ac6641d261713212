"""The recommended default is never less accurate than plain DDIM on its schedule's usual spacing,
on the exact Gaussian mixture, at any budget from 4 to 25 evaluations."""

import math

import pytest
import torch

import noisewise as nw
from noisewise.gmm import GaussianMixture

GMM = GaussianMixture.default(dim=4)


@pytest.mark.parametrize(
    "schedule,ddim_spacing",
    [
        (nw.DiscreteVP(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), "trailing"),
        (nw.RectifiedFlow(shift=3.0), "linspace"),
    ],
    ids=["sd-vp", "flow-shift3"],
)
def test_default_beats_ddim(schedule, ddim_spacing):
    x = torch.randn(48, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    end = nw.Level(1.0, 0.0, math.inf, 0.0)
    exact_cache = {}

    def err(r):
        first = r.grid[0]
        key = round(first.lam, 9)
        if key not in exact_cache:
            exact_cache[key] = GMM.ode_solution(x * math.sqrt(first.alpha**2 + first.sigma**2), first, end)
        return float((r.x - exact_cache[key]).norm(dim=1).median())

    for nfe in (4, 5, 6, 8, 10, 12, 15, 20, 25):
        d = nw.sample(None, x, schedule=schedule, nfe=nfe, denoiser=GMM.denoiser(), return_info=True)
        b = nw.sample(None, x, schedule=schedule, nfe=nfe, sampler="ddim", spacing=ddim_spacing,
                      denoiser=GMM.denoiser(), return_info=True)
        assert d.nfe <= nfe
        assert err(d) <= err(b) * 1.02, (nfe, err(d), err(b))
