"""Training the shapes models: the VAE, the two denoisers (VP epsilon and rectified flow) and the
evaluator. Used by ``train/train_shapes.py``; seeded, with progress bars, checkpoints and resume.

Every loop takes ``steps`` (the schedule length) and an optional ``max_seconds``: with a time budget
the loop measures its speed after a few steps and fits the schedule to the budget (refitting it
as it goes), and records the step count it settled on. Runs without a budget are exactly
repeatable; ``steps=<that count>`` trains as many steps as the time-boxed run, on a learning-rate
schedule that differs in its warm-up and in the refits.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .evaluator import EVALUATOR_CONFIG, ShapesClassifier, classifier_loss

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [64, 128, 128], "layers_per_block": 1, "latent_channels": 4,
    "norm_num_groups": 32, "sample_size": 32,
}
UNET_CONFIG: dict[str, Any] = {
    "sample_size": 8, "in_channels": 4, "out_channels": 4,
    "down_block_types": ["CrossAttnDownBlock2D"] * 2, "up_block_types": ["CrossAttnUpBlock2D"] * 2,
    "block_out_channels": [64, 128], "layers_per_block": 2, "cross_attention_dim": 384,
    "attention_head_dim": 8, "norm_num_groups": 32,
}
SCHEDULER_CONFIGS: dict[str, dict[str, Any]] = {
    # Stable Diffusion 1.x: 1000-step scaled-linear VP, epsilon prediction
    "vp": {
        "_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "prediction_type": "epsilon", "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": 1, "timestep_spacing": "trailing",
    },
    # SD3 / Flux: rectified flow, velocity prediction, model time 1000 * t
    "flow": {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0},
}
# The architectures a run can train: ``shipped`` (the weights in the package, trained on a GPU) and
# ``small``, half the channels (1.9-3.3x less compute per training sample, 3.5-4x fewer parameters), the one
# the 2-hour CPU recipe trains (``train_shapes.py all --recipe cpu-2h``). Attention heads keep the
# shipped head width (8 and 16 channels).
ARCHS: dict[str, dict[str, dict[str, Any]]] = {
    "shipped": {"vae": VAE_CONFIG, "unet": UNET_CONFIG},
    "small": {
        "vae": {**VAE_CONFIG, "block_out_channels": [32, 64, 64], "norm_num_groups": 16},
        "unet": {**UNET_CONFIG, "block_out_channels": [32, 64], "norm_num_groups": 16, "attention_head_dim": 4},
    },
}
TEXT_MAX_LENGTH = 32

Kind = Literal["vp", "flow"]


# ------------------------------------------------------------------------------------------------
# the shared loop
# ------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Step budget. With ``max_seconds``, ``total`` is fitted to the budget once the loop knows its
    speed (after ``measured_at`` steps) and refitted at 2x, 4x, 8x ... that, never above the steps
    asked for: slow first steps (allocation, a briefly busy machine) then cost little of the budget."""

    total: int
    max_seconds: float | None = None
    warmup: int = 100
    measured_at: int = 30  # > 5: the speed is measured from step 5 on
    history: list[dict[str, float]] = field(default_factory=list)

    def lr_factor(self, step: int) -> float:
        """Linear warm-up, then cosine decay to 10% over the (possibly shortened) schedule."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        frac = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))


def _progress(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=desc, mininterval=5.0, dynamic_ncols=True)


def train_loop(
    step_fn: Callable[[int], Tensor],
    plan: Plan,
    *,
    start_step: int = 0,
    desc: str = "train",
    log_every: int = 100,
    checkpoint: Callable[[int], None] | None = None,
    checkpoint_every_s: float = 60.0,
    progress: bool = True,
    stop_at: int | None = None,
) -> int:
    """Run ``step_fn(step) -> loss`` for ``plan.total`` steps (or until the time budget, or until
    step ``stop_at`` to split a run in parts); returns the number of steps done. Losses are
    averaged on the device and read every ``log_every``."""
    t0 = time.perf_counter()
    last_ckpt = t0
    acc: Tensor | None = None
    n_acc = 0
    bar = _progress(plan.total, desc, progress)
    if bar is not None and start_step:
        bar.update(start_step)
    step = start_step
    t_measure = t0
    requested = plan.total
    while step < plan.total and (stop_at is None or step < stop_at):
        loss = step_fn(step).detach()
        acc = loss if acc is None else acc + loss
        n_acc += 1
        step += 1
        if bar is not None:
            bar.update(1)
        done = step - start_step
        if plan.max_seconds is not None and done == 5:
            t_measure = time.perf_counter()
        if (plan.max_seconds is not None and done % plan.measured_at == 0
                and _is_power_of_two(done // plan.measured_at)):
            # fit the schedule to the budget at step 30, and again at 60, 120, 240, ...: the first
            # steps can be slower (allocation, a busy machine) and would otherwise leave time unused
            per_step = (time.perf_counter() - t_measure) / (done - 5)
            left = plan.max_seconds - (time.perf_counter() - t0)
            fit = max(step + 1, min(requested, step + int(0.97 * left / per_step)))
            if fit != plan.total:
                logger.info("%s: %.1f ms/step, schedule set to %d steps to fit %.0f s",
                            desc, 1e3 * per_step, fit, plan.max_seconds)
                plan.total = fit
                if bar is not None:
                    bar.total = plan.total
        if step % log_every == 0 or step == plan.total:
            assert acc is not None
            plan.history.append({"step": step, "loss": float(acc) / n_acc, "time": time.perf_counter() - t0})
            if bar is not None:
                bar.set_postfix(loss=f"{plan.history[-1]['loss']:.4g}")
            else:
                logger.info("%s step %d loss %.5g", desc, step, plan.history[-1]["loss"])
            acc, n_acc = None, 0
        if plan.max_seconds is not None and time.perf_counter() - t0 > plan.max_seconds:
            logger.info("%s: time budget reached at step %d", desc, step)
            plan.total = step
            if acc is not None:
                plan.history.append({"step": step, "loss": float(acc) / n_acc, "time": time.perf_counter() - t0})
            break
        if checkpoint is not None and time.perf_counter() - last_ckpt > checkpoint_every_s:
            checkpoint(step)
            last_ckpt = time.perf_counter()
    if bar is not None:
        bar.close()
    return step


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _optimizer(params: Any, lr: float, plan: Plan, weight_decay: float = 0.0) -> tuple[Any, Any]:
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, plan.lr_factor)
    return opt, sched


PRECISIONS: tuple[str, ...] = ("auto", "fp32", "bf16")


def _check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)} (auto: bf16 autocast on CUDA, "
                         f"fp32 on the CPU), got {precision!r}")
    return precision


def _autocast(device: torch.device, precision: str = "auto") -> Any:
    """The forward pass's autocast: ``auto`` is bf16 on CUDA and fp32 elsewhere; ``bf16`` / ``fp32``
    force it on any device (parameters, optimizer state and the loss stay fp32)."""
    _check_precision(precision)
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)
    return torch.autocast("cpu", enabled=False)


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach().float(), 1 - d)


def _save_ckpt(path: Path | None, **state: Any) -> None:
    if path is None:
        return
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def _load_ckpt(path: Path | None, resume: bool) -> dict[str, Any] | None:
    if path is None or not resume or not path.is_file():
        return None
    logger.info("resuming from %s", path)
    return torch.load(path, map_location="cpu", weights_only=False)


def _resume(ckpt: Path | None, resume: bool, gen: torch.Generator, plan: Plan, **parts: Any) -> int:
    """Restore ``parts`` (name -> object with ``load_state_dict``), the generator and the plan's
    history from a checkpoint written by :func:`_save_training`; returns the step to start from."""
    state = _load_ckpt(ckpt, resume)
    if state is None:
        return 0
    for name, obj in parts.items():
        obj.load_state_dict(state[name])
    gen.set_state(state["gen"])  # loaded on the CPU: what set_state takes for CPU and CUDA generators
    plan.history = state["history"]
    return int(state["step"])


def _save_training(ckpt: Path | None, step: int, gen: torch.Generator, plan: Plan, **parts: Any) -> None:
    """Checkpoint ``parts`` (name -> object with ``state_dict``), the generator and the plan's history."""
    _save_ckpt(ckpt, **{name: obj.state_dict() for name, obj in parts.items()}, gen=gen.get_state(),
               history=plan.history, step=step)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


