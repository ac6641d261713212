"""Continuous batching across requests: many samplers, one forward pass per tick.

Each request runs its own sampler (any sampler, step count, guidance, seed) in a worker thread
against a :class:`ForwardBatcher` instead of the network. The batcher collects the network calls
of all active requests — each call already carries per-sample model times, and a guided request's
call already holds both its branches — concatenates them along the batch dimension, runs the
network once, and hands every request its own rows back. Requests join and leave at any step.

Nothing in the solvers or the guidance knows about batching: they call ``model(x, t, *args)`` as
usual. A request's result equals running it alone, up to the network's own batch-size dependence
in floating point (none for per-row networks; ~1e-6 relative for convolution kernels that choose
a different algorithm per batch size).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

Tensor = torch.Tensor


class Cancelled(Exception):
    """Raised inside a request whose client went away; its slot is freed."""


@dataclass
class _Call:
    x: Tensor
    t: Tensor
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    done: threading.Event = field(default_factory=threading.Event)
    out: Tensor | None = None
    error: BaseException | None = None


def _signature(a: Any) -> Any:
    """What must agree between calls to share a forward: tensor trailing shapes/dtypes, the rest by value."""
    if isinstance(a, Tensor):
        return ("T", tuple(a.shape[1:]), a.dtype, a.device)
    if isinstance(a, dict):
        return tuple((k, _signature(v)) for k, v in sorted(a.items()))
    if isinstance(a, (list, tuple)):
        return (type(a).__name__,) + tuple(_signature(v) for v in a)
    return ("V", repr(a))


def _cat(items: list[Any]) -> Any:
    first = items[0]
    if isinstance(first, Tensor):
        return torch.cat(items)
    if isinstance(first, dict):
        return {k: _cat([it[k] for it in items]) for k in first}
    if isinstance(first, (list, tuple)):
        return type(first)(_cat([it[i] for it in items]) for i in range(len(first)))
    return first


class ForwardBatcher:
    """A drop-in network ``model(x, t, *args, **kwargs)`` that batches concurrent callers.

    Args:
        model: the real network.
        max_batch: most rows in one forward (calls are never split; a call larger than this runs alone).
        max_wait_s: how long a tick waits for active requests that have not yet asked (they are
            doing solver arithmetic, which takes microseconds; the wait bounds a slow straggler).
    """

    def __init__(self, model: Callable[..., Tensor], max_batch: int = 64, max_wait_s: float = 0.005) -> None:
        self.model = model
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._lock = threading.Condition()
        self._pending: list[_Call] = []
        self._active = 0
        self._closed = False
        self.forwards = 0
        self.rows = 0
        self.batch_sizes: deque[int] = deque(maxlen=100_000)  # recent forwards' rows (bounded for servers)
        self.on_forward: Callable[[int, float], None] | None = None  # metrics hook: (rows, seconds)
        self._thread = threading.Thread(target=self._loop, name="noisewise-batcher", daemon=True)
        self._thread.start()

    # -- request side -------------------------------------------------------------------------
    def join(self) -> None:
        """A request starts sampling (the batcher waits for its calls)."""
        with self._lock:
            self._active += 1

    def leave(self) -> None:
        with self._lock:
            self._active -= 1
            self._lock.notify_all()

    def __call__(self, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        call = _Call(x, t, args, kwargs)
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._pending.append(call)
            self._lock.notify_all()
        call.done.wait()
        if call.error is not None:
            raise call.error
        assert call.out is not None
        return call.out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=5)

    # -- batching loop ------------------------------------------------------------------------
    def _take(self) -> list[_Call]:
        """Wait until every active request has a call pending (or max_wait passed), then take a
        compatible group of at most max_batch rows."""
        with self._lock:
            while not self._pending and not self._closed:
                self._lock.wait()
            if self._closed and not self._pending:
                return []
            deadline = time.monotonic() + self.max_wait_s
            while len(self._pending) < self._active and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._lock.wait(left)
            first = self._pending[0]
            sig = (_signature(first.x), _signature(first.args), _signature(first.kwargs))
            group, rows = [], 0
            for c in list(self._pending):
                if (_signature(c.x), _signature(c.args), _signature(c.kwargs)) != sig:
                    continue
                n = c.x.shape[0]
                if group and rows + n > self.max_batch:
                    break
                group.append(c)
                rows += n
            for c in group:
                self._pending.remove(c)
            return group

    def _loop(self) -> None:
        while True:
            group = self._take()
            if not group:
                return
            try:
                x = torch.cat([c.x for c in group])
                t = torch.cat([c.t.reshape(-1).to(group[0].t.dtype) for c in group])
                args = _cat([c.args for c in group])
                kwargs = _cat([c.kwargs for c in group])
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = self.model(x, t, *args, **kwargs)
                seconds = time.perf_counter() - t0
                if hasattr(out, "sample") and not isinstance(out, Tensor):
                    out = out.sample
                elif isinstance(out, tuple):
                    out = out[0]
                self.forwards += 1
                self.rows += x.shape[0]
                self.batch_sizes.append(x.shape[0])
                if self.on_forward is not None:
                    self.on_forward(int(x.shape[0]), seconds)
                off = 0
                for c in group:
                    n = c.x.shape[0]
                    c.out = out[off:off + n]
                    off += n
            except BaseException as e:  # noqa: BLE001 - handed to every caller of this forward
                for c in group:
                    c.error = e
            for c in group:
                c.done.set()


_current = threading.local()


class RequestHandle:
    """A submitted request: ``result()`` waits for it, ``cancel()`` frees its slot at the next
    network call it makes."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self._cancel = threading.Event()
        self._value: Any = None
        self._error: BaseException | None = None
        self.started = threading.Event()
        self._callbacks: list[Callable[[RequestHandle], None]] = []
        self._cb_lock = threading.Lock()

    def add_done_callback(self, fn: Callable[[RequestHandle], None]) -> None:
        """Call ``fn(handle)`` when the request ends (at once if it already has), in the worker thread."""
        with self._cb_lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self)

    def _finish(self) -> None:
        with self._cb_lock:
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError("request still running")
        if self._error is not None:
            raise self._error
        return self._value


