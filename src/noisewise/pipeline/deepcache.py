"""DeepCache-style step caching for a diffusers ``UNet2DConditionModel``.

DeepCache (Ma, Fang and Wang 2023, "DeepCache: Accelerating Diffusion Models for Free") notes that
the deep, low-resolution features of a U-Net change slowly between adjacent denoising steps while
the shallow, high-resolution path carries the detail. On a *full* call the whole network runs and
the hidden state entering the up-path layer of a chosen skip branch is cached; on the following
*shallow* calls only the shallow path runs -- ``conv_in``, the down layers that produce skips
``0 .. branch``, the up layers that consume them, ``conv_out`` -- and the cached deep feature stands
in for everything below.

The wrapper walks the UNet's own submodules in the order of ``UNet2DConditionModel.forward`` at the
granularity of one resnet (+ its transformer) per skip connection:

- skip 0 is ``conv_in``'s output; each resnet (+ attention) of a down block adds one skip, and a down
  block's downsampler adds one more; the up blocks consume the skips in reverse, one per resnet.
- ``branch=b`` keeps skips ``0 .. b`` in the shallow path. ``branch=0`` is the shallowest (conv_in,
  the last up resnet, conv_out); the default is the whole first resolution level without its
  downsampler (``branch = len(down_blocks[0].resnets)``: the first down block's layers and the last
  up block).

"Step" means *network call*: the cache is refreshed on every ``interval``-th call since the last
full call, so a second-order sampler (two calls per step) or an adaptive one works unchanged; a
multistep sampler calls once per step. The cache is keyed on the batch (shape, dtype, device and
the conditioning values -- classifier-free guidance's cond and uncond halves are both held, and a
batch change or different conditioning forces a full call) and is dropped when a new sampling run
starts: :meth:`DeepCacheUNet.reset` (the text-to-image pipeline calls it at the start of every run),
and automatically when the model time goes up (a new run starts at the noisiest level).

    dc = DeepCacheUNet(pipe.unet, interval=3)
    result = pipe(prompts, model=dc)          # dc.full_calls, dc.shallow_calls
"""

from __future__ import annotations

from typing import Any

import torch

Tensor = torch.Tensor

_DOWN_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")


def _check_unet(unet: Any) -> None:
    name = type(unet).__name__
    if not hasattr(unet, "down_blocks") or not hasattr(unet, "up_blocks") or not hasattr(unet, "conv_in"):
        raise TypeError(f"DeepCache wraps a diffusers UNet2DConditionModel, got {name}")
    cfg = unet.config
    unsupported = {
        "class_embed_type": cfg.class_embed_type, "num_class_embeds": cfg.num_class_embeds,
        "addition_embed_type": cfg.addition_embed_type, "time_cond_proj_dim": cfg.time_cond_proj_dim,
    }
    bad = {k: v for k, v in unsupported.items() if v is not None}
    if bad:
        raise ValueError(
            f"DeepCache supports text-conditioned UNets without extra embeddings; this one has {bad}. "
            "Use the plain model (no model= argument) for it"
        )
    if cfg.encoder_hid_dim_type not in (None, "text_proj"):
        raise ValueError(f"DeepCache does not support encoder_hid_dim_type={cfg.encoder_hid_dim_type!r}")
    for b in unet.down_blocks:
        if type(b).__name__ not in _DOWN_TYPES:
            raise ValueError(f"DeepCache supports down blocks {_DOWN_TYPES}, got {type(b).__name__}")
    for b in unet.up_blocks:
        if type(b).__name__ not in _UP_TYPES:
            raise ValueError(f"DeepCache supports up blocks {_UP_TYPES}, got {type(b).__name__}")
        if all(getattr(b, k, None) for k in ("s1", "s2", "b1", "b2")):
            raise ValueError("DeepCache does not support FreeU; call unet.disable_freeu() first")


def num_skips(unet: Any) -> int:
    """Number of skip connections (branches) of the UNet: ``conv_in`` + one per down resnet + one
    per downsampler. Valid ``branch`` values are ``0 .. num_skips(unet) - 1``."""
    n = 1
    for b in unet.down_blocks:
        n += len(b.resnets) + (1 if b.downsamplers is not None else 0)
    return n


