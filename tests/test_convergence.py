"""Every deterministic sampler converges to the exact probability-flow ODE solution at the order
its paper claims (exact Gaussian-mixture denoiser, exact ODE solution by DOP853)."""

import math

import pytest
import torch

import noisewise as nw
from noisewise.gmm import GaussianMixture

F64 = torch.float64
GMM = GaussianMixture.default(dim=2)
L0, L1 = -2.0, 1.0


def _grid(schedule, n, refined_start=True):
    """Uniform-lambda grid from L0 to L1, no final denoise (final='none'). With
    ``refined_start`` the first step is split into two tiny ones (length ~h^2/8), so that the
    first-order warm-up of multistep methods does not limit their global order (a standard
    starting procedure). Single-step methods are self-starting and use the plain grid."""
    h = (L1 - L0) / n
    head = [L0, L0 + h * h / 8, L0 + h * h / 4] if refined_start else [L0]
    lams = head + [L0 + h * i for i in range(1, n + 1)]
    return nw.Grid.from_model_times(schedule, schedule.inverse_lambda(torch.tensor(lams, dtype=F64)), final="none")


CASES = [
    ("ddim", {}, 1),
    ("euler", {}, 1),
    ("flow_euler", {}, 1),
    ("heun", {}, 2),
    ("dpm_solver", {"order": 1}, 1),
    ("dpm_solver", {"order": 2, "lower_order_final": False}, 2),
    ("dpm_solver", {"order": 3, "lower_order_final": False}, 3),
    ("dpm_solver", {"order": 2, "algorithm": "dpmsolver", "lower_order_final": False}, 2),
    ("dpm_solver", {"order": 3, "algorithm": "dpmsolver", "lower_order_final": False}, 3),
    ("dpmpp_2m", {}, 2),
    ("dpmpp_3m", {}, 3),
    ("unipc", {"order": 1, "lower_order_final": False}, 2),  # UniC raises the order by one
    ("unipc", {"order": 2, "lower_order_final": False}, 3),
    ("unipc", {"order": 2, "variant": "bh1", "lower_order_final": False}, 3),
    ("unipc", {"order": 3, "lower_order_final": False}, 3),
]


@pytest.fixture(scope="module", params=["linear_vp", "flow"])
def setting(request):
    s = nw.LinearVP() if request.param == "linear_vp" else nw.RectifiedFlow()
    x = torch.randn(12, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    g = _grid(s, 4)
    exact = GMM.ode_solution(x, g[0], g[-1], rtol=1e-13, atol=1e-14)
    return s, x, exact


@pytest.mark.parametrize("name,opts,order", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_convergence_order(setting, name, opts, order):
    s, x, exact = setting
    single = name in ("dpm_solver", "heun", "ddim", "euler", "flow_euler")
    ns = [30, 60, 120] if single else [32, 64, 128]  # whole groups of 2 and 3 for single-step
    errs = []
    for n in ns:
        grid = _grid(s, n, refined_start=not single)
        out, _ = nw.run(nw.get_sampler(name).fn(x.clone(), grid, **opts), GMM.denoiser())
        errs.append(float((out - exact).norm(dim=1).max()))
    slopes = [math.log2(errs[i] / errs[i + 1]) for i in range(len(errs) - 1)]
    assert sum(slopes) / len(slopes) > order - 0.25, (errs, slopes)
    assert min(slopes) > order - 0.5, (errs, slopes)


def test_exact_ode_solution_is_exact():
    """The ground truth itself: DDIM with many steps converges to it at first order, and the
    integrator is reproducible at two tolerances."""
    s = nw.LinearVP()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    g = nw.make_grid(s, 4, "uniform_lambda", final="none")
    a = GMM.ode_solution(x, g[0], g[-1], rtol=1e-10, atol=1e-11)
    b = GMM.ode_solution(x, g[0], g[-1], rtol=1e-13, atol=1e-14)
    assert float((a - b).abs().max()) < 1e-8
    errs = []
    for n in (500, 1000):
        fine = nw.make_grid(s, n, "uniform_lambda", final="none")
        out, _ = nw.run(nw.get_sampler("ddim").fn(x.clone(), fine), GMM.denoiser())
        errs.append(float((out - b).abs().max()))
    assert errs[1] < errs[0] * 0.6 and errs[1] < 5e-3


def test_exact_ode_from_alpha_zero_to_sigma_zero():
    """Both ends: flow t = 1 (alpha = 0) to sigma = 0; a fine Heun solve agrees."""
    s = nw.RectifiedFlow()
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    g = nw.make_grid(s, 400, "linspace")
    assert g[0].alpha == 0.0 and g[-1].sigma == 0.0
    exact = GMM.ode_solution(x, g[0], g[-1])
    out = nw.sample(None, x, grid=g, sampler="dpmpp_3m", denoiser=GMM.denoiser())
    assert float((out - exact).norm(dim=1).max()) < 2e-3


def test_diffusers_3m_weight_is_only_second_order(setting):
    """The D2 weight diffusers/k-diffusion use (variant='diffusers') is half the exact one: their
    DPM-Solver++(3M) converges at second order, ours (the default 'exact' variant) at third."""
    s, x, exact = setting
    slopes = {}
    for variant in ("exact", "diffusers"):
        errs = []
        for n in (32, 64, 128):
            gen = nw.get_sampler("dpmpp_3m").fn(x.clone(), _grid(s, n), variant=variant)
            out, _ = nw.run(gen, GMM.denoiser())
            errs.append(float((out - exact).norm(dim=1).max()))
        slopes[variant] = math.log2(errs[1] / errs[2])
    assert slopes["exact"] > 2.75 and 1.6 < slopes["diffusers"] < 2.4, slopes
