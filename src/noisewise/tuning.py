"""Step schedules tuned for one model, sampler and budget: ``nw.tune_schedule`` and ``spacing="tuned"``.

Hand spacings (uniform lambda, Karras, time-quadratic ...) and published tables (Align Your Steps,
GITS, OptimalSteps) put the levels where they suit *some* model. :func:`tune_schedule` computes them
for *this* model, sampler and number of evaluations, from the model alone:

1. **Calibration noise.** ``batch`` draws of standard normal noise from a generator seeded with a
   value *derived* from ``seed`` (``derived_seed(seed)``), so the calibration draws are never the
   draws of a plain ``torch.Generator().manual_seed(k)`` that an evaluation uses. The result
   records ``seed``; :func:`evaluation_noise` refuses to draw evaluation noise with it.
2. **Reference.** One fine solve per calibration sample from the same first level to sigma = 0:
   ``reference_steps`` steps uniform in lambda, then four steps linear in the VE sigma ``rho`` from
   ``2 rho_min`` to ``rho_min`` (the cleanest trained level), by third-order LMS, whose last step
   integrates a polynomial in rho to rho = 0. That extrapolates the ODE below the cleanest trained
   level instead of stopping at its denoised value (``reference="denoise"``: the plain fine solve,
   which on an SD-like schedule sits ~0.01 from the exact ODE limit on the mixture benchmark).
3. **Start.** The levels of the hand spacings in ``start`` (``uniform_lambda``, ``time_quadratic``,
   ``karras``, ``exponential``, ``trailing`` on discrete schedules, ``linspace``), all anchored at
   the same first level; the one whose cheap solve lands closest to the reference is the start.
4. **Search.** The ``n - 1`` free levels (the first level and the final sigma = 0 stay put) are
   moved in half-log-SNR lambda to minimise the median per-sample L2 distance between the cheap
   solve's output and the reference. The levels are parametrised by their log-increments in lambda
   (softmax + cumulative sum over ``[lambda_first, lambda_max]``, so they stay sorted whatever the
   optimiser tries) and searched by adaptive Nelder-Mead from the start, until the simplex shrinks
   below 1e-3 or ``max_evals`` cheap solves are spent. ``method="coordinate"`` instead moves one
   level at a time between its neighbours (bounded Brent line searches) plus a global stretch move.

Every network call goes through a memo keyed by the bytes of its inputs, so a cheap solve whose
first ``k`` levels did not move re-uses their evaluations (moving level ``i`` costs ``n - i``
network calls, not ``n``). The cost is reported on the result (``seconds``, ``model_calls``,
``evaluations``).

Results are cached per (model identity, schedule, shift, sampler + options, steps, prediction
type, guidance) in memory, and on disk in a JSON file when ``cache_file=`` (or the environment
variable ``NOISEWISE_TUNED_CACHE``) names one; ``nw.sample(..., spacing="tuned")`` looks the same
key up. See ``docs/tuning.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import logging
import math
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from .core.grid import Grid
from .core.schedules import Schedule
from .core.spacing import get_spacing, lambda_range
from .models.denoiser import infer_model_dtype

Tensor = torch.Tensor
log = logging.getLogger(__name__)
_F64 = torch.float64

CACHE_ENV = "NOISEWISE_TUNED_CACHE"
# hand spacings tried as starting points ("trailing" only applies to discrete schedules)
START_SPACINGS: tuple[str, ...] = ("uniform_lambda", "time_quadratic", "karras", "exponential", "trailing", "linspace")
REFERENCE_SAMPLERS: dict[str, tuple[str, dict[str, Any]]] = {
    "extrapolate": ("lms", {"order": 3}),
    "denoise": ("unipc", {"order": 3}),
}
_MIN_GAP = 1e-3  # smallest distance in lambda between two tuned levels
_TAIL = 4  # reference: steps linear in rho from 2 rho_min to rho_min


# ------------------------------------------------------------------------------------------------
# the result
# ------------------------------------------------------------------------------------------------


class NoTunedSchedule(ValueError):
    """``spacing="tuned"`` found nothing cached for this model, sampler (and options) and budget;
    the attributes say what to tune."""

    def __init__(self, sampler: str, options: dict[str, Any], steps: int, nfe: int) -> None:
        self.sampler, self.options, self.steps, self.nfe = sampler, dict(options), steps, nfe
        opt_txt = "".join(f", {k}={v!r}" for k, v in options.items())
        super().__init__(
            f"no tuned schedule is cached for this model with sampler {sampler!r}{opt_txt} at {nfe} NFE "
            f"({steps} steps); call nw.tune_schedule(model, schedule=..., sampler={sampler!r}, nfe={nfe}, "
            f"shape=...{opt_txt}) first (same guidance settings), or load a cache file via "
            f"${CACHE_ENV}"
        )


@dataclass(frozen=True)
class TunedSchedule:
    """Model times tuned for one model, sampler and budget; pass it as ``nw.sample(spacing=...)``.

    The times are the final levels: the schedule's inference shift is already in them and is not
    applied again. ``sampler`` / ``sampler_options`` are what it was tuned for; ``nw.sample`` with no
    ``sampler=`` uses them. ``seed`` is the calibration seed (never evaluate with it).
    """

    model_times: tuple[float, ...]
    sampler: str
    sampler_options: dict[str, Any]
    steps: int
    nfe: int
    key: str
    schedule: str
    schedule_id: str
    shift: float
    seed: int
    batch: int
    start: str
    start_loss: float
    loss: float
    starts: dict[str, float] = field(default_factory=dict)
    evaluations: int = 0
    model_calls: int = 0
    seconds: float = 0.0
    reference_steps: int = 0

    shift_applied = True  # read by make_grid: these levels are final, do not shift them again

    def __len__(self) -> int:
        return len(self.model_times)

    def __getitem__(self, i: int) -> float:
        return self.model_times[i]

    def __iter__(self) -> Any:
        return iter(self.model_times)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        return np.asarray(self.model_times, dtype=np.float64 if dtype is None else dtype)

    def lams(self, schedule: Schedule) -> list[float]:
        """The half-log-SNR of each level on ``schedule``."""
        return schedule.lam(torch.tensor(self.model_times, dtype=_F64)).tolist()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["model_times"] = list(self.model_times)
        return d

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> TunedSchedule:
        known = {f for f in TunedSchedule.__dataclass_fields__}
        kw = {k: v for k, v in d.items() if k in known}
        kw["model_times"] = tuple(float(t) for t in kw["model_times"])
        return TunedSchedule(**kw)

    def __repr__(self) -> str:
        opts = "".join(f", {k}={v!r}" for k, v in self.sampler_options.items())
        return (f"TunedSchedule({self.sampler}{opts}, nfe={self.nfe}, loss {self.start_loss:.3g} -> {self.loss:.3g} "
                f"from {self.start!r}, model_times={[round(t, 4) for t in self.model_times]})")


# ------------------------------------------------------------------------------------------------
# identities and cache keys
# ------------------------------------------------------------------------------------------------

_MODULE_HASHES: weakref.WeakKeyDictionary[Any, tuple[tuple[int, ...], str]] = weakref.WeakKeyDictionary()


def _module_hash(m: torch.nn.Module) -> str:
    tensors = list(m.state_dict().items())
    versions = tuple(t._version for _, t in tensors)
    hit = _MODULE_HASHES.get(m)
    if hit is not None and hit[0] == versions:
        return hit[1]
    h = hashlib.sha256(f"{type(m).__module__}.{type(m).__qualname__}".encode())
    for name, t in tensors:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(_tensor_bytes(t))
    digest = h.hexdigest()[:24]
    _MODULE_HASHES[m] = (versions, digest)
    return digest


def _network_of(model: Any) -> torch.nn.Module | None:
    """The ``nn.Module`` behind ``model``: itself, the object of a bound method, or that object's
    ``.unet`` (noisewise's text-to-image ``Pipeline.model_fn``)."""
    target = model.__self__ if inspect.ismethod(model) else model
    if isinstance(target, torch.nn.Module):
        return target
    net = getattr(target, "unet", None) if inspect.ismethod(model) else None
    return net if isinstance(net, torch.nn.Module) else None


def model_identity(model: Any, model_id: str | None = None) -> tuple[str, bool]:
    """``(identity, stable)`` of a model for the cache: ``model_id`` when given, else the model's
    ``noisewise_model_id`` attribute; the hash of the weights (and class) of the ``nn.Module`` behind
    it (:func:`_network_of`), stable across processes and so usable in the cache file; otherwise
    the object's id (memory cache only, valid while the object lives)."""
    target = model.__self__ if inspect.ismethod(model) else model
    suffix = "." + model.__func__.__name__ if inspect.ismethod(model) else ""
    given = model_id if model_id is not None else getattr(target, "noisewise_model_id", None)
    if isinstance(given, str) and given:
        return f"id:{given}{suffix}", True
    net = _network_of(model)
    if net is not None:
        kind = type(target).__qualname__ if net is not target else ""
        return f"module:{_module_hash(net)}:{kind}{suffix}", True
    name = getattr(target, "__qualname__", type(target).__qualname__)
    return f"object:{name}:{id(target):x}{suffix}", False


def schedule_fingerprint(schedule: Schedule) -> str:
    """A short hash of what the schedule computes: its class, range and lambda at 65 model times."""
    ts = torch.linspace(schedule.t_min, schedule.t_max, 65, dtype=_F64)
    lam = schedule.lam(ts)
    lam = torch.where(torch.isfinite(lam), lam, torch.sign(lam) * 1e9)
    text = f"{type(schedule).__name__}|{schedule.t_min:.9g}|{schedule.t_max:.9g}|" + ",".join(
        f"{v:.9g}" for v in lam.tolist()
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _canon(v: Any) -> Any:
    if isinstance(v, Tensor):
        return [round(float(x), 12) for x in v.detach().reshape(-1).tolist()]
    if isinstance(v, float):
        return round(v, 12)
    if isinstance(v, Mapping):
        return {str(k): _canon(x) for k, x in sorted(v.items(), key=lambda kv: str(kv[0]))}
    if isinstance(v, (list, tuple)):
        return [_canon(x) for x in v]
    if v is None or isinstance(v, (int, str, bool)):
        return v
    return repr(v)


def cache_key(
    identity: str,
    schedule: Schedule,
    shift: float,
    sampler: str,
    sampler_options: Mapping[str, Any],
    steps: int,
    prediction_type: str | None,
    guidance_scale: Any = None,
    guidance: Any = None,
) -> str:
    """The cache key of a tuned schedule (a hex digest)."""
    parts = {
        "model": identity,
        "schedule": schedule_fingerprint(schedule),
        "shift": round(float(shift), 12),
        "sampler": sampler,
        "options": _canon(dict(sampler_options)),
        "steps": int(steps),
        "prediction_type": prediction_type,
        "guidance_scale": _canon(guidance_scale),
        "guidance": _canon(guidance),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


class _StrongRef:
    def __init__(self, obj: Any) -> None:
        self.obj = obj

    def __call__(self) -> Any:
        return self.obj


class _Cache:
    """In-memory tuned schedules by key (entries for unstable identities hold a weak reference to
    the model so a recycled ``id`` cannot return another model's schedule)."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[TunedSchedule, Any]] = {}

    def get(self, key: str, model: Any) -> TunedSchedule | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        tuned, ref = hit
        if ref is not None:
            target = model.__self__ if inspect.ismethod(model) else model
            if ref() is not target:
                del self.entries[key]
                return None
        return tuned

    def put(self, key: str, tuned: TunedSchedule, model: Any, stable: bool) -> None:
        ref = None
        if not stable:
            target = model.__self__ if inspect.ismethod(model) else model
            try:
                ref = weakref.ref(target)
            except TypeError:  # not weak-referenceable: keep it alive with the entry instead
                ref = _StrongRef(target)
        self.entries[key] = (tuned, ref)

    def clear(self) -> None:
        self.entries.clear()


_MEMORY = _Cache()


def clear_cache() -> None:
    """Forget every tuned schedule held in memory (files are left alone)."""
    _MEMORY.clear()


def default_cache_file() -> Path:
    """``$NOISEWISE_TUNED_CACHE``, else ``$XDG_CACHE_HOME/noisewise/tuned_schedules.json`` (XDG
    default ``~/.cache``): where ``noisewise tune-schedule`` writes and ``spacing="tuned"`` reads."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "noisewise" / "tuned_schedules.json"


def _cache_path(cache_file: str | os.PathLike[str] | None) -> Path | None:
    """Where tune_schedule writes: ``cache_file``, else ``$NOISEWISE_TUNED_CACHE``, else nowhere."""
    if cache_file is not None:
        return Path(cache_file)
    env = os.environ.get(CACHE_ENV)
    return Path(env) if env else None


def _read_file(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        log.warning("ignoring unreadable tuned-schedule cache %s: %s", path, e)
        return {}
    return data if isinstance(data, dict) else {}


def _write_file(path: Path, key: str, tuned: TunedSchedule) -> None:
    data = _read_file(path)
    data[key] = tuned.to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(tmp, path)


def lookup(
    key: str, model: Any, stable: bool, cache_file: str | os.PathLike[str] | None = None
) -> TunedSchedule | None:
    """A cached tuned schedule for ``key``: memory first, then (stable identities only) the cache
    file ``cache_file`` or :func:`default_cache_file`."""
    hit = _MEMORY.get(key, model)
    if hit is not None:
        return hit
    path = Path(cache_file) if cache_file is not None else default_cache_file()
    if stable and path.is_file():
        d = _read_file(path).get(key)
        if d is not None:
            tuned = TunedSchedule.from_dict(d)
            _MEMORY.put(key, tuned, model, stable)
            return tuned
    return None


# ------------------------------------------------------------------------------------------------
# noise
# ------------------------------------------------------------------------------------------------


def derived_seed(seed: int) -> int:
    """The generator seed of the calibration noise for ``seed``: a hash, so calibration draws are
    never the draws of ``torch.Generator().manual_seed(k)`` used for evaluation."""
    return int.from_bytes(hashlib.sha256(f"noisewise-calibration:{int(seed)}".encode()).digest()[:8], "little") >> 1


def calibration_noise(seed: int, batch: int, shape: Sequence[int], dtype: torch.dtype = torch.float32,
                      device: Any = None) -> Tensor:
    """The calibration noise :func:`tune_schedule` uses for ``seed``."""
    g = torch.Generator().manual_seed(derived_seed(seed))
    return torch.randn(batch, *shape, generator=g, dtype=_F64).to(device=device, dtype=dtype)


def evaluation_noise(tuned: TunedSchedule | Sequence[TunedSchedule], n: int, shape: Sequence[int], seed: int,
                     dtype: torch.dtype = torch.float64) -> Tensor:
    """Evaluation noise drawn with ``torch.Generator().manual_seed(seed)``; refuses a ``seed`` that
    any of the given tuned schedules was calibrated with."""
    for t in [tuned] if isinstance(tuned, TunedSchedule) else list(tuned):
        if int(seed) == int(t.seed):
            raise ValueError(
                f"evaluation seed {seed} is the calibration seed of {t!r}; evaluate on a different seed"
            )
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, *shape, generator=g, dtype=_F64).to(dtype)


# ------------------------------------------------------------------------------------------------
# the memo around the network
# ------------------------------------------------------------------------------------------------


def _tensor_bytes(t: Tensor) -> bytes:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _digest_into(h: Any, v: Any) -> None:
    if isinstance(v, Tensor):
        h.update(f"T{tuple(v.shape)}{v.dtype}".encode())
        h.update(_tensor_bytes(v))
    elif isinstance(v, Mapping):
        for k in sorted(v, key=str):
            h.update(f"K{k}".encode())
            _digest_into(h, v[k])
    elif isinstance(v, (list, tuple)):
        h.update(b"L")
        for x in v:
            _digest_into(h, x)
    else:
        h.update(repr(v).encode())


class _Memo:
    """Calls ``fn`` once per distinct input (by the bytes of its tensors); LRU of ``capacity``."""

    def __init__(self, fn: Callable[..., Any], capacity: int) -> None:
        self.fn = fn
        self.capacity = capacity
        self.store: OrderedDict[bytes, Any] = OrderedDict()
        self.calls = 0
        self.hits = 0
        sig = None
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            pass
        self.__signature__ = sig  # so callers that inspect the model see the wrapped signature

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        h = hashlib.blake2b(digest_size=20)
        _digest_into(h, args)
        _digest_into(h, kwargs)
        k = h.digest()
        if k in self.store:
            self.store.move_to_end(k)
            self.hits += 1
            return self.store[k].clone()  # a copy: the caller may work in place
        out = self.fn(*args, **kwargs)
        if hasattr(out, "sample") and not isinstance(out, Tensor):  # diffusers output objects
            out = out.sample
        elif isinstance(out, tuple):
            out = out[0]
        self.calls += 1
        if isinstance(out, Tensor):
            self.store[k] = out.clone()
            if len(self.store) > self.capacity:
                self.store.popitem(last=False)
        return out


# ------------------------------------------------------------------------------------------------
# tuning
# ------------------------------------------------------------------------------------------------


def _resolve_sampler(schedule: Schedule, sampler: str | None, nfe: int | None, steps: int | None,
                     options: dict[str, Any]) -> tuple[str, dict[str, Any], int, int]:
    from .sampling import recommended
    from .solvers.base import get_sampler

    if nfe is not None and steps is not None:
        raise ValueError("give nfe= or steps=, not both")
    for name, v in (("nfe", nfe), ("steps", steps)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if sampler is None:
        name, defaults, _ = recommended(schedule, nfe if nfe is not None else steps)
        options = {**defaults, **options}
    else:
        name = sampler
    spec = get_sampler(name)  # ValueError with a closest-match hint for unknown names
    if spec.stochastic or options.get("eta", 0):
        raise ValueError(
            f"sampler {name!r} is stochastic; tune a deterministic sampler (e.g. 'dpmpp_2m', 'unipc', 'dpm_solver')"
        )
    n = spec.steps_for_nfe(nfe) if nfe is not None else (20 if steps is None else steps)
    if n < 2 or (nfe is not None and nfe < 2):
        raise ValueError(
            f"a tuned schedule needs at least 2 model evaluations (nfe >= 2) so that a level can move; "
            f"got {'nfe=' + str(nfe) if nfe is not None else 'steps=' + str(steps)}"
        )
    return name, options, n, spec.nfe(n)


def _first_time(schedule: Schedule, anchor: str | None, n: int, shift: float, prediction_type: str | None,
                denoiser_given: bool) -> float:
    from .core.spacing import apply_shift

    name = anchor or schedule.default_spacing
    ts = apply_shift(schedule, torch.as_tensor(get_spacing(name)(schedule, n), dtype=_F64), shift)
    t0 = float(ts[0])
    if float(schedule.alpha(t0)) == 0.0 and not denoiser_given and prediction_type == "epsilon":
        t0 = float(schedule.inverse_lambda(torch.tensor([lambda_range(schedule)[0]], dtype=_F64))[0])
    return t0


def _start_lams(schedule: Schedule, name: str, n: int, shift: float, lam0: float, lo: float, hi: float) -> list[float]:
    """Levels 1..n-1 of a hand spacing (after shift) in lambda, clipped into (lo, hi], strictly increasing."""
    from .core.spacing import apply_shift

    ts = apply_shift(schedule, torch.as_tensor(get_spacing(name)(schedule, n), dtype=_F64), shift)
    lam = schedule.lam(ts).tolist()[1:]
    out: list[float] = []
    prev = lo
    for i, v in enumerate(lam):
        room = hi - _MIN_GAP * (len(lam) - 1 - i)
        v = min(max(v if math.isfinite(v) else lo, prev + _MIN_GAP), room)
        out.append(v)
        prev = v
    return out


def tune_schedule(
    model: Callable[..., Tensor] | None = None,
    *,
    schedule: Schedule,
    sampler: str | None = None,
    nfe: int | None = None,
    steps: int | None = None,
    shape: Sequence[int] | None = None,
    batch: int = 64,
    seed: int = 0,
    spacing: str | None = None,
    start: Sequence[str] = START_SPACINGS,
    prediction_type: str | None = None,
    denoiser: Callable[..., Tensor] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    model_dtype: torch.dtype | None = None,
    dtype: torch.dtype | None = None,
    device: Any = None,
    shift: float | None = None,
    image_seq_len: int | None = None,
    cond: Any = None,
    uncond: Any = None,
    negative: Any = None,
    guidance_scale: float | Tensor | None = None,
    guidance: Any = None,
    reference_steps: int = 200,
    reference: Literal["extrapolate", "denoise"] = "extrapolate",
    max_evals: int | None = None,
    tol: float = 1e-3,
    objective: Literal["median", "mean"] = "median",
    method: Literal["nelder-mead", "coordinate"] = "nelder-mead",
    model_id: str | None = None,
    cache: bool = True,
    cache_file: str | os.PathLike[str] | None = None,
    force: bool = False,
    **sampler_options: Any,
) -> TunedSchedule:
    """Optimise where the ``nfe`` levels sit for this model, sampler and budget (module docstring).

    Args:
        model: ``model(x, model_time, ...)`` returning its raw prediction (``prediction_type``), as
            for :func:`noisewise.sample`; or pass ``denoiser=D`` with ``D(x, level) -> x0``.
        schedule: the model's training schedule.
        sampler / **sampler_options: the sampler it is tuned for (default: the recommended one).
        nfe / steps: the budget (``nfe >= 2``).
        shape: the shape of one sample (e.g. ``(4, 32, 32)``); required.
        batch / seed: calibration noise: ``batch`` samples from :func:`calibration_noise` (``seed``).
            Never evaluate with the same ``seed`` (:func:`evaluation_noise` enforces it).
        spacing: the hand spacing whose first level the tuned schedule keeps (default: the
            recommended spacing for the budget); ``start``: hand spacings tried as starting points.
        dtype / device: of the calibration noise (default float32, the model's device).
        cond, uncond, negative, guidance_scale, guidance: as for :func:`noisewise.sample` (cond and
            uncond batch-aligned with the calibration batch, or batch 1).
        reference_steps / reference: the fine reference solve: ``'extrapolate'`` (default; LMS-3,
            extrapolated below the cleanest trained level to sigma = 0) or ``'denoise'`` (UniPC-3,
            ending with the denoised value at the cleanest level); see :func:`reference_grid`.
        max_evals: at most this many cheap solves in the search (default ``25 * steps + 50``).
        tol: relative loss tolerance of the search.
        objective: the median (default) or mean over calibration samples of the L2 distance.
        method: ``'nelder-mead'`` (default) or ``'coordinate'`` (module docstring).
        model_id: a name for the model in the cache (default: weight hash for ``nn.Module``s).
        cache / cache_file / force: look up and store the result in memory (and the JSON file
            ``cache_file`` or ``$NOISEWISE_TUNED_CACHE``); ``force`` re-tunes even on a hit.

    Returns a :class:`TunedSchedule` usable as ``nw.sample(..., spacing=tuned)``; afterwards
    ``spacing="tuned"`` finds it by the same key.
    """
    from .sampling import sample

    t_start = time.perf_counter()
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule must be a noisewise Schedule (e.g. nw.Schedule.from_diffusers(cfg)), got "
                        f"{type(schedule).__name__}")
    fn = denoiser if denoiser is not None else model
    if fn is None or not callable(fn):
        raise ValueError("pass a model (model(x, model_time, ...) -> raw prediction) or denoiser=D(x, level)")
    if shape is None:
        raise ValueError("pass shape= the shape of one sample, e.g. shape=(4, 32, 32) for 4-channel 32x32 latents")
    shape = tuple(int(s) for s in shape)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be an integer >= 1, got {batch!r}")
    if isinstance(reference_steps, bool) or not isinstance(reference_steps, int) or reference_steps < 16:
        raise ValueError(f"reference_steps must be an integer >= 16, got {reference_steps!r}")
    if reference not in REFERENCE_SAMPLERS:
        raise ValueError(f"reference must be 'extrapolate' or 'denoise', got {reference!r}")
    if objective not in ("median", "mean"):
        raise ValueError(f"objective must be 'median' or 'mean', got {objective!r}")
    if method not in ("nelder-mead", "coordinate"):
        raise ValueError(f"method must be 'nelder-mead' or 'coordinate', got {method!r}")
    name, opts, n, nfe_total = _resolve_sampler(schedule, sampler, nfe, steps, dict(sampler_options))
    from .sampling import _check_options
    from .solvers.base import get_sampler

    _check_options(get_sampler(name), opts)
    pt = None if denoiser is not None else (prediction_type or schedule.prediction_type)
    s = schedule.shift_for(image_seq_len) if shift is None else float(shift)
    identity, stable = model_identity(fn, model_id)
    key = cache_key(identity, schedule, s, name, opts, n, pt, guidance_scale, guidance)
    if cache and not force:
        hit = lookup(key, fn, stable, cache_file)
        if hit is not None:
            log.info("tuned schedule cache hit %s", key)
            return hit

    net_module = _network_of(fn)
    if device is None and net_module is not None:
        device = next((p.device for p in net_module.parameters()), None)
    noise = calibration_noise(seed, batch, shape, dtype or torch.float32, device)
    memo = _Memo(fn, capacity=max(256, 8 * n))
    common: dict[str, Any] = dict(
        schedule=schedule, cond=cond, uncond=uncond, negative=negative, guidance_scale=guidance_scale,
        guidance=guidance,
    )
    if denoiser is not None:
        common["denoiser"] = memo
        net = None
    else:
        common.update(prediction_type=pt, model_kwargs=model_kwargs,
                      model_dtype=model_dtype if model_dtype is not None else infer_model_dtype(fn))
        net = memo

    lam_hi = lambda_range(schedule)[1]
    t0 = _first_time(schedule, spacing or _recommended_spacing(schedule, nfe_total), n, s, pt, denoiser is not None)
    lam0 = float(schedule.lam(t0))
    lo = _lowest_free_lam(schedule, lam0, s)
    if not lo < lam_hi - _MIN_GAP * n:
        raise ValueError(f"the first level (model time {t0:g}) leaves no room for {n} levels on this schedule")

    def times_of(lams: Sequence[float]) -> list[float]:
        rest = schedule.inverse_lambda(torch.tensor(list(lams), dtype=_F64)).tolist()
        return [t0, *rest]

    ref_name, ref_opts = REFERENCE_SAMPLERS[reference]
    ref_grid = reference_grid(schedule, t0, reference_steps, reference, shift=s)
    ref = sample(net, noise, sampler=ref_name, grid=ref_grid, **common, **ref_opts)
    memo.store.clear()

    evals = [0]

    def loss(lams: Sequence[float]) -> float:
        evals[0] += 1
        try:
            grid = Grid.from_model_times(schedule, times_of(lams))
            x = sample(net, noise, sampler=name, grid=grid, **common, **opts)
        except (ValueError, FloatingPointError) as e:
            log.debug("candidate rejected: %s", e)
            return math.inf
        err = (x.to(_F64) - ref.to(_F64)).reshape(batch, -1).norm(dim=1)
        v = float(err.median()) if objective == "median" else float(err.mean())
        return v if math.isfinite(v) else math.inf

    # start: the best hand spacing, anchored at t0
    starts: dict[str, float] = {}
    best_name, best_lams, best = "", [], math.inf
    candidates = list(dict.fromkeys([*(([spacing]) if spacing else []), *start]))
    for sp in candidates:
        try:
            lams = _start_lams(schedule, sp, n, s, lam0, lo, lam_hi)
        except ValueError as e:
            log.debug("start spacing %s skipped: %s", sp, e)
            continue
        f = loss(lams)
        starts[sp] = f
        if f < best:
            best_name, best_lams, best = sp, lams, f
    if not best_lams:
        raise ValueError(f"no start spacing gives a finite result for sampler {name!r}; tried {candidates}")
    start_loss = best
    budget = 25 * n + 50 if max_evals is None else int(max_evals)
    if method == "coordinate":
        lams, f = _search(loss, list(best_lams), best, lo, lam_hi, budget, tol, evals)
    else:
        lams, f = _search_nelder_mead(loss, list(best_lams), best, lo, lam_hi, budget, tol, evals)

    tuned = TunedSchedule(
        model_times=tuple(times_of(lams)), sampler=name, sampler_options=dict(opts), steps=n, nfe=nfe_total,
        key=key, schedule=repr(schedule), schedule_id=schedule_fingerprint(schedule), shift=s, seed=int(seed),
        batch=batch, start=best_name,
        start_loss=start_loss, loss=f, starts=starts, evaluations=evals[0], model_calls=memo.calls,
        seconds=time.perf_counter() - t_start, reference_steps=reference_steps,
    )
    log.info("tuned %s in %.1f s (%d solves, %d model calls): loss %.4g -> %.4g",
             name, tuned.seconds, tuned.evaluations, tuned.model_calls, start_loss, f)
    if cache:
        _MEMORY.put(key, tuned, fn, stable)
        path = _cache_path(cache_file)
        if path is not None:
            if stable:
                _write_file(path, key, tuned)
            else:
                log.warning("not writing %s: the model has no stable identity (pass model_id= or an nn.Module)", path)
    return tuned


def _lowest_free_lam(schedule: Schedule, lam0: float, shift: float) -> float:
    """Lower bound in lambda of the levels after the first: the first level's own lambda, or where
    that is -inf (alpha = 0), the schedule's noisiest finite level, shifted."""
    if math.isfinite(lam0):
        return lam0
    lam_lo, lam_hi = lambda_range(schedule)
    return min(lam_lo - math.log(shift), lam_hi - 1.0)


def reference_grid(schedule: Schedule, first_time: float, steps: int = 200, reference: str = "extrapolate",
                   shift: float = 1.0) -> Grid:
    """The grid of the fine reference solve from ``first_time`` (run it with
    ``REFERENCE_SAMPLERS[reference]``): see :func:`_reference_lams`."""
    if reference not in REFERENCE_SAMPLERS:
        raise ValueError(f"reference must be one of {sorted(REFERENCE_SAMPLERS)}, got {reference!r}")
    lam0 = float(schedule.lam(first_time))
    lo, hi = _lowest_free_lam(schedule, lam0, shift), lambda_range(schedule)[1]
    rest = schedule.inverse_lambda(torch.tensor(_reference_lams(lo, hi, lam0, steps, reference), dtype=_F64))
    return Grid.from_model_times(schedule, [float(first_time), *rest.tolist()])


def _reference_lams(lo: float, hi: float, lam0: float, steps: int, reference: str) -> list[float]:
    """Levels 1.. of the reference grid in lambda. ``'denoise'``: uniform in lambda up to the
    cleanest trained level (the last step returns the denoised sample there). ``'extrapolate'``: the
    same up to twice the cleanest VE sigma ``rho_min``, then 4 steps linear in rho down to rho_min,
    so that the last step of third-order LMS (a quadratic in rho through the last three nodes,
    integrated to rho = 0) extrapolates the ODE from nodes spaced on the scale of the step it takes."""
    n_main = steps if reference == "denoise" else steps - _TAIL
    top = hi if reference == "denoise" else hi - math.log(2.0)
    if reference == "extrapolate" and not top > lo + 1.0:
        top, n_main = hi, steps  # too short a range for the tail
    extra = 0 if math.isfinite(lam0) else 1  # the first level (alpha = 0) is not on the lambda line
    lams = torch.linspace(lo, top, n_main + extra, dtype=_F64)[1:].tolist()
    if top < hi:
        rho_min = math.exp(-hi)
        lams += [-math.log(r) for r in torch.linspace(2 * rho_min, rho_min, _TAIL + 1, dtype=_F64)[1:].tolist()]
    return lams


def _recommended_spacing(schedule: Schedule, nfe: int) -> str:
    from .sampling import recommended

    return recommended(schedule, nfe)[2] or schedule.default_spacing


def _search(loss: Callable[[Sequence[float]], float], lams: list[float], f: float, lo: float, hi: float,
            budget: int, tol: float, evals: list[int]) -> tuple[list[float], float]:
    """Coordinate descent in lambda (bounded Brent per level, between its neighbours) plus global
    stretch moves, until a sweep gains less than ``tol`` (relative) or ``budget`` solves are spent."""
    from scipy.optimize import minimize_scalar

    m = len(lams)
    start_evals = evals[0]

    def spent() -> bool:
        return evals[0] - start_evals >= budget

    while not spent():
        f_sweep = f
        for i in range(m):
            if spent():
                break
            a = (lams[i - 1] if i > 0 else lo) + _MIN_GAP
            b = lams[i + 1] - _MIN_GAP if i < m - 1 else hi
            if not b > a:
                continue
            trial = list(lams)

            def g(v: float, i: int = i, trial: list[float] = trial) -> float:
                trial[i] = v
                return loss(trial)

            xatol = max(1e-3, 0.01 * (b - a))
            r = minimize_scalar(g, bounds=(a, b), method="bounded", options={"xatol": xatol, "maxiter": 16})
            if r.fun < f:
                lams[i], f = float(r.x), float(r.fun)
        # global move: stretch all free levels towards one end (power warp of their positions)
        if not spent() and m > 1:
            base = list(lams)

            def warp(p: float, base: list[float] = base) -> list[float]:
                return [lo + (v - lo) * ((v - lo) / (hi - lo)) ** p if v > lo else v for v in base]

            def gw(p: float) -> float:
                w = warp(p)
                if any(not b > a for a, b in zip([lo, *w], w)):
                    return math.inf
                return loss(w)

            r = minimize_scalar(gw, bounds=(-0.3, 0.3), method="bounded", options={"xatol": 0.01, "maxiter": 10})
            if r.fun < f:
                lams, f = warp(float(r.x)), float(r.fun)
        if not f < f_sweep * (1 - tol):
            break
    return lams, f


_SIMPLEX_STEP = 0.5  # initial simplex: each log-increment moved by 0.5 (increments x 1.65)


def _search_nelder_mead(loss: Callable[[Sequence[float]], float], lams: list[float], f: float, lo: float, hi: float,
                  budget: int, tol: float, evals: list[int]) -> tuple[list[float], float]:
    """Nelder-Mead (adaptive) on the log-increments of the levels (sorted by construction)."""
    from scipy.optimize import minimize

    span = hi - lo
    inc = np.diff(np.array([lo, *lams, hi]))
    inc = np.maximum(inc, 1e-3 * span)
    theta0 = np.log(inc[:-1] / inc[-1])

    def to_lams(th: np.ndarray) -> list[float]:
        e = np.exp(np.clip(np.concatenate([th, [0.0]]), -30, 30))
        c = np.cumsum(e / e.sum())[:-1]
        return (lo + span * c).tolist()

    best = [f, list(lams)]

    def obj(th: np.ndarray) -> float:
        lm = to_lams(th)
        if any(not b - a > _MIN_GAP / 2 for a, b in zip([lo, *lm], lm)):
            return math.inf
        v = loss(lm)
        if v < best[0]:
            best[0], best[1] = v, lm
        return v

    k = len(theta0)
    simplex = np.vstack([theta0, theta0 + _SIMPLEX_STEP * np.eye(k)])
    opts = {"maxfev": budget, "xatol": 1e-3, "fatol": tol * f, "adaptive": True, "initial_simplex": simplex}
    minimize(obj, theta0, method="Nelder-Mead", options=opts)
    return best[1], best[0]


# ------------------------------------------------------------------------------------------------
# sample(..., spacing="tuned" | TunedSchedule)
# ------------------------------------------------------------------------------------------------


def is_tuned(spacing: Any) -> bool:
    """True for ``"tuned"`` and for a :class:`TunedSchedule`."""
    return isinstance(spacing, TunedSchedule) or (isinstance(spacing, str) and spacing == "tuned")


def use_tuned(
    spacing: Any,
    *,
    model: Any,
    schedule: Schedule | None,
    sampler: str | None,
    sampler_options: dict[str, Any],
    steps: int | None,
    nfe: int | None,
    prediction_type: str | None,
    denoiser_given: bool,
    shift: float | None,
    image_seq_len: int | None,
    guidance_scale: Any,
    guidance: Any,
    model_id: str | None = None,
    cache_file: str | os.PathLike[str] | None = None,
) -> tuple[TunedSchedule, str | None, dict[str, Any]]:
    """What ``nw.sample`` does with ``spacing="tuned"`` or a :class:`TunedSchedule`: returns the
    schedule, the sampler and its options (the tuned ones when ``sampler`` is None)."""
    if schedule is None:
        raise ValueError("spacing='tuned' needs schedule= (the one the schedule was tuned on)")
    if isinstance(spacing, TunedSchedule):
        tuned = spacing
        if tuned.schedule_id != schedule_fingerprint(schedule):
            raise ValueError(f"this tuned schedule was tuned on {tuned.schedule}, not {schedule!r}; tune it again")
        if nfe is not None and nfe != tuned.nfe or steps is not None and steps != tuned.steps:
            raise ValueError(
                f"this tuned schedule has {tuned.steps} steps ({tuned.nfe} NFE); pass nfe={tuned.nfe} or none, or "
                "tune another with nw.tune_schedule(..., nfe=...)"
            )
        if sampler is None:
            return tuned, tuned.sampler, {**tuned.sampler_options, **sampler_options}
        if sampler != tuned.sampler or any(tuned.sampler_options.get(k) != v for k, v in sampler_options.items()):
            log.warning("schedule tuned for %s %s used with %s %s", tuned.sampler, tuned.sampler_options,
                        sampler, sampler_options)
        return tuned, sampler, sampler_options
    fn = model
    if fn is None:
        raise ValueError("spacing='tuned' needs the model (or denoiser=) the schedule was tuned for")
    name, opts, n, nfe_total = _resolve_sampler(schedule, sampler, nfe, steps, dict(sampler_options))
    pt = None if denoiser_given else (prediction_type or schedule.prediction_type)
    s = schedule.shift_for(image_seq_len) if shift is None else float(shift)
    identity, stable = model_identity(fn, model_id)
    key = cache_key(identity, schedule, s, name, opts, n, pt, guidance_scale, guidance)
    tuned = lookup(key, fn, stable, cache_file)
    if tuned is None:
        raise NoTunedSchedule(name, opts, n, nfe_total)
    return tuned, name, opts


# ------------------------------------------------------------------------------------------------
# command line: noisewise tune-schedule
# ------------------------------------------------------------------------------------------------

# calibration prompts: shapes captions from benchmark_prompts(seed=CALIBRATION_PROMPT_SEED + --seed); the
# evaluation benchmarks use seeds 20_000 (bench_models, bench_tuning) and 30_000 (training samples)
CALIBRATION_PROMPT_SEED = 40_000


def add_cli(sub: Any) -> argparse.ArgumentParser:
    """Add the ``tune-schedule`` subcommand to an argparse subparsers object."""
    p = sub.add_parser(
        "tune-schedule",
        help="optimise the step levels for a model, sampler and NFE (docs/tuning.md)",
        description="Optimise where the NFE levels sit for a text-to-image model and sampler, with the model's "
                    "default guidance, on calibration prompts and noise; store the result in a JSON cache file. "
                    "Sample with spacing='tuned' afterwards (the same sampler, NFE and guidance scale).",
    )
    p.add_argument("--model", default=None, help="shipped model name (shapes-vp, shapes-flow) or a model folder")
    p.add_argument("--sampler", default=None, help="sampler name (default: the model's default sampler)")
    p.add_argument("--nfe", type=int, required=True, help="model evaluations per sample, >= 2 (each counts "
                                                           "both guidance branches once)")
    p.add_argument("--order", type=int, default=None, help="the sampler's order option, where it has one")
    p.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (default: the model's)")
    p.add_argument("--batch", type=int, default=32, help="calibration samples (default 32)")
    p.add_argument("--seed", type=int, default=0, help="calibration seed (never evaluate with the same seed)")
    p.add_argument("--max-evals", type=int, default=None, help="at most this many cheap solves")
    p.add_argument("--cache-file", default=None,
                   help=f"JSON cache file (default ${CACHE_ENV}, else ~/.cache/noisewise/tuned_schedules.json)")
    p.set_defaults(func=cmd_tune_schedule)
    return p


def calibration_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` shapes captions for calibrating a text-to-image model (disjoint from the benchmark prompts)."""
    from .shapes.evaluator import benchmark_prompts

    return benchmark_prompts(n, seed=CALIBRATION_PROMPT_SEED + seed)


def cmd_tune_schedule(a: argparse.Namespace) -> int:
    """``noisewise tune-schedule``: tune for a text-to-image model and save to the cache file."""
    from .cli import UserError
    from .pipeline.t2i import Pipeline

    if a.nfe < 2:
        raise UserError(f"--nfe must be >= 2, got {a.nfe}")
    if a.model is None:
        from .pipeline.t2i import available_models

        names = ", ".join(available_models()) or "none installed"
        raise UserError(f"pass --model NAME_OR_FOLDER (shipped: {names})")
    try:
        pipe = Pipeline.from_pretrained(a.model)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(str(e)) from None
    sampler = a.sampler or pipe.defaults["sampler"]
    w = float(a.guidance_scale if a.guidance_scale is not None else pipe.defaults["guidance_scale"])
    prompts = calibration_prompts(a.batch, a.seed)
    cond = pipe.encode_prompt(prompts)
    uncond = pipe.encode_prompt([pipe.defaults["negative_prompt"]] * a.batch)
    opts = {} if a.order is None else {"order": a.order}
    path = Path(a.cache_file) if a.cache_file else default_cache_file()
    try:
        tuned = tune_schedule(pipe.model_fn, schedule=pipe.schedule, sampler=sampler, nfe=a.nfe,
                              shape=pipe.latent_shape, batch=a.batch, seed=a.seed, cond=cond, uncond=uncond,
                              guidance_scale=w, max_evals=a.max_evals, cache_file=path, force=True, **opts)
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    print(json.dumps({"cache_file": str(path), **tuned.to_dict()}, indent=1))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m noisewise.tuning --model ... --nfe 8``: the same as ``noisewise tune-schedule``."""
    import sys

    ap = argparse.ArgumentParser(prog="noisewise")
    sub = ap.add_subparsers(dest="command", required=True)
    add_cli(sub)
    from .cli import UserError

    args = ap.parse_args(["tune-schedule", *(sys.argv[1:] if argv is None else argv)])
    try:
        return int(args.func(args))
    except UserError as e:
        print(f"noisewise: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
