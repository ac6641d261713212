"""Stability of guided sampling: against the exact solution of the *guided* probability-flow ODE
of the class-conditional Gaussian mixture, the guarded multistep samplers against guided DDIM.

Without the stiffness guard (``stiff_guard=None``), DPM-Solver++(3M) and UniPC-3 end up several
times DDIM's error at large scales (the same failure diffusers' schedulers show); with it
(the default under guidance, ``noisewise.solvers.stiffness``) they stay close to or below DDIM.
They are not strictly never worse: at large w the error counts a handful of samples that end in
another mode (errors of 1-4 data scales each, so one sample moves the mean of 256 by ~0.01, 10-15%
of DDIM's mean error at NFE 17-20), and which samples those are changes with the noise draw. In the
regime where every solver fails (w >= 10 on 4-8 long steps, DDIM's own error 1-3 data scales) the
guarded samplers were 2-20% worse systematically until the long-step limit (``StiffGuard.max_step``,
set from the guidance scale) made them take DDIM's steps there. So each check bounds both the
ratio to DDIM and the paired excess in standard errors (mean(e - e_ddim) / (std(e - e_ddim) /
sqrt(B))); the measured worst values are in ``docs/benchmarks/guidance.md``.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import math
from pathlib import Path

import pytest
import torch

import noisewise as nw
from noisewise.gmm import GaussianMixture
from noisewise.guidance.exact import guided_ode_solution
from noisewise.solvers.base import ddim_step
from noisewise.solvers.stiffness import CORRECTION_BOUND, LONG_STEP, STIFF_SCALE, StiffnessGuard

F64 = torch.float64
GMM = GaussianMixture.default()
SCHED = nw.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
B = 256
Z = torch.randn(B, GMM.dim, generator=torch.Generator().manual_seed(0), dtype=F64)
CLS = torch.arange(B) % 2
TOL = 1.1  # ratio to DDIM on the default subset (measured worst 1.086: w = 7.5, NFE 8, UniPC-bh1); see the docstring
Z_TOL = 3.0  # paired excess over DDIM in standard errors (measured worst 1.59: w = 7.5, NFE 8, UniPC-3-bh1)

# every multistep sampler with the guard (samplers that take ``stiff_guard`` join automatically)
MULTISTEP: list[tuple[str, dict]] = [
    ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("dpmpp_3m", {"variant": "diffusers"}),
    ("unipc", {"order": 1}), ("unipc", {"order": 2}), ("unipc", {"order": 3}),
    ("unipc", {"order": 2, "variant": "bh1"}), ("unipc", {"order": 3, "variant": "bh1"}),
    ("dpm_solver", {"order": 2}), ("dpm_solver", {"order": 3}),  # single-step, guarded too
]
MULTISTEP += [
    (name, {}) for name, spec in sorted(nw.SAMPLERS.items())
    if "stiff_guard" in inspect.signature(spec.fn).parameters and not spec.stochastic
    and name not in ("dpmpp_2m", "dpmpp_3m", "unipc", "dpm_solver")
]
STOCHASTIC_MULTISTEP = [name for name, spec in sorted(nw.SAMPLERS.items())
                        if "stiff_guard" in inspect.signature(spec.fn).parameters and spec.stochastic]


def cond_denoiser(x: torch.Tensor, level: nw.Level, cls: torch.Tensor) -> torch.Tensor:
    return GMM.posterior_mean(x, level.alpha, level.sigma, cls)


def sample_errors(w: float, steps: int, spacing: str, samplers: list[tuple[str, dict]]) -> list[torch.Tensor]:
    """Per-sample distances to the exact guided ODE solution: DDIM's first, then each sampler's."""
    grid = nw.make_grid(SCHED, steps, spacing)
    ref = guided_ode_solution(GMM, Z, grid[0], grid[-1], CLS, torch.full((B,), -1), w, rtol=1e-8, atol=1e-9)
    kw = dict(grid=grid, denoiser=cond_denoiser, cond=CLS, uncond=torch.tensor([-1]), guidance_scale=w)
    return [(nw.sample(None, Z, sampler=n, **kw, **o) - ref).norm(dim=1) for n, o in [("ddim", {})] + samplers]


def errors(w: float, steps: int, spacing: str, samplers: list[tuple[str, dict]]) -> tuple[float, list[float]]:
    e_ddim, *es = sample_errors(w, steps, spacing, samplers)
    return e_ddim.mean().item(), [e.mean().item() for e in es]


def _bench_guidance():
    spec = importlib.util.spec_from_file_location(
        "bench_guidance", Path(__file__).resolve().parent.parent / "bench" / "bench_guidance.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


excess_se = _bench_guidance().paired_excess_se  # the benchmark's own measure, so test and table agree


def _check(w: float, steps: int, spacing: str, tol: float = TOL, z_tol: float = Z_TOL) -> None:
    e_ddim, *es = sample_errors(w, steps, spacing, MULTISTEP)
    for (name, opts), e in zip(MULTISTEP, es):
        m, m_ddim, z = e.mean().item(), e_ddim.mean().item(), excess_se(e, e_ddim)
        assert m <= tol * m_ddim and z <= z_tol, \
            f"{name} {opts} at w={w}, {steps} steps ({spacing}): {m:.3f} vs DDIM {m_ddim:.3f} ({z:.2f} SE above)"


@pytest.mark.parametrize("w", [1.0, 3.0, 7.5, 15.0])
def test_guided_multistep_is_never_worse_than_guided_ddim(w: float) -> None:
    for steps in (4, 5, 8, 12, 20):
        _check(w, steps, "karras")


@pytest.mark.parametrize("w, steps", [(7.5, 5), (3.0, 8)])
def test_the_guard_keeps_the_high_order_gain(w: float, steps: int) -> None:
    """The other side of the bound above: a guard that fell back to DDIM too often would pass it
    trivially. Measured (karras): 3M 0.75x and UniPC-3 0.72x DDIM's error at w = 7.5, NFE 5 (the
    reference point), 0.74x both at w = 3, NFE 8; a correction bound of 1 sigma' or a safety factor
    of 0.25 takes the reference point to 0.97-1.0x."""
    e_ddim, errs = errors(w, steps, "karras", [("dpmpp_3m", {}), ("unipc", {"order": 3})])
    assert max(errs) <= 0.8 * e_ddim, (errs, e_ddim)


def test_without_the_guard_high_order_solvers_blow_up() -> None:
    """The guard is what makes the test above pass: the plain 3M/UniPC-3 updates fail it badly."""
    e_ddim, (e_3m, e_unipc3) = errors(
        10.0, 12, "karras", [("dpmpp_3m", {"stiff_guard": None}), ("unipc", {"order": 3, "stiff_guard": None})]
    )
    assert e_3m > 3 * e_ddim and e_unipc3 > 3 * e_ddim


@pytest.mark.slow
@pytest.mark.parametrize("spacing", ["karras", "uniform_lambda", "trailing"])
def test_guided_multistep_full_grid(spacing: str) -> None:
    """w = 1..15 x NFE 4..20: the worst measured ratio is 1.53 (w = 15, NFE 19, karras, where DDIM's
    median error is 0.02 and a few samples switching modes make the mean; 0.94-1.19 on other noise
    draws) and the worst paired excess 2.33 SE (trailing, w = 11, NFE 19, ipndm; 3.5 SE at
    uniform_lambda, w = 12, NFE 5 before the long-step limit); without the guard ratios reach 30
    (dpmpp_3m) to 500 (unguarded deis/ipndm)."""
    for w, steps in itertools.product(range(1, 16), range(4, 21)):
        _check(float(w), steps, spacing, tol=1.55, z_tol=3.0)


@pytest.mark.parametrize("spacing, w, steps", [("uniform_lambda", 15.0, 6), ("uniform_lambda", 12.0, 5),
                                               ("karras", 15.0, 4)])
def test_long_steps_at_large_scales_take_the_ddim_step(spacing: str, w: float, steps: int) -> None:
    """Where every solver fails (DDIM's error ~2 data scales) the guarded samplers lost to DDIM on
    every noise draw (uniform_lambda, w = 15, NFE 6: UniPC-bh1 1.17x pooled over four draws, 5.2
    standard errors). At w >= STIFF_SCALE no higher-order update over a lambda step longer than
    LONG_STEP is kept, so on these all-long-step grids every guarded sampler is DDIM up to rounding;
    without the limit UniPC-bh1 is worse."""
    e_ddim, errs = errors(w, steps, spacing, MULTISTEP)
    assert max(errs) <= e_ddim * (1 + 1e-9), (errs, e_ddim)
    if spacing == "uniform_lambda":
        _, (free,) = errors(w, steps, spacing, [("unipc", {"order": 2, "variant": "bh1",
                                                           "stiff_guard": nw.StiffGuard(0.5, math.inf)})])
        assert free > 1.1 * e_ddim, (free, e_ddim)


def test_the_long_step_limit_keeps_short_steps_and_moderate_scales() -> None:
    """The limit costs nothing where the steps are short (trailing spacing, w = 15, NFE 6: every
    lambda step <= 0.9, and the guarded samplers stay ~8% better than DDIM) or the scale is below
    STIFF_SCALE (bit-identical to the guard without the limit), and it is per sample: a batch
    mixing w = 15 and w = 5 gives each sample what its own run gives."""
    grid = nw.make_grid(SCHED, 6, "trailing")
    assert max(b - a for a, b in zip(grid.lams[1:-2], grid.lams[2:-1])) <= LONG_STEP
    e_ddim, errs = errors(15.0, 6, "trailing", [("dpmpp_3m", {}), ("unipc", {"order": 3})])
    assert max(errs) <= 0.95 * e_ddim, (errs, e_ddim)
    grid = nw.make_grid(SCHED, 6, "uniform_lambda")
    kw = dict(grid=grid, denoiser=cond_denoiser, cond=CLS, uncond=torch.tensor([-1]), sampler="dpmpp_3m")
    below = nw.sample(None, Z, guidance_scale=STIFF_SCALE - 0.5, **kw)
    free = nw.sample(None, Z, guidance_scale=STIFF_SCALE - 0.5, stiff_guard=nw.StiffGuard(0.5, math.inf), **kw)
    assert torch.equal(below, free)
    w = torch.where(CLS == 0, 15.0, 5.0).to(F64)
    mixed = nw.sample(None, Z, guidance_scale=w, **kw)
    for v in (15.0, 5.0):
        alone = nw.sample(None, Z, guidance_scale=v, **kw)
        torch.testing.assert_close(mixed[w == v], alone[w == v], rtol=0, atol=1e-12)
    assert not torch.allclose(nw.sample(None, Z, guidance_scale=15.0, **kw),
                              nw.sample(None, Z, guidance_scale=15.0, stiff_guard=nw.StiffGuard(0.5, math.inf), **kw))


def test_stiff_guard_options_fail_clearly() -> None:
    grid = nw.make_grid(SCHED, 6, "uniform_lambda")
    kw = dict(grid=grid, denoiser=cond_denoiser, cond=CLS[:4], uncond=torch.tensor([-1]), guidance_scale=3.0,
              sampler="dpmpp_2m")
    for bad, msg in [(nw.StiffGuard(0.5, -1.0), "max_step must be > 0"),
                     (nw.StiffGuard(0.5, True), "got a bool"),
                     (nw.StiffGuard(0.5, torch.tensor([1.0, float("nan")])), "one per sample"),
                     (nw.StiffGuard(0.5, torch.ones(3)), "holds 3 values for a batch of 4"),
                     (nw.StiffGuard(-1.0), "safety factor"), ("strong", "safety factor")]:
        with pytest.raises(ValueError, match=msg):
            nw.sample(None, Z[:4], stiff_guard=bad, **kw)
    # one limit per sample, given by hand: sample 0 limited to short steps, the rest free
    lim = torch.tensor([0.5, math.inf, math.inf, math.inf], dtype=F64)
    out = nw.sample(None, Z[:4], stiff_guard=nw.StiffGuard(0.5, lim), **kw)
    ddim = nw.sample(None, Z[:4], **{**kw, "sampler": "ddim"})
    free = nw.sample(None, Z[:4], stiff_guard=nw.StiffGuard(0.5, math.inf), **kw)
    torch.testing.assert_close(out[0], ddim[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(out[1:], free[1:], rtol=0, atol=0)
    assert not torch.allclose(free[0], ddim[0])


def test_composition_sizes_the_limit_by_its_total_guidance_weight() -> None:
    from noisewise.guidance.compose import ComposedDenoiser, Composition

    d = ComposedDenoiser(cond_denoiser, cond=CLS[:3], guide=torch.full((3,), -1), guidance_scale=4.0,
                         composition=Composition(cond=torch.tensor([0, 1, 1]), owner=[0, 2, 2],
                                                 weight=[3.0, 5.0, -2.0]))
    assert d.stiffness_scale().tolist() == [7.0, 4.0, 11.0]  # w + the sum of |component weights|
    masked = ComposedDenoiser(cond_denoiser, cond=CLS[:3], guide=torch.full((3,), -1), guidance_scale=4.0,
                              composition=Composition(cond=torch.tensor([0, 1, 1]), owner=[0, 2, 2],
                                                      weight=[3.0, 5.0, -2.0], mask=torch.ones(3, 2)))
    assert masked.stiffness_scale().tolist() == [7.0, 4.0, 9.0]  # regions: w + the largest component weight


def test_the_guard_drops_a_correction_far_above_the_noise_level() -> None:
    """Hand-built: D barely moves (L ~ 1e-3, the stability test passes), so only the size test can
    reject. Per sample, a high-order result more than CORRECTION_BOUND * sigma' (rms) away from the
    DDIM result of the same step is replaced by the DDIM result; one within it is kept."""
    grid = nw.make_grid(SCHED, 6, "karras")
    lv0, lv1, lv2 = grid[1], grid[2], grid[3]
    x = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(3), dtype=F64)
    d = 0.5 * torch.ones_like(x)
    g = StiffnessGuard(0.5)
    g.observe(x, d, lv0)
    x1 = ddim_step(x, d, lv0, lv1)
    g.observe(x1, d + 1e-3 * (x1 / lv1.alpha - x / lv0.alpha), lv1)
    low = ddim_step(x1, d, lv1, lv2)
    assert g.accept(lv2.lam - lv1.lam, 2).all()  # stable: the stability test alone keeps every sample
    unit = torch.ones_like(x)  # rms 1 per sample
    scale = torch.tensor([0.5, 0.99, 1.01, 4.0], dtype=F64).reshape(-1, 1, 1) * CORRECTION_BOUND * lv2.sigma
    high = low + scale * unit
    out = g.choose_ddim(2, high, x1, d, lv1, lv2)
    torch.testing.assert_close(out[:2], high[:2], rtol=0, atol=0)
    torch.testing.assert_close(out[2:], low[2:], rtol=0, atol=0)
    # the same test on choose() with a noise level (a UniC correction of the state at lv1)
    out = g.choose(lv1.lam - lv0.lam, 2, x1 + scale / lv2.sigma * lv1.sigma * unit, x1, sigma=lv1.sigma)
    torch.testing.assert_close(out[:2], (x1 + scale / lv2.sigma * lv1.sigma * unit)[:2], rtol=0, atol=0)
    torch.testing.assert_close(out[2:], x1[2:], rtol=0, atol=0)
    # without a noise level choose() keeps the stability test alone
    assert torch.equal(g.choose(lv1.lam - lv0.lam, 2, x1 + 10 * unit, x1), x1 + 10 * unit)


def test_the_correction_bound_keeps_unipc_bh1_at_four_steps_below_ddim() -> None:
    """UniPC with B(h) = h over the long steps of a 4-step karras run: the extrapolation passes the
    stability test but its correction is tens of times the noise level; without the size test the
    guarded bh1 ends 1.12x DDIM's error even at w = 1 (0.75x with it)."""
    e_ddim, errs = errors(1.0, 4, "karras", [("unipc", {"order": 2, "variant": "bh1"}),
                                             ("unipc", {"order": 3, "variant": "bh1"})])
    assert max(errs) <= 0.85 * e_ddim, (errs, e_ddim)


def test_the_classic_multistep_samplers_are_guarded() -> None:
    names = {n for n, _ in MULTISTEP}
    assert {"lms", "deis", "ipndm"} <= names
    assert {"dpmpp_2m_sde", "dpmpp_3m_sde"} <= set(STOCHASTIC_MULTISTEP)


def _stochastic_stats(name: str, opts: dict, w: float, grid: nw.Grid, ref: torch.Tensor) -> tuple[float, float]:
    """(median distance to the guided ODE solution ``ref`` of the same noise, largest sample norm)."""
    x = nw.sample(None, Z, sampler=name, grid=grid, denoiser=cond_denoiser, cond=CLS, uncond=torch.tensor([-1]),
                  guidance_scale=w, generator=torch.Generator().manual_seed(1), **opts)
    return (x - ref).norm(dim=1).median().item(), x.norm(dim=1).max().item()


@pytest.mark.parametrize("w, steps", [(7.5, 8), (15.0, 12), (15.0, 20)])
def test_guided_sde_multistep_is_no_worse_than_first_order_ancestral(w: float, steps: int) -> None:
    """The SDE multisteps under guidance: with the guard they stay with the first-order stochastic
    sampler (Euler ancestral, same noise stream; neither follows the ODE, so the distance to its
    solution is about the data scale for both); without it, samples run off (max norm 5-300x)."""
    grid = nw.make_grid(SCHED, steps, "karras")
    ref = guided_ode_solution(GMM, Z, grid[0], grid[-1], CLS, torch.full((B,), -1), w, rtol=1e-8, atol=1e-9)
    med_ea, max_ea = _stochastic_stats("euler_ancestral", {}, w, grid, ref)
    for name in STOCHASTIC_MULTISTEP:
        med, mx = _stochastic_stats(name, {}, w, grid, ref)
        assert med <= 1.25 * med_ea and mx <= 1.5 * max_ea, (name, w, steps, med, med_ea, mx, max_ea)
    med, mx = _stochastic_stats("dpmpp_3m_sde", {"stiff_guard": None}, w, grid, ref)
    assert mx > 2.5 * max_ea and med > 1.5 * med_ea  # what the guard prevents


def test_guided_sde_guard_at_eta_zero_is_the_guarded_ode_sampler() -> None:
    grid = nw.make_grid(SCHED, 8, "karras")
    kw = dict(grid=grid, denoiser=cond_denoiser, cond=CLS, uncond=torch.tensor([-1]), guidance_scale=10.0)
    a = nw.sample(None, Z, sampler="dpmpp_2m_sde", eta=0.0, **kw)
    b = nw.sample(None, Z, sampler="dpmpp_2m", **kw)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    c = nw.sample(None, Z, sampler="dpmpp_2m", stiff_guard=None, **kw)
    assert (b - c).abs().max() > 1e-3  # the guard did act here
