"""A negative prompt with its own weight (``negative_scale``): ``D(u) + w (D(c) - D(u)) - s (D(n) - D(u))``.

Checked against the exact Gaussian-mixture denoiser (the formula, one batched forward with three
branches, the NFE count), against the replacing negative (``s = w - 1`` is the same sampler), on the
composed denoiser, in the pipeline (rows, metadata, reproduction), the CLI and the HTTP API.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import noisewise as nw
from noisewise.gmm import GaussianMixture
from noisewise.guidance import APG, Autoguidance, GuidedDenoiser
from noisewise.guidance.compose import ComposedDenoiser, Composition
from noisewise.guidance.exact import class_of
from tests.test_compose import RowSpy  # the network's rows per call

F64 = torch.float64
_G = GaussianMixture.default()
GMM = GaussianMixture(_G.means, _G.stds, _G.weights, torch.arange(8) % 4)  # four classes: four conditions
SCHED = nw.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LEVEL = nw.Level(alpha=0.8, sigma=0.6, lam=float(np.log(0.8 / 0.6)), model_time=500.0)
UNCOND = torch.tensor([-1])


def post(x: torch.Tensor, cls: torch.Tensor | int) -> torch.Tensor:
    c = torch.as_tensor(cls).reshape(-1).expand(x.shape[0])
    return GMM.posterior_mean(x, LEVEL.alpha, LEVEL.sigma, c)


class Spy:
    def __init__(self) -> None:
        self.calls: list[list[int]] = []

    def __call__(self, x: torch.Tensor, level: nw.Level, cls: torch.Tensor) -> torch.Tensor:
        self.calls.append(cls.reshape(-1).tolist())
        return GMM.posterior_mean(x, level.alpha, level.sigma, cls)


def x_(b: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_guided_denoiser_is_the_formula_in_one_forward() -> None:
    x, cond = x_(4), torch.tensor([0, 1, 2, 3])
    w = torch.tensor([3.0, 1.0, 0.0, 2.5], dtype=F64)  # w = 1 still gets its negative term
    spy = Spy()
    d = GuidedDenoiser(spy, cond=cond, uncond=UNCOND, negative=torch.tensor([1]), negative_scale=1.5,
                       guidance_scale=w, batch=4)
    out = d(x, LEVEL)
    u = post(x, -1)
    ref = u + w[:, None] * (post(x, cond) - u) - 1.5 * (post(x, 1) - u)
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert spy.calls == [[0, 1, 2, 3] + [-1] * 4 + [1] * 4] and d.nfe == 3 and d.calls == 1 and d.rows == 12


def test_a_zero_or_absent_negative_scale_is_plain_cfg() -> None:
    x, cond, neg = x_(3), torch.tensor([0, 2, 3]), torch.tensor([1])
    u = post(x, -1)
    plain = u + 2.0 * (post(x, cond) - u)
    spy = Spy()
    zero = GuidedDenoiser(spy, cond=cond, uncond=UNCOND, negative=neg, negative_scale=0.0, guidance_scale=2.0)
    assert torch.allclose(zero(x, LEVEL), plain, atol=1e-12, rtol=0) and zero.nfe == 2 and len(spy.calls[0]) == 6
    n = post(x, 1)
    replaced = GuidedDenoiser(Spy(), cond=cond, uncond=UNCOND, negative=neg, guidance_scale=2.0)(x, LEVEL)
    assert torch.allclose(replaced, n + 2.0 * (post(x, cond) - n), atol=1e-12, rtol=0)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "heun", "unipc"])
def test_negative_scale_w_minus_one_samples_like_the_replacing_negative(sampler: str) -> None:
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    opts = dict(schedule=SCHED, sampler=sampler, steps=8, cond=torch.tensor([0]), uncond=UNCOND,
                negative=torch.tensor([1]), guidance_scale=3.0)
    model = GMM.model(SCHED)
    replaced = nw.sample(model, z, **opts)
    weighted = nw.sample(model, z, negative_scale=2.0, return_info=True, **opts)
    assert torch.allclose(weighted.x, replaced, atol=1e-9, rtol=0)
    half = nw.sample(model, z, negative_scale=1.0, **opts)
    assert (half - replaced).abs().max() > 1e-3  # a different weight is a different sampler


def test_a_larger_negative_scale_pushes_more_samples_out_of_the_negative_class() -> None:
    z = torch.randn(256, 2, generator=torch.Generator().manual_seed(4), dtype=F64)
    share = {}
    for s in (0.0, 1.0, 3.0):
        x = nw.sample(GMM.model(SCHED), z, schedule=SCHED, sampler="dpmpp_2m", steps=20, spacing="karras",
                      cond=torch.tensor([-1]), uncond=UNCOND, negative=torch.tensor([1]), negative_scale=s,
                      guidance_scale=1.0)
        share[s] = (class_of(GMM, x) == 1).double().mean().item()
    assert share[0.0] > share[1.0] > share[3.0] and share[3.0] < 0.5 * share[0.0], share


def test_composed_denoiser_adds_the_negative_term() -> None:
    x = x_(2)
    cond, guide, neg = torch.tensor([0, 3]), torch.tensor([-1, -1]), torch.tensor([1, 1])
    comp = Composition(torch.tensor([2]), owner=[0], weight=[0.7])
    spy = Spy()
    d = ComposedDenoiser(spy, cond=cond, guide=guide, guidance_scale=2.0, composition=comp, negative=neg,
                         negative_scale=0.5)
    out = d(x, LEVEL)
    u = post(x, -1)
    ref = u + 2.0 * (post(x, cond) - u) - 0.5 * (post(x, 1) - u)
    ref[0] += 0.7 * (post(x[:1], 2) - u[:1])[0]
    assert torch.allclose(out, ref, atol=1e-12, rtol=0)
    assert spy.calls == [[-1, -1, 1, 1, 0, 3, 2]] and d.nfe == 4
    # through nw.sample, with components measured from the full prompt (regional prompting): s = w - 1 is
    # the replacing negative there too (components measured from the guide see u instead of the negative)
    z = torch.randn(8, 2, generator=torch.Generator().manual_seed(5), dtype=F64)
    opts = dict(schedule=SCHED, sampler="dpmpp_2m", steps=6, cond=torch.tensor([0]).expand(8), guidance_scale=2.5,
                composition=Composition(torch.tensor([2]), owner=[0], weight=[0.7], relative="cond"))
    model = GMM.model(SCHED)
    replaced = nw.sample(model, z, uncond=UNCOND.expand(8), negative=torch.tensor([1]).expand(8), **opts)
    weighted = nw.sample(model, z, uncond=UNCOND.expand(8), negative=torch.tensor([1]).expand(8), negative_scale=1.5,
                         **opts)
    assert torch.allclose(weighted, replaced, atol=1e-9, rtol=0)
    # the same rules as GuidedDenoiser's negative: s = 0 or an empty negative adds no term and no rows; a
    # negative without its weight is refused (a replacing negative is guide=)
    for kw in (dict(negative=neg, negative_scale=0.0), dict(negative=torch.tensor([]), negative_scale=0.5)):
        spy = Spy()
        d = ComposedDenoiser(spy, cond=cond, guide=guide, guidance_scale=2.0, composition=comp, **kw)
        d(x, LEVEL)
        assert d.neg is None and spy.calls == [[-1, -1, 0, 3, 2]], kw
    with pytest.raises(ValueError, match="give negative_scale= too, or pass a negative that replaces"):
        ComposedDenoiser(spy, cond=cond, guide=guide, guidance_scale=2.0, composition=comp, negative=neg)


def test_negative_above_gates_the_negative_term_and_its_rows() -> None:
    """``negative_above``: the negative term (and its rows) only at ``sigma / alpha >= negative_above``;
    below, plain CFG against ``uncond`` with two rows per sample."""
    x, cond, neg = x_(3), torch.tensor([0, 2, 3]), torch.tensor([1])
    u = post(x, -1)
    with_neg = u + 2.0 * (post(x, cond) - u) - 1.5 * (post(x, 1) - u)
    plain = u + 2.0 * (post(x, cond) - u)
    ve = LEVEL.sigma / LEVEL.alpha  # 0.75
    for above, ref, rows in ((0.0, with_neg, 9), (ve, with_neg, 9), (0.76, plain, 6)):
        spy = Spy()
        d = GuidedDenoiser(spy, cond=cond, uncond=UNCOND, negative=neg, negative_scale=1.5, negative_above=above,
                           guidance_scale=2.0)
        assert torch.allclose(d(x, LEVEL), ref, atol=1e-12, rtol=0), above
        assert len(spy.calls[0]) == rows and d.nfe == rows // 3
        spy = Spy()
        c = ComposedDenoiser(spy, cond=cond, guide=UNCOND.expand(3), guidance_scale=2.0, negative=neg.expand(3),
                             negative_scale=1.5, negative_above=above,
                             composition=Composition(torch.tensor([2]), owner=[0], weight=[0.7]))
        comp = ref.clone()
        comp[0] += 0.7 * (post(x[:1], 2) - u[:1])[0]
        assert torch.allclose(c(x, LEVEL), comp, atol=1e-12, rtol=0), above
        assert len(spy.calls[0]) == rows + 1 and c.nfe == (4 if rows == 9 else 3)
    # through nw.sample: 0 is the ungated sampler, a level above every step's is negative_scale 0, one between
    # them is neither
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    opts = dict(schedule=SCHED, sampler="dpmpp_2m", steps=8, cond=torch.tensor([0]), uncond=UNCOND,
                negative=torch.tensor([1]), guidance_scale=3.0)
    model = GMM.model(SCHED)
    full = nw.sample(model, z, negative_scale=1.0, **opts)
    assert torch.equal(nw.sample(model, z, negative_scale=1.0, negative_above=0.0, **opts), full)
    off = nw.sample(model, z, negative_scale=0.0, **opts)
    assert torch.allclose(nw.sample(model, z, negative_scale=1.0, negative_above=1e9, **opts), off, atol=1e-12, rtol=0)
    half = nw.sample(model, z, negative_scale=1.0, negative_above=1.0, **opts)
    assert (half - full).abs().max() > 1e-3 and (half - off).abs().max() > 1e-3


def _perp(d: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """``d`` less its projection on ``p``, row by row (the Perp-Neg formula, written out here)."""
    return d - ((d * p).sum(1, keepdim=True) / (p * p).sum(1, keepdim=True)) * p


def test_negative_perpendicular_subtracts_only_the_part_across_the_prompt() -> None:
    """``negative_perpendicular``: ``D(u) + P - s perp(D(n) - D(u), P)``, ``P`` the guided direction
    (``w (D(c) - D(u))``, plus the components in the composed denoiser), on the exact mixture; the
    term is orthogonal to ``P``; same rows and NFE as the plain negative; a zero direction keeps the
    plain term."""
    x, cond, neg = x_(3, seed=3), torch.tensor([0, 2, 3]), torch.tensor([1])
    u = post(x, -1)
    P = 2.0 * (post(x, cond) - u)
    nd = post(x, 1) - u
    ref = u + P - 1.5 * _perp(nd, P)
    assert torch.allclose((_perp(nd, P) * P).sum(1), torch.zeros(3, dtype=F64), atol=1e-12)
    assert (ref - (u + P - 1.5 * nd)).abs().max() > 1e-3  # the projection changes the result here
    spy = Spy()
    d = GuidedDenoiser(spy, cond=cond, uncond=UNCOND, negative=neg, negative_scale=1.5, negative_perpendicular=True,
                       guidance_scale=2.0)
    assert torch.allclose(d(x, LEVEL), ref, atol=1e-12, rtol=0)
    assert len(spy.calls[0]) == 9 and d.nfe == 3
    plain = GuidedDenoiser(Spy(), cond=cond, uncond=UNCOND, negative=neg, negative_scale=1.5, guidance_scale=2.0)
    assert torch.allclose(plain(x, LEVEL), u + P - 1.5 * nd, atol=1e-12, rtol=0)
    # composed: the direction is the sum of the full prompt's and the components' terms
    spy = Spy()
    c = ComposedDenoiser(spy, cond=cond, guide=UNCOND.expand(3), guidance_scale=2.0, negative=neg.expand(3),
                         negative_scale=1.5, negative_perpendicular=True,
                         composition=Composition(torch.tensor([2]), owner=[0], weight=[0.7]))
    Pc = P.clone()
    Pc[0] += 0.7 * (post(x[:1], 2) - u[:1])[0]
    assert torch.allclose(c(x, LEVEL), u + Pc - 1.5 * _perp(nd, Pc), atol=1e-12, rtol=0)
    assert len(spy.calls[0]) == 10 and c.nfe == 4
    # w = 1 with no components: P = D(c) - D(u) still; a sample whose direction is zero keeps the plain term
    same = GuidedDenoiser(Spy(), cond=torch.tensor([-1, 0]), uncond=UNCOND, negative=neg, negative_scale=1.0,
                          negative_perpendicular=True, guidance_scale=2.0, batch=2)
    x2 = x[:2]
    u2, nd2 = post(x2, -1), post(x2, 1) - post(x2, -1)
    out = same(x2, LEVEL)
    assert torch.allclose(out[0], u2[0] - nd2[0], atol=1e-12, rtol=0)
    P2 = 2.0 * (post(x2[1:], 0) - u2[1:])
    assert torch.allclose(out[1:], u2[1:] + P2 - _perp(nd2[1:], P2), atol=1e-12, rtol=0)
    # through nw.sample, and gated together with negative_above
    z = torch.randn(16, 2, generator=torch.Generator().manual_seed(6), dtype=F64)
    opts = dict(schedule=SCHED, sampler="dpmpp_2m", steps=8, cond=torch.tensor([0]), uncond=UNCOND,
                negative=torch.tensor([1]), guidance_scale=3.0, negative_scale=1.0)
    model = GMM.model(SCHED)
    full = nw.sample(model, z, **opts)
    perp = nw.sample(model, z, negative_perpendicular=True, **opts)
    assert torch.equal(nw.sample(model, z, negative_perpendicular=False, **opts), full)
    assert (perp - full).abs().max() > 1e-3
    off = nw.sample(model, z, **{**opts, "negative_scale": 0.0})
    gated = nw.sample(model, z, negative_perpendicular=True, negative_above=1e9, **opts)
    assert torch.allclose(gated, off, atol=1e-12, rtol=0)


@pytest.mark.parametrize("option, bads, type_says, on, scale_says", [
    ("negative_above", (-1.0, float("nan"), float("inf"), True, "1"), "negative_above must be a finite number >= 0",
     1.0, "negative_above= gates the negative prompt's own term: give negative_scale= too"),
    ("negative_perpendicular", (1, 0, "yes", None), "negative_perpendicular must be True or False",
     True, "negative_perpendicular=True projects the negative prompt's own term: give negative_scale= too"),
])
def test_negative_gate_and_projection_are_checked(option, bads, type_says, on, scale_says) -> None:
    """Each option of the weighted negative refuses a bad value, and refuses to act on a replacing
    negative (which has no term of its own to gate or project), in both denoisers."""
    for bad in bads:
        with pytest.raises(ValueError, match=type_says):
            GuidedDenoiser(Spy(), cond=torch.tensor([0]), uncond=UNCOND, negative=torch.tensor([1]),
                           negative_scale=1.0, guidance_scale=2.0, **{option: bad})
    for d in (GuidedDenoiser, ComposedDenoiser):
        kw = {"uncond": UNCOND} if d is GuidedDenoiser else {"guide": UNCOND}
        with pytest.raises(ValueError, match=scale_says):
            d(Spy(), cond=torch.tensor([0]), negative=torch.tensor([1]), guidance_scale=2.0, **{option: on}, **kw)


@pytest.mark.parametrize("bad", [-0.5, float("nan"), float("inf"), True, "1"])
def test_bad_negative_scales_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="negative_scale must be a finite number >= 0"):
        GuidedDenoiser(Spy(), cond=torch.tensor([0]), uncond=UNCOND, negative=torch.tensor([1]), negative_scale=bad,
                       guidance_scale=2.0)


def test_negative_scale_needs_uncond_and_refuses_cfgpp_and_autoguidance() -> None:
    with pytest.raises(ValueError, match="pass uncond= too"):
        GuidedDenoiser(Spy(), cond=torch.tensor([0]), negative=torch.tensor([1]), negative_scale=1.0,
                       guidance_scale=2.0)
    with pytest.raises(ValueError, match="pass uncond= too"):
        nw.sample(GMM.model(SCHED), x_(1), schedule=SCHED, steps=2, cond=torch.tensor([0]), negative=torch.tensor([1]),
                  negative_scale=1.0, guidance_scale=2.0, composition=Composition(torch.tensor([2]), [0], [1.0]))
    with pytest.raises(ValueError, match="CFG\\+\\+"):
        GuidedDenoiser(Spy(), cond=torch.tensor([0]), uncond=UNCOND, negative=torch.tensor([1]), negative_scale=1.0,
                       guidance_scale=0.5, guidance="cfgpp")
    with pytest.raises(ValueError, match="autoguidance"):
        GuidedDenoiser(Spy(), cond=torch.tensor([0]), negative=torch.tensor([1]), negative_scale=1.0,
                       guidance=Autoguidance(guide=Spy()), uncond=UNCOND)
    # APG combines c and u; the negative term is added after it, in one forward
    spy = Spy()
    d = GuidedDenoiser(spy, cond=torch.tensor([0]), uncond=UNCOND, negative=torch.tensor([1]), negative_scale=1.0,
                       guidance_scale=2.0, guidance=APG())
    assert torch.isfinite(d(x_(1), LEVEL)).all() and spy.calls == [[0, -1, 1]]


# -- the pipeline, the CLI, the HTTP API ---------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    from noisewise.pipeline import Pipeline

    return Pipeline.from_pretrained("shapes-vp")


def test_pipeline_negative_scale(pipe) -> None:
    prompts = ["a red circle on the left", "a blue square at the top"]
    w = pipe.defaults["guidance_scale"]
    base = pipe(prompts, seed=2, steps=4, compose="off", negative_scale=None)
    spy = RowSpy(pipe)
    same = pipe(prompts, seed=2, steps=4, compose="off", negative_scale=w - 1, model=spy)
    assert spy.rows == [6] * 4 and same.nfe == 12  # cond, empty prompt and negative rows
    assert np.abs(same.images.astype(int) - base.images.astype(int)).max() <= 1
    res = pipe(prompts, seed=2, steps=4, compose="off", negative_scale=0.5)
    assert res.metadata[0]["negative_scale"] == 0.5 and "negative_scale" not in base.metadata[0]
    assert not np.array_equal(res.images, base.images)
    m = res.metadata[1]
    again = pipe(m["prompt"], seed=m["seed"], steps=4, compose=m["compose"], negative_prompt=m["negative_prompt"],
                 negative_scale=m["negative_scale"])
    assert np.array_equal(again.images[0], res.images[1])
    # no negative prompt: nothing to weigh, plain CFG and no extra rows
    spy = RowSpy(pipe)
    none = pipe(prompts, seed=2, steps=4, compose="off", negative_prompt="", negative_scale=2.0, model=spy)
    assert spy.rows == [4] * 4 and "negative_scale" not in none.metadata[0]
    # the model's default is used when the call gives none
    saved = dict(pipe.defaults)
    try:
        pipe.defaults["negative_scale"] = 0.5
        assert np.array_equal(pipe(prompts, seed=2, steps=4, compose="off").images, res.images)
        # a guidance method (CFG++ refuses a negative scale) gets the replacing negative, not the model's scale
        cfgpp = pipe(prompts, seed=2, steps=4, guidance="cfgpp", guidance_scale=0.5)
        assert "negative_scale" not in cfgpp.metadata[0]
        with pytest.raises(ValueError, match="CFG\\+\\+"):
            pipe(prompts, steps=2, guidance="cfgpp", guidance_scale=0.5, negative_scale=0.5)
    finally:
        pipe.defaults.clear()
        pipe.defaults.update(saved)
    with pytest.raises(ValueError, match="negative_scale"):
        pipe(prompts, steps=2, negative_scale=-1.0)


def test_pipeline_negative_above(pipe) -> None:
    """The gate in the pipeline: fewer rows at the low-noise steps, stored, reproduced, the model's
    default taken only with a weighted negative."""
    prompts = ["a red circle on the left", "a blue square at the top"]
    spy = RowSpy(pipe)
    full = pipe(prompts, seed=2, steps=4, compose="off", negative_scale=1.0, model=spy)
    assert spy.rows == [6] * 4 and full.metadata[0]["negative_above"] == 0.0
    spy = RowSpy(pipe)
    gated = pipe(prompts, seed=2, steps=4, compose="off", negative_scale=1.0, negative_above=1.0, model=spy)
    n_low = sum(r == 4 for r in spy.rows)
    assert 0 < n_low < 4 and set(spy.rows) == {4, 6} and spy.rows == sorted(spy.rows, reverse=True)
    assert gated.nfe == 3 * (4 - n_low) + 2 * n_low  # three branches above the gate, two below
    assert gated.metadata[0]["negative_above"] == 1.0 and not np.array_equal(gated.images, full.images)
    m = gated.metadata[1]
    again = pipe(m["prompt"], seed=m["seed"], steps=4, compose=m["compose"], negative_prompt=m["negative_prompt"],
                 negative_scale=m["negative_scale"], negative_above=m["negative_above"])
    assert np.array_equal(again.images[0], gated.images[1])
    saved = dict(pipe.defaults)
    try:
        pipe.defaults.update({"negative_scale": 1.0, "negative_above": 1.0})
        assert np.array_equal(pipe(prompts, seed=2, steps=4, compose="off").images, gated.images)
        # the stored 0 reproduces the ungated image under a model whose default gates
        assert np.array_equal(pipe(prompts, seed=2, steps=4, compose="off", negative_above=0.0).images, full.images)
        # a replacing negative (a guidance method) does not take the model's gate
        assert "negative_above" not in pipe(prompts, seed=2, steps=2, guidance="apg").metadata[0]
    finally:
        pipe.defaults.clear()
        pipe.defaults.update(saved)
    with pytest.raises(ValueError, match="give negative_scale= too"):
        pipe(prompts, steps=2, negative_above=1.0)  # the shipped vp replaces the unconditional branch
    with pytest.raises(ValueError, match="negative_above must be a finite number"):
        pipe(prompts, steps=2, negative_scale=1.0, negative_above=-1.0)
    # no negative prompt: nothing to gate
    assert "negative_above" not in pipe(prompts, steps=2, negative_prompt="", negative_above=1.0).metadata[0]


def test_pipeline_negative_perpendicular(pipe) -> None:
    """Perp-Neg in the pipeline: same rows, stored (False too, with a weighted negative), reproduced,
    the model's default taken only with a weighted negative."""
    prompts = ["a red circle on the left", "a blue square at the top"]
    plain = pipe(prompts, seed=2, steps=4, compose="off", negative_scale=1.0)
    assert plain.metadata[0]["negative_perpendicular"] is False
    spy = RowSpy(pipe)
    perp = pipe(prompts, seed=2, steps=4, compose="off", negative_scale=1.0, negative_perpendicular=True, model=spy)
    assert spy.rows == [6] * 4 and perp.nfe == 12
    assert perp.metadata[0]["negative_perpendicular"] is True and not np.array_equal(perp.images, plain.images)
    m = perp.metadata[1]
    again = pipe(m["prompt"], seed=m["seed"], steps=4, compose=m["compose"], negative_prompt=m["negative_prompt"],
                 negative_scale=m["negative_scale"], negative_above=m["negative_above"],
                 negative_perpendicular=m["negative_perpendicular"])
    assert np.array_equal(again.images[0], perp.images[1])
    saved = dict(pipe.defaults)
    try:
        pipe.defaults.update({"negative_scale": 1.0, "negative_perpendicular": True})
        assert np.array_equal(pipe(prompts, seed=2, steps=4, compose="off").images, perp.images)
        # the stored False reproduces the plain image under a model whose default projects
        assert np.array_equal(pipe(prompts, seed=2, steps=4, compose="off", negative_perpendicular=False).images,
                              plain.images)
        # a replacing negative (a guidance method) does not take the model's projection
        assert "negative_perpendicular" not in pipe(prompts, seed=2, steps=2, guidance="apg").metadata[0]
    finally:
        pipe.defaults.clear()
        pipe.defaults.update(saved)
    with pytest.raises(ValueError, match="give negative_scale= too"):
        pipe(prompts, steps=2, negative_perpendicular=True)  # the shipped vp replaces the unconditional branch
    with pytest.raises(ValueError, match="negative_perpendicular must be True or False"):
        pipe(prompts, steps=2, negative_scale=1.0, negative_perpendicular="yes")
    # no negative prompt: nothing to project
    none = pipe(prompts, steps=2, negative_prompt="", negative_perpendicular=True)
    assert "negative_perpendicular" not in none.metadata[0]


