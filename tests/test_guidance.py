"""Guided sampling on the exact class-conditional Gaussian mixture: batching, NFE accounting,
per-sample scales, negative conditioning, the guidance interval, CFG++ and autoguidance.

The mixture (``GaussianMixture.default()``) has two classes; its raw 'network'
``model(x, model_time, cls)`` takes a class index per row (-1 = unconditional), so the guided
wrapper can concatenate the branches exactly as it does for a text embedding.
"""

from __future__ import annotations

import math

import pytest
import torch

import noisewise as nw
from noisewise.gmm import GaussianMixture
from noisewise.guidance import APG, Autoguidance, CFGZeroStar, GuidedDenoiser, Interval
from noisewise.guidance.exact import class_of, guided_ode_solution, guided_posterior_mean
from noisewise.sampling import DEFAULT_STIFF_GUARD

F64 = torch.float64
GMM = GaussianMixture.default()
SCHED = nw.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
UNCOND = torch.tensor([-1])


def noise(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, GMM.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def classes(b: int) -> torch.Tensor:
    return torch.arange(b) % 2


class Spy:
    """The GMM network, recording every call's rows and conditioning."""

    def __init__(self, schedule: nw.Schedule = SCHED, prediction_type: str = "epsilon") -> None:
        self.model = GMM.model(schedule, prediction_type)
        self.calls: list[tuple[int, list[int], float]] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        self.calls.append((x.shape[0], cls.tolist(), float(t[0])))
        return self.model(x, t, cls)


def cond_denoiser(x: torch.Tensor, level: nw.Level, cls: torch.Tensor) -> torch.Tensor:
    return GMM.posterior_mean(x, level.alpha, level.sigma, cls)


# -- w = 1, batching, accounting ------------------------------------------------------------------
@pytest.mark.parametrize("sampler", ["ddim", "euler", "heun", "dpmpp_2m", "unipc"])
def test_w1_equals_the_conditional_model_and_makes_no_uncond_call(sampler: str) -> None:
    B, cls = 6, classes(6)
    spy = Spy()
    r = nw.sample(spy, noise(B), schedule=SCHED, sampler=sampler, steps=8, cond=cls, uncond=UNCOND,
                  guidance_scale=1.0, return_info=True)
    opts = {"stiff_guard": DEFAULT_STIFF_GUARD} if sampler in ("dpmpp_2m", "unipc") else {}
    ref = nw.sample(lambda x, t: GMM.model(SCHED)(x, t, cls), noise(B), schedule=SCHED, sampler=sampler, steps=8,
                    return_info=True, **opts)
    assert torch.equal(r.x, ref.x)
    assert all(rows == B and -1 not in c for rows, c, _ in spy.calls)
    assert r.nfe == ref.nfe == len(spy.calls) and r.rows == B * r.nfe and r.calls == r.nfe


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m", "unipc", "heun"])
def test_cfg_is_the_same_in_x0_eps_v_and_flow_space(sampler: str) -> None:
    B, cls = 8, classes(8)
    outs = [
        nw.sample(GMM.model(SCHED), noise(B), schedule=SCHED, sampler=sampler, steps=10, spacing="karras",
                  cond=cls, uncond=UNCOND, guidance_scale=5.0, guidance={"cfg": {"space": space}})
        for space in ("x0", "eps", "v", "flow")
    ]
    for o in outs[1:]:
        assert (o - outs[0]).abs().max().item() < 1e-10


def test_guided_denoiser_is_the_exact_guided_posterior_mean() -> None:
    B, cls = 16, classes(16)
    x = 1.3 * noise(B, 1)
    md = nw.ModelDenoiser(GMM.model(SCHED), "epsilon")
    D = GuidedDenoiser(md, cond=cls, uncond=UNCOND, guidance_scale=4.0, batch=B)
    for t in (900.0, 500.0, 120.0, 10.0):
        lv = nw.Grid.from_model_times(SCHED, [t], final="zero")[0]
        exact = guided_posterior_mean(GMM, x, lv.alpha, lv.sigma, cls, torch.full((B,), -1), 4.0)
        assert (D(x, lv) - exact).abs().max().item() < 1e-12


@pytest.mark.parametrize("sampler,steps", [("ddim", 7), ("dpmpp_2m", 7), ("heun", 4)])
def test_both_branches_go_through_one_network_call_per_evaluation(sampler: str, steps: int) -> None:
    B, cls = 5, classes(5)
    spy = Spy()
    r = nw.sample(spy, noise(B), schedule=SCHED, sampler=sampler, steps=steps, cond=cls, uncond=UNCOND,
                  guidance_scale=7.5, return_info=True)
    evals = nw.get_sampler(sampler).nfe(steps)
    assert len(spy.calls) == r.calls == evals
    for rows, c, _ in spy.calls:
        assert rows == 2 * B and c == cls.tolist() + [-1] * B
    assert r.nfe == 2 * evals and r.rows == 2 * B * evals


def test_max_batch_splits_the_rows_and_changes_nothing_else() -> None:
    B, cls = 8, classes(8)
    full = nw.sample(GMM.model(SCHED), noise(B), schedule=SCHED, sampler="dpmpp_2m", steps=6, cond=cls,
                     uncond=UNCOND, guidance_scale=3.0, return_info=True)
    spy = Spy()
    split = nw.sample(spy, noise(B), schedule=SCHED, sampler="dpmpp_2m", steps=6, cond=cls, uncond=UNCOND,
                      guidance_scale=3.0, max_batch=5, return_info=True)
    assert (split.x - full.x).abs().max().item() < 1e-13
    assert [rows for rows, _, _ in spy.calls] == [5, 5, 5, 1] * 6
    assert split.calls == 24 and split.nfe == full.nfe == 12 and split.rows == full.rows == 96


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_3m", "unipc"])
def test_per_sample_scale_in_one_batch_equals_separate_runs(sampler: str) -> None:
    w = torch.tensor([1.0, 2.0, 5.0, 7.5, 0.0])
    B, cls = 5, classes(5)
    z = noise(B, 3)
    spy = Spy()
    opts = dict(schedule=SCHED, sampler=sampler, steps=9, spacing="karras")
    batch = nw.sample(spy, z, cond=cls, uncond=UNCOND, guidance_scale=w, return_info=True, **opts)
    for i in range(B):
        alone = nw.sample(GMM.model(SCHED), z[i : i + 1], cond=cls[i : i + 1], uncond=UNCOND,
                          guidance_scale=float(w[i]), **opts)
        assert (batch.x[i] - alone[0]).abs().max().item() < 1e-12, i
    # the w = 1 sample sends no unconditional row
    assert all(rows == B + 4 for rows, _, _ in spy.calls) and batch.rows == 9 * (B + 4)


def test_negative_class_pushes_samples_out_of_that_class() -> None:
    B = 256
    z = noise(B, 4)
    anyclass, minus = torch.full((B,), -1), torch.full((B,), 1)
    grid = nw.make_grid(SCHED, 20, "karras")
    frac, exact = {}, {}
    for w in (1.0, 2.0, 3.0, 4.0):
        x = nw.sample(GMM.model(SCHED), z, grid=grid, prediction_type="epsilon", sampler="dpmpp_2m",
                      cond=anyclass[:1], negative=minus[:1], guidance_scale=w)
        frac[w] = (class_of(GMM, x) == 1).double().mean().item()
        ref = guided_ode_solution(GMM, z, grid[0], grid[-1], anyclass, minus, w, rtol=1e-8, atol=1e-9)
        exact[w] = (class_of(GMM, ref) == 1).double().mean().item()
    # unguided: the class prior (0.56 for this mixture); guided away from class 1: few left, as the exact ODE
    assert 0.4 < frac[1.0] < 0.65
    assert frac[1.0] > frac[2.0] > frac[3.0] > frac[4.0] and frac[4.0] < 0.1
    assert all(abs(frac[w] - exact[w]) < 0.04 for w in frac), (frac, exact)


def test_negative_replaces_uncond_and_an_empty_negative_falls_back() -> None:
    B, cls = 6, torch.zeros(6, dtype=torch.long)
    opts = dict(schedule=SCHED, sampler="ddim", steps=6, cond=cls, guidance_scale=3.0)
    spy = Spy()
    neg = nw.sample(spy, noise(B), uncond=UNCOND, negative=torch.tensor([1]), **opts)
    assert all(c[B:] == [1] * B for _, c, _ in spy.calls)
    base = nw.sample(GMM.model(SCHED), noise(B), uncond=UNCOND, **opts)
    for empty in (None, torch.empty(0, dtype=torch.long)):
        out = nw.sample(GMM.model(SCHED), noise(B), uncond=UNCOND, negative=empty, **opts)
        assert torch.equal(out, base)
    assert not torch.allclose(neg, base)
    # a negative alone (no uncond) is a guiding branch too
    only = nw.sample(GMM.model(SCHED), noise(B), negative=torch.tensor([1]), **opts)
    assert torch.equal(only, neg)


@pytest.mark.parametrize("sampler,spacing", [("dpmpp_2m", "karras"), ("heun", "karras"), ("unipc", "trailing")])
def test_guidance_interval_saves_exactly_the_nfe_outside_it(sampler: str, spacing: str) -> None:
    B, cls = 4, classes(4)
    lo, hi = 0.28, 5.42
    spy = Spy()
    r = nw.sample(spy, noise(B), schedule=SCHED, sampler=sampler, steps=12, spacing=spacing, cond=cls,
                  uncond=UNCOND, guidance_scale=4.0, guidance=Interval(lo, hi), return_info=True)
    inside = 0
    for rows, c, t in spy.calls:
        lv = nw.Grid.from_model_times(SCHED, [t])[0]
        ve = lv.sigma / lv.alpha
        guided = lo < ve <= hi
        inside += guided
        assert rows == (2 * B if guided else B) and ((-1 in c) == guided)
    evals = nw.get_sampler(sampler).nfe(12)
    assert r.calls == evals and 0 < inside < evals
    assert r.nfe == evals + inside and r.rows == B * (evals + inside)
    # the same count from the grid alone (each evaluation sits on a grid level for these samplers)
    levels = [lv for lv in r.grid.levels[:-1]]
    if sampler == "heun":
        levels = levels + list(r.grid.levels[1:-1])
    assert inside == sum(lo < lv.sigma / lv.alpha <= hi for lv in levels)


# -- CFG++, CFG-Zero*, autoguidance, APG state ------------------------------------------------------
def _cfgpp_ddim_reference(z: torch.Tensor, grid: nw.Grid, cls: torch.Tensor, lam: float) -> torch.Tensor:
    """CFG++ DDIM as written in Chung et al. 2024 (Algorithm 1), with epsilon predictions:
    eps_lam = eps_u + lam (eps_c - eps_u); x0 = (x - sqrt(1-abar) eps_lam) / sqrt(abar);
    x' = sqrt(abar') x0 + sqrt(1-abar') eps_u."""
    model = GMM.model(SCHED)
    x = z.clone()
    for i in range(grid.steps):
        cur, nxt = grid[i], grid[i + 1]
        t = torch.full((x.shape[0],), cur.model_time, dtype=F64)
        eps_c, eps_u = model(x, t, cls), model(x, t, torch.full_like(cls, -1))
        eps_lam = eps_u + lam * (eps_c - eps_u)
        x0 = (x - cur.sigma * eps_lam) / cur.alpha
        x = nxt.alpha * x0 + nxt.sigma * eps_u if nxt.sigma > 0 else x0
    return x


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_cfgpp_matches_the_papers_ddim_algorithm(sampler: str) -> None:
    B, cls = 8, classes(8)
    for spacing in ("trailing", "karras"):
        grid = nw.make_grid(SCHED, 10, spacing)
        ref = _cfgpp_ddim_reference(noise(B), grid, cls, 0.6)
        out = nw.sample(GMM.model(SCHED), noise(B), grid=grid, sampler=sampler, cond=cls, uncond=UNCOND,
                        guidance_scale=0.6, guidance="cfg++", prediction_type="epsilon")
        assert (out - ref).abs().max().item() < 1e-11


def test_cfgpp_and_cfg_run_with_every_sampler() -> None:
    B, cls = 4, classes(4)
    for name in nw.samplers():
        spec = nw.get_sampler(name)
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        for guidance, w in (("cfg", 3.0), ("cfg++", 0.5)):
            r = nw.sample(GMM.model(SCHED), noise(B), schedule=SCHED, sampler=name, steps=6, spacing="karras",
                          cond=cls, uncond=UNCOND, guidance_scale=w, guidance=guidance,
                          generator=gens if spec.stochastic else None, return_info=True)
            assert torch.isfinite(r.x).all() and r.x.abs().max() < 10, (name, guidance)
            assert r.nfe == 2 * r.calls and r.rows == 2 * B * r.calls, (name, guidance)


def test_cfg_zero_star_zero_init_skips_the_network_and_keeps_x_on_a_flow() -> None:
    flow = nw.RectifiedFlow()
    B, cls = 4, classes(4)
    spy = Spy(flow, "flow")
    seen = []
    r = nw.sample(spy, noise(B), schedule=flow, sampler="flow_euler", steps=8, cond=cls, uncond=UNCOND,
                  guidance_scale=4.0, guidance=CFGZeroStar(zero_init_steps=2), callback=lambda s: seen.append(s.x),
                  return_info=True)
    assert len(spy.calls) == 6 and r.nfe == 12  # two steps without a network call
    x_start = noise(B) * math.sqrt(r.grid[0].alpha ** 2 + r.grid[0].sigma ** 2)
    assert (seen[0] - x_start).abs().max().item() < 1e-12 and (seen[1] - x_start).abs().max().item() < 1e-12


def test_autoguidance_guides_with_the_weaker_model_in_a_second_call() -> None:
    weak = GaussianMixture(GMM.means, GMM.stds * 2.0, GMM.weights, GMM.component_class)  # a blurrier model
    B, cls = 6, classes(6)
    spy, weak_calls = Spy(), []

    def weak_model(x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        weak_calls.append(c.tolist())
        return weak.model(SCHED)(x, t, c)

    r = nw.sample(spy, noise(B), schedule=SCHED, sampler="ddim", steps=8, cond=cls, guidance_scale=2.5,
                  guidance=Autoguidance(guide=weak_model), return_info=True)

    def exact(x: torch.Tensor, lv: nw.Level) -> torch.Tensor:
        good, bad = GMM.posterior_mean(x, lv.alpha, lv.sigma, cls), weak.posterior_mean(x, lv.alpha, lv.sigma, cls)
        return bad + 2.5 * (good - bad)

    ref = nw.sample(None, noise(B), grid=r.grid, sampler="ddim", denoiser=exact)
    assert (r.x - ref).abs().max().item() < 1e-11
    assert len(spy.calls) == len(weak_calls) == 8 and all(c == cls.tolist() for c in weak_calls)
    assert r.nfe == 16 and r.calls == 16 and r.rows == 16 * B
    with pytest.raises(ValueError, match="autoguidance"):
        nw.sample(spy, noise(B), schedule=SCHED, steps=4, cond=cls, uncond=UNCOND, guidance_scale=2.0,
                  guidance=Autoguidance(guide=weak_model))


def test_apg_momentum_runs_over_the_steps_of_one_run_like_the_reference() -> None:
    guiders = pytest.importorskip("diffusers.guiders.adaptive_projected_guidance")
    B, cls = 4, classes(4)
    x = noise(B, 7)
    D = GuidedDenoiser(cond_denoiser, cond=cls, uncond=UNCOND, guidance_scale=3.0, batch=B,
                       guidance=APG(eta=0.3, momentum=-0.5, norm_threshold=0.8))
    buf = guiders.MomentumBuffer(-0.5)
    for t in (800.0, 600.0, 300.0):
        lv = nw.Grid.from_model_times(SCHED, [t])[0]
        c, u = cond_denoiser(x, lv, cls), cond_denoiser(x, lv, torch.full((B,), -1))
        # diffusers' use_original_formulation is the paper's: cond + (w - 1) * update
        ref = guiders.normalized_guidance(c, u, 2.0, buf, 0.3, 0.8, use_original_formulation=True)
        assert (D(x, lv) - ref).abs().max().item() < 1e-12
    D.bind(nw.make_grid(SCHED, 4))  # a new run forgets the momentum
    lv = nw.Grid.from_model_times(SCHED, [800.0])[0]
    c, u = cond_denoiser(x, lv, cls), cond_denoiser(x, lv, torch.full((B,), -1))
    ref = guiders.normalized_guidance(c, u, 2.0, guiders.MomentumBuffer(-0.5), 0.3, 0.8, use_original_formulation=True)
    assert (D(x, lv) - ref).abs().max().item() < 1e-12


def test_a_guided_denoiser_passed_as_denoiser_reports_its_cost() -> None:
    B, cls = 3, classes(3)
    D = GuidedDenoiser(cond_denoiser, cond=cls, uncond=UNCOND, guidance_scale=2.0, batch=B)
    r = nw.sample(None, noise(B), schedule=SCHED, sampler="ddim", steps=5, denoiser=D, return_info=True)
    assert r.nfe == 10 and r.calls == 5 and r.rows == 30


def test_guided_sampling_turns_on_the_stiffness_guard_and_plain_sampling_does_not() -> None:
    B, cls = 64, classes(64)
    grid = nw.make_grid(SCHED, 12, "karras")
    kw = dict(grid=grid, sampler="dpmpp_3m", prediction_type="epsilon")
    plain = nw.sample(lambda x, t: GMM.model(SCHED)(x, t, cls), noise(B), **kw)
    assert torch.equal(plain, nw.sample(lambda x, t: GMM.model(SCHED)(x, t, cls), noise(B), stiff_guard=None, **kw))
    guided = nw.sample(GMM.model(SCHED), noise(B), cond=cls, uncond=UNCOND, guidance_scale=10.0, **kw)
    unguarded = nw.sample(GMM.model(SCHED), noise(B), cond=cls, uncond=UNCOND, guidance_scale=10.0,
                          stiff_guard=None, **kw)
    assert not torch.equal(guided, unguarded)
    assert guided.abs().max() < 3.0 < unguarded.abs().max()  # unguarded 3M overshoots far off the data
