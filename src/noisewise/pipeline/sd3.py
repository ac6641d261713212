"""SD3 prompt encoding: two CLIP encoders with projection plus an optional T5, as diffusers does.

For each prompt, ``StableDiffusion3Pipeline.encode_prompt`` builds

- ``encoder_hidden_states``: the *penultimate* hidden states of CLIP-1 and CLIP-2 (prompts padded to
  the tokenizer's ``model_max_length``, no attention mask) concatenated along features, zero-padded
  to the transformer's ``joint_attention_dim``, then concatenated along the sequence with T5's last
  hidden states (``max_sequence_length`` tokens) -- or with zeros of that shape when the folder has
  no T5 (``text_encoder_3`` null);
- ``pooled_projections``: CLIP-1's and CLIP-2's projected pooled outputs (``text_embeds``) side by side.

:class:`SD3TextEncoder` returns both as a dict, which noisewise's guidance batches like a tensor and
:meth:`noisewise.pipeline.Pipeline.model_fn` passes to the transformer as keyword arguments.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .embcache import DEFAULT_CACHE_BYTES, EmbeddingCache
from .loading import load_tokenizer, load_transformers_model, tokenizer_max_length

logger = logging.getLogger(__name__)
Tensor = torch.Tensor


class SD3TextEncoder:
    """Prompt encoder of an SD3 folder; ``encode(prompts)`` -> ``{"encoder_hidden_states": (B, L, joint),
    "pooled_projections": (B, P)}`` in float32, with an LRU cache keyed by prompt
    (:class:`~noisewise.pipeline.embcache.EmbeddingCache`, at most ``cache_size`` entries and
    ``cache_bytes`` bytes; ``cache_size=0`` turns it off). With T5 one prompt's states take about
    5 MB (333 tokens x 4096 floats), so the byte budget is what bounds the memory of a server.
    Prompts in :attr:`pinned_prompts` (the pipeline adds its default negative prompt) are never
    evicted.

    Args:
        clips: ``[(text_encoder_dir, tokenizer_dir), (text_encoder_2_dir, tokenizer_2_dir)]``.
        t5: ``(text_encoder_3_dir, tokenizer_3_dir)`` or ``None``.
        joint_attention_dim: the transformer's ``joint_attention_dim``.
        max_sequence_length: T5 tokens (diffusers' default 256); zeros of this length without T5.
    """

    def __init__(
        self, clips: Sequence[tuple[Path, Path]], t5: tuple[Path, Path] | None, *, joint_attention_dim: int,
        max_sequence_length: int = 256, tokenizer_classes: Sequence[str | None] = (None, None, None),
        cache_size: int = 256, cache_bytes: int = DEFAULT_CACHE_BYTES, device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(clips) != 2:
            raise ValueError(f"SD3 needs two CLIP encoders, got {len(clips)}")
        self.clips = [(Path(a), Path(b)) for a, b in clips]
        self.t5 = (Path(t5[0]), Path(t5[1])) if t5 is not None else None
        self.joint_attention_dim = int(joint_attention_dim)
        self.max_sequence_length = int(max_sequence_length)
        self.tokenizer_classes = list(tokenizer_classes)
        self.max_length = tokenizer_max_length(self.clips[0][1])
        self.device = torch.device(device)
        self.dtype = dtype
        self.cache_size = int(cache_size)
        self._models: list[Any] | None = None
        self._tokenizers: list[Any] = []
        self._cache = EmbeddingCache(0 if self.cache_size == 0 else int(cache_bytes), max_entries=self.cache_size)
        self.pinned_prompts: set[str] = set()
        self._lock = threading.RLock()

    @classmethod
    def from_folders(cls, parts: dict[str, Path | None], *, joint_attention_dim: int,
                     tokenizer_classes: dict[str, str | None], **kw: Any) -> SD3TextEncoder:
        clips = [(parts["text_encoder"], parts["tokenizer"]), (parts["text_encoder_2"], parts["tokenizer_2"])]
        t5 = None
        if parts.get("text_encoder_3") is not None:
            if parts.get("tokenizer_3") is None:
                raise ValueError("text_encoder_3 (T5) is present but tokenizer_3/ is missing")
            t5 = (parts["text_encoder_3"], parts["tokenizer_3"])
        classes = [tokenizer_classes.get(k) for k in ("tokenizer", "tokenizer_2", "tokenizer_3")]
        return cls(clips, t5, joint_attention_dim=joint_attention_dim, tokenizer_classes=classes, **kw)  # type: ignore[arg-type]

    # -- loading ------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._models is not None:
            return
        with self._lock:
            if self._models is not None:
                return
            models, toks = [], []
            for i, (enc, tok) in enumerate(self.clips):
                toks.append(load_tokenizer(tok, self.tokenizer_classes[i]))
                models.append(load_transformers_model(enc, "CLIPTextModelWithProjection", self.dtype, self.device))
            if self.t5 is not None:
                toks.append(load_tokenizer(self.t5[1], self.tokenizer_classes[2]))
                models.append(load_transformers_model(self.t5[0], "T5EncoderModel", self.dtype, self.device))
            self._tokenizers = toks
            self._models = models

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> SD3TextEncoder:
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        for m in self._models or []:
            m.to(device=self.device, dtype=self.dtype)
        self._cache.clear()
        return self

    # -- encoding -----------------------------------------------------------------------------
    def _ids(self, tokenizer: Any, prompts: list[str], max_length: int) -> Tensor:
        return tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def truncates(self, prompt: str) -> bool:
        """Whether CLIP (``max_length`` tokens) or T5 (``max_sequence_length``) truncates ``prompt``."""
        self._load()
        n = len(self._tokenizers[0]([prompt])["input_ids"][0])
        if n > self.max_length:
            return True
        if self.t5 is not None:
            return len(self._tokenizers[2]([prompt])["input_ids"][0]) > self.max_sequence_length
        return False

    @torch.no_grad()
    def encode_uncached(self, prompts: Sequence[str], *, warn: bool = True) -> dict[str, Tensor]:
        self._load()
        assert self._models is not None
        prompts = [str(p) for p in prompts]
        if warn:
            for p in prompts:
                if self.truncates(p):
                    logger.warning("prompt is longer than the text encoders take and was truncated: %r", p[:80])
        states, pooled = [], []
        for tok, model in zip(self._tokenizers[:2], self._models[:2]):
            out = model(self._ids(tok, prompts, self.max_length), output_hidden_states=True)
            states.append(out.hidden_states[-2].float())
            pooled.append(out.text_embeds.float())
        clip = torch.cat(states, dim=-1)
        if clip.shape[-1] > self.joint_attention_dim:
            raise ValueError(f"the CLIP states are {clip.shape[-1]} wide, more than the transformer's "
                             f"joint_attention_dim {self.joint_attention_dim}")
        clip = torch.nn.functional.pad(clip, (0, self.joint_attention_dim - clip.shape[-1]))
        if self.t5 is not None:
            t5 = self._models[2](self._ids(self._tokenizers[2], prompts, self.max_sequence_length))[0].float()
        else:
            t5 = torch.zeros(len(prompts), self.max_sequence_length, self.joint_attention_dim, device=clip.device)
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def encode(self, prompts: str | Sequence[str]) -> dict[str, Tensor]:
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        def encode(missing: list[Any]) -> list[dict[str, Tensor]]:
            states = self.encode_uncached(missing)
            return [{k: v[i] for k, v in states.items()} for i in range(len(missing))]

        rows = self._cache.fetch(prompts, encode, pinned=self.pinned_prompts)
        return {k: torch.stack([r[k] for r in rows]).clone() for k in rows[0]}  # type: ignore[index]

    def __call__(self, prompts: str | Sequence[str]) -> dict[str, Tensor]:
        return self.encode(prompts)

    def cache_info(self) -> dict[str, Any]:
        return self._cache.info()