def test_cli_negative_scale_is_stored_and_checked(tmp_path, capsys) -> None:
    from PIL import Image

    from noisewise.cli import main

    out = tmp_path / "o.png"
    gen = ["generate", "a red circle", "--steps", "2", "--out", str(out), "--overwrite", "--device", "cpu", "--quiet"]

    def written():
        return json.loads(Image.open(out).text["parameters"])

    assert main([*gen, "--negative-scale", "0.75"]) == 0 and written()["negative_scale"] == 0.75
    assert main([*gen, "--negative-scale", "0.75", "--negative-above", "1"]) == 0
    assert written()["negative_above"] == 1.0
    assert main([*gen, "--negative-scale", "0.75", "--negative-perpendicular"]) == 0
    assert written()["negative_perpendicular"] is True
    capsys.readouterr()
    for args, says in ((["--negative-scale", "-1"], "--negative-scale"),
                       (["--negative-above", "-1"], "--negative-above")):
        with pytest.raises(SystemExit):  # refused by the option's own check, as it is parsed
            main([*gen, *args])
        assert says in capsys.readouterr().err
    for args in (["--negative-perpendicular"], ["--negative-above", "1"]):  # the shipped vp replaces
        assert main([*gen, *args]) == 2
        assert "give negative_scale= too" in capsys.readouterr().err


