"""Each guidance option against its paper's formula on hand-built inputs (and against diffusers'
guiders where it has one), plus option parsing and bad input."""

from __future__ import annotations

import math

import pytest
import torch

import noisewise as nw
from noisewise.gmm import GaussianMixture
from noisewise.guidance import (
    APG,
    CFG,
    Autoguidance,
    CFGPlusPlus,
    CFGZeroStar,
    DynamicThreshold,
    GuidedDenoiser,
    Interval,
    Rescale,
    apg,
    cfg,
    cfg_zero_star,
    cfgpp_scale,
    dynamic_threshold,
    from_space,
    parse_guidance,
    rescale,
    to_space,
)

F64 = torch.float64
GEN = torch.Generator().manual_seed(11)


def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=GEN, dtype=F64)


C, U = rnd(3, 4, 5, 5), rnd(3, 4, 5, 5)  # hand-built 'image' predictions, batch 3
W = torch.tensor([1.0, 3.0, 7.5], dtype=F64).reshape(3, 1, 1, 1)


def test_cfg_formula_and_w1_identity() -> None:
    assert (cfg(C, U, W) - (U + W * (C - U))).abs().max() < 1e-13
    assert torch.equal(cfg(C, U, 1.0), C)


def test_rescale_is_lin_et_al_algorithm_2() -> None:
    guided = cfg(C, U, W)
    phi = 0.7
    # Algorithm 2: std over all but the batch axis, x_final = phi * x_cfg * std_pos / std_cfg + (1 - phi) * x_cfg
    out = rescale(guided, C, phi)
    for i in range(3):
        std_pos, std_cfg = C[i].std(), guided[i].std()
        ref = phi * guided[i] * (std_pos / std_cfg) + (1 - phi) * guided[i]
        assert (out[i] - ref).abs().max() < 1e-13
    assert torch.equal(rescale(guided, C, 0.0), guided)
    utils = pytest.importorskip("diffusers.guiders.guider_utils")
    assert (out - utils.rescale_noise_cfg(guided, C, phi)).abs().max() < 1e-13


@pytest.mark.parametrize(
    "eta,threshold,momentum", [(0.0, 0.0, 0.0), (0.4, 0.0, 0.0), (0.0, 2.0, -0.5), (1.0, 0.0, 0.0)]
)
def test_apg_is_sadat_et_al_algorithm_1(eta: float, threshold: float, momentum: float) -> None:
    running = rnd(3, 4, 5, 5, scale=0.3) if momentum else None
    out, new_running = apg(C, U, W, eta=eta, norm_threshold=threshold, running=running, momentum=momentum)
    for i in range(3):
        diff = C[i] - U[i]
        if momentum:
            diff = diff + momentum * running[i]
        assert torch.equal(new_running[i], diff)
        if threshold:
            diff = diff * min(1.0, threshold / diff.norm().item())
        unit = C[i] / C[i].norm()
        par = (diff * unit).sum() * unit
        ref = C[i] + (W[i] - 1) * ((diff - par) + eta * par)
        assert (out[i] - ref).abs().max() < 1e-12
    if eta == 1.0 and not threshold and not momentum:  # APG without its parts is CFG
        assert (out - cfg(C, U, W)).abs().max() < 1e-12


def test_apg_matches_diffusers_original_formulation() -> None:
    guiders = pytest.importorskip("diffusers.guiders.adaptive_projected_guidance")
    for w in (2.0, 7.5):
        out, _ = apg(C, U, w, eta=0.25, norm_threshold=3.0)
        ref = guiders.normalized_guidance(C, U, w - 1, None, 0.25, 3.0, use_original_formulation=True)
        assert (out - ref).abs().max() < 1e-12


def test_cfg_zero_star_is_fan_et_al_eq_8() -> None:
    out = cfg_zero_star(C, U, W)
    for i in range(3):
        s = (C[i] * U[i]).sum() / ((U[i] * U[i]).sum() + 1e-8)
        ref = s * U[i] + W[i] * (C[i] - s * U[i])
        assert (out[i] - ref).abs().max() < 1e-12
    assert (cfg_zero_star(C, U, 1.0) - C).abs().max() < 1e-13
    zs = pytest.importorskip("diffusers.guiders.classifier_free_zero_star_guidance")
    s = zs.cfg_zero_star_scale(C.flatten(1), U.flatten(1)).reshape(3, 1, 1, 1)
    assert (out - (U * s + W * (C - U * s))).abs().max() < 1e-6  # diffusers computes s in float32


