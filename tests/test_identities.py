"""Exact algebraic identities between samplers and between prediction types (float64, ~1e-12)."""

import pytest
import torch

import noisewise as nw
from noisewise.gmm import GaussianMixture

F64 = torch.float64
GMM = GaussianMixture.default(dim=3)


def _noise(n=16, d=3, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _run(name, grid, x, **opts):
    out, nfe = nw.run(nw.get_sampler(name).fn(x.clone(), grid, **opts), GMM.denoiser())
    return out, nfe


GRIDS = {
    "sd_trailing": lambda: nw.make_grid(
        nw.DiscreteVP(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), 9, "trailing"
    ),
    "linear_vp_karras": lambda: nw.make_grid(nw.LinearVP(), 7, "karras"),
    "flow_from_t1": lambda: nw.make_grid(nw.RectifiedFlow(shift=3.0), 8, "linspace"),
    "edm": lambda: nw.make_grid(nw.EDM(), 6, "karras"),
    "zsnr": lambda: nw.make_grid(
        nw.DiscreteVP(rescale_betas_zero_snr=True, prediction_type="v_prediction"), 5, "trailing"
    ),
}


@pytest.mark.parametrize("grid_name", list(GRIDS))
def test_first_order_samplers_are_one_method(grid_name):
    """DDIM(eta=0) == DPM-Solver(++) order 1 == Euler in (x/alpha, sigma/alpha) == flow Euler."""
    grid = GRIDS[grid_name]()
    x = _noise()
    ref, nfe = _run("ddim", grid, x)
    assert nfe == grid.steps
    for name, opts in [
        ("euler", {}),
        ("flow_euler", {}),
        ("dpm_solver", {"order": 1}),
        ("dpm_solver", {"order": 1, "algorithm": "dpmsolver"}),
        ("unipc", {"order": 1, "disable_corrector": tuple(range(100))}),
    ]:
        out, _ = _run(name, grid, x, **opts)
        assert torch.allclose(out, ref, rtol=1e-12, atol=1e-12), (name, opts, (out - ref).abs().max())


def test_euler_in_ve_coordinates_by_hand():
    """Euler on dy/ds = (y - D)/s written out explicitly equals our samplers."""
    grid = GRIDS["sd_trailing"]()
    x = _noise()
    y = x / grid[0].alpha
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        s, s1 = cur.sigma / cur.alpha, nxt.sigma / nxt.alpha
        d = (y - GMM.posterior_mean(y * cur.alpha, cur.alpha, cur.sigma)) / s
        y = y + (s1 - s) * d
    out, _ = _run("euler", grid, x)
    assert torch.allclose(out, y * grid[-1].alpha, rtol=1e-12, atol=1e-12)


def test_flow_euler_by_hand_on_flow_schedule():
    s = nw.RectifiedFlow()
    grid = nw.make_grid(s, 6, "linspace")
    model = GMM.model(s, "flow")
    x = _noise()
    z = x.clone()
    for i in range(grid.steps):
        t, t1 = grid[i].sigma, grid[i + 1].sigma
        v = model(z, torch.full((z.shape[0],), grid[i].model_time, dtype=F64))
        z = z + (t1 - t) * v
    out = nw.sample(model, x, schedule=s, sampler="flow_euler", steps=6, spacing="linspace")
    assert torch.allclose(out, z, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample", "flow"])
@pytest.mark.parametrize("sched", ["vp", "flow", "edm"])
def test_prediction_types_round_trip(pt, sched):
    s = {"vp": nw.LinearVP(), "flow": nw.RectifiedFlow(), "edm": nw.EDM()}[sched]
    x = _noise()
    for t in [0.3 * s.t_max + 0.7 * s.t_min, 0.9 * s.t_max + 0.1 * s.t_min]:
        a, sg = float(s.alpha(t)), float(s.sigma(t))
        x0 = GMM.posterior_mean(x, a, sg)
        raw = nw.from_x0(x0, x, a, sg, pt)
        assert torch.allclose(nw.to_x0(raw, x, a, sg, pt), x0, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pt", ["epsilon", "v_prediction", "sample", "flow"])
@pytest.mark.parametrize("sampler", ["ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "dpm_solver"])
def test_sampling_is_independent_of_prediction_type(pt, sampler):
    """The same exact model exposed as eps / v / x0 / flow gives the same samples."""
    s = nw.LinearVP(prediction_type=pt)
    x = _noise()
    ref = nw.sample(None, x, schedule=s, sampler=sampler, steps=8, denoiser=GMM.denoiser())
    out = nw.sample(GMM.model(s, pt), x, schedule=s, sampler=sampler, steps=8)
    assert torch.allclose(out, ref, rtol=1e-10, atol=1e-10)


def test_schedules_with_equal_ve_sigmas_give_equivalent_solutions():
    """The PF-ODE depends only on sigma/alpha: a VP and an EDM grid at the same VE sigmas give
    x_vp / alpha == x_ve for every first- and multistep sampler."""
    vp = nw.LinearVP()
    grid_vp = nw.make_grid(vp, 7, "karras")
    ve_sig = [lv.sigma / lv.alpha for lv in grid_vp.levels[:-1]]
    grid_ve = nw.Grid.from_model_times(nw.EDM(sigma_min=1e-4, sigma_max=1e4), ve_sig)
    x = _noise()
    for name in ["ddim", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "dpm_solver"]:
        a, _ = _run(name, grid_vp, x)
        b, _ = _run(name, grid_ve, x / grid_vp[0].alpha)
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-9), name
