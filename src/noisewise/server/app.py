"""FastAPI application: generation endpoints (PNG, JSON, SSE progress), model/sampler/preset lists,
health, readiness and Prometheus metrics. ``create_app(ServerConfig(...))``; ``noisewise serve``."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import math
import threading
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, ClassVar, Literal

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, WithJsonSchema, field_validator, model_validator

from .. import limits
from ..serving.jobs import ComposeMode
from .service import (
    GenerationJob,
    GenerationService,
    InitImage,
    ServerConfig,
    ServiceError,
    decode_init_image,
    png_b64,
    png_bytes,
    public_params,
)

logger = logging.getLogger(__name__)

ResizeMode = Literal[limits.RESIZE_MODES]  # type: ignore[valid-type]  # the tuple's values
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # model names only: no '/', no path


class GenerateRequest(BaseModel):
    """One text-to-image or image-to-image request (``image`` + ``strength``). Unset fields take the
    model's defaults (or the preset's)."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, json_schema_extra={"examples": [
        {"prompt": "a large red circle on the left", "sampler": "dpmpp_2m", "steps": 20,
         "guidance_scale": 7.5, "seed": 0}]})

    prompt: str = Field("", max_length=2000, description="what to draw (\"\" = unconditional)")
    negative_prompt: str | None = Field(None, max_length=2000,
                                        description="what to steer away from; null = the model's default")
    negative_scale: float | None = Field(
        None, ge=limits.NEGATIVE_SCALE[0], le=limits.NEGATIVE_SCALE[1],
        description="the negative prompt's own weight s: D(u) + w (D(c) - D(u)) - s (D(neg) - D(u)), one more "
                    "network row per image; null = the model's default (for a model without one, the negative "
                    "prompt replaces the unconditional branch, which is s = guidance_scale - 1)")
    negative_above: float | None = Field(
        None, ge=limits.NEGATIVE_ABOVE[0], le=limits.NEGATIVE_ABOVE[1],
        description="with a negative scale: the negative prompt acts only at noise levels sigma/alpha at or above "
                    "this (0 = every level); null = the model's default")
    negative_perpendicular: StrictBool | None = Field(
        None, description="with a negative scale: subtract only the part of the negative prompt's direction "
                          "perpendicular to the prompt's guided direction (Perp-Neg), so it does not also push "
                          "harder along the prompt; null = the model's default")
    model: str | None = Field(None, pattern=NAME_PATTERN,
                              description="a model name from GET /v1/models (names only, never paths)")
    preset: str | None = Field(None, pattern=NAME_PATTERN, description="a preset from GET /v1/presets")
    sampler: str | None = Field(None, pattern=NAME_PATTERN, description="a sampler from GET /v1/samplers")
    steps: int | None = Field(None, ge=limits.STEPS[0], le=limits.STEPS[1],
                              description="sampler steps (server limit applies)")
    guidance_scale: float | None = Field(None, ge=limits.GUIDANCE_SCALE[0], le=limits.GUIDANCE_SCALE[1],
                                         description="classifier-free guidance scale")
    compose: ComposeMode | None = Field(
        None, description="prompt composition (docs/composition.md): 'regions' guides each object of a two-object "
                          "shapes prompt in its own region (the shapes models' default), 'and' composes the parts of "
                          "'A AND B', 'off' = plain classifier-free guidance; null = the model's default")
    seed: int | None = Field(None, ge=limits.SEED[0], le=limits.SEED[1],
                             description="image i uses seed + i; null = random")
    num_images: int = Field(1, ge=limits.NUM_IMAGES[0], le=limits.NUM_IMAGES[1],
                            description="images for this prompt (server limit applies)")
    image: Annotated[InitImage | None, WithJsonSchema({"anyOf": [{"type": "string", "contentEncoding": "base64"},
                                                                {"type": "null"}]})] = Field(
        None, description="image-to-image: the init image, a PNG or JPEG file base64-encoded (a "
                          "'data:image/png;base64,' prefix is allowed), brought to the model's size (GET /v1/models "
                          "'size') as 'resize' says, at most max_image_bytes / max_image_pixels (GET /v1/limits)")
    strength: float | None = Field(
        None, gt=0.0, le=1.0, description="image-to-image strength in (0, 1]: the last int(steps * strength) steps "
                                          "run from the noised image; 1 ignores the image. Default 0.8; needs image")
    resize: ResizeMode | None = Field(
        None, description="image-to-image: how an image of another size becomes the model's: 'auto' (the default) "
                          "scales a square image and refuses other shapes, 'crop' scales the centre square, "
                          "'stretch' scales each side on its own, 'off' refuses every other size. Shrinking "
                          "averages pixel areas. Needs image")

    # operator limits on the init image (create_app binds the server's; these are ServerConfig's defaults)
    image_limits: ClassVar[tuple[int, int]] = (ServerConfig.max_image_bytes, ServerConfig.max_image_pixels)

    @field_validator("image", mode="plain")
    @classmethod
    def _decode_image(cls, v: Any) -> InitImage | None:
        """base64 text -> the decoded picture (bad base64, not PNG/JPEG, over the limits: 422)."""
        if v is None:
            return None
        if not isinstance(v, str):
            raise ValueError("image must be a string: a PNG or JPEG file base64-encoded")
        max_bytes, max_pixels = cls.image_limits
        return decode_init_image(v, max_bytes=max_bytes, max_pixels=max_pixels)

    @field_validator("strength", mode="before")
    @classmethod
    def _strength_range(cls, v: Any) -> Any:
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not 0.0 < float(v) <= 1.0:
            raise ValueError(f"strength must be above 0 and at most 1 (1 ignores the image, small values keep it; "
                             f"0 would return the image unchanged), got {v}")
        return v

    @model_validator(mode="after")
    def _strength_needs_image(self) -> GenerateRequest:
        for k in ("strength", "resize"):
            if self.image is None and getattr(self, k) is not None:
                raise ValueError(f"{k} needs an init image: send the picture base64-encoded in 'image', or "
                                 f"leave {k} out for text-to-image")
        return self

    def to_params(self) -> dict[str, Any]:
        """The request as service parameters: the decoded init image instead of its base64 text."""
        p = self.model_dump(exclude={"image"})
        if self.image is not None:
            p["init_image"] = self.image
        return p