def test_dynamic_threshold_is_imagen() -> None:
    x0 = rnd(3, 4, 5, 5, scale=1.5)
    x0[0] /= 1.1 * x0[0].abs().max()  # a sample already inside [-1, 1]: untouched
    out = dynamic_threshold(x0, 0.9)
    for i in range(3):
        s = max(torch.quantile(x0[i].abs().flatten(), 0.9).item(), 1.0)
        ref = x0[i].clamp(-s, s) / s
        assert (out[i] - ref).abs().max() < 1e-12
    assert torch.equal(out[0], x0[0])
    capped = dynamic_threshold(x0, 0.9, max_value=1.2)
    assert capped.abs().max() <= 1.0 + 1e-12
    ddpm = pytest.importorskip("diffusers").DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.9,
                                                           sample_max_value=1e9)
    assert (out - ddpm._threshold_sample(x0)).abs().max() < 1e-12


def test_cfgpp_scale_turns_a_ddim_step_into_the_cfgpp_step() -> None:
    x, c, u = rnd(4, 6), rnd(4, 6), rnd(4, 6)
    for (a, s), (a2, s2) in [((0.3, 0.954), (0.6, 0.8)), ((0.05, 0.9987), (0.999, 0.0447))]:
        h = math.log(a2 / s2) - math.log(a / s)
        lam = 0.7
        eps_u = (x - a * u) / s
        paper = a2 * (u + lam * (c - u)) + s2 * eps_u  # CFG++: interpolate x0, re-noise with eps_uncond
        x0 = cfg(c, u, cfgpp_scale(lam, h))
        ddim = a2 * x0 + s2 * (x - a * x0) / s
        assert (ddim - paper).abs().max() < 1e-12
    assert cfgpp_scale(0.7, math.inf) == 0.7


def test_interval_is_half_open_in_ve_sigma() -> None:
    iv = Interval(0.28, 5.42)
    assert not iv.active(0.28) and iv.active(0.2800001) and iv.active(5.42) and not iv.active(5.43)
    assert not iv.active(math.inf) and Interval(0.0, math.inf).active(math.inf)


@pytest.mark.parametrize("space", ["x0", "eps", "v", "flow"])
def test_space_conversions_round_trip(space: str) -> None:
    lv = nw.Level(0.6, 0.8, math.log(0.75), 500.0)
    x, x0 = rnd(5, 3), rnd(5, 3)
    assert (from_space(to_space(x0, x, lv, space), x, lv, space) - x0).abs().max() < 1e-13


def test_rescale_works_in_its_declared_space() -> None:
    """Rescale in v space on a GMM step equals the hand computation in v space."""
    gmm = GaussianMixture.default(dim=6)
    B = 4
    cls = torch.arange(B) % 2
    x = rnd(B, 6)
    lv = nw.Level(0.5, math.sqrt(0.75), math.log(0.5 / math.sqrt(0.75)), 600.0)

    def D(x: torch.Tensor, level: nw.Level, c: torch.Tensor) -> torch.Tensor:
        return gmm.posterior_mean(x, level.alpha, level.sigma, c)

    for space in ("v", "eps", "x0"):
        G = GuidedDenoiser(D, cond=cls, uncond=torch.tensor([-1]), guidance_scale=6.0, batch=B,
                           guidance=Rescale(0.7, space))
        c, u = D(x, lv, cls), D(x, lv, torch.full((B,), -1))
        cs, us = to_space(c, x, lv, space), to_space(u, x, lv, space)
        ref = from_space(rescale(cfg(cs, us, 6.0), cs, 0.7), x, lv, space)
        assert (G(x, lv) - ref).abs().max() < 1e-12


# -- parsing ------------------------------------------------------------------------------------
def test_parse_guidance_forms() -> None:
    assert parse_guidance(None) == (CFG(),)
    assert parse_guidance("apg") == (APG(),)
    assert parse_guidance("CFG-Zero*") == (CFGZeroStar(),)
    assert parse_guidance("cfgpp") == (CFGPlusPlus(),)
    opts = parse_guidance([{"rescale": {"phi": 0.5}}, "interval", DynamicThreshold(0.99)])
    assert opts == (CFG(), Rescale(0.5), Interval(), DynamicThreshold(0.99))
    assert parse_guidance({"apg": None, "guidance_rescale": {}}) == (APG(), Rescale())
    assert set(nw.guidance_methods()) >= {"cfg", "rescale", "interval", "apg", "cfg_zero_star", "cfg++"}


