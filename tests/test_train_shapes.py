"""Training code: every model trains a few steps on CPU, losses are finite, and a run split in two
with a checkpoint in between ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from noisewise.shapes import build_dataset  # noqa: E402
from noisewise.shapes import training as T  # noqa: E402

SHIPPED = Path(T.__file__).resolve().parent.parent / "weights"
TINY_VAE = {**T.VAE_CONFIG, "block_out_channels": [8, 16, 16], "norm_num_groups": 8}
TINY_UNET = {**T.UNET_CONFIG, "block_out_channels": [16, 32], "layers_per_block": 1, "norm_num_groups": 8,
             "attention_head_dim": 2, "cross_attention_dim": 24}


@pytest.fixture(scope="module")
def data():
    torch.set_num_threads(1)
    return build_dataset(48, seed=1, n_captions=2)


def _params(m: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in m.parameters()])


def test_vae_trains_and_resumes_exactly(data, tmp_path):
    kw = dict(steps=4, batch_size=4, config=TINY_VAE, progress=False, log_every=1)
    full, plan = T.train_vae(data.images, **kw)
    assert len(plan.history) == 4 and all(np.isfinite(h["loss"]) for h in plan.history)
    ck = tmp_path / "vae.ckpt"
    T.train_vae(data.images, checkpoint_path=ck, stop_at=2, **kw)
    resumed, plan2 = T.train_vae(data.images, checkpoint_path=ck, resume=True, **kw)
    torch.testing.assert_close(_params(resumed), _params(full), rtol=0, atol=0)
    assert [h["step"] for h in plan2.history] == [1, 2, 3, 4]
    mean, std, scale = T.encode_latents(full, data.images[:8])
    assert mean.shape == (8, 4, 8, 8) and std.shape == mean.shape and np.isfinite(scale) and scale > 0


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_denoiser_trains_and_resumes_exactly(kind, tmp_path):
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(16, 4, 8, 8, generator=g).half(), torch.full((16, 4, 8, 8), 0.01).half()
    states = torch.randn(5, 6, 24, generator=g).half()
    index = torch.randint(5, (16, 2), generator=g)
    kw = dict(steps=4, batch_size=4, config=TINY_UNET, progress=False, log_every=1)
    full, plan = T.train_denoiser(kind, mean, std, 0.5, states, index, **kw)
    assert len(plan.history) == 4 and all(np.isfinite(h["loss"]) for h in plan.history)
    ck = tmp_path / "unet.ckpt"
    seen = []
    T.train_denoiser(kind, mean, std, 0.5, states, index, checkpoint_path=ck, stop_at=2,
                     on_checkpoint=lambda ema, step: seen.append(step), **kw)
    assert seen == [2]
    resumed, _ = T.train_denoiser(kind, mean, std, 0.5, states, index, checkpoint_path=ck, resume=True, **kw)
    torch.testing.assert_close(_params(resumed), _params(full), rtol=0, atol=0)


def test_sample_weights_draw_images_in_proportion(monkeypatch):
    """``sample_weights``: batches draw images in proportion to the weights (none: uniform, as before);
    bad weights fail clearly; train_shapes' pair_weights marks two-object images of the given colour
    pairs, in either order, and nothing else."""
    gen = torch.Generator().manual_seed(0)
    w = T.check_sample_weights(torch.tensor([0.0, 0.0, 3.0, 1.0]), 4)
    idx = T.draw_indices(4, 4000, gen, torch.device("cpu"), w)
    counts = torch.bincount(idx, minlength=4)
    assert counts[:2].tolist() == [0, 0] and 2.5 < counts[2] / counts[3] < 3.5
    for bad, says in (([1.0, 1.0], "one weight per image"), ([1.0, -1.0, 0, 0], ">= 0"), ([0.0] * 4, "above 0"),
                      ([float("nan"), 1, 1, 1], "finite")):
        with pytest.raises(ValueError, match=says):
            T.check_sample_weights(torch.tensor(bad), 4)
    # the weights reach the training batches
    drawn = []
    real = T.draw_indices
    monkeypatch.setattr(T, "draw_indices", lambda *a: drawn.append(real(*a)) or drawn[-1])
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(8, 4, 8, 8, generator=g).half(), torch.full((8, 4, 8, 8), 0.01).half()
    states, index = torch.randn(3, 6, 24, generator=g).half(), torch.randint(3, (8, 2), generator=g)
    T.train_denoiser("flow", mean, std, 0.5, states, index, steps=3, batch_size=4, config=TINY_UNET, progress=False,
                     sample_weights=torch.tensor([0, 0, 0, 0, 0, 1.0, 0, 0]))
    assert len(drawn) == 3 and all(d.tolist() == [5] * 4 for d in drawn)

    ts = _train_script()
    from noisewise.shapes import COLORS

    r, o, y, b = (COLORS.index(c) for c in ("red", "orange", "yellow", "blue"))
    color = np.array([[r, o, -1, -1, -1], [-1, o, -1, r, -1], [r, -1, -1, -1, -1], [r, b, -1, -1, -1],
                      [y, -1, o, -1, -1], [o, o, -1, -1, -1]])
    got = ts.pair_weights(color, [("red", "orange"), ("orange", "yellow")], 3.0)
    assert got.tolist() == [3.0, 3.0, 1.0, 1.0, 3.0, 1.0]
    parse = ts.build_parser().parse_args
    a = parse(["unet", "--kind", "flow", "--oversample-pairs", "red+orange", "yellow+orange"])
    assert a.oversample_pairs == [("red", "orange"), ("yellow", "orange")] and a.oversample_factor == 3.0
    with pytest.raises(SystemExit):
        parse(["unet", "--kind", "flow", "--oversample-pairs", "red+pink"])


def test_denoiser_losses_match_their_definitions():
    """The VP loss is the min-SNR-weighted epsilon MSE, the flow loss the velocity MSE: check both
    with a network that returns its target exactly (loss 0) or zero (loss = E[w |target|^2])."""

    class Out:
        def __init__(self, s):
            self.sample = s

    z0 = torch.randn(64, 4, 8, 8)
    cond = torch.zeros(64, 3, 5)
    acp = T.vp_alphas_cumprod()
    assert len(acp) == 1000 and abs(float(acp[0]) - (1 - 0.00085)) < 1e-6

    def oracle(kind):
        def net(xt, t, c):
            if kind == "vp":
                a = acp[t.long()].sqrt().view(-1, 1, 1, 1)
                s = (1 - acp[t.long()]).sqrt().view(-1, 1, 1, 1)
                return Out((xt - a * z0) / s)  # the epsilon that produced xt
            tt = (t / 1000).view(-1, 1, 1, 1)
            return Out((xt - z0) / tt)  # eps - x0 = (xt - x0) / t
        return net

    for kind in ("vp", "flow"):
        loss = T.denoiser_loss(kind, oracle(kind), z0, cond, torch.Generator().manual_seed(0), acp)
        assert float(loss) < 1e-8
        zero = T.denoiser_loss(kind, lambda x, t, c: Out(torch.zeros_like(x)), z0, cond,
                               torch.Generator().manual_seed(0), acp)
        assert 0.1 < float(zero) < (3.0 if kind == "flow" else 1.01)
    # the flow model's training time is logit-normal: location flow_t_loc, scale 1
    seen_t = []

    def record(xt, t, c):
        seen_t.append(t / 1000)
        return Out(torch.zeros_like(xt))

    big = torch.zeros(4000, *z0.shape[1:])
    for loc in (0.0, 0.5):
        seen_t.clear()
        T.denoiser_loss("flow", record, big, torch.zeros(4000, *cond.shape[1:]), torch.Generator().manual_seed(1),
                        acp, flow_t_loc=loc)
        z = torch.logit(seen_t[0].double())
        assert abs(float(z.mean()) - loc) < 0.06 and abs(float(z.std()) - 1.0) < 0.04


def test_evaluator_trains(data):
    model, plan = T.train_evaluator(data.images, data.labels, steps=3, batch_size=8, progress=False, log_every=1,
                                    config={"channels": [8, 8, 8], "features": 16})
    assert all(np.isfinite(h["loss"]) for h in plan.history)
    acc = T.classifier_accuracy(model, data.images[:16], {k: v[:16] for k, v in data.labels.items()})
    assert set(acc) >= {"background", "shape", "color", "size", "presence", "defects", "exact"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())


def test_evaluator_clips_its_gradient_when_asked(data, monkeypatch):
    """``clip_grad_norm``: every update sees a gradient no longer than it; without it, the raw gradient."""
    norms: list[float] = []
    real = T._optimizer

    def recording(params, lr, plan, weight_decay=0.0):
        opt, sched = real(params, lr, plan, weight_decay)

        def pre_step(optimizer, args, kwargs):
            grads = [p.grad.norm() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            norms.append(float(torch.stack(grads).norm()))

        opt.register_step_pre_hook(pre_step)
        return opt, sched

    monkeypatch.setattr(T, "_optimizer", recording)
    small = {"channels": [8, 8, 8], "features": 16}
    T.train_evaluator(data.images, data.labels, steps=3, batch_size=8, progress=False, config=small)
    assert len(norms) == 3 and min(norms) > 1e-2
    norms.clear()
    T.train_evaluator(data.images, data.labels, steps=3, batch_size=8, progress=False, config=small,
                      clip_grad_norm=1e-2)
    assert len(norms) == 3 and max(norms) <= 1e-2 * (1 + 1e-4)


def test_lr_plan_shrinks_to_fit_a_time_budget():
    plan = T.Plan(10_000, max_seconds=0.5, measured_at=10)
    import time

    done = T.train_loop(lambda step: (time.sleep(0.01), torch.tensor(1.0))[1], plan, progress=False)
    assert done == plan.total < 10_000
    assert plan.lr_factor(0) < plan.lr_factor(plan.warmup) == pytest.approx(1.0, abs=1e-3) or plan.total <= plan.warmup


def _fake_clock(monkeypatch, per_step):
    """``T.time.perf_counter`` advanced by ``per_step(i)`` seconds at each step ``i``."""
    from types import SimpleNamespace

    clock = [0.0]
    monkeypatch.setattr(T, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def step(i):
        clock[0] += per_step(i)
        return torch.tensor(1.0)

    return clock, step


def test_time_budget_refits_the_schedule_after_slow_first_steps(monkeypatch):
    """The first 30 steps take 5x as long as the rest (allocation, a briefly busy machine): the
    schedule fitted at step 30 would use a fifth of the budget; the refits at 60, 120, ... steps
    extend it to use most of it, and the run still ends inside the budget."""
    clock, step = _fake_clock(monkeypatch, lambda i: 0.05 if i < 30 else 0.01)
    first_fit = 30 + int(0.97 * (20.0 - 30 * 0.05) / 0.05)
    plan = T.Plan(100_000, max_seconds=20.0, measured_at=30)
    done = T.train_loop(step, plan, progress=False)
    assert done == plan.total > 4 * first_fit
    assert 0.9 * 20.0 <= clock[0] <= 20.0
    capped = T.Plan(500, max_seconds=20.0, measured_at=30)
    clock[0] = 0.0
    assert T.train_loop(step, capped, progress=False) == 500  # never more steps than asked for


def test_time_budget_refits_the_schedule_when_steps_slow_down(monkeypatch):
    """Steps become 5x slower after 100 (another job starts): the refits shorten the schedule, so
    the cosine decay still runs its course (the last step's learning-rate factor is the floor)."""
    clock, step = _fake_clock(monkeypatch, lambda i: 0.01 if i < 100 else 0.05)
    plan = T.Plan(100_000, max_seconds=20.0, measured_at=30)
    lr = []  # the learning-rate factor each step ran with

    def logged(i):
        lr.append(plan.lr_factor(i))
        return step(i)

    done = T.train_loop(logged, plan, progress=False)
    assert clock[0] <= 20.0 + 0.06  # the budget, overrun by at most the step that crossed it
    assert done == plan.total == len(lr) and lr[-1] < 0.3  # fitted once only: ~0.9 when time runs out


def _tiny_denoiser_data(dim: int = 24):
    g = torch.Generator().manual_seed(0)
    mean, std = torch.randn(16, 4, 8, 8, generator=g).half(), torch.full((16, 4, 8, 8), 0.01).half()
    states = torch.randn(5, 6, dim, generator=g).half()
    index = torch.randint(5, (16, 2), generator=g)
    return mean, std, states, index


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_bf16_autocast_on_cpu_trains_close_to_fp32(kind):
    """--precision bf16 on the CPU: the same seeded run, losses finite and within a few percent of fp32's."""
    mean, std, states, index = _tiny_denoiser_data()
    kw = dict(steps=3, batch_size=8, config=TINY_UNET, progress=False, log_every=1)
    _, p32 = T.train_denoiser(kind, mean, std, 0.5, states, index, precision="fp32", **kw)
    _, p16 = T.train_denoiser(kind, mean, std, 0.5, states, index, precision="bf16", **kw)
    l32, l16 = [h["loss"] for h in p32.history], [h["loss"] for h in p16.history]
    assert all(np.isfinite(l16)) and len(l16) == 3
    assert l16 != l32  # bf16 really ran (different rounding)
    np.testing.assert_allclose(l16, l32, rtol=0.05)
    _, pauto = T.train_denoiser(kind, mean, std, 0.5, states, index, precision="auto", **kw)
    assert [h["loss"] for h in pauto.history] == l32  # auto is fp32 on the CPU


def test_precision_and_init_weights_fail_clearly(tmp_path):
    mean, std, states, index = _tiny_denoiser_data()
    with pytest.raises(ValueError, match="precision must be one of auto, fp32, bf16"):
        T.train_denoiser("vp", mean, std, 0.5, states, index, steps=1, batch_size=2, config=TINY_UNET,
                         progress=False, precision="fp16")
    with pytest.raises(FileNotFoundError, match="no denoiser weights"):
        T.load_unet_weights(tmp_path)
    shipped = T.load_unet_weights(SHIPPED / "shapes-vp")
    with pytest.raises(ValueError, match="do not fit this network's config"):
        T.train_denoiser("vp", mean, std, 0.5, states, index, steps=1, batch_size=2, config=TINY_UNET,
                         progress=False, init_state=shipped)


@pytest.mark.parametrize("kind", ["vp", "flow"])
def test_init_from_the_shipped_weights(kind, tmp_path):
    """Fine-tuning starts exactly at the shipped network (diffusers' own loading as the oracle), and
    two steps from there run with finite losses and move the weights."""
    from diffusers import UNet2DConditionModel

    folder = SHIPPED / f"shapes-{kind}"
    oracle = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=torch.float32)
    for src in (folder, folder / "unet", folder / "unet" / "diffusion_pytorch_model.safetensors"):
        init = T.load_unet_weights(src)
        assert init.keys() == oracle.state_dict().keys()
    mean, std, states, index = _tiny_denoiser_data(dim=384)
    kw = dict(steps=2, batch_size=4, progress=False, log_every=1, init_state=init)
    start, plan0 = T.train_denoiser(kind, mean, std, 0.5, states, index, stop_at=0, **kw)
    assert plan0.history == []
    for k, v in oracle.state_dict().items():
        assert torch.equal(start.state_dict()[k], v), k
    ck = tmp_path / "ft.ckpt"
    ema, plan = T.train_denoiser(kind, mean, std, 0.5, states, index, checkpoint_path=ck, **kw)
    assert [h["step"] for h in plan.history] == [1, 2] and all(np.isfinite(h["loss"]) for h in plan.history)
    diff = (_params(ema) - _params(oracle)).abs().max()
    assert 0 < diff < 0.05  # moved, but only by fine-tuning steps
    # a resume continues from the checkpoint, not from init_state
    resumed, _ = T.train_denoiser(kind, mean, std, 0.5, states, index, checkpoint_path=ck, resume=True,
                                  **{**kw, "steps": 2})
    torch.testing.assert_close(_params(resumed), _params(ema), rtol=0, atol=0)