_GenerateRequestBase = GenerateRequest


def _shorten(v: Any, limit: int = 200) -> Any:
    if isinstance(v, str) and len(v) > limit:
        return f"{v[:limit]}... ({len(v)} characters)"
    if isinstance(v, dict):
        return {k: _shorten(x, limit) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return type(v)(_shorten(x, limit) for x in v)
    return v


def _bind_request_model(model: type[BaseModel]) -> Any:
    """Annotate an endpoint's ``req`` parameter with ``model`` (a class made inside :func:`create_app`:
    FastAPI resolves string annotations in the module's globals only)."""

    def deco(fn: Any) -> Any:
        sig = inspect.signature(fn)
        fn.__signature__ = sig.replace(parameters=[
            q.replace(annotation=model) if q.name == "req" else q for q in sig.parameters.values()])
        return fn

    return deco


class ImageOut(BaseModel):
    png_base64: str
    metadata: dict[str, Any]


class GenerateResponse(BaseModel):
    model: str
    nfe: int
    seconds: float
    images: list[ImageOut]


def create_app(config: ServerConfig | None = None, *, service: GenerationService | None = None,
               wait_ready: bool = False) -> Any:
    """The FastAPI app. ``wait_ready``: load the preload models before serving (else in the
    background, with ``/readyz`` answering 503 until they are loaded)."""
    from .web import INDEX_HTML

    svc = service or GenerationService(config)
    cfg = svc.config

    class GenerateRequest(_GenerateRequestBase):  # the same model, bound to this server's image limits
        __doc__ = _GenerateRequestBase.__doc__
        image_limits: ClassVar[tuple[int, int]] = (int(cfg.max_image_bytes), int(cfg.max_image_pixels))

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        if wait_ready:
            await asyncio.to_thread(svc.preload)
        else:
            threading.Thread(target=_preload_logged, args=(svc,), name="noisewise-preload", daemon=True).start()
        yield
        svc.begin_drain()
        deadline = time.monotonic() + cfg.shutdown_grace_s
        while svc.running + svc.waiting > 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        n = svc.cancel_all()
        if n:
            logger.warning("shutdown: cancelled %d unfinished request(s)", n)
        await asyncio.to_thread(svc.close)

    from .. import __version__

    app = FastAPI(title="noisewise", version=__version__, lifespan=lifespan,
                  description="Text-to-image with any noisewise sampler; concurrent requests share network "
                              "forwards (continuous batching). See docs/serving.md.")
    app.state.service = svc
    app.add_middleware(_BodyLimit, limit=cfg.body_limit,
                       hint=f"{cfg.max_body_bytes} for the text fields plus a base64 init image of at most "
                            f"{cfg.max_image_bytes} bytes (GET /v1/limits)")

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        # FastAPI's 422, with long inputs (a base64 image of megabytes) cut short instead of echoed whole
        return JSONResponse({"detail": jsonable_encoder(_shorten(e.errors()))}, status_code=422)

    @app.exception_handler(ServiceError)
    async def _service_error(request: Request, e: ServiceError) -> JSONResponse:
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse({"detail": str(e)}, status_code=e.status, headers=headers)

    def _prepare(req: Any) -> dict[str, Any]:
        return svc.validate(req.to_params())

    async def _wait(job: GenerationJob, request: Request) -> Any:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + cfg.request_timeout_s
        try:
            while True:
                try:
                    return await asyncio.wait_for(asyncio.shield(job.future), 0.2)
                except asyncio.TimeoutError:
                    pass
                if await request.is_disconnected():
                    job.cancel()
                    raise ServiceError("client disconnected", 499)
                if loop.time() > deadline:
                    job.cancel()
                    raise ServiceError(f"the request did not finish within {cfg.request_timeout_s:g} s and was "
                                       "cancelled; ask for fewer steps or images", 504)
        except asyncio.CancelledError:
            job.cancel()
            raise

    def _result_error(e: BaseException) -> ServiceError:
        from ..serving import Cancelled

        if isinstance(e, ServiceError):
            return e
        if isinstance(e, Cancelled):
            return ServiceError("the request was cancelled (client gone or server shutting down)", 503)
        if isinstance(e, (ValueError, TypeError)):
            return ServiceError(str(e), 422)
        logger.exception("generation failed", exc_info=e)
        return ServiceError(f"generation failed: {type(e).__name__}", 500)

    async def _generate(req: Any, request: Request) -> tuple[Any, float]:
        params = _prepare(req)
        t0 = time.monotonic()
        job = svc.submit(params, loop=asyncio.get_running_loop())
        try:
            res = await _wait(job, request)
        except ServiceError:
            raise
        except Exception as e:  # noqa: BLE001 - mapped to an HTTP status
            raise _result_error(e) from None
        return res, time.monotonic() - t0

    @app.post("/v1/generate", response_model=GenerateResponse, tags=["generate"],
              responses={422: {"description": "invalid or over a limit"}, 429: {"description": "queue full"},
                         503: {"description": "shutting down"}, 504: {"description": "timed out"}})
    @_bind_request_model(GenerateRequest)
    async def generate(req: GenerateRequest, request: Request) -> Any:
        """Generate images; JSON with base64 PNGs and each image's parameters."""
        res, seconds = await _generate(req, request)
        return {"model": res.metadata[0]["model"], "nfe": res.nfe, "seconds": round(seconds, 4),
                "images": [{"png_base64": png_b64(im, m), "metadata": m} for im, m in zip(res.images, res.metadata)]}

    @app.post("/v1/generate.png", tags=["generate"], response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the first image; parameters in the "
                                                                            "PNG 'parameters' text chunk"}})
    @_bind_request_model(GenerateRequest)
    async def generate_png(req: GenerateRequest, request: Request) -> Response:
        """Generate and return the first image as PNG (parameters in its text chunk and a header)."""
        res, _ = await _generate(req, request)
        meta = res.metadata[0]
        return Response(png_bytes(res.images[0], meta), media_type="image/png",
                        headers={"X-Noisewise-Parameters": json.dumps(meta)})

    @app.post("/v1/generate/stream", tags=["generate"],
              responses={200: {"content": {"text/event-stream": {}}}})
    @_bind_request_model(GenerateRequest)
    async def generate_stream(req: GenerateRequest, request: Request,
                              preview_every: int = 1) -> StreamingResponse:
        """Server-sent events: ``queued``, ``started``, ``step`` (with a PNG preview of the current
        x0 estimate), then ``done`` (images + parameters) or ``error``. Closing the connection
        cancels the request and frees its slot."""
        if not 0 <= preview_every <= 1000:
            raise ServiceError("preview_every must be from 0 (no previews) to 1000", 422)
        params = _prepare(req)
        loop = asyncio.get_running_loop()
        job = svc.submit(params, loop=loop, stream=True, preview_every=preview_every)

        def sse(ev: dict[str, Any]) -> str:
            return f"data: {json.dumps(ev)}\n\n"

        async def events() -> AsyncIterator[str]:
            finished = False
            deadline = loop.time() + cfg.request_timeout_s
            try:
                yield sse({"event": "queued", "params": public_params(params)})
                assert job.events is not None
                while True:
                    left = deadline - loop.time()
                    if left <= 0:
                        job.cancel()
                        yield sse({"event": "error", "status": 504,
                                   "detail": f"did not finish within {cfg.request_timeout_s:g} s"})
                        return
                    try:
                        ev = await asyncio.wait_for(job.events.get(), min(left, 1.0))
                    except asyncio.TimeoutError:
                        continue
                    if ev["event"] == "_end":
                        break
                    yield sse(ev)
                try:
                    res = job.future.result()
                except Exception as e:  # noqa: BLE001 - reported as an event
                    err = _result_error(e)
                    finished = True
                    yield sse({"event": "error", "status": err.status, "detail": str(err)})
                    return
                finished = True
                yield sse({"event": "done", "nfe": res.nfe,
                           "images": [{"png_base64": png_b64(im, m), "metadata": m}
                                      for im, m in zip(res.images, res.metadata)]})
            finally:
                if not finished:
                    job.cancel()  # client went away (or the server stops): free the slot

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/v1/models", tags=["info"])
    async def models() -> dict[str, Any]:
        """The models this server serves (request them by name)."""
        return {"models": svc.describe_models()}

    @app.get("/v1/samplers", tags=["info"])
    async def samplers() -> dict[str, Any]:
        """Every sampler with its paper, order and whether it is stochastic."""
        import noisewise as nw

        out = []
        for name in nw.samplers():
            s = nw.get_sampler(name)
            out.append({"name": name, "paper": s.paper, "order": s.order, "stochastic": s.stochastic,
                        "evals_per_step": s.evals_per_step})
        return {"samplers": out}

    @app.get("/v1/presets", tags=["info"])
    async def presets() -> dict[str, Any]:
        """Named parameter sets (``"preset": name`` in a request; explicit fields win)."""
        from .service import PRESETS

        return {"presets": [{"name": k, **v} for k, v in PRESETS.items()]}

    @app.get("/v1/limits", tags=["info"])
    async def limits() -> dict[str, Any]:
        """This server's per-request limits."""
        return {"max_steps": cfg.max_steps, "max_images": cfg.max_images, "max_prompt_chars": cfg.max_prompt_chars,
                "request_timeout_s": cfg.request_timeout_s, "max_queue": cfg.max_queue,
                "max_body_bytes": cfg.body_limit, "max_image_bytes": cfg.max_image_bytes,
                "max_image_pixels": cfg.max_image_pixels}

    @app.get("/healthz", tags=["ops"])
    async def healthz() -> dict[str, str]:
        """Liveness: the process answers."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    async def readyz() -> JSONResponse:
        """Readiness: models loaded and not shutting down."""
        if svc.ready:
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "draining" if svc.draining else "loading"}, status_code=503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    async def metrics() -> Response:
        """Prometheus metrics."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        svc.refresh_metrics()
        return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(INDEX_HTML)

    return app


