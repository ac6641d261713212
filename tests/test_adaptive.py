"""dpm_adaptive: error-controlled DPM-Solver-12/23 on VP and flow schedules.

- parity with k-diffusion's ``sample_dpm_adaptive`` (same model, same start and end, float64);
- tighter tolerance gives a smaller error vs the exact ODE at a higher NFE, monotonically, on a VP
  schedule and on a flow schedule that starts at alpha = 0 (t = 1);
- the public API: ``sample(..., sampler="dpm_adaptive", rtol=...)`` and the NFE it reports.
"""

from __future__ import annotations

import math

import pytest
import torch

import noisewise as nw
from noisewise.core.grid import Grid

from .oracles import k_sampling
from .samplers_helpers import F64, GMM, flow, k_model, noise, ode_reference, vp

D = GMM.denoiser()


class Counting:
    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, *a):
        self.calls += 1
        return self.fn(*a)


@pytest.mark.parametrize("make", [vp, lambda: flow(3.0)], ids=["vp", "flow"])
@pytest.mark.parametrize(("order", "rtol"), [(3, 0.05), (3, 0.01), (2, 0.05)])
def test_parity_k_diffusion(make, order, rtol):
    """Same accepted steps and result as k-diffusion's DPM-Solver (noise prediction, batch RMS error).
    k-diffusion re-evaluates the model at the step's start after every rejection; we keep that
    evaluation, so we spend exactly n_reject fewer model calls."""
    K = k_sampling()
    grid = nw.make_grid(make(), 10, "karras", final="none")  # sigma_max .. sigma_min, no final denoise
    x = noise(6, seed=30)
    smax, smin = grid[0].sigma / grid[0].alpha, grid[-1].sigma / grid[-1].alpha
    y0 = x * math.sqrt(1 + smax**2)
    default = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # k-diffusion builds its times with torch.tensor(float)
    try:
        y, info = K.sample_dpm_adaptive(k_model(grid, D), y0, smin, smax, order=order, rtol=rtol,
                                        disable=True, return_info=True)
    finally:
        torch.set_default_dtype(default)
    counted = Counting(D)
    res = nw.sample(None, x, denoiser=counted, grid=grid, sampler="dpm_adaptive", order=order, rtol=rtol,
                    algorithm="dpmsolver", error_norm="batch_rms", return_info=True)
    # flow (shift 3) starts at sigma/alpha ~ 3000, where k-diffusion's variance-exploding state carries
    # the data part with ~3 digits fewer than our (alpha, sigma) state: ~2e-7 apart there
    tol = 1e-9 if isinstance(grid.schedule, nw.DiscreteVP) else 1e-6
    torch.testing.assert_close(res.x / grid[-1].alpha, y, rtol=tol, atol=tol)
    assert info["n_reject"] > 0 or rtol == 0.05
    assert res.nfe == counted.calls == info["nfe"] - info["n_reject"]


def _error_and_nfe(grid: Grid, rtol: float, x: torch.Tensor, ref: torch.Tensor, **kw) -> tuple[float, int]:
    res = nw.sample(None, x, denoiser=D, grid=grid, sampler="dpm_adaptive", rtol=rtol, atol=1e-4,
                    return_info=True, **kw)
    return float((res.x - ref).norm(dim=1).median()), res.nfe


@pytest.mark.parametrize("algorithm", ["dpmsolver++", "dpmsolver"])
@pytest.mark.parametrize(("make", "ts"), [
    (vp, [999.0, 0.0]),
    (flow, [1000.0, 1.0]),  # starts at alpha = 0
    (lambda: flow(3.0), [1000.0, 1.0]),
], ids=["vp", "flow", "flow-shift3"])
def test_tighter_tolerance_smaller_error_more_nfe(make, ts, algorithm):
    grid = Grid.from_model_times(make(), ts, final="none")
    x = noise(32, seed=31)
    ref = ode_reference(x, grid)
    rows = [_error_and_nfe(grid, r, x, ref, algorithm=algorithm) for r in (1e-1, 3e-2, 1e-2, 3e-3, 1e-3)]
    errs, nfes = zip(*rows)
    assert all(a > b for a, b in zip(errs, errs[1:])), rows
    assert all(a < b for a, b in zip(nfes, nfes[1:])), rows
    assert errs[-1] < 2e-3, rows


def test_sample_api_and_reported_nfe():
    s = flow(3.0)
    x = noise(8, seed=32)
    counted = Counting(GMM.model(s, "flow"))
    res = nw.sample(counted, x, schedule=s, sampler="dpm_adaptive", rtol=1e-2, return_info=True)
    assert res.nfe == counted.calls > 10
    # inner grid nodes are ignored: the step count does not change the solve
    res2 = nw.sample(GMM.model(s, "flow"), x, schedule=s, steps=3, sampler="dpm_adaptive", rtol=1e-2, return_info=True)
    assert res2.nfe == res.nfe
    torch.testing.assert_close(res2.x, res.x, rtol=0, atol=1e-12)
    # lands on the data
    d = torch.cdist(res.x, GMM.means).min(dim=1).values
    assert float(d.median()) < 0.3


def test_sample_max_norm_holds_every_sample_to_the_tolerance():
    """With one far-off sample in the batch, 'batch_rms' lets the others dilute its error;
    'sample_max' does not, so it takes more steps."""
    grid = Grid.from_model_times(vp(), [999.0, 0.0], final="none")
    x = noise(32, seed=33)
    x[0] *= 3.0
    nfe = {n: nw.sample(None, x, denoiser=D, grid=grid, sampler="dpm_adaptive", rtol=1e-2, error_norm=n,
                        return_info=True).nfe for n in ("sample_max", "batch_rms")}
    assert nfe["sample_max"] > nfe["batch_rms"], nfe


@pytest.mark.parametrize(("opts", "match"), [
    ({"order": 1}, "order"),
    ({"rtol": -1.0}, "rtol"),
    ({"rtol": 0.0, "atol": 0.0}, "both be 0"),
    ({"algorithm": "dpm++"}, "algorithm"),
    ({"error_norm": "l2"}, "error_norm"),
])
def test_bad_options(opts, match):
    with pytest.raises(ValueError, match=match):
        nw.sample(None, noise(2), denoiser=D, schedule=vp(), sampler="dpm_adaptive", **opts)


def test_needs_the_schedule():
    grid = Grid.from_arrays([0.1, 1.0], [0.99, 0.1], [900, 10])
    with pytest.raises(ValueError, match="needs the schedule"):
        nw.sample(None, noise(2), denoiser=D, grid=grid, sampler="dpm_adaptive")
