"""``noisewise serve`` and ``noisewise batch`` subcommands (added to the main parser by cli.py)."""

from __future__ import annotations

import argparse
from typing import Any

from .. import limits
from ..cli import _float_range, _int_range  # the same range checks as noisewise generate
from ..serving.jobs import COMPOSE_MODES


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _setting(field: str, option: str) -> Any:
    """argparse type: ``option``'s text as the server setting ``field`` (``limits.SERVER_SETTINGS``)."""
    def parse(s: str) -> int | float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option} must be a number, got {s!r}") from None
        try:
            return limits.check_setting(field, v, option)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def cmd_serve(a: argparse.Namespace) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise ImportError(f"{e.name} is missing; noisewise serve needs: pip install 'noisewise[server]'") from None
    from . import ServerConfig, serve

    models = _csv(a.models)
    try:
        cfg = ServerConfig(
            models=models, preload=_csv(a.preload) if a.preload is not None else models[:1],
            max_active=a.max_active, max_queue=a.max_queue, max_batch=a.max_batch, max_steps=a.max_steps,
            max_images=a.max_images, request_timeout_s=a.timeout, batching=not a.no_batching, device=a.device,
            torch_threads=a.torch_threads, shutdown_grace_s=a.shutdown_grace, max_image_bytes=a.max_image_bytes,
            max_image_pixels=a.max_image_pixels,
        )
    except ValueError as e:  # --models / --preload (the numbers were checked as they were parsed)
        from ..cli import UserError

        raise UserError(str(e).replace("preload names", "--preload names").replace("models must", "--models must")
                        ) from None
    from ..cli import UserError
    from ..pipeline.t2i import resolve_model

    for name in cfg.models:  # a typo fails here, in one line, not in a server that never turns ready
        try:
            resolve_model(name)
        except ValueError as e:
            raise UserError(f"--models: {e}") from None
    serve(a.host, a.port, cfg, log_level=a.log_level)
    return 0


def cmd_batch(a: argparse.Namespace) -> int:
    from ..serving.jobs import JobDefaults, read_items, run_batch

    d = JobDefaults(model=a.model, sampler=a.sampler, steps=a.steps, guidance_scale=a.guidance_scale,
                    negative_prompt=a.negative_prompt, negative_scale=a.negative_scale,
                    negative_above=a.negative_above, negative_perpendicular=a.negative_perpendicular,
                    compose=a.compose, resize=a.resize,
                    base_seed=a.seed)
    try:
        items = read_items(a.prompts, d)
    except (OSError, ValueError) as e:
        from ..cli import UserError

        raise UserError(str(e)) from None
    rep = run_batch(items, a.out, engine=a.engine, workers=a.workers, address=a.address,
                    torch_threads=a.torch_threads, progress=not a.quiet)
    steady = rep.steady_items_per_s
    after = (f"; first result after {rep.first_result_s:.1f} s, then {steady:.2f} items/s"
             if steady is not None and rep.first_result_s is not None else "")
    failed = f", {len(rep.failed)} failed" if rep.failed else ""
    print(f"{rep.done} item(s) generated, {rep.skipped} already done{failed}, {rep.total} in all -> {a.out} "
          f"({rep.seconds:.1f} s, {rep.images_per_s:.2f} items/s{after})")
    if rep.failed:
        import sys

        for item_id, why in list(rep.failed.items())[:10]:
            print(f"noisewise: item {item_id} failed: {why}", file=sys.stderr)
        more = f" (and {len(rep.failed) - 10} more)" if len(rep.failed) > 10 else ""
        print(f"noisewise: {len(rep.failed)} item(s) failed{more} and wrote nothing; fix them and run the same "
              "command again: finished items are skipped", file=sys.stderr)
        return 1
    return 0