def test_http_negative_scale() -> None:
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from noisewise.server import ServerConfig, create_app

    app = create_app(ServerConfig(models=("shapes-vp",), preload=("shapes-vp",), max_steps=50, max_images=2,
                                  max_wait_s=0.02), wait_ready=True)
    with TestClient(app) as client:
        r = client.post("/v1/generate", json={"prompt": "a red circle", "steps": 3, "seed": 1, "negative_scale": 0.5})
        assert r.status_code == 200, r.text
        assert r.json()["images"][0]["metadata"]["negative_scale"] == 0.5
        bad = client.post("/v1/generate", json={"prompt": "a red circle", "negative_scale": -1})
        assert bad.status_code == 422 and "negative_scale" in bad.text
        # the gate: stored, the same image as in Python; without a scale (the shipped vp replaces) a clear 422
        r = client.post("/v1/generate", json={"prompt": "a red circle", "steps": 3, "seed": 1, "negative_scale": 0.5,
                                              "negative_above": 1.0})
        assert r.status_code == 200, r.text
        assert r.json()["images"][0]["metadata"]["negative_above"] == 1.0
        bad = client.post("/v1/generate", json={"prompt": "a red circle", "steps": 3, "negative_above": 1.0})
        assert bad.status_code == 422 and "give negative_scale= too" in bad.text
        # Perp-Neg: stored, the same image as in Python; refused without a scale and for a non-boolean
        body = {"prompt": "a red circle", "steps": 3, "seed": 1, "negative_scale": 0.5, "negative_perpendicular": True}
        r = client.post("/v1/generate", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["images"][0]["metadata"]["negative_perpendicular"] is True
        from noisewise.pipeline import Pipeline
        from tests.test_server import _png

        py = Pipeline.from_pretrained("shapes-vp")("a red circle", steps=3, seed=1, negative_scale=0.5,
                                                   negative_perpendicular=True)
        assert np.array_equal(_png(r.json()["images"][0]["png_base64"]), py.images[0])
        bad = client.post("/v1/generate", json={"prompt": "a red circle", "steps": 3, "negative_perpendicular": True})
        assert bad.status_code == 422 and "give negative_scale= too" in bad.text
        for flag in ("sometimes", "true", 1):  # strictly a JSON boolean, as batch lines are
            bad = client.post("/v1/generate", json={"prompt": "a red circle", "negative_perpendicular": flag})
            assert bad.status_code == 422 and "negative_perpendicular" in bad.text, flag
