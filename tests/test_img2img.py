"""Image-to-image: ``nw.sample(..., init=, strength=)`` starts the solve at an intermediate level.

Ground truth: (1) the exact Gaussian-mixture probability-flow ODE from the noised start level;
(2) diffusers' img2img pipelines (``get_timesteps`` + ``add_noise`` / ``scale_noise`` + the
scheduler loop) on the same exact network, as an oracle for the noise-level arithmetic.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

import noisewise as nw
from noisewise.core.grid import make_grid, strength_start, truncate_grid
from noisewise.gmm import GaussianMixture

F64 = torch.float64
DIM, BATCH = 4, 8
GMM = GaussianMixture.default(dim=DIM)
SD = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
DDIM_SD = dict(SD, clip_sample=False, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True)


def _randn(seed: int) -> torch.Tensor:
    return torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _data(seed: int = 1) -> torch.Tensor:
    return GMM.sample(BATCH, generator=torch.Generator().manual_seed(seed))[0].to(F64)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("steps", [1, 7, 10, 25, 50])
@pytest.mark.parametrize("strength", [0.0, 0.05, 0.29, 0.3, 0.5, 0.75, 0.8, 0.999, 1.0])
def test_strength_start_matches_diffusers_get_timesteps(steps: int, strength: float) -> None:
    diffusers = pytest.importorskip("diffusers")
    sch = diffusers.DDIMScheduler(**DDIM_SD)
    sch.set_timesteps(steps)
    fake = SimpleNamespace(scheduler=sch)
    theirs, n = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(fake, steps, strength, "cpu")
    schedule = nw.Schedule.from_diffusers(DDIM_SD)
    grid = make_grid(schedule, steps, "leading", spacing_options={"steps_offset": 1})
    start = strength_start(steps, strength)
    sub = truncate_grid(grid, start)
    assert steps - start == n
    ours = [] if sub is None else sub.model_times[:-1]
    assert ours == [float(t) for t in theirs]


def test_strength_validation() -> None:
    for bad in (-0.1, 1.5, float("nan"), "0.5", True):
        with pytest.raises(ValueError, match="strength"):
            strength_start(10, bad)  # type: ignore[arg-type]
    x = torch.zeros(2, DIM)
    with pytest.raises(ValueError, match="init="):
        nw.sample(GMM.model(nw.RectifiedFlow(), "flow"), x, schedule=nw.RectifiedFlow(), strength=0.5)
    with pytest.raises(ValueError, match="must match"):
        nw.sample(GMM.model(nw.RectifiedFlow(), "flow"), x, schedule=nw.RectifiedFlow(), init=torch.zeros(3, DIM))


@pytest.mark.parametrize("strength", [0.3, 0.6, 1.0])
def test_img2img_ddim_matches_diffusers_img2img_loop(strength: float) -> None:
    """StableDiffusionImg2ImgPipeline's arithmetic (get_timesteps, scheduler.add_noise at the first
    kept timestep, the DDIM loop) on an exact network = nw.sample(init=, strength=)."""
    diffusers = pytest.importorskip("diffusers")
    steps = 20
    schedule = nw.Schedule.from_diffusers(DDIM_SD)
    net = GMM.model(schedule, "epsilon")
    x0, noise = _data(), _randn(0)
    sch = diffusers.DDIMScheduler(**DDIM_SD)
    sch.set_timesteps(steps)
    ts, _ = diffusers.StableDiffusionImg2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sch), steps, strength,
                                                                   "cpu")
    x = sch.add_noise(x0, noise, ts[:1].repeat(BATCH))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in ts:
            x = sch.step(net(x, t.to(F64).expand(BATCH)), t, x).prev_sample
    ours = nw.sample(net, noise, schedule=schedule, sampler="ddim", steps=steps, spacing="leading",
                     spacing_options={"steps_offset": 1}, init=x0, strength=strength, return_info=True)
    assert ours.nfe == len(ts) and ours.steps == len(ts)
    assert rel(ours.x, x.to(F64)) < 1e-5


@pytest.mark.parametrize("strength", [0.25, 0.5, 1.0])
def test_img2img_flow_matches_diffusers_sd3_img2img_loop(strength: float) -> None:
    """SD3 img2img: FlowMatchEuler scale_noise at the first kept sigma, then Euler steps. (SD3's
    get_timesteps rounds the kept step count up where SD's rounds down; these strengths make
    steps * strength whole, where both agree.)"""
    diffusers = pytest.importorskip("diffusers")
    steps, shift = 12, 3.0
    cfg = dict(num_train_timesteps=1000, shift=shift)
    schedule = nw.Schedule.from_diffusers(dict(cfg, _class_name="FlowMatchEulerDiscreteScheduler"))
    net = GMM.model(schedule, "flow")
    x0, noise = _data(2), _randn(3)
    sch = diffusers.FlowMatchEulerDiscreteScheduler(**cfg)
    sch.set_timesteps(sigmas=[1.0 - i / steps for i in range(steps)])
    ts, _ = diffusers.StableDiffusion3Img2ImgPipeline.get_timesteps(SimpleNamespace(scheduler=sch), steps, strength,
                                                                    "cpu")
    x = sch.scale_noise(x0, ts[:1].repeat(BATCH), noise)
    for t in ts:
        x = sch.step(net(x, t.to(F64).expand(BATCH)), t, x).prev_sample
    ours = nw.sample(net, noise, schedule=schedule, sampler="flow_euler", steps=steps, spacing="linspace",
                     init=x0, strength=strength, return_info=True)
    assert ours.nfe == len(ts)
    assert rel(ours.x, x.to(F64)) < 1e-5


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_img2img_converges_to_exact_ode_from_the_start_level(kind: str) -> None:
    """With the exact denoiser, img2img converges to the exact probability-flow ODE from
    ``alpha_s x0 + sigma_s noise`` at the strength's level (a wrong start level or start state
    would leave an error that does not shrink with the step size)."""
    schedule = nw.Schedule.from_diffusers(SD) if kind == "vp" else nw.RectifiedFlow(shift=3.0)
    x0, noise = _data(4), _randn(5)
    D = GMM.denoiser()
    errs: dict[str, list[float]] = {"ddim": [], "unipc": []}
    for steps in (80, 160):
        grid = make_grid(schedule, steps, "uniform_lambda", final="none")  # ends at the last sigma > 0
        start = strength_start(grid.steps, 0.5)
        lv = grid[start]
        exact = GMM.ode_solution(lv.alpha * x0 + lv.sigma * noise, lv, grid[-1], rtol=1e-12, atol=1e-13)
        for sampler, opts in (("ddim", {}), ("unipc", {"order": 3})):
            out = nw.sample(None, noise, denoiser=D, grid=grid, sampler=sampler, init=x0, strength=0.5,
                            return_info=True, **opts)
            assert out.steps == grid.steps - start
            errs[sampler].append(rel(out.x, exact))
    assert errs["unipc"][1] < 3e-5
    assert 0.35 < errs["ddim"][1] / errs["ddim"][0] < 0.65  # first order: halves with the step
    assert errs["unipc"][1] / errs["unipc"][0] < 0.2  # higher order


def test_strength_zero_and_one() -> None:
    schedule = nw.RectifiedFlow()
    net = GMM.model(schedule, "flow")
    x0, noise = _data(6), _randn(7)
    same = nw.sample(net, noise, schedule=schedule, steps=10, init=x0, strength=0.0, return_info=True)
    assert same.nfe == 0 and torch.equal(same.x, x0)
    assert torch.equal(nw.sample(net, noise, schedule=schedule, steps=10, init=x0, strength=0.05), x0)  # 0 steps
    # strength 1 on a flow schedule (alpha = 0 at t = 1): exactly text-to-image from the noise
    a = nw.sample(net, noise, schedule=schedule, sampler="flow_euler", steps=10, init=x0, strength=1.0)
    b = nw.sample(net, noise, schedule=schedule, sampler="flow_euler", steps=10)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the start state is alpha * init + sigma * noise at the kept grid's first level (level 5 of 10)
    seen: list[tuple[torch.Tensor, float]] = []
    D = GMM.denoiser()

    def rec(x: torch.Tensor, level: nw.Level) -> torch.Tensor:
        seen.append((x.clone(), level.sigma))
        return D(x, level)

    nw.sample(None, noise, denoiser=rec, schedule=schedule, sampler="flow_euler", steps=10, init=x0, strength=0.5)
    g = make_grid(schedule, 10)
    assert len(seen) == 5 and seen[0][1] == g[5].sigma
    torch.testing.assert_close(seen[0][0], g[5].alpha * x0 + g[5].sigma * noise, rtol=1e-12, atol=1e-12)
