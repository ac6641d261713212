"""Content-keyed LRU cache of text embeddings, bounded by a memory budget in bytes.

Keys are ``(encoder_id, prompt)`` where ``encoder_id`` fingerprints everything that changes the
states (weights, config, tokenizer, ``max_length``, dtype, quantization), so one cache can be
shared by several encoders safely. Pinned entries (the default negative prompt) are never evicted
and count against the budget like the rest.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Collection, Hashable, Sequence
from typing import Any

import torch

Tensor = torch.Tensor

DEFAULT_CACHE_BYTES = 128 * 2**20


Value = Tensor | dict[str, Tensor]  # one prompt's states (SD3: several named tensors)


def tensor_bytes(t: Value) -> int:
    if isinstance(t, dict):
        return sum(tensor_bytes(v) for v in t.values())
    return int(t.numel()) * int(t.element_size())


def _private_copy(t: Value) -> Value:
    if isinstance(t, dict):
        return {k: v.detach().clone() for k, v in t.items()}
    return t.detach().clone()


class EmbeddingCache:
    """Thread-safe LRU ``key -> tensor`` (or dict of tensors) bounded by ``max_bytes`` (``0`` disables it).

    ``hits`` / ``misses`` count lookups; ``evictions`` counts entries dropped for room. A tensor
    larger than the whole budget is not stored. Stored tensors are private copies (callers can
    edit what :meth:`get` returns)."""

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES, max_entries: int | None = None) -> None:
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
            raise ValueError(f"max_bytes must be an integer >= 0 (bytes; 0 disables the cache), got {max_bytes!r}")
        if max_entries is not None and max_entries < 0:
            raise ValueError(f"max_entries must be >= 0 or None, got {max_entries!r}")
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._lru: OrderedDict[Hashable, Value] = OrderedDict()
        self._pinned: dict[Hashable, Value] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0 and self.max_entries != 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._lru) + len(self._pinned)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._lru or key in self._pinned

    def lookup(self, keys: list[Hashable]) -> list[Value | None]:
        """The cached value for each key (None = miss); counts hits and misses, refreshes LRU order."""
        out: list[Value | None] = []
        with self._lock:
            for k in keys:
                t = self._pinned.get(k)
                if t is None:
                    t = self._lru.get(k)
                    if t is not None:
                        self._lru.move_to_end(k)
                if t is None:
                    self.misses += 1
                else:
                    self.hits += 1
                out.append(t)
        return out

    def fetch(self, keys: Sequence[Hashable], encode: Callable[[list[Hashable]], Sequence[Value]],
              pinned: Collection[Hashable] = ()) -> list[Value]:
        """Each key's value: from the cache where it is there, else from one ``encode(missing)`` call
        (each distinct missing key once, in order) whose results are stored. Keys in ``pinned`` are
        stored pinned, and pinned now if they were cached before they were asked to be."""
        found = self.lookup(list(keys))
        for k, v in zip(keys, found):
            if v is not None and k in pinned:
                self.pin(k)
        missing = list(dict.fromkeys(k for k, v in zip(keys, found) if v is None))
        fresh: dict[Hashable, Value] = {}
        if missing:
            values = encode(missing)
            if len(values) != len(missing):
                raise ValueError(f"encode returned {len(values)} values for {len(missing)} keys")
            for k, v in zip(missing, values):
                fresh[k] = v
                self.put(k, v, pin=k in pinned)
        return [v if v is not None else fresh[k] for k, v in zip(keys, found)]

    def put(self, key: Hashable, value: Value, *, pin: bool = False) -> None:
        """Store a private copy of ``value``; ``pin=True`` keeps it until :meth:`unpin`/:meth:`clear`."""
        if not self.enabled:
            return
        size = tensor_bytes(value)
        if size > self.max_bytes:
            return
        value = _private_copy(value)
        with self._lock:
            old = self._lru.pop(key, None)
            if old is not None:
                self._bytes -= tensor_bytes(old)
            oldp = self._pinned.pop(key, None)
            if oldp is not None:
                self._bytes -= tensor_bytes(oldp)
            if pin:
                self._pinned[key] = value
            else:
                self._lru[key] = value
            self._bytes += size
            self._evict()

    def pin(self, key: Hashable) -> bool:
        """Move a cached entry to the pinned set; False if it is not cached."""
        with self._lock:
            t = self._lru.pop(key, None)
            if t is None:
                return key in self._pinned
            self._pinned[key] = t
            return True

    def unpin(self, key: Hashable) -> None:
        with self._lock:
            t = self._pinned.pop(key, None)
            if t is not None:
                self._lru[key] = t
                self._evict()

    def _evict(self) -> None:
        while self._lru and (
            self._bytes > self.max_bytes or (self.max_entries is not None and len(self._lru) > self.max_entries)
        ):
            _, t = self._lru.popitem(last=False)
            self._bytes -= tensor_bytes(t)
            self.evictions += 1

    def clear(self) -> None:
        with self._lock:
            self._lru.clear()
            self._pinned.clear()
            self._bytes = 0

    def info(self) -> dict[str, Any]:
        with self._lock:
            return {
                "hits": self.hits, "misses": self.misses, "evictions": self.evictions,
                "size": len(self._lru) + len(self._pinned), "pinned": len(self._pinned),
                "bytes": self._bytes, "max_bytes": self.max_bytes, "max_size": self.max_entries,
            }