@pytest.mark.parametrize(
    "bad,match",
    [
        ("cgf", "unknown guidance option 'cgf'; did you mean 'cfg'"),
        ("resacle", "did you mean 'rescale'"),
        ({"rescale": {"ph": 0.5}}, "takes no setting 'ph'; did you mean 'phi'"),
        (["apg", "cfg++"], "choose one way to combine"),
        (["rescale", Rescale()], "given twice"),
        ("autoguidance", "needs the weaker model"),
        ({"rescale": 0.5}, "needs a dict of settings"),
        (3.0, "guidance must be a name"),
    ],
)
def test_bad_guidance_options_teach(bad: object, match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        parse_guidance(bad)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: Rescale(phi=1.5), "phi"),
        (lambda: Rescale(space="latent"), "space must be one of"),
        (lambda: Interval(5.0, 1.0), "sigma_lo < sigma_hi"),
        (lambda: Interval(float("nan"), 1.0), "sigma_lo"),
        (lambda: DynamicThreshold(percentile=2.0), "percentile"),
        (lambda: APG(momentum=float("nan")), "momentum"),
        (lambda: CFGZeroStar(zero_init_steps=-1), "zero_init_steps"),
        (lambda: Autoguidance(), "weaker model"),
    ],
)
def test_bad_option_settings_teach(make, match: str) -> None:  # noqa: ANN001
    with pytest.raises(ValueError, match=match):
        make()


# -- bad input through nw.sample ------------------------------------------------------------------
GMM = GaussianMixture.default()
SCHED = nw.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
Z = torch.randn(4, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
CLS = torch.tensor([0, 1, 0, 1])


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(guidance_scale=-1.0), ValueError, "must be >= 0"),
        (dict(guidance_scale=float("nan")), ValueError, "finite"),
        (dict(guidance_scale=float("inf")), ValueError, "finite"),
        (dict(guidance_scale=True), TypeError, "bool"),
        (dict(guidance_scale=torch.tensor([1.0, 2.0])), ValueError, "one value per sample"),
        (dict(guidance_scale=torch.tensor([1.0, 2.0, -3.0, 1.0])), ValueError, ">= 0"),
        (dict(uncond=torch.zeros(4, 3)), ValueError, "same shape apart from the batch"),
        (dict(uncond=torch.tensor([-1, -1])), ValueError, "batch dimension first with 4 rows"),
        (dict(uncond=None), ValueError, "needs a guiding branch: pass uncond="),
        (dict(negative=torch.zeros(4, 2)), ValueError, "same shape apart from the batch"),
        (dict(negative="blurry"), TypeError, "negative must be a tensor"),
        (dict(cond=torch.tensor([0, 1, 0])), ValueError, "4 rows"),
        (dict(cond=None), ValueError, "needs cond="),
        (dict(cond=[1, 2]), TypeError, "batch-aligned tensor"),
        (dict(guidance="cfgg"), ValueError, "did you mean 'cfg'"),
        (dict(max_batch=0), ValueError, "max_batch"),
        (dict(uncond=torch.tensor([float("nan")]), cond=torch.zeros(4)), ValueError, "NaN"),
    ],
)
def test_bad_guided_input_gives_a_clear_error(kwargs: dict, err: type, match: str) -> None:
    opts = dict(cond=CLS, uncond=torch.tensor([-1]), guidance_scale=3.0)
    opts.update(kwargs)
    with pytest.raises(err, match=match):
        nw.sample(GMM.model(SCHED), Z, schedule=SCHED, sampler="ddim", steps=3, **opts)


def test_max_batch_without_guidance_is_an_error() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        nw.sample(lambda x, t: GMM.model(SCHED)(x, t, None), Z, schedule=SCHED, steps=3, max_batch=2)


def test_cfgpp_needs_the_grid_when_used_by_hand() -> None:
    D = GuidedDenoiser(lambda x, lv, c: x, cond=CLS, uncond=torch.tensor([-1]), guidance_scale=0.5,
                       guidance="cfg++", batch=4)
    with pytest.raises(RuntimeError, match="bind"):
        D(Z, nw.Level(0.6, 0.8, math.log(0.75), 500.0))