# ------------------------------------------------------------------------------------------------
# VAE
# ------------------------------------------------------------------------------------------------


def _highpass_rms(x: Tensor) -> Tensor:
    """Per-image RMS of ``x - box3x3(x)``: the energy of grain and sharp edges."""
    blur = torch.nn.functional.avg_pool2d(torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate"), 3, 1)
    return (x - blur).pow(2).mean(dim=(1, 2, 3)).add(1e-8).sqrt()


def vae_loss(vae: Any, x: Tensor, generator: torch.Generator | None, kl_weight: float, hf_weight: float) -> Tensor:
    """MSE + ``hf_weight`` * (high-pass energy mismatch)^2 + ``kl_weight`` * KL. The energy term
    keeps grain and sharp edges, which plain MSE averages away."""
    post = vae.encode(x).latent_dist
    rec = vae.decode(post.sample(generator)).sample.float()
    mse = (rec - x).pow(2).mean()
    hf = (_highpass_rms(rec) - _highpass_rms(x)).pow(2).mean()
    kl = post.kl().mean() / post.mean[0].numel()
    return mse + hf_weight * hf + kl_weight * kl


def _to_unit(images_u8: Tensor) -> Tensor:
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def train_vae(
    images: np.ndarray,
    *,
    steps: int = 20000,
    batch_size: int = 256,
    lr: float = 5e-4,
    kl_weight: float = 1e-6,
    hf_weight: float = 4.0,
    max_seconds: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    config: dict[str, Any] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 100,
    stop_at: int | None = None,
    precision: str = "auto",
) -> tuple[Any, Plan]:
    """Train ``AutoencoderKL`` on uint8 images ``(N, 32, 32, 3)``; returns (vae, plan with history)."""
    from diffusers import AutoencoderKL

    _check_precision(precision)
    seed_everything(seed)
    dev = torch.device(device)
    vae = AutoencoderKL(**(config or VAE_CONFIG)).to(dev).train()
    data = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
    plan = Plan(steps, max_seconds, warmup=min(200, max(1, steps // 10)))
    opt, sched = _optimizer(vae.parameters(), lr, plan)
    gen = torch.Generator(dev).manual_seed(seed)
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    start = _resume(ckpt, resume, gen, plan, model=vae, opt=opt, sched=sched)

    def step_fn(step: int) -> Tensor:
        idx = torch.randint(len(data), (batch_size,), device=dev, generator=gen)
        x = _to_unit(data[idx])
        with _autocast(dev, precision):
            loss = vae_loss(vae, x, gen, kl_weight, hf_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss

    def save(step: int) -> None:
        _save_training(ckpt, step, gen, plan, model=vae, opt=opt, sched=sched)

    done = train_loop(step_fn, plan, start_step=start, desc="vae", log_every=log_every, checkpoint=save,
                      progress=progress, stop_at=stop_at)
    save(done)
    return vae.eval(), plan


@torch.no_grad()
def encode_latents(vae: Any, images: np.ndarray, batch_size: int = 2048) -> tuple[Tensor, Tensor, float]:
    """Posterior mean and std of every image (unscaled, float16 on the VAE's device), and the
    ``scaling_factor`` (1 / std of the means) that gives the denoisers unit-variance latents."""
    dev = next(vae.parameters()).device
    means, stds = [], []
    for i in range(0, len(images), batch_size):
        x = _to_unit(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(dev))
        post = vae.encode(x).latent_dist
        means.append(post.mean.half())
        stds.append(post.std.half())
    mean, std = torch.cat(means), torch.cat(stds)
    scale = 1.0 / float(mean.float().std())
    return mean, std, scale


# ------------------------------------------------------------------------------------------------
# denoisers
# ------------------------------------------------------------------------------------------------


def vp_alphas_cumprod(cfg: dict[str, Any] | None = None) -> Tensor:
    """``alphas_cumprod`` of the scaled-linear VP schedule (from noisewise's own schedule code)."""
    from ..core.schedules import Schedule

    sched = Schedule.from_diffusers(cfg or SCHEDULER_CONFIGS["vp"])
    return sched.alphas_cumprod_table.float()  # type: ignore[attr-defined]


def denoiser_loss(
    kind: Kind, unet: Any, z0: Tensor, cond: Tensor, gen: torch.Generator, acp: Tensor | None,
    min_snr_gamma: float = 5.0, flow_t_loc: float = 0.0,
) -> Tensor:
    """One training loss. ``vp``: epsilon prediction at a uniform integer step, min-SNR-5 weighted
    (Hang et al. 2023). ``flow``: rectified-flow velocity ``eps - x0`` at a logit-normal ``t``
    (Esser et al. 2024) of location ``flow_t_loc`` and scale 1 (a positive location trains more at
    high noise), model time ``1000 t``."""
    b, dev = z0.shape[0], z0.device
    eps = torch.randn(z0.shape, device=dev, generator=gen)
    if kind == "vp":
        assert acp is not None
        t = torch.randint(len(acp), (b,), device=dev, generator=gen)
        a = acp[t].sqrt().view(b, 1, 1, 1)
        s = (1 - acp[t]).sqrt().view(b, 1, 1, 1)
        xt = a * z0 + s * eps
        pred = unet(xt, t, cond).sample.float()
        snr = acp[t] / (1 - acp[t])
        w = snr.clamp(max=min_snr_gamma) / snr
        return (w * (pred - eps).pow(2).mean(dim=(1, 2, 3))).mean()
    if kind == "flow":
        t = torch.sigmoid(flow_t_loc + torch.randn(b, device=dev, generator=gen))
        tt = t.view(b, 1, 1, 1)
        xt = (1 - tt) * z0 + tt * eps
        pred = unet(xt, 1000.0 * t, cond).sample.float()
        return (pred - (eps - z0)).pow(2).mean()
    raise ValueError(f"unknown kind {kind!r}; known: 'vp', 'flow'")


def encode_captions(text_encoder: Any, captions: list[list[str]], batch_size: int = 2048,
                    before_batch: Any = None) -> tuple[Tensor, Tensor]:
    """States of every distinct caption (float16) and, per image and caption slot, its row.
    ``before_batch()``, when given, is called before each batch of ``batch_size`` texts."""
    unique: dict[str, int] = {}
    index = np.empty((len(captions), len(captions[0])), dtype=np.int64)
    for i, caps in enumerate(captions):
        for k, c in enumerate(caps):
            index[i, k] = unique.setdefault(c, len(unique))
    texts = list(unique)
    states = []
    for i in range(0, len(texts), batch_size):
        if before_batch is not None:
            before_batch()
        states.append(text_encoder.encode_uncached(texts[i : i + batch_size], warn=False).half())
    return torch.cat(states), torch.from_numpy(index)


def load_unet_weights(path: str | os.PathLike[str]) -> dict[str, Tensor]:
    """A denoiser's weights (float32) from a ``.safetensors`` file, a diffusers ``unet`` folder or a
    model folder holding ``unet/`` (e.g. ``src/noisewise/weights/shapes-vp``), for ``init_state``."""
    from safetensors.torch import load_file

    p = Path(path)
    candidates = [p] if p.is_file() else [p / "diffusion_pytorch_model.safetensors",
                                          p / "unet" / "diffusion_pytorch_model.safetensors"]
    for c in candidates:
        if c.is_file() and c.suffix == ".safetensors":
            return {k: v.float() for k, v in load_file(str(c)).items()}
    raise FileNotFoundError(
        f"no denoiser weights at {p}: give a .safetensors file, a diffusers unet folder (with "
        f"diffusion_pytorch_model.safetensors) or a model folder with unet/ (e.g. src/noisewise/weights/shapes-vp)"
    )


def _load_exact(model: torch.nn.Module, state: dict[str, Tensor]) -> None:
    own = model.state_dict()
    missing, extra = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    bad = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or extra or bad:
        raise ValueError(
            f"the initial weights do not fit this network's config ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(extra)} unexpected, e.g. {extra[:2]}; {len(bad)} of another shape, e.g. {sorted(bad)[:2]}): "
            "give weights trained with the same UNet config (training.UNET_CONFIG for the shapes models)"
        )
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()})


def train_denoiser(
    kind: Kind,
    latent_mean: Tensor,
    latent_std: Tensor,
    scaling_factor: float,
    text_states: Tensor,
    caption_index: Tensor,
    *,
    steps: int = 50000,
    batch_size: int = 512,
    lr: float = 5e-4,
    ema_decay: float = 0.999,
    max_seconds: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    config: dict[str, Any] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 100,
    on_checkpoint: Callable[[Any, int], None] | None = None,
    stop_at: int | None = None,
    precision: str = "auto",
    init_state: dict[str, Tensor] | None = None,
    checkpoint_every_s: float = 60.0,
    warmup: int | None = None,
    flow_t_loc: float = 0.0,
    sample_weights: Tensor | None = None,
) -> tuple[Any, Plan]:
    """Train a ``UNet2DConditionModel`` on scaled VAE latents with text cross-attention; returns
    (EMA model, plan with history). Latents are sampled from the VAE posterior each step.

    ``init_state``: start the network (and its EMA) from these weights (:func:`load_unet_weights`,
    e.g. the shipped model's) instead of a random initialisation: fine-tuning. A ``resume`` from a
    checkpoint takes precedence (the checkpoint holds the fine-tuned weights). ``flow_t_loc``: the
    flow model's training-time distribution (:func:`denoiser_loss`). ``sample_weights``: one
    non-negative weight per image; each batch draws images in proportion to them (with replacement)
    instead of uniformly (:func:`draw_indices`)."""
    from diffusers import UNet2DConditionModel

    _check_precision(precision)
    seed_everything(seed)
    dev = torch.device(device)
    unet = UNet2DConditionModel(**(config or UNET_CONFIG))
    if init_state is not None:
        _load_exact(unet, init_state)
    unet = unet.to(dev).train()
    ema = copy.deepcopy(unet).float().eval().requires_grad_(False)
    mean, std = latent_mean.to(dev), latent_std.to(dev)
    states, cidx = text_states.to(dev), caption_index.to(dev)
    acp = vp_alphas_cumprod().to(dev) if kind == "vp" else None
    plan = Plan(steps, max_seconds, warmup=min(500, max(1, steps // 10)) if warmup is None else max(1, warmup))
    opt, sched = _optimizer(unet.parameters(), lr, plan, weight_decay=0.01)
    gen = torch.Generator(dev).manual_seed(seed + (0 if kind == "vp" else 1))
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    start = _resume(ckpt, resume, gen, plan, model=unet, ema=ema, opt=opt, sched=sched)

    weights = None if sample_weights is None else check_sample_weights(sample_weights, len(mean)).to(dev)

    def step_fn(step: int) -> Tensor:
        idx = draw_indices(len(mean), batch_size, gen, dev, weights)
        k = torch.randint(cidx.shape[1], (batch_size,), device=dev, generator=gen)
        z0 = (mean[idx].float() + std[idx].float() * torch.randn(mean[idx].shape, device=dev, generator=gen))
        z0 = z0 * scaling_factor
        cond = states[cidx[idx, k]].float()
        loss = _denoiser_update(kind, unet, ema, opt, z0, cond, gen, acp, dev, precision, step, ema_decay,
                                flow_t_loc)
        sched.step()
        return loss

    def save(step: int) -> None:
        _save_training(ckpt, step, gen, plan, model=unet, ema=ema, opt=opt, sched=sched)
        if on_checkpoint is not None:
            on_checkpoint(ema, step)

    done = train_loop(step_fn, plan, start_step=start, desc=f"unet-{kind}", log_every=log_every,
                      checkpoint=save, checkpoint_every_s=checkpoint_every_s, progress=progress, stop_at=stop_at)
    save(done)
    return ema, plan


def check_sample_weights(weights: Tensor, n: int) -> Tensor:
    """Per-image sampling weights checked: ``n`` finite values >= 0, not all 0 (float64)."""
    w = torch.as_tensor(weights, dtype=torch.float64).reshape(-1)
    if w.numel() != n:
        raise ValueError(f"sample_weights needs one weight per image ({n}), got {w.numel()}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError("sample_weights must be finite and >= 0, with at least one above 0")
    return w


def draw_indices(n: int, batch_size: int, gen: torch.Generator, device: torch.device,
                 weights: Tensor | None = None) -> Tensor:
    """A training batch's image indices: uniform over ``n`` (``weights`` None), else drawn with
    replacement in proportion to ``weights``."""
    if weights is None:
        return torch.randint(n, (batch_size,), device=device, generator=gen)
    return torch.multinomial(weights, batch_size, replacement=True, generator=gen)


def _denoiser_update(kind: Kind, unet: Any, ema: torch.nn.Module, opt: Any, z0: Tensor, cond: Tensor, gen: Any,
                     acp: Tensor | None, dev: torch.device, precision: str, step: int, ema_decay: float,
                     flow_t_loc: float = 0.0) -> Tensor:
    """One training update of a denoiser (loss, backward, clipping, optimizer, EMA); returns the loss."""
    with _autocast(dev, precision):
        loss = denoiser_loss(kind, unet, z0, cond, gen, acp, flow_t_loc=flow_t_loc)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    opt.step()
    _ema_update(ema, unet, step, ema_decay)
    return loss


def time_denoiser_steps(
    kind: Kind, batch_sizes: list[int], *, seconds: float = 3.0, device: str = "cpu", precision: str = "auto",
    config: dict[str, Any] | None = None, text_shape: tuple[int, int] = (TEXT_MAX_LENGTH, 384), warmup: int = 3,
) -> dict[int, float]:
    """Seconds per training step (forward, backward, clipping, AdamW, EMA: what ``train_denoiser``
    does per step, on random latents and text states) at each batch size, each timed for about
    ``seconds`` after ``warmup`` steps."""
    _check_precision(precision)
    return {bs: _time_steps(kind, bs, seconds, torch.device(device), precision, config or UNET_CONFIG, text_shape,
                            warmup) for bs in batch_sizes}


def _time_steps(kind: Kind, bs: int, seconds: float, dev: torch.device, precision: str, cfg: dict[str, Any],
                text_shape: tuple[int, int], warmup: int) -> float:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    acp = vp_alphas_cumprod().to(dev) if kind == "vp" else None
    unet = UNet2DConditionModel(**cfg).to(dev).train()
    ema = copy.deepcopy(unet).float().eval().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    gen = torch.Generator(dev).manual_seed(0)
    z0 = torch.randn((bs, cfg["in_channels"], cfg["sample_size"], cfg["sample_size"]), device=dev, generator=gen)
    cond = torch.randn((bs, *text_shape), device=dev, generator=gen)

    def step(i: int) -> None:
        _denoiser_update(kind, unet, ema, opt, z0, cond, gen, acp, dev, precision, i, 0.999)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    for i in range(warmup):
        step(i)
    sync()
    n, t0 = 0, time.perf_counter()
    while True:
        step(warmup + n)
        n += 1
        if n % 5 == 0 or dev.type != "cuda":
            sync()
            if time.perf_counter() - t0 >= seconds:
                return (time.perf_counter() - t0) / n


def choose_batch(step_seconds: dict[int, float], tolerance: float = 0.05) -> int:
    """The batch size to train with, from :func:`time_denoiser_steps`'s timings: the highest
    throughput (samples per second); among batch sizes within ``tolerance`` of it, the smallest
    (more optimiser steps for the same data)."""
    if not step_seconds:
        raise ValueError("no timings: time at least one batch size")
    rate = {bs: bs / s for bs, s in step_seconds.items()}
    best = max(rate.values())
    return min(bs for bs, r in rate.items() if r >= (1 - tolerance) * best)


# ------------------------------------------------------------------------------------------------
# evaluator
# ------------------------------------------------------------------------------------------------


def train_evaluator(
    images: np.ndarray,
    labels: dict[str, np.ndarray],
    *,
    steps: int = 6000,
    batch_size: int = 512,
    lr: float = 2e-3,
    max_seconds: float | None = None,
    device: str = "cpu",
    seed: int = 0,
    config: dict[str, Any] | None = None,
    checkpoint_path: str | os.PathLike[str] | None = None,
    resume: bool = False,
    progress: bool = True,
    log_every: int = 100,
    stop_at: int | None = None,
    precision: str = "auto",
    clip_grad_norm: float | None = None,
) -> tuple[ShapesClassifier, Plan]:
    """Train the attribute classifier on renders (with a faint extra noise so it reads decoded
    images as well); returns (model in eval mode, plan). ``clip_grad_norm``: clip the gradient's
    norm to this before each update (off by default, as the shipped evaluator was trained)."""
    _check_precision(precision)
    seed_everything(seed)
    dev = torch.device(device)
    cfg = config or EVALUATOR_CONFIG
    model = ShapesClassifier(cfg["channels"], cfg["features"]).to(dev).train()
    data = torch.from_numpy(np.ascontiguousarray(images)).to(dev)
    lab = {k: torch.from_numpy(v).to(dev) for k, v in labels.items()}
    plan = Plan(steps, max_seconds, warmup=min(200, max(1, steps // 10)))
    opt, sched = _optimizer(model.parameters(), lr, plan, weight_decay=1e-4)
    gen = torch.Generator(dev).manual_seed(seed + 2)
    ckpt = Path(checkpoint_path) if checkpoint_path else None
    start = _resume(ckpt, resume, gen, plan, model=model, opt=opt, sched=sched)

    def step_fn(step: int) -> Tensor:
        idx = torch.randint(len(data), (batch_size,), device=dev, generator=gen)
        x = data[idx].permute(0, 3, 1, 2).float() / 255.0
        amp = 0.02 * torch.rand((batch_size, 1, 1, 1), device=dev, generator=gen)
        x = x + amp * torch.randn(x.shape, device=dev, generator=gen)
        with _autocast(dev, precision):
            out = model(x)
        loss = classifier_loss({k: v.float() for k, v in out.items()}, {k: v[idx] for k, v in lab.items()})
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
        opt.step()
        sched.step()
        return loss

    def save(step: int) -> None:
        _save_training(ckpt, step, gen, plan, model=model, opt=opt, sched=sched)

    done = train_loop(step_fn, plan, start_step=start, desc="evaluator", log_every=log_every,
                      checkpoint=save, progress=progress, stop_at=stop_at)
    save(done)
    return model.eval(), plan


@torch.no_grad()
def classifier_accuracy(model: ShapesClassifier, images: np.ndarray, labels: dict[str, np.ndarray],
                        batch_size: int = 1024) -> dict[str, float]:
    """Held-out accuracy per label: background, defects (each), and per object slot presence,
    shape, colour and size (the latter three over present objects), and whole-image exactness."""
    dev = next(model.parameters()).device
    model.eval()
    outs: dict[str, list[Tensor]] = {}
    for i in range(0, len(images), batch_size):
        x = torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])).to(dev).permute(0, 3, 1, 2).float() / 255
        for k, v in model(x).items():
            outs.setdefault(k, []).append(v.float().cpu())
    o = {k: torch.cat(v) for k, v in outs.items()}
    lab = {k: torch.from_numpy(v) for k, v in labels.items()}
    present = lab["shape"] >= 0
    shape_pred = o["shape"].argmax(-1) - 1
    res = {
        "background": float((o["background"].argmax(-1) == lab["background"]).float().mean()),
        "defects": float(((o["defects"] > 0).long() == lab["defects"]).float().mean()),
        "presence": float(((shape_pred >= 0) == present).float().mean()),
        "shape": float((shape_pred == lab["shape"])[present].float().mean()),
        "color": float((o["color"].argmax(-1) == lab["color"])[present].float().mean()),
        "size": float((o["size"].argmax(-1) == lab["size"])[present].float().mean()),
    }
    exact = (o["background"].argmax(-1) == lab["background"]) & ((o["defects"] > 0).long() == lab["defects"]).all(-1)
    slot_ok = (shape_pred == lab["shape"]) & (~present | ((o["color"].argmax(-1) == lab["color"])
                                                          & (o["size"].argmax(-1) == lab["size"])))
    res["exact"] = float((exact & slot_ok.all(-1)).float().mean())
    return res


def history_json(plan: Plan) -> str:
    return json.dumps({"steps": plan.total, "history": plan.history})