def test_batch_timing_and_choice():
    times = T.time_denoiser_steps("flow", [2, 4], seconds=0.0, device="cpu", config=TINY_UNET,
                                  text_shape=(6, 24), warmup=1)
    assert set(times) == {2, 4} and all(v > 0 for v in times.values())
    # throughput 512/0.1 = 5120, 1024/0.12 = 8533, 2048/0.235 = 8715 (within 5% of the best) -> 1024
    assert T.choose_batch({512: 0.1, 1024: 0.12, 2048: 0.235}) == 1024
    assert T.choose_batch({512: 0.1, 1024: 0.12, 2048: 0.2}) == 2048
    assert T.choose_batch({512: 0.1, 1024: 0.2}) == 512
    with pytest.raises(ValueError, match="no timings"):
        T.choose_batch({})


def test_export_carries_the_shipped_generation_defaults(tmp_path):
    """Re-exported (fine-tuned) models get the shipped folders' generation defaults, so a probe of
    the fine-tuned and the shipped models compares like with like."""
    import json

    ts = _train_script()
    flat = tmp_path / "flat"
    flat.mkdir()
    for f in ("vae.safetensors", "unet-vp.safetensors"):
        (flat / f).write_bytes(b"weights")
    (flat / "vae.json").write_text(json.dumps({"scaling_factor": 0.5}))
    ts.export(flat, tmp_path / "out")
    got = json.loads((tmp_path / "out" / "shapes-vp" / "model_index.json").read_text())["_noisewise"]["defaults"]
    shipped = json.loads((SHIPPED / "shapes-vp" / "model_index.json").read_text())["_noisewise"]["defaults"]
    assert got == shipped
    assert (tmp_path / "out" / "shapes-vp" / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == b"weights"
    assert not (tmp_path / "out" / "shapes-flow").exists()  # no weights for it: skipped


def _train_script():
    import importlib.util

    script = SHIPPED.parent.parent.parent / "train" / "train_shapes.py"
    spec = importlib.util.spec_from_file_location("train_shapes", script)
    ts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ts)
    return ts