def default_branch(unet: Any) -> int:
    """The whole first resolution level (its down resnets and the last up block), without the
    first downsampler."""
    return len(unet.down_blocks[0].resnets)


class DeepCacheUNet:
    """A callable ``model(x, model_time, cond) -> prediction`` over a ``UNet2DConditionModel`` that
    runs the full network every ``interval`` calls and only the shallow path (up to skip ``branch``)
    in between, reusing the cached deep feature.

    Attributes ``calls``, ``full_calls``, ``shallow_calls`` count the network calls since
    construction (:meth:`reset_counters` zeroes them); ``interval=1`` is the plain network.
    """

    def __init__(self, unet: Any, *, interval: int = 2, branch: int | None = None) -> None:
        _check_unet(unet)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f"interval must be an integer >= 1 (1 = no caching), got {interval!r}")
        n = num_skips(unet)
        if branch is None:
            branch = default_branch(unet)
        if isinstance(branch, bool) or not isinstance(branch, int) or not 0 <= branch < n:
            raise ValueError(
                f"branch must be an integer from 0 (shallowest) to {n - 1} (everything but the mid block) "
                f"for this UNet, got {branch!r}"
            )
        self.unet = unet
        self.interval = interval
        self.branch = branch
        self.n_skips = n
        self._down_ops, self._up_ops = self._plan()
        self.calls = 0
        self.full_calls = 0
        self.shallow_calls = 0
        self.reset()

    # -- cache state ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Drop the cached feature: the next call runs the full network. Call it between sampling
        runs (the text-to-image pipeline does)."""
        self._feature: Tensor | None = None
        self._key: tuple[Any, ...] | None = None
        self._cond: Tensor | None = None
        self._last_t: Tensor | None = None
        self._since_full = 0

    def reset_counters(self) -> None:
        self.calls = self.full_calls = self.shallow_calls = 0

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    def _plan(self) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        """Flat lists of down ops (each produces one skip) and up ops (each consumes one skip)."""
        down: list[tuple[Any, ...]] = []
        for blk in self.unet.down_blocks:
            attns = getattr(blk, "attentions", None)
            for i, res in enumerate(blk.resnets):
                down.append(("layer", res, attns[i] if attns is not None else None))
            if blk.downsamplers is not None:
                down.append(("downsample", blk.downsamplers))
        up: list[tuple[Any, ...]] = []
        for j, blk in enumerate(self.unet.up_blocks):
            attns = getattr(blk, "attentions", None)
            last = len(blk.resnets) - 1
            final_block = j == len(self.unet.up_blocks) - 1
            for i, res in enumerate(blk.resnets):
                ups = blk.upsamplers if i == last else None
                up.append((res, attns[i] if attns is not None else None, ups, final_block))
        if len(up) != len(down) + 1:
            raise ValueError(
                f"unexpected UNet layout: {len(down) + 1} skip connections but {len(up)} up-path resnets"
            )
        return down, up

    def _cache_key(self, x: Tensor, cond: Tensor) -> tuple[Any, ...]:
        return (tuple(x.shape), x.dtype, x.device, tuple(cond.shape), cond.dtype)

    def _needs_full(self, x: Tensor, t: Tensor, cond: Tensor) -> bool:
        if self._feature is None or self._key != self._cache_key(x, cond):
            return True
        if self._last_t is not None and t.shape == self._last_t.shape and bool((t > self._last_t).any()):
            return True  # the model time went up: a new sampling run (or a restart) -- never reuse
        if cond is not self._cond and not torch.equal(cond, self._cond):  # type: ignore[arg-type]
            return True
        return self._since_full + 1 >= self.interval

    # -- the call -------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: Tensor, model_time: Tensor | float | int, cond: Tensor) -> Tensor:
        if not isinstance(cond, Tensor):
            raise TypeError("DeepCacheUNet is called as model(x, model_time, cond) with cond a tensor of text states")
        if cond.shape[0] != x.shape[0]:
            raise ValueError(f"cond has {cond.shape[0]} rows but x has {x.shape[0]}; they must be batch-aligned")
        dt = self.dtype
        x = x.to(dt)
        cond = cond.to(dt)
        t = torch.as_tensor(model_time, device=x.device)
        t_key = (t.reshape(-1).expand(x.shape[0]) if t.numel() == 1 else t.reshape(-1)).detach().float().clone()
        full = self._needs_full(x, t_key, cond)
        if full:
            out, feature = self._forward(x, model_time, cond, full=True)
            self._feature = feature
            self._key = self._cache_key(x, cond)
            self._cond = cond.detach().clone()
            self._since_full = 0
            self.full_calls += 1
        else:
            out, _ = self._forward(x, model_time, cond, full=False)
            self._since_full += 1
            self.shallow_calls += 1
        self._last_t = t_key
        self.calls += 1
        return out

    def forward_full(self, x: Tensor, model_time: Tensor | float | int, cond: Tensor) -> Tensor:
        """The whole network through this wrapper's walk (no caching): equals ``unet(x, t, cond)``."""
        with torch.no_grad():
            return self._forward(x.to(self.dtype), model_time, cond.to(self.dtype), full=True)[0]

    def _forward(self, x: Tensor, timestep: Any, ehs: Tensor, *, full: bool) -> tuple[Tensor, Tensor | None]:
        u = self.unet
        sample = 2 * x - 1.0 if u.config.center_input_sample else x
        # 1. time embedding, exactly as UNet2DConditionModel.forward (no class / added embeddings)
        t_emb = u.get_time_embed(sample=sample, timestep=timestep)
        emb = u.time_embedding(t_emb, None)
        if u.time_embed_act is not None:
            emb = u.time_embed_act(emb)
        ehs = u.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs={})
        up_factor = 2 ** u.num_upsamplers
        forward_upsample_size = any(d % up_factor != 0 for d in sample.shape[-2:])

        # 2. conv_in and the down path (all of it on a full call; up to skip `branch` otherwise)
        h = u.conv_in(sample)
        skips = [h]
        n_down = len(self._down_ops) if full else self.branch
        for op in self._down_ops[:n_down]:
            if op[0] == "layer":
                _, res, attn = op
                h = res(h, emb)
                if attn is not None:
                    h = attn(h, encoder_hidden_states=ehs, cross_attention_kwargs=None, attention_mask=None,
                             encoder_attention_mask=None, return_dict=False)[0]
            else:
                for ds in op[1]:
                    h = ds(h)
            skips.append(h)

        # 3. the deep part: mid block and the up layers above the cached branch
        start = self.n_skips - 1 - self.branch  # index of the first up op of the shallow path
        feature = None
        if full:
            if u.mid_block is not None:
                if getattr(u.mid_block, "has_cross_attention", False):
                    h = u.mid_block(h, emb, encoder_hidden_states=ehs, attention_mask=None,
                                    cross_attention_kwargs=None, encoder_attention_mask=None)
                else:
                    h = u.mid_block(h, emb)
            for k in range(start):
                h = self._up(k, h, skips, emb, ehs, forward_upsample_size)
            feature = h
        else:
            assert self._feature is not None
            h = self._feature
        # 4. the shallow up path
        for k in range(start, len(self._up_ops)):
            h = self._up(k, h, skips, emb, ehs, forward_upsample_size)

        # 5. post-process
        if u.conv_norm_out is not None:
            h = u.conv_act(u.conv_norm_out(h))
        return u.conv_out(h), feature

    def _up(self, k: int, h: Tensor, skips: list[Tensor], emb: Tensor, ehs: Tensor, fwd_size: bool) -> Tensor:
        res, attn, ups, final_block = self._up_ops[k]
        skip = skips[self.n_skips - 1 - k]
        h = res(torch.cat([h, skip], dim=1), emb)
        if attn is not None:
            h = attn(h, encoder_hidden_states=ehs, cross_attention_kwargs=None, attention_mask=None,
                     encoder_attention_mask=None, return_dict=False)[0]
        if ups is not None:
            size = skips[self.n_skips - 2 - k].shape[2:] if fwd_size and not final_block else None
            for up in ups:
                h = up(h, size)
        return h

    def __repr__(self) -> str:
        return (f"DeepCacheUNet(interval={self.interval}, branch={self.branch}/{self.n_skips - 1}, "
                f"full_calls={self.full_calls}, shallow_calls={self.shallow_calls})")