def _preload_logged(svc: GenerationService) -> None:
    try:
        svc.preload()
    except Exception:  # noqa: BLE001 - /readyz stays 503 and says why in the log
        logger.exception("loading the models failed")


class _BodyLimit:
    """413 for request bodies over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int, hint: str = "") -> None:
        self.app = app
        self.limit = limit
        self.hint = hint

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(send)
        seen = 0
        started = False

        async def counting_receive() -> Any:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return msg

        async def tracking_send(msg: Any) -> None:
            nonlocal started
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                await self._reject(send)

    async def _reject(self, send: Any) -> None:
        why = f" ({self.hint})" if self.hint else ""
        body = json.dumps({"detail": f"request body over {self.limit} bytes{why}"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def serve(host: str = "127.0.0.1", port: int = 8000, config: ServerConfig | None = None,
          log_level: str = "info") -> None:
    """Run the server with uvicorn until SIGINT/SIGTERM; then stop admitting (503), let in-flight
    requests finish for ``shutdown_grace_s`` and cancel what is left."""
    import uvicorn

    cfg = config or ServerConfig()
    svc = GenerationService(cfg)
    app = create_app(cfg, service=svc)

    grace = max(0.0, float(cfg.shutdown_grace_s))

    class _Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            if not svc.draining:
                svc.begin_drain()
                # what is still running when the grace period ends is cancelled by the service, so its
                # client gets an explicit 503 ("server shutting down"); uvicorn's own deadline comes a
                # little later, only to let those answers go out (otherwise it would cut them off: 500)
                timer = threading.Timer(grace, lambda: logger.warning(
                    "shutdown grace period (%g s) over: cancelled %d unfinished request(s)", grace, svc.cancel_all()))
                timer.daemon = True
                timer.start()
            super().handle_exit(sig, frame)

    ucfg = uvicorn.Config(app, host=host, port=port, log_level=log_level,
                          timeout_graceful_shutdown=int(math.ceil(grace + 5.0)), access_log=False)
    _Server(ucfg).run()