class BatchEngine:
    """Runs requests concurrently against one :class:`ForwardBatcher`.

    ``submit(fn)`` runs ``fn(model)`` in a worker thread, where ``model`` is the batching stand-in
    for the network; typically ``fn = lambda m: nw.sample(m, noise, schedule=..., ...)``. At most
    ``max_active`` requests sample at once (the rest wait in order).
    """

    def __init__(self, model: Callable[..., Tensor], *, max_batch: int = 64, max_active: int = 32,
                 max_wait_s: float = 0.005) -> None:
        self.batcher = _CancellableBatcher(model, max_batch=max_batch, max_wait_s=max_wait_s)
        self._slots = threading.Semaphore(max_active)
        self.max_active = max_active

    def submit(self, fn: Callable[[Callable[..., Tensor]], Any]) -> RequestHandle:
        handle = RequestHandle()

        def work() -> None:
            with self._slots:
                handle.started.set()
                _current.handle = handle
                self.batcher.join()
                try:
                    if handle.cancelled:
                        raise Cancelled("cancelled before it started")
                    handle._value = fn(self.batcher)
                except BaseException as e:  # noqa: BLE001 - delivered through result()
                    handle._error = e
                finally:
                    self.batcher.leave()
                    _current.handle = None
                    handle._finish()

        threading.Thread(target=work, name="noisewise-request", daemon=True).start()
        return handle

    def close(self) -> None:
        self.batcher.close()


class _CancellableBatcher(ForwardBatcher):
    def __call__(self, x: Tensor, t: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        h = getattr(_current, "handle", None)
        if h is not None and h.cancelled:
            raise Cancelled("request cancelled")
        return super().__call__(x, t, *args, **kwargs)