def test_budgets_shrink_to_fit_the_total():
    fit = _train_script().fit_budgets
    assert fit([1800, 900, 2100, 2100], total=7200, elapsed=0, reserve=0) == 1800  # 6900 s fit in 7200 s
    assert fit([100, 300], total=460, elapsed=0, reserve=30) == 100
    assert fit([100, 300], total=260, elapsed=0, reserve=30) == pytest.approx(50)  # 200 s left for 400 asked
    assert fit([300], total=260, elapsed=100, reserve=30) == pytest.approx(130)
    with pytest.raises(SystemExit, match="total budget of 260 s is spent"):
        fit([300], total=260, elapsed=250, reserve=30)
    with pytest.raises(SystemExit, match="must be > 0 seconds"):
        fit([300, 0], total=7200, elapsed=0)


def test_all_runs_every_stage_once_within_the_total_budget(monkeypatch, tmp_path):
    """``all`` renders, trains the VAE and evaluator, encodes the captions once, trains both
    denoisers, and shrinks the training budgets so that slow rendering/encoding/evaluation still
    leave the whole run inside ``--total-seconds`` (a fake clock: each stage takes its budget plus
    40 s it does not cover)."""
    import json

    ts = _train_script()
    clock = [0.0]
    monkeypatch.setattr(ts, "time", type("Clock", (), {"time": staticmethod(lambda: clock[0])}))
    ran = []

    def stage(name):
        def run(a):
            budget = getattr(a, "max_seconds", None)
            ran.append((name + (f"-{a.kind}" if hasattr(a, "kind") and name == "unet" else ""), budget))
            clock[0] += {"data": 600.0, "captions": 300.0}.get(name, (budget or 0) + 40.0)
        return run

    for name in ("data", "vae", "evaluator", "captions", "unet"):
        monkeypatch.setattr(ts, f"cmd_{name}", stage(name))
    ts.main(["all", "--run", str(tmp_path), "--device", "cpu"])
    assert [r[0] for r in ran] == ["data", "vae", "evaluator", "captions", "unet-vp", "unet-flow"]
    budgets = dict(ran)
    assert budgets["data"] is None and budgets["captions"] is None
    assert budgets["unet-vp"] < 2100 and budgets["unet-vp"] == pytest.approx(budgets["unet-flow"], rel=0.02)
    assert budgets["vae"] < 1800 and budgets["evaluator"] < 900  # the rendering's 600 s is shared by all
    assert 7000 <= clock[0] <= 7200  # inside the budget, and not wastefully early
    wall = json.loads((tmp_path / "export" / "all.json").read_text())["wall_seconds"]
    assert wall["total"] == clock[0] and wall["captions"] == 300.0
    ran.clear()
    clock[0] = 0.0
    ts.main(["all", "--run", str(tmp_path), "--device", "cpu", "--total-seconds", "0"])
    assert dict(ran)["unet-vp"] == 2100 and dict(ran)["vae"] == 1800  # no total budget: as asked


