"""The generation service behind the HTTP API: model registry, admission, continuous batching, metrics.

One :class:`~noisewise.serving.BatchEngine` per loaded model: every request runs its own
``Pipeline.__call__`` (own sampler, steps, guidance, seed) in a worker thread whose network calls
go through the engine's batcher, so all active requests on a model share one UNet forward per tick.
Nothing here takes a file-system path from a request: models are looked up by name in the registry
the operator configured at start-up.
"""

from __future__ import annotations

import asyncio
import base64
import difflib
import io
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .. import limits

logger = logging.getLogger(__name__)


class ServiceError(Exception):
    """An error with an HTTP status and a message meant for the client."""

    status = 400

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        if status is not None:
            self.status = status


class QueueFull(ServiceError):
    status = 429


class Draining(ServiceError):
    status = 503


@dataclass
class ServerConfig:
    """Operator settings (command line), never taken from requests.

    Args:
        models: model names (or operator-given folders) the server may load; requests pick by name.
        preload: models loaded at start-up (``/readyz`` turns ready once they are); each must be one of
            ``models``. Default: the first model.
        max_active: requests sampling at once per model (they share forwards).
        max_queue: requests waiting for a slot, over all models; one more gets 429.
        max_batch: most rows in one network forward.
        max_steps / max_images / max_prompt_chars: per-request limits (422 beyond them).
        request_timeout_s: a request still running after this is cancelled (504).
        max_body_bytes: the JSON body without an init image; a body over ``body_limit`` (this plus
            the base64 length of ``max_image_bytes``) gets 413.
        max_image_bytes / max_image_pixels: image-to-image init images (the decoded PNG/JPEG file, and
            width x height read from its header before decoding); larger ones get 422.
        batching: False serves one request at a time per model (the baseline of the load test).
    """

    models: tuple[str, ...] = ("shapes-vp", "shapes-flow")
    preload: tuple[str, ...] | None = None
    max_active: int = 32
    max_queue: int = 64
    max_batch: int = 64
    max_wait_s: float = 0.005
    max_steps: int = 100
    max_images: int = 4
    max_prompt_chars: int = 300
    request_timeout_s: float = 120.0
    max_body_bytes: int = 16_384
    max_image_bytes: int = 2 * 1024 * 1024
    max_image_pixels: int = 2048 * 2048
    shutdown_grace_s: float = 30.0
    batching: bool = True
    device: str = "cpu"
    torch_threads: int | None = None  # intra-op threads (1 is best on a small, shared CPU)

    def __post_init__(self) -> None:
        """Every setting checked (:data:`noisewise.limits.SERVER_SETTINGS`): ValueError naming it and what
        it takes."""
        self.models = (self.models,) if isinstance(self.models, str) else tuple(self.models)
        p = self.preload
        self.preload = self.models[:1] if p is None else (p,) if isinstance(p, str) else tuple(p)
        if not self.models or not all(isinstance(m, str) and m for m in self.models):
            raise ValueError(f"models must name at least one model, got {self.models!r}")
        stray = [m for m in self.preload if m not in self.models]
        if stray:
            raise ValueError(f"preload names {', '.join(map(repr, stray))}, not among the models this server may "
                             f"load ({', '.join(self.models)}): add it to the models, or leave it out of preload")
        for name in limits.SERVER_SETTINGS:
            v = getattr(self, name)
            if not (name == "torch_threads" and v is None):
                setattr(self, name, limits.check_setting(name, v))

    @property
    def body_limit(self) -> int:
        """Largest accepted request body: the text fields plus a base64 init image of ``max_image_bytes``
        (with room for a ``data:image/...;base64,`` prefix)."""
        return int(self.max_body_bytes) + 4 * ((int(self.max_image_bytes) + 2) // 3) + 64


def _presets() -> dict[str, dict[str, Any]]:
    """The pipeline's latency/quality presets (noisewise.pipeline.presets; their pipeline-level
    optimizations are not applied per request) plus the server's seeded SDE preset."""
    from ..pipeline.presets import PRESETS as PIPELINE_PRESETS

    out: dict[str, dict[str, Any]] = {
        p.name: {"sampler": p.sampler, "steps": p.steps, "guidance_scale": p.guidance_scale,
                 "description": p.description}
        for p in PIPELINE_PRESETS.values()
    }
    out["stochastic"] = {"sampler": "dpmpp_2m_sde", "steps": 30, "guidance_scale": 2.0,
                         "description": "SDE sampler (seeded per image: reproducible)"}
    return out


PRESETS: dict[str, dict[str, Any]] = _presets()


def _closest(name: str, options: list[str]) -> str:
    hint = difflib.get_close_matches(name, options, n=1)
    return f"; did you mean {hint[0]!r}?" if hint else ""


def png_bytes(image: np.ndarray, meta: dict[str, Any] | None = None) -> bytes:
    """Encode one uint8 HWC image as PNG, with ``meta`` as JSON in a ``parameters`` text chunk."""
    import json

    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if meta is not None:
        info.add_text("parameters", json.dumps(meta))
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_b64(image: np.ndarray, meta: dict[str, Any] | None = None) -> str:
    return base64.b64encode(png_bytes(image, meta)).decode("ascii")


IMAGE_FORMATS = ("PNG", "JPEG")
_DATA_URL = ("data:image/png;base64,", "data:image/jpeg;base64,", "data:image/jpg;base64,")


@dataclass(frozen=True, eq=False)
class InitImage:
    """A decoded image-to-image init image: RGB uint8 ``pixels`` (H, W, 3) and what identifies it.

    ``sha256`` is the hash of the uploaded file's bytes (what ``sha256sum in.png`` prints);
    ``pixels_sha256`` the hash of the decoded RGB pixels (``hashlib.sha256(np.asarray(
    Image.open(f).convert("RGB")).tobytes())``), which is what the result depends on."""

    pixels: np.ndarray
    sha256: str
    pixels_sha256: str
    format: str
    nbytes: int

    @classmethod
    def of(cls, data: bytes, pixels: np.ndarray, fmt: str) -> InitImage:
        """The record of a file's bytes ``data`` decoded to RGB uint8 ``pixels`` (format ``fmt``)."""
        import hashlib

        pixels = np.ascontiguousarray(pixels)
        return cls(pixels, hashlib.sha256(data).hexdigest(), hashlib.sha256(pixels.tobytes()).hexdigest(), fmt,
                   len(data))

    @property
    def size(self) -> tuple[int, int]:
        return int(self.pixels.shape[1]), int(self.pixels.shape[0])

    def info(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "pixels_sha256": self.pixels_sha256, "format": self.format.lower(),
                "size": list(self.size), "bytes": self.nbytes}


def decode_init_image(text: str, *, max_bytes: int, max_pixels: int) -> InitImage:
    """Base64 PNG/JPEG (an optional ``data:image/png;base64,`` prefix is allowed) -> :class:`InitImage`.

    ValueError with what to do instead for bad base64, files that are not PNG/JPEG pictures, files over
    ``max_bytes`` and pictures over ``max_pixels`` (checked from the header, before decoding)."""
    import binascii

    s = text.strip()
    for prefix in _DATA_URL:
        if s[:len(prefix)].lower() == prefix:
            s = s[len(prefix):]
            break
    if not s:
        raise ValueError("image is empty: send a PNG or JPEG file base64-encoded (e.g. base64 -w0 in.png), "
                         "or leave image out for text-to-image")
    approx = len(s) // 4 * 3
    if approx > max_bytes + 3:
        raise ValueError(f"image is about {approx} bytes, over the limit of {max_bytes} bytes (GET /v1/limits); "
                         "send a smaller PNG/JPEG at the model's size (GET /v1/models)")
    try:
        data = base64.b64decode(s, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"image is not valid base64 ({e}); send the file's bytes base64-encoded "
                         "(standard alphabet, e.g. base64 -w0 in.png)") from None
    return decode_image_bytes(data, max_bytes=max_bytes, max_pixels=max_pixels)


def decode_image_bytes(data: bytes, *, max_bytes: int, max_pixels: int, what: str = "image",
                       where: str = " (GET /v1/limits)") -> InitImage:
    """A PNG/JPEG file's bytes -> :class:`InitImage` (ValueError naming ``what`` and the fix otherwise;
    ``where`` tells where the limits are listed)."""

    from PIL import Image, UnidentifiedImageError

    if len(data) > max_bytes:
        raise ValueError(f"{what} is {len(data)} bytes, over the limit of {max_bytes} bytes{where}; "
                         "send a smaller PNG/JPEG at the model's size")
    try:
        im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError):
        raise ValueError(f"{what} is not a PNG or JPEG picture (no image format recognises its bytes); "
                         "send a PNG or JPEG file") from None
    with im:
        if im.format not in IMAGE_FORMATS:
            raise ValueError(f"{what} is a {im.format} picture; send PNG or JPEG (convert it first)")
        w, h = im.size
        if w * h > max_pixels:
            raise ValueError(f"{what} is {w}x{h} = {w * h} pixels, over the limit of {max_pixels}{where}; "
                             "send it at the model's size")
        try:
            pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError, SyntaxError) as e:
            raise ValueError(f"{what} could not be decoded as {im.format} ({e}); send an intact PNG or "
                             "JPEG file") from None
        fmt = str(im.format)
    return InitImage.of(data, pixels, fmt)


