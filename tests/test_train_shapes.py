"""Training code: every model trains a few steps on CPU, losses are finite, and a run split in two
with a checkpoint in between ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from noisewise.shapes import build_dataset  # noqa: E402
from noisewise.shapes import training as T  # noqa: E402

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


def test_evaluator_trains(data):
    model, plan = T.train_evaluator(data.images, data.labels, steps=3, batch_size=8, progress=False, log_every=1,
                                    config={"channels": [8, 8, 8], "features": 16})
    assert all(np.isfinite(h["loss"]) for h in plan.history)
    acc = T.classifier_accuracy(model, data.images[:16], {k: v[:16] for k, v in data.labels.items()})
    assert set(acc) >= {"background", "shape", "color", "size", "presence", "defects", "exact"}
    assert all(0.0 <= v <= 1.0 for v in acc.values())


def test_lr_plan_shrinks_to_fit_a_time_budget():
    plan = T.Plan(10_000, max_seconds=0.5, measured_at=10)
    import time

    done = T.train_loop(lambda step: (time.sleep(0.01), torch.tensor(1.0))[1], plan, progress=False)
    assert done == plan.total < 10_000
    assert plan.lr_factor(0) < plan.lr_factor(plan.warmup) == pytest.approx(1.0, abs=1e-3) or plan.total <= plan.warmup