def test_small_arch_trains_exports_and_generates(tmp_path):
    """The CLI path of the 2-hour CPU recipe's architecture: render, train the small VAE (bf16) and a
    small denoiser a few steps, export, and the exported folders load through the user-facing
    Pipeline and generate; the folders say the architecture they hold, not the shipped one."""
    import json

    from noisewise.pipeline import Pipeline

    ts = _train_script()
    run = str(tmp_path)
    ts.main(["data", "--run", run, "--n", "48", "--heldout", "16", "--workers", "1"])
    ts.main(["vae", "--run", run, "--device", "cpu", "--arch", "small", "--steps", "2", "--batch-size", "4",
             "--precision", "bf16", "--no-progress"])
    ts.main(["unet", "--run", run, "--device", "cpu", "--kind", "flow", "--arch", "small", "--steps", "2",
             "--batch-size", "4", "--no-progress"])
    ts.main(["export", "--run", run, "--dest", str(tmp_path / "models")])
    small = T.ARCHS["small"]
    vae_cfg = json.loads((tmp_path / "models" / "shapes-vae" / "config.json").read_text())
    unet_cfg = json.loads((tmp_path / "models" / "shapes-flow" / "unet" / "config.json").read_text())
    assert vae_cfg["block_out_channels"] == small["vae"]["block_out_channels"] != T.VAE_CONFIG["block_out_channels"]
    assert vae_cfg["scaling_factor"] == json.loads((tmp_path / "export" / "vae.json").read_text())["scaling_factor"]
    assert unet_cfg["block_out_channels"] == small["unet"]["block_out_channels"] != T.UNET_CONFIG["block_out_channels"]
    assert unet_cfg["attention_head_dim"] == small["unet"]["attention_head_dim"]
    pipe = Pipeline.from_pretrained(tmp_path / "models" / "shapes-flow", device="cpu")
    out = pipe("a red circle", num_images=2, seed=0, steps=2)
    assert out.images.shape == (2, 32, 32, 3) and out.images.dtype == np.uint8
    shipped_flow = ts.shipped_defaults()["flow"]
    assert pipe.defaults == {**pipe.defaults, **shipped_flow}  # no defaults chosen yet: the shipped ones

    # the defaults stage: probe guidance scales (no negative prompt), then negative settings at the chosen
    # scale, with the run's evaluator; write the choice, export it
    ts.main(["evaluator", "--run", run, "--device", "cpu", "--steps", "2", "--batch-size", "8", "--no-progress"])
    ts.main(["defaults", "--run", run, "--device", "cpu", "--n-prompts", "4", "--guidance", "1", "6",
             "--negative-prompts", "blurry", "--negative-scales", "replace", "0.5", "--negative-seeds", "1", "2",
             "--negative-above", "0", "0.4", "--negative-perpendicular", "off", "on", "--confirm-seeds", "3",
             "--dest", str(tmp_path / "models")])
    chosen = json.loads((tmp_path / "export" / "defaults.json").read_text())
    probe = {float(w): acc for w, acc in chosen["probe"]["flow"].items()}
    assert sorted(probe) == [1.0, 6.0] and "vp" not in chosen["defaults"]  # only flow was trained
    best = ts.choose_guidance(probe)
    neg = chosen["negative_probe"]["flow"]
    assert neg["guidance_scale"] == best and neg["seeds"] == [1, 2]
    cands = {(c["negative_prompt"], c["negative_scale"], c["negative_above"], c["negative_perpendicular"]): c
             for c in neg["candidates"]}
    # every weighted scale with and without the gate and the projection; replace alone (no term of its own)
    assert set(cands) == {("blurry", 0.5, 0.0, False), ("blurry", 0.5, 0.4, False), ("blurry", 0.5, 0.0, True),
                          ("blurry", 0.5, 0.4, True), ("blurry", "replace", 0.0, False)}
    key, met = ts.choose_negative(cands, neg["baseline"]["defect_rate"])
    assert met == neg["cut_reached"]
    conf = neg["confirmation"]
    if met:  # re-measured on seed 3, best first: the first that held, else the lowest there
        assert conf["seeds"] == [3] and conf["tried"]
        ranked = ts.rank_negative(cands, neg["baseline"]["defect_rate"])
        assert [(t["negative_prompt"], t["negative_scale"], t["negative_above"], t["negative_perpendicular"])
                for t in conf["tried"]] == ranked[:len(conf["tried"])]
        for t in conf["tried"]:
            assert t["confirmed"] == ts.cuts_defects(t["defect_rate"], conf["baseline"]["defect_rate"])
        assert conf["confirmed"] == any(t["confirmed"] for t in conf["tried"])
        kept = next((t for t in conf["tried"] if t["confirmed"]), None) or min(conf["tried"],
                                                                               key=lambda t: t["defect_rate"])
        key = (kept["negative_prompt"], kept["negative_scale"], kept["negative_above"], kept["negative_perpendicular"])
    else:
        assert conf is None
    want = {**shipped_flow, "guidance_scale": best, "negative_prompt": key[0]}
    if key[1] != "replace":
        want["negative_scale"] = key[1]
    if key[2]:
        want["negative_above"] = key[2]
    if key[3]:
        want["negative_perpendicular"] = True
    assert chosen["defaults"]["flow"] == want
    for folder in (tmp_path / "models", tmp_path / "weights"):
        index = json.loads((folder / "shapes-flow" / "model_index.json").read_text())
        assert index["_noisewise"]["defaults"] == want
    ts.main(["export", "--run", run, "--dest", str(tmp_path / "again")])  # a later export keeps the choice
    index = json.loads((tmp_path / "again" / "shapes-flow" / "model_index.json").read_text())
    assert index["_noisewise"]["defaults"] == want

    # bench/probe_denoiser.py reads the same run as the defaults probe did: at the same prompts, seed and
    # guidance it must find the same accuracies, and it appends the run's training settings
    import importlib.util

    spec = importlib.util.spec_from_file_location("probe_denoiser", SHIPPED.parents[2] / "bench" / "probe_denoiser.py")
    pd = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pd)
    rows = tmp_path / "probe.jsonl"
    for _ in range(2):
        pd.main(["--run", run, "--kind", "flow", "--evaluator", str(tmp_path / "models" / "shapes-evaluator"),
                 "--n-prompts", "4", "--seeds", "1", "--guidance", "6", "--negative-prompt", "", "--out", str(rows)])
    got = [json.loads(line) for line in rows.read_text().splitlines()]
    same = [json.dumps({**g, "seconds": 0}, sort_keys=True) for g in got]  # (a NaN is never == itself)
    assert len(got) == 2 and got[0]["seconds"] >= 0 and same[0] == same[1]  # deterministic
    assert (got[0]["kind"], got[0]["steps"], got[0]["batch_size"], got[0]["seeds"]) == ("flow", 2, 4, [1])
    for k in ("background", "shape", "color", "size", "position", "defect_rate"):
        want = probe[6.0][k]
        assert got[0][k] == pytest.approx(want, abs=6e-4) or (want != want and got[0][k] != got[0][k]), k
    # the negative probe's baseline is the mean over its seeds, with no negative prompt, at the chosen scale
    pd.main(["--run", run, "--kind", "flow", "--evaluator", str(tmp_path / "models" / "shapes-evaluator"),
             "--n-prompts", "4", "--seeds", "1", "2", "--guidance", str(best), "--negative-prompt", "",
             "--out", str(rows)])
    two = json.loads(rows.read_text().splitlines()[-1])
    for k in ("background", "shape", "color", "size", "position", "defect_rate"):
        want = neg["baseline"][k]
        assert two[k] == pytest.approx(want, abs=6e-4) or (want != want and two[k] != two[k]), k
    # and a gated, projected candidate reads as the defaults probe read it
    pd.main(["--run", run, "--kind", "flow", "--evaluator", str(tmp_path / "models" / "shapes-evaluator"),
             "--n-prompts", "4", "--seeds", "1", "2", "--guidance", str(best), "--negative-prompt", "blurry",
             "--negative-scale", "0.5", "--negative-above", "0.4", "--negative-perpendicular", "--out", str(rows)])
    gated = json.loads(rows.read_text().splitlines()[-1])
    assert (gated["negative_scale"], gated["negative_above"], gated["negative_perpendicular"]) == (0.5, 0.4, True)
    for k in ("background", "shape", "color", "size", "position", "defect_rate"):
        want = cands[("blurry", 0.5, 0.4, True)][k]
        assert gated[k] == pytest.approx(want, abs=6e-5) or (want != want and gated[k] != gated[k]), k
    # --two-objects keeps the prompts that name two objects
    from noisewise.shapes.captions import parse_prompt
    from noisewise.shapes.evaluator import benchmark_prompts

    n_two = sum(len(parse_prompt(q).objects) == 2 for q in benchmark_prompts(12, seed=ts.DEFAULTS_PROMPT_SEED))
    assert 0 < n_two < 12
    pd.main(["--run", run, "--kind", "flow", "--evaluator", str(tmp_path / "models" / "shapes-evaluator"),
             "--n-prompts", "12", "--seeds", "1", "--two-objects", "--out", str(rows)])
    two_obj = json.loads(rows.read_text().splitlines()[-1])
    assert (two_obj["n_prompts"], two_obj["two_objects"]) == (n_two, True) and "color" in two_obj

    # each denoiser's training record: the flow one says its time location; vp, which has none, does not
    assert json.loads((tmp_path / "export" / "unet-flow.json").read_text())["flow_t_loc"] == 0.0
    ts.main(["unet", "--run", run, "--device", "cpu", "--kind", "vp", "--arch", "small", "--steps", "1",
             "--batch-size", "4", "--no-progress"])
    vp_record = json.loads((tmp_path / "export" / "unet-vp.json").read_text())
    assert vp_record["steps"] == 1 and "flow_t_loc" not in vp_record


