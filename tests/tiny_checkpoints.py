"""Tiny randomly initialised diffusers checkpoints, built offline as diffusers' own fast tests do.

Every component is a real diffusers / transformers class with a tiny config and fixed-seed weights;
the tokenizer is a real ``CLIPTokenizer`` over a hand-written vocabulary and merge list (nothing is
downloaded). :func:`save_sd` writes a ``StableDiffusionPipeline`` folder, :func:`save_sd3` a
``StableDiffusion3Pipeline`` folder, each with diffusers' own ``save_pretrained``.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

WORDS = ("a", "red", "blue", "green", "circle", "square", "triangle", "big", "small", "on", "the", "blurry",
         "watermark", "photo", "of", "cat")
PAD = "<|endoftext|>"


def tiny_clip_tokenizer(max_length: int = 16, pad_token: str = PAD) -> Any:
    """A real CLIP BPE tokenizer: bos/eos, letters/digits (word-final and not) and merges that spell
    :data:`WORDS`. ``pad_token`` "!" reproduces SD 2.x's tokenizer, ``<|endoftext|>`` SD 1.x's."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for tok in ("<|startoftext|>", "<|endoftext|>", "!", "!</w>"):
        vocab[tok] = len(vocab)
    for c in string.ascii_lowercase + string.digits + ",.":
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    merges: list[tuple[str, str]] = []
    for w in WORDS:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        cur = parts[0]
        for p in parts[1:]:
            if (cur, p) not in merges:
                merges.append((cur, p))
            cur += p
            vocab.setdefault(cur, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, pad_token=pad_token)


def _clip_config(tokenizer: Any, hidden: int, layers: int = 2, projection_dim: int | None = None) -> Any:
    from transformers import CLIPTextConfig

    kw: dict[str, Any] = dict(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=layers, max_position_embeddings=tokenizer.model_max_length, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )
    if projection_dim is not None:
        kw["projection_dim"] = projection_dim
    return CLIPTextConfig(**kw)


def tiny_vae(seed: int = 0, shift_factor: float | None = None) -> Any:
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    kw: dict[str, Any] = {}
    if shift_factor is not None:
        kw["shift_factor"] = shift_factor
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=4, layers_per_block=1,
        sample_size=16, scaling_factor=0.6, **kw,
    ).eval()


def sd_components(prediction_type: str = "epsilon", scheduler: str = "DDIMScheduler",
                  pad_token: str = PAD, **sched_kw: Any) -> dict[str, Any]:
    """Components of a tiny SD 1.x/2.x pipeline (latents 4x8x8, images 16x16, CLIP width 32)."""
    import diffusers
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    tok = tiny_clip_tokenizer(pad_token=pad_token)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()
    torch.manual_seed(1)
    text_encoder = CLIPTextModel(_clip_config(tok, 32)).eval()
    sched_cfg = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type=prediction_type, **sched_kw)
    if scheduler == "DDIMScheduler":
        sched_cfg.setdefault("clip_sample", False)
    sched = getattr(diffusers, scheduler)(**sched_cfg)
    return {"unet": unet, "vae": tiny_vae(2), "text_encoder": text_encoder, "tokenizer": tok, "scheduler": sched,
            "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}


def save_sd(path: Path, **kw: Any) -> Any:
    """Save a tiny ``StableDiffusionPipeline`` to ``path`` (safetensors); returns the diffusers pipeline."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**sd_components(**kw))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe


def sd3_components(with_t5: bool = False, shift: float = 3.0, **sched_kw: Any) -> dict[str, Any]:
    """Components of a tiny SD3 pipeline (latents 4x8x8, patch 1, CLIP widths 16 + 16 = joint width 32, pooled 2 x 32);
    ``text_encoder_3`` is a tiny T5 when ``with_t5`` and ``None`` otherwise (as diffusers allows)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    tok = tiny_clip_tokenizer()
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=64, out_channels=4,
    ).eval()
    torch.manual_seed(1)
    te1 = CLIPTextModelWithProjection(_clip_config(tok, 16, projection_dim=32)).eval()
    torch.manual_seed(2)
    te2 = CLIPTextModelWithProjection(_clip_config(tok, 16, projection_dim=32)).eval()
    te3, tok3 = None, None
    if with_t5:
        te3, tok3 = tiny_t5()
    return {
        "transformer": transformer, "vae": tiny_vae(3, shift_factor=0.1),
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=shift, **sched_kw),
        "text_encoder": te1, "tokenizer": tok, "text_encoder_2": te2, "tokenizer_2": tiny_clip_tokenizer(),
        "text_encoder_3": te3, "tokenizer_3": tok3,
    }


def tiny_t5() -> tuple[Any, Any]:
    """A tiny T5 encoder (d_model 32, the SD3 joint width) and a T5 tokenizer built from a word-level
    unigram vocabulary (no sentencepiece download)."""
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [("\u2581" + w, -1.0 - i) for i, w in enumerate(WORDS)]
    vocab += [(c, -50.0) for c in string.ascii_lowercase + string.digits + ",.\u2581"]
    tok = T5TokenizerFast(vocab=vocab, extra_ids=0)
    torch.manual_seed(4)
    cfg = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    return T5EncoderModel(cfg).eval(), tok


def save_sd3(path: Path, **kw: Any) -> Any:
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**sd3_components(**kw))
    pipe.set_progress_bar_config(disable=True)
    pipe.save_pretrained(str(path), safe_serialization=True)
    return pipe