def add_cli(sub: Any) -> None:
    s = sub.add_parser("serve", help="HTTP API + web page with continuous batching (docs/serving.md)",
                       description="Serve text-to-image over HTTP: POST /v1/generate, a web page at /, "
                                   "Prometheus /metrics. Concurrent requests share network forwards.")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default loopback only)")
    s.add_argument("--port", type=_int_range(0, 65535, "--port"), default=8000, help="0: any free port")
    s.add_argument("--models", default="shapes-vp,shapes-flow",
                   help="comma-separated model names (or operator-given folders) requests may name")
    s.add_argument("--preload", default=None, help="models loaded at start (default: the first)")
    s.add_argument("--max-active", type=_setting("max_active", "--max-active"), default=32,
                   help="requests sampling at once per model")
    s.add_argument("--max-queue", type=_setting("max_queue", "--max-queue"), default=64,
                   help="waiting requests before 429")
    s.add_argument("--max-batch", type=_setting("max_batch", "--max-batch"), default=64,
                   help="most rows in one network forward")
    s.add_argument("--max-steps", type=_setting("max_steps", "--max-steps"), default=100)
    s.add_argument("--max-images", type=_setting("max_images", "--max-images"), default=4)
    s.add_argument("--timeout", type=_setting("request_timeout_s", "--timeout"), default=120.0,
                   help="seconds before a request is cancelled (504)")
    s.add_argument("--max-image-bytes", type=_setting("max_image_bytes", "--max-image-bytes"), default=2 * 1024 * 1024,
                   help="image-to-image: largest init image file (PNG/JPEG bytes, default 2 MiB); 422 beyond")
    s.add_argument("--max-image-pixels", type=_setting("max_image_pixels", "--max-image-pixels"), default=2048 * 2048,
                   help="image-to-image: most init image pixels, read from the header before decoding "
                        "(default 2048x2048); 422 beyond")
    s.add_argument("--shutdown-grace", type=_setting("shutdown_grace_s", "--shutdown-grace"), default=30.0,
                   help="on SIGTERM/SIGINT: stop admitting (503), let running requests finish for this many "
                        "seconds, then cancel the rest with an explicit 503 (default 30)")
    s.add_argument("--no-batching", action="store_true", help="serve one request at a time (for comparison)")
    s.add_argument("--device", default="cpu")
    s.add_argument("--torch-threads", type=_setting("torch_threads", "--torch-threads"), default=None,
                   help="torch intra-op threads (default: torch's)")
    s.add_argument("--log-level", default="info")
    s.set_defaults(func=cmd_serve)

    b = sub.add_parser("batch", help="generate a JSONL file of prompts into a folder (local or Ray)",
                       description="Each line: {\"prompt\": ..., optional negative_prompt, negative_scale, "
                                   "negative_above, negative_perpendicular, model, sampler, steps, "
                                   "guidance_scale, compose, seed, num_images, id, image (a PNG/JPEG path relative "
                                   "to the file: image-to-image), strength, resize (auto, crop, stretch or off)}. "
                                   "Resumable: finished items are skipped.")
    b.add_argument("prompts", help="JSONL file, one item per line")
    b.add_argument("--out", required=True, help="output folder (<id>.png + <id>.json per item)")
    b.add_argument("--engine", choices=["local", "ray"], default="local")
    b.add_argument("--workers", type=_int_range(1, 4096, "--workers"), default=2,
                   help="Ray actors (each holds the pipelines)")
    b.add_argument("--address", default=None, help="Ray cluster address (default: start Ray locally)")
    b.add_argument("--torch-threads", type=_setting("torch_threads", "--torch-threads"), default=None,
                   help="torch threads per worker")
    b.add_argument("--model", default="shapes-vp")
    b.add_argument("--sampler", default=None)
    b.add_argument("--steps", type=_int_range(*limits.STEPS, "--steps"), default=None)
    b.add_argument("--guidance-scale", type=_float_range(*limits.GUIDANCE_SCALE, "--guidance-scale"), default=None)
    b.add_argument("--negative-prompt", default=None)
    b.add_argument("--negative-scale", type=_float_range(*limits.NEGATIVE_SCALE, "--negative-scale"), default=None,
                   help="the negative prompt's own weight for items without one (docs/guidance.md); default: the "
                        "model's")
    b.add_argument("--negative-above", type=_float_range(*limits.NEGATIVE_ABOVE, "--negative-above"), default=None,
                   help="for items without one: with a negative scale, the negative prompt acts only at noise levels "
                        "sigma/alpha at or above this (docs/guidance.md); default: the model's")
    b.add_argument("--negative-perpendicular", action=argparse.BooleanOptionalAction, default=None,
                   help="for items without one: with a negative scale, subtract only the part of the negative "
                        "prompt's direction perpendicular to the prompt's (Perp-Neg; docs/guidance.md); default: "
                        "the model's")
    b.add_argument("--compose", choices=COMPOSE_MODES, default=None,
                   help="prompt composition for items without one (docs/composition.md); default: the model's")
    b.add_argument("--resize", choices=list(limits.RESIZE_MODES), default=None,
                   help="image-to-image lines without their own \"resize\": how a picture of another size becomes "
                        "the model's (default auto: a square picture is scaled, another shape refused)")
    b.add_argument("--seed", type=_int_range(*limits.SEED, "--seed"), default=0,
                   help="items without a seed use seed + line index")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_batch)