def test_choose_guidance_takes_the_best_mean_of_accuracies_and_clean_share_and_the_lowest_scale_among_equals():
    ts = _train_script()
    acc = {"background": 1.0, "shape": 0.8, "color": 0.8, "size": 0.9, "position": 0.9, "defect_rate": 0.1}
    better = {**acc, "color": 0.9}
    assert ts.choose_guidance({2.0: acc, 3.0: better, 5.0: acc}) == 3.0
    assert ts.choose_guidance({5.0: better, 3.0: better, 2.0: acc}) == 3.0
    assert ts.choose_guidance({2.0: acc, 4.0: {**acc, "defect_rate": 0.0}}) == 4.0  # fewer defects count
    # colour +0.1 (mean accuracy +0.02) outweighs 0.005 more defects, not 0.15 more
    assert ts.choose_guidance({2.0: acc, 3.0: {**better, "defect_rate": 0.105}}) == 3.0
    assert ts.choose_guidance({2.0: acc, 3.0: {**better, "defect_rate": 0.25}}) == 2.0
    no_size = {**acc, "size": float("nan")}  # no probe prompt named a size
    assert ts.choose_guidance({2.0: no_size, 3.0: {**no_size, "shape": 0.9}}) == 3.0


def test_choose_negative_takes_the_most_accurate_setting_that_cuts_defects_to_a_third():
    ts = _train_script()
    acc = {"background": 1.0, "shape": 0.9, "color": 0.9, "size": 0.9, "position": 0.9}
    scores = {("a", "replace"): {**acc, "color": 0.95, "defect_rate": 0.02},  # most accurate, misses the cut
              ("a", 1.0): {**acc, "defect_rate": 0.01},
              ("b", 0.5): {**acc, "defect_rate": 0.0},
              ("b", "replace"): {**acc, "defect_rate": 0.01}}
    # baseline 0.03: the cut is 0.01; three equal settings meet it: the cheapest (replace) wins
    assert ts.choose_negative(scores, 0.03) == (("b", "replace"), True)
    del scores[("b", "replace")]
    assert ts.choose_negative(scores, 0.03) == (("b", 0.5), True)  # among scales, the smaller
    assert ts.choose_negative(scores, 0.06) == (("a", "replace"), True)  # a looser cut: the most accurate
    # none meets a cut of 0.0 / 3: the lowest defect rate
    assert ts.choose_negative({k: v for k, v in scores.items() if k != ("b", 0.5)}, 0.0) == (("a", 1.0), False)
    assert ts.choose_negative(scores, 0.03, cut=100.0) == (("b", 0.5), True)
    assert ts.rank_negative(scores, 0.03) == [("b", 0.5), ("a", 1.0)]  # equal accuracy: the smaller scale first
    assert ts.rank_negative(scores, 0.0) == [("b", 0.5)]
    # the gate and the projection: equal accuracy and scale, the higher gate first, then the plain negative
    four = {("c", 1.0, 0.0, True): {**acc, "defect_rate": 0.0}, ("c", 1.0, 0.0, False): {**acc, "defect_rate": 0.0},
            ("c", 1.0, 0.4, True): {**acc, "defect_rate": 0.0}, ("c", 1.0, 0.4, False): {**acc, "defect_rate": 0.0}}
    assert ts.rank_negative(four, 0.03) == [("c", 1.0, 0.4, False), ("c", 1.0, 0.4, True), ("c", 1.0, 0.0, False),
                                            ("c", 1.0, 0.0, True)]
    assert ts.negative_kwargs(("c", 1.0, 0.4, True)) == {"negative_prompt": "c", "negative_scale": 1.0,
                                                         "negative_above": 0.4, "negative_perpendicular": True}
    assert ts.negative_kwargs(("c", 1.0, 0.0, False)) == {"negative_prompt": "c", "negative_scale": 1.0}