def supports_img2img(pipe: Any) -> bool:
    """A pipeline can do image-to-image when it has a VAE encoder and takes ``image=``/``strength=``."""
    import inspect

    codec = getattr(pipe, "codec", None)
    if not callable(getattr(codec, "encode", None)):
        return False
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (TypeError, ValueError):
        return False
    return "image" in params and "strength" in params


def public_params(params: dict[str, Any]) -> dict[str, Any]:
    """A request's parameters as JSON (the init image as its hashes, not its pixels)."""
    out = dict(params)
    init = out.pop("init_image", None)
    if isinstance(init, InitImage):
        out["init_image"] = init.info()
    return out


class Metrics:
    """Prometheus collectors on a registry of their own (several apps may live in one process)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        r = self.registry = CollectorRegistry()
        self.requests = Counter("noisewise_requests", "finished requests by outcome", ["model", "status"], registry=r)
        self.rejected = Counter("noisewise_rejected", "requests rejected before running", ["reason"], registry=r)
        self.by_kind = Counter("noisewise_requests_by_kind", "finished requests by kind (txt2img, img2img) and outcome",
                               ["model", "kind", "status"], registry=r)
        self.queue_depth = Gauge("noisewise_queue_depth", "requests waiting for a sampling slot", registry=r)
        self.active = Gauge("noisewise_active_requests", "requests sampling now", registry=r)
        self.latency = Histogram(
            "noisewise_request_latency_seconds", "submit-to-result latency of successful requests", ["model"],
            buckets=(0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120), registry=r)
        self.queue_wait = Histogram(
            "noisewise_queue_wait_seconds", "time a request waited for a slot",
            buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60), registry=r)
        self.batch_rows = Histogram(
            "noisewise_batch_size", "rows per network forward (all requests together)", ["model"],
            buckets=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128), registry=r)
        self.forward_seconds = Histogram(
            "noisewise_forward_seconds", "duration of one batched network forward", ["model"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2), registry=r)
        self.nfe = Counter("noisewise_nfe", "network evaluations (NFE) of finished requests", ["model"], registry=r)
        self.rows = Counter("noisewise_network_rows", "network rows evaluated (images x branches x NFE)",
                            ["model"], registry=r)
        self.images = Counter("noisewise_images", "images generated", ["model"], registry=r)
        self.nfe_rate = Gauge("noisewise_nfe_per_second", "request NFE per second over the last 30 s", registry=r)
        self.cache_hits = Gauge("noisewise_text_cache_hits", "text-embedding cache hits (all models)", registry=r)
        self.cache_misses = Gauge("noisewise_text_cache_misses", "text-embedding cache misses", registry=r)
        self.cache_rate = Gauge("noisewise_text_cache_hit_ratio", "text-embedding cache hit rate", registry=r)
        self._recent: deque[tuple[float, int]] = deque()
        self._lock = threading.Lock()

    def add_nfe(self, model: str, nfe: int) -> None:
        self.nfe.labels(model).inc(nfe)
        with self._lock:
            self._recent.append((time.monotonic(), nfe))

    def refresh(self, encoders: list[Any]) -> None:
        now = time.monotonic()
        with self._lock:
            while self._recent and self._recent[0][0] < now - 30.0:
                self._recent.popleft()
            self.nfe_rate.set(sum(n for _, n in self._recent) / 30.0)
        hits = sum(getattr(e, "hits", 0) for e in encoders)
        misses = sum(getattr(e, "misses", 0) for e in encoders)
        self.cache_hits.set(hits)
        self.cache_misses.set(misses)
        self.cache_rate.set(hits / (hits + misses) if hits + misses else 0.0)


@dataclass(eq=False)
class GenerationJob:
    """One admitted request: the event loop awaits ``future``; ``events`` streams progress."""

    model: str
    params: dict[str, Any]
    future: asyncio.Future[Any]
    events: asyncio.Queue[dict[str, Any]] | None
    submitted: float = field(default_factory=time.monotonic)
    handle: Any = None

    def cancel(self) -> None:
        if self.handle is not None:
            self.handle.cancel()


class _Model:
    def __init__(self, name: str, pipe: Any, engine: Any, lock: threading.Lock | None) -> None:
        self.name = name
        self.pipe = pipe
        self.engine = engine
        self.solo_lock = lock  # batching off: one request at a time


class GenerationService:
    """Loads models by name, admits requests (bounded), runs them batched, reports metrics."""

    def __init__(self, config: ServerConfig | None = None,
                 pipeline_factory: Callable[[str], Any] | None = None) -> None:
        self.config = config or ServerConfig()
        if not self.config.models:
            raise ValueError("ServerConfig.models is empty: name at least one model, e.g. ('shapes-vp',)")
        self.metrics = Metrics()
        self._factory = pipeline_factory
        self._models: dict[str, _Model] = {}
        self._load_lock = threading.Lock()
        self._state = threading.Lock()
        self.waiting = 0
        self.running = 0
        self.draining = False
        self.jobs: set[GenerationJob] = set()
        if self.config.torch_threads:
            import torch

            torch.set_num_threads(int(self.config.torch_threads))

    # -- models -------------------------------------------------------------------------------
    @property
    def model_names(self) -> list[str]:
        return list(self.config.models)

    def check_model(self, name: str | None) -> str:
        name = name or self.config.models[0]
        if name not in self.config.models:
            raise ServiceError(
                f"unknown model {name!r}{_closest(name, self.model_names)} This server serves: "
                f"{', '.join(self.model_names)} (GET /v1/models lists them)", 422)
        return name

    def _load(self, name: str) -> Any:
        if self._factory is not None:
            return self._factory(name)
        from ..pipeline import Pipeline

        return Pipeline.from_pretrained(name, device=self.config.device)

    def get(self, name: str) -> _Model:
        m = self._models.get(name)
        if m is not None:
            return m
        with self._load_lock:
            m = self._models.get(name)
            if m is not None:
                return m
            pipe = self._load(name)
            from ..serving import BatchEngine

            c = self.config
            engine = BatchEngine(pipe.model_fn, max_batch=c.max_batch if c.batching else 1 << 30,
                                 max_active=c.max_active if c.batching else 1, max_wait_s=c.max_wait_s)
            hist, fsec = self.metrics.batch_rows.labels(name), self.metrics.forward_seconds.labels(name)
            rows_total = self.metrics.rows.labels(name)

            def on_forward(rows: int, seconds: float) -> None:
                hist.observe(rows)
                rows_total.inc(rows)
                fsec.observe(seconds)

            engine.batcher.on_forward = on_forward
            m = _Model(name, pipe, engine, None)
            self._models[name] = m
            logger.info("loaded model %s", name)
            return m

    def preload(self) -> None:
        for name in self.config.preload or ():
            self.get(name)

    @property
    def ready(self) -> bool:
        return not self.draining and all(n in self._models for n in self.config.preload or ())

    def describe_models(self) -> list[dict[str, Any]]:
        out = []
        for name in self.config.models:
            m = self._models.get(name)
            d: dict[str, Any] = {"name": name, "loaded": m is not None}
            if m is not None:
                p = m.pipe
                d.update(defaults=dict(p.defaults), size=[p.sample_size, p.sample_size],
                         prediction_type=getattr(p.schedule, "prediction_type", None), img2img=supports_img2img(p))
            out.append(d)
        return out

    def refresh_metrics(self) -> None:
        self.metrics.queue_depth.set(self.waiting)
        self.metrics.active.set(self.running)
        self.metrics.refresh([m.pipe.text_encoder for m in self._models.values()])

    # -- requests -----------------------------------------------------------------------------
    def validate(self, params: dict[str, Any]) -> dict[str, Any]:
        """Apply defaults and the server's limits; ServiceError (422) with the fix otherwise."""
        import noisewise as nw

        c = self.config
        p = dict(params)
        p["model"] = self.check_model(p.get("model"))
        preset = p.pop("preset", None)
        if preset is not None:
            if preset not in PRESETS:
                raise ServiceError(f"unknown preset {preset!r}{_closest(preset, list(PRESETS))} "
                                   f"Presets: {', '.join(PRESETS)}", 422)
            for k in ("sampler", "steps", "guidance_scale"):
                if p.get(k) is None:
                    p[k] = PRESETS[preset][k]
        if p.get("sampler") is not None:
            names = list(nw.samplers())
            if p["sampler"] not in names:
                raise ServiceError(f"unknown sampler {p['sampler']!r}{_closest(p['sampler'], names)} "
                                   "GET /v1/samplers lists them", 422)
        if p.get("steps") is not None and p["steps"] > c.max_steps:
            raise ServiceError(f"steps={p['steps']} is over this server's limit of {c.max_steps}; "
                               f"ask for at most {c.max_steps} steps", 422)
        if p.get("num_images", 1) > c.max_images:
            raise ServiceError(f"num_images={p['num_images']} is over this server's limit of {c.max_images}; "
                               "send several requests instead", 422)
        for k in ("prompt", "negative_prompt"):
            v = p.get(k)
            if v is not None and len(v) > c.max_prompt_chars:
                raise ServiceError(f"{k} has {len(v)} characters, over this server's limit of "
                                   f"{c.max_prompt_chars}; shorten it", 422)
        self._validate_image(p)
        if p.get("seed") is None:
            p["seed"] = int(np.random.default_rng().integers(0, 2**31))
        return p

    def _validate_image(self, p: dict[str, Any]) -> None:
        """Image-to-image fields: ``image`` (base64, decoded here) or ``init_image`` (already decoded by
        the request model), ``strength`` in (0, 1] (default 0.8) and ``resize`` (default ``"auto"``); the
        model must be able to take the image at its size under ``resize``."""
        from ..pipeline.img2img import DEFAULT_STRENGTH

        c = self.config
        raw = p.pop("image", None)
        init = p.get("init_image")
        if raw is not None and init is None:
            try:
                init = decode_init_image(str(raw), max_bytes=c.max_image_bytes, max_pixels=c.max_image_pixels)
            except ValueError as e:
                raise ServiceError(str(e), 422) from None
        strength = p.get("strength")
        if init is None:
            p.pop("init_image", None)
            for k in ("strength", "resize"):
                if p.pop(k, None) is not None:
                    raise ServiceError(f"{k} needs an init image: send it base64-encoded in 'image', or leave "
                                       f"{k} out for text-to-image", 422)
            return
        if not isinstance(init, InitImage):
            raise ServiceError("init_image must be a decoded InitImage; send the picture in 'image'", 422)
        if strength is None:
            strength = DEFAULT_STRENGTH
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < float(strength) <= 1.0:
            raise ServiceError(f"strength must be above 0 and at most 1 (1 ignores the image, small values keep "
                               f"it), got {strength!r}", 422)
        pipe = self.get(p["model"]).pipe
        if not supports_img2img(pipe):
            img_models = [n for n in self.config.models if n in self._models and supports_img2img(self._models[n].pipe)]
            alt = f"; models that can: {', '.join(img_models)}" if img_models else ""
            raise ServiceError(f"model {p['model']!r} cannot do image-to-image (it has no image encoder); leave "
                               f"image and strength out, or pick another model{alt}", 422)
        from ..pipeline.img2img import check_image_size, check_resize

        try:
            resize = check_resize(p.get("resize"))
            check_image_size(*init.size, int(pipe.sample_size), resize, p["model"], spell='"resize": "{}"')
        except ValueError as e:
            raise ServiceError(str(e), 422) from None
        p["resize"] = resize
        p["init_image"] = init
        p["strength"] = float(strength)

    def submit(self, params: dict[str, Any], *, loop: asyncio.AbstractEventLoop, stream: bool = False,
               preview_every: int = 1) -> GenerationJob:
        """Admit a validated request (429 when the queue is full, 503 when draining) and start it."""
        c = self.config
        if self.draining:
            self.metrics.rejected.labels("draining").inc()
            raise Draining("the server is shutting down and takes no new requests; retry on another replica")
        model = self.get(params["model"])
        with self._state:
            capacity = c.max_queue + (c.max_active if c.batching else 1) * len(self.config.models)
            if self.waiting + self.running >= capacity or self.waiting >= c.max_queue:
                self.metrics.rejected.labels("queue_full").inc()
                raise QueueFull(f"the queue is full ({c.max_queue} waiting); retry after a short pause")
            self.waiting += 1
        job = GenerationJob(model.name, params, loop.create_future(), asyncio.Queue() if stream else None)
        job.future.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved even if nobody awaits
        self.jobs.add(job)

        def emit(ev: dict[str, Any]) -> None:
            if job.events is not None:
                loop.call_soon_threadsafe(job.events.put_nowait, ev)

        started_box: list[float] = []
        init: InitImage | None = params.get("init_image")
        kind = "txt2img" if init is None else "img2img"
        steps_run = params.get("steps")
        if init is not None:  # the last int(steps * strength) steps of the grid run (diffusers' rule)
            from ..core.grid import strength_start

            total = int(params.get("steps") or model.pipe.defaults["steps"])
            steps_run = total - strength_start(total, params["strength"])

        def on_step(info: Any) -> None:
            if job.handle is not None and job.handle.cancelled:
                from ..serving import Cancelled

                raise Cancelled("client went away")
            if job.events is None:
                return
            i = int(getattr(info, "i", 0))
            ev: dict[str, Any] = {"event": "step", "step": i + 1, "steps": steps_run}
            x0 = getattr(info, "x0", None)
            if x0 is not None and preview_every > 0 and (i % preview_every == 0):
                ev["preview"] = png_b64(model.pipe.decode(x0[:1].float())[0])
            emit(ev)

        def run(net: Any) -> Any:
            with self._state:
                self.waiting -= 1
                self.running += 1
            started_box.append(time.monotonic())
            self.metrics.queue_wait.observe(started_box[0] - job.submitted)
            emit({"event": "started"})
            kw = {k: params.get(k) for k in ("negative_prompt", "negative_scale", "negative_above",
                                             "negative_perpendicular", "sampler", "steps", "guidance_scale",
                                             "compose")}
            # a stochastic sampler's step noise is seeded per image by the pipeline: the same image however
            # the requests are batched
            seeds = [params["seed"] + i for i in range(params.get("num_images", 1))]
            extra: dict[str, Any] = {}
            if init is not None:
                extra.update(image=init.pixels, strength=params["strength"], resize=params["resize"])
            res = model.pipe(params.get("prompt", ""), num_images=len(seeds), seed=params["seed"],
                             callback=on_step, model=net, **kw, **extra)
            if init is not None:  # reproducible with the init image at hand (the pipeline records the strength)
                for m in res.metadata:
                    m["init_image"] = init.info()
            return res

        def done(handle: Any) -> None:
            with self._state:
                if started_box:
                    self.running -= 1
                else:
                    self.waiting -= 1
            try:
                value = handle.result(0)
                err = None
            except BaseException as e:  # noqa: BLE001 - delivered to the awaiting request
                value, err = None, e
            status = "ok" if err is None else type(err).__name__.lower()
            self.metrics.requests.labels(model.name, status).inc()
            self.metrics.by_kind.labels(model.name, kind, status).inc()
            if err is None:
                self.metrics.latency.labels(model.name).observe(time.monotonic() - job.submitted)
                self.metrics.add_nfe(model.name, int(value.nfe))
                self.metrics.images.labels(model.name).inc(len(value))

            def settle() -> None:
                self.jobs.discard(job)
                if job.events is not None:
                    job.events.put_nowait({"event": "_end"})
                if job.future.done():
                    return
                if err is None:
                    job.future.set_result(value)
                else:
                    job.future.set_exception(err)

            loop.call_soon_threadsafe(settle)

        job.handle = model.engine.submit(run)
        job.handle.add_done_callback(done)
        return job

    # -- shutdown -----------------------------------------------------------------------------
    def begin_drain(self) -> None:
        """Stop admitting (503; /readyz fails); in-flight requests go on."""
        if not self.draining:
            logger.info("draining: %d running, %d waiting", self.running, self.waiting)
        self.draining = True

    def cancel_all(self) -> int:
        n = 0
        for job in list(self.jobs):
            job.cancel()
            n += 1
        return n

    def close(self) -> None:
        self.begin_drain()
        self.cancel_all()
        for m in self._models.values():
            m.engine.close()