def test_confirm_negative_keeps_the_first_setting_that_cuts_defects_on_fresh_seeds_too():
    """The probe's pick is re-measured on fresh seeds; when its rate there misses the cut, the next
    ranked setting is tried, up to ``tries``; none holding returns None with every re-measurement."""
    ts = _train_script()
    fresh = {("a", 1.0): 0.02, ("b", 0.5): 0.01, ("c", "replace"): 0.0}
    calls = []

    def measure(key):
        calls.append(key)
        return {"color": 0.99, "defect_rate": fresh[key]}

    ranked = [("a", 1.0), ("b", 0.5), ("c", "replace")]
    kept, tried = ts.confirm_negative(ranked, measure, baseline=0.03)
    assert kept == ("b", 0.5) and calls == ranked[:2]  # a's fresh 0.02 misses 0.03 / 3; b's 0.01 holds
    assert [t["confirmed"] for t in tried] == [False, True]
    assert tried[0] == {"negative_prompt": "a", "negative_scale": 1.0, "color": 0.99, "defect_rate": 0.02,
                        "confirmed": False}
    calls.clear()
    assert ts.confirm_negative(ranked, measure, baseline=0.03, tries=1) == (None, tried[:1])
    assert calls == ranked[:1]
    assert ts.confirm_negative(ranked, measure, baseline=0.0)[0] == ("c", "replace")  # 0.0 <= 0.0 / 3
    assert ts.confirm_negative([], measure, baseline=0.03) == (None, [])


def test_defaults_negative_scales_parse_and_refuse_bad_values(capsys):
    """``defaults --negative-scales``: 'replace' or a number checked as the library checks it."""
    ts = _train_script()
    parse = ts.build_parser().parse_args
    assert parse(["defaults", "--negative-scales", "replace", "0", "1.5"]).negative_scales == [ts.REPLACE, 0.0, 1.5]
    assert parse(["defaults"]).confirm_seeds == [4, 5, 6] and parse(["defaults", "--confirm-seeds"]).confirm_seeds == []
    with pytest.raises(SystemExit):
        parse(["defaults", "--confirm-tries", "0"])
    assert "a whole number >= 1, got '0'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--confirm-seeds \\[3, 4\\] must be fresh"):
        ts.cmd_defaults(parse(["defaults", "--negative-seeds", "1", "2", "3", "--confirm-seeds", "3", "4"]))
    for bad, says in (("-1", "negative_scale must be a finite number >= 0"), ("nan", "finite number"),
                      ("inf", "finite number"), ("lots", "'replace' or a number >= 0")):
        with pytest.raises(SystemExit):
            parse(["defaults", "--negative-scales", bad])
        assert says in capsys.readouterr().err


def test_all_recipe_sets_every_stage_and_options_override(monkeypatch, tmp_path):
    """``all --recipe cpu-2h`` passes the small architecture, its batch sizes and the bf16 VAE to the
    stages, renders its 60,000 images, records what it ran; an option on the command line wins."""
    import json

    ts = _train_script()
    seen = {}

    def stage(name):
        def run(a):
            label = name + (f"-{a.kind}" if name == "unet" else "")
            seen[label] = {k: getattr(a, k) for k in ("arch", "batch_size", "precision", "n", "max_seconds",
                                                      "no_progress", "clip_grad_norm", "lr", "flow_t_loc")
                           if hasattr(a, k)}
        return run

    for name in ("data", "vae", "evaluator", "captions", "unet"):
        monkeypatch.setattr(ts, f"cmd_{name}", stage(name))
    spawned = []

    argvs = {}

    def spawn(argv, log_path, threads):  # the lanes' processes, run here in turn (the stages are fakes)
        argvs[argv[0]] = argv
        spawned.append((argv[0] + (f"-{argv[argv.index('--kind') + 1]}" if "--kind" in argv else ""), threads,
                        "--no-progress" in argv, log_path.name))
        sub = ts.build_parser().parse_args(argv)
        sub.func(sub)
        return type("Done", (), {"poll": lambda self: 0})()

    monkeypatch.setattr(ts, "_spawn", spawn)
    monkeypatch.setattr(ts, "_POLL_SECONDS", 0.0)
    ts.main(["all", "--recipe", "cpu-2h", "--run", str(tmp_path), "--device", "cpu"])
    r = ts.RECIPES["cpu-2h"]
    assert seen["data"]["n"] == r["n"] == 60_000
    assert seen["vae"] == {"arch": "small", "batch_size": 64, "precision": "bf16", "max_seconds": r["vae_seconds"],
                           "no_progress": False, "lr": 5e-4}  # alone: its progress bar stays
    for kind, loc in (("vp", 0.0), ("flow", r["flow_t_loc"])):  # vp ignores --flow-t-loc; only flow gets it
        assert seen[f"unet-{kind}"] == {"arch": "small", "batch_size": 64, "precision": "auto", "lr": r["unet_lr"],
                                        "max_seconds": r["unet_seconds"], "no_progress": True, "flow_t_loc": loc}
    assert r["unet_lr"] == 2e-3 and r["flow_t_loc"] == 0.5
    assert seen["evaluator"]["max_seconds"] == r["evaluator_seconds"]
    assert seen["evaluator"]["clip_grad_norm"] == r["evaluator_clip_grad_norm"] == 1.0
    # two lanes: the VAE alone, then the evaluator beside the captions, then the two denoisers side by
    # side, each its own process with half the threads and no progress bar (they log to <run>/logs/)
    half = max(1, torch.get_num_threads() // 2)
    assert spawned == [("evaluator", half, True, "evaluator.log"), ("captions", half, False, "captions.log"),
                       ("unet-vp", half, True, "unet-vp.log"), ("unet-flow", half, True, "unet-flow.log")]
    # the caption encoding takes the evaluator's thread once the evaluator is done
    grow = argvs["captions"][argvs["captions"].index("--grow-threads-file"):]
    assert grow == ["--grow-threads-file", str(tmp_path / "logs" / "evaluator.done"), "--grow-threads",
                    str(torch.get_num_threads())]
    assert "--grow-threads-file" not in argvs["evaluator"]
    meta = json.loads((tmp_path / "export" / "all.json").read_text())
    assert meta["recipe"] == "cpu-2h" and meta["options"] == r and meta["lanes"] == 2
    assert set(meta["wall_seconds"]) == {"data", "vae", "evaluator", "captions", "unet-vp", "unet-flow", "total"}
    spawned.clear()
    ts.main(["all", "--recipe", "cpu-2h", "--run", str(tmp_path), "--device", "cpu", "--arch", "shipped",
             "--unet-batch-size", "256", "--unet-lr", "3e-4", "--n", "1000", "--lanes", "1"])
    assert seen["unet-vp"]["arch"] == seen["vae"]["arch"] == "shipped" and seen["unet-flow"]["batch_size"] == 256
    assert seen["unet-vp"]["lr"] == seen["unet-flow"]["lr"] == 3e-4
    ts.main(["all", "--recipe", "cpu-2h", "--run", str(tmp_path), "--device", "cpu", "--flow-t-loc", "0",
             "--n", "1000", "--lanes", "1"])
    assert seen["unet-flow"]["flow_t_loc"] == 0.0
    assert seen["data"]["n"] == 1000 and seen["vae"]["batch_size"] == 64
    assert spawned == []  # one lane: every stage in this process, in turn
    ts.main(["all", "--run", str(tmp_path), "--device", "cpu"])  # the default recipe: the shipped architectures
    assert seen["vae"]["arch"] == "shipped" and seen["vae"]["batch_size"] == 256 and seen["data"]["n"] == 200_000
    assert seen["evaluator"]["clip_grad_norm"] == 0.0  # as the shipped evaluator was trained
    assert seen["unet-vp"]["lr"] == seen["unet-flow"]["lr"] == 5e-4 and seen["unet-vp"]["batch_size"] == 512
    assert seen["unet-flow"]["flow_t_loc"] == 0.0  # as the shipped flow model was trained
    assert spawned == []
    with pytest.raises(SystemExit, match="--vae-seconds must be > 0"):
        ts.main(["all", "--run", str(tmp_path), "--device", "cpu", "--vae-seconds", "0"])
    with pytest.raises(SystemExit, match="--unet-lr must be > 0"):
        ts.main(["all", "--run", str(tmp_path), "--device", "cpu", "--unet-lr", "0"])
    with pytest.raises(SystemExit, match="--evaluator-clip-grad-norm must be >= 0"):
        ts.main(["all", "--run", str(tmp_path), "--device", "cpu", "--evaluator-clip-grad-norm", "-1"])
    monkeypatch.undo()  # the real evaluator and unet stages: they refuse before loading anything
    with pytest.raises(SystemExit, match="--flow-t-loc sets the flow denoiser's"):
        ts.main(["unet", "--kind", "vp", "--run", str(tmp_path), "--device", "cpu", "--flow-t-loc", "0.5"])
    with pytest.raises(SystemExit, match="--clip-grad-norm must be >= 0"):
        ts.main(["evaluator", "--run", str(tmp_path), "--device", "cpu", "--clip-grad-norm", "-1"])


def test_lanes_run_stage_processes_side_by_side_and_a_failure_stops_the_rest(tmp_path):
    """``_run_lanes`` with real processes: two lanes' stages both finish and log; a stage that fails
    names its log and stops the other lane's long stage instead of leaving it running."""
    ts = _train_script()
    small = ["--n", "8", "--heldout", "4", "--workers", "1", "--captions", "1"]
    wall = ts._run_lanes([[("a", ["data", "--run", str(tmp_path / "a"), *small])],
                          [("b", ["data", "--run", str(tmp_path / "b"), *small])]], tmp_path, 1)
    assert set(wall) == {"a", "b"}
    assert (tmp_path / "a" / "data" / "images.npy").is_file() and (tmp_path / "b" / "data" / "images.npy").is_file()
    assert (tmp_path / "logs" / "a.log").is_file()
    assert (tmp_path / "logs" / "a.done").is_file() and (tmp_path / "logs" / "b.done").is_file()
    t = time.time()
    long = ["data", "--run", str(tmp_path / "long"), "--n", "2000000", "--workers", "1"]
    bad = ["unet", "--run", str(tmp_path / "missing"), "--kind", "vp", "--device", "cpu", "--steps", "1"]
    (tmp_path / "logs" / "bad.done").touch()  # from an earlier run: removed when the stage starts
    with pytest.raises(SystemExit, match=r"stage bad failed \(exit 1\).*logs/bad.log"):
        ts._run_lanes([[("long", long)], [("bad", bad)]], tmp_path, 1)
    assert not (tmp_path / "logs" / "bad.done").exists() and not (tmp_path / "logs" / "long.done").exists()
    assert time.time() - t < 120  # rendering 2,000,000 images would take far longer
    assert not (tmp_path / "long" / "data" / "images.npy").exists()


def test_captions_take_more_threads_once_the_grow_file_exists(tmp_path, caplog):
    """The caption encoding beside the evaluator goes on with all the threads once the evaluator's
    ``.done`` file appears (checked before every batch), and encodes the same states."""
    import logging

    ts = _train_script()
    run = str(tmp_path)
    ts.main(["data", "--run", run, "--n", "8", "--heldout", "4", "--workers", "1", "--captions", "1"])
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flag = tmp_path / "logs" / "evaluator.done"
        ts.main(["captions", "--run", run, "--device", "cpu", "--grow-threads-file", str(flag), "--grow-threads", "2"])
        assert torch.get_num_threads() == 1  # no file: the threads it was given
        first = torch.load(tmp_path / "captions.pt")
        flag.parent.mkdir(parents=True, exist_ok=True)
        flag.touch()
        with caplog.at_level(logging.INFO, logger="train_shapes"):
            ts.main(["captions", "--run", run, "--device", "cpu", "--grow-threads-file", str(flag),
                     "--grow-threads", "2"])
        assert torch.get_num_threads() == 2 and "encoding on 2 threads" in caplog.text
        again = torch.load(tmp_path / "captions.pt")
        assert torch.allclose(first["states"].float(), again["states"].float(), atol=2e-3)
        assert torch.equal(first["index"], again["index"])
    finally:
        torch.set_num_threads(before)
    calls = []
    T.encode_captions(type("Enc", (), {"encode_uncached": lambda self, t, warn: torch.zeros(len(t), 2, 3)})(),
                      [["a"], ["b"], ["c"]], batch_size=2, before_batch=lambda: calls.append(1))
    assert len(calls) == 2  # once per batch


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and text in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/cmdline").is_file(), reason="reads /proc to find the stage processes")
def test_killing_a_laned_run_stops_its_stage_processes(tmp_path):
    """A ``kill`` (SIGTERM) of the run that drives the lanes also stops the stage processes it started,
    instead of leaving them training in the background."""
    import os
    import signal
    import subprocess
    import sys

    script = SHIPPED.parent.parent.parent / "train" / "train_shapes.py"
    marker = str(tmp_path / "long-run")
    driver = (f"import importlib.util, pathlib; spec = importlib.util.spec_from_file_location('ts', {str(script)!r}); "
              "ts = importlib.util.module_from_spec(spec); spec.loader.exec_module(ts); "
              f"ts._run_lanes([[('long', ['data', '--run', {marker!r}, '--n', '2000000', '--workers', '1'])]], "
              f"pathlib.Path({str(tmp_path)!r}), 1)")
    proc = subprocess.Popen([sys.executable, "-c", driver])
    try:
        deadline = time.time() + 60
        while len(_processes_mentioning(marker)) < 2 and time.time() < deadline:  # the driver and its stage
            time.sleep(0.2)
        assert [p for p in _processes_mentioning(marker) if p != proc.pid], "the stage process did not start"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        deadline = time.time() + 30
        while _processes_mentioning(marker) and time.time() < deadline:
            time.sleep(0.2)
        assert _processes_mentioning(marker) == []
    finally:  # never leave a stray renderer behind, whatever failed
        for pid in _processes_mentioning(marker):
            os.kill(pid, signal.SIGKILL)
