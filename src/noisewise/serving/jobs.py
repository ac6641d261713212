"""Batch jobs: ``noisewise batch prompts.jsonl --out DIR`` on a local engine or a Ray actor pool.

Each line of the JSONL file is one item: ``{"prompt": ..., "negative_prompt"?, "negative_scale"?, "negative_above"?,
"negative_perpendicular"?, "model"?, "sampler"?, "steps"?, "guidance_scale"?, "compose"?, "seed"?, "num_images"?,
"id"?, "image"?, "strength"?, "resize"?}``;
missing fields take the job's defaults, a missing seed is ``base_seed + line index`` (so a job is
reproducible as a whole). Every line is checked when the file is read, numbers against the ranges
``noisewise generate`` and the HTTP API accept (:mod:`noisewise.limits`), models against the shipped
names and model folders, pictures against their model's size, so a bad line stops the job before any
work and names its line. ``image`` (a PNG/JPEG path, relative to the JSONL file's folder)
and ``strength`` (and ``resize``) make the item image-to-image, as over HTTP: the driver reads and checks each picture
once when the file is read (so Ray workers need no shared file system) and the metadata records the
strength and its hashes.
An item's images go to ``DIR/<id>.png`` (``<id>-<i>.png`` for several) and its parameters to
``DIR/<id>.json``, every file written to a temporary name and renamed, the JSON last: an item is
finished exactly when its JSON exists, and a rerun after a crash skips finished items.

Both engines run each item alone through the same :class:`ItemRunner` (same seeds, same batch
shapes), so the local and the Ray engine write identical images.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

from .. import limits

logger = logging.getLogger(__name__)

ITEM_FIELDS = ("id", "prompt", "negative_prompt", "negative_scale", "negative_above", "negative_perpendicular",
               "model", "sampler", "steps", "guidance_scale", "compose", "seed", "num_images", "image", "strength",
               "resize")
# the composition modes a job (over HTTP, in a batch file) may ask for (docs/composition.md); None = the model's default
ComposeMode = Literal["off", "and", "regions"]
COMPOSE_MODES: tuple[str, ...] = get_args(ComposeMode)
MAX_IMAGE_BYTES = 16 * 1024 * 1024
MAX_IMAGE_PIXELS = 4096 * 4096
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass
class JobDefaults:
    model: str = "shapes-vp"
    sampler: str | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    negative_scale: float | None = None
    negative_above: float | None = None
    negative_perpendicular: bool | None = None
    compose: str | None = None
    resize: str | None = None  # image-to-image lines without their own "resize"
    num_images: int = 1
    base_seed: int = 0


def read_items(path: str | os.PathLike[str], defaults: JobDefaults | None = None) -> list[dict[str, Any]]:
    """Parse and validate the JSONL file (ValueError naming the line on a bad one)."""
    d = defaults or JobDefaults()
    items: list[dict[str, Any]] = []
    seen: set[str] = set()
    pictures: dict[Path, Any] = {}  # one decode per file, shared by the items that use it
    sizes: dict[str, int | None] = {}  # model -> the image size it makes
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if isinstance(raw, str):
                raw = {"prompt": raw}
            if not isinstance(raw, dict):
                raise ValueError(f"{path}:{n}: expected an object like {{\"prompt\": \"a red circle\"}}")
            unknown = set(raw) - set(ITEM_FIELDS)
            if unknown:
                raise ValueError(f"{path}:{n}: unknown field(s) {sorted(unknown)}; allowed: {', '.join(ITEM_FIELDS)}")
            index = len(items)
            try:
                item = _checked_item(raw, d, index)
            except ValueError as e:
                raise ValueError(f"{path}:{n}: {e}") from None
            if item["id"] in seen:
                raise ValueError(f"{path}:{n}: duplicate id {item['id']!r}")
            seen.add(item["id"])
            _read_init_image(item, raw, Path(path).parent, pictures, f"{path}:{n}", d.resize)
            _check_model(item, sizes, f"{path}:{n}")
            items.append(item)
    return items


def _check_model(item: dict[str, Any], sizes: dict[str, int | None], where: str) -> None:
    """The item's model is a shipped name or a model folder, and takes its init image (if any) under its
    ``resize``: read from the folder's configs, no weights loaded; ``sizes`` caches the image size per
    model. ValueError naming the line otherwise, so a typo on line 500 fails before line 1 runs."""
    from ..pipeline.img2img import check_image_size
    from ..pipeline.t2i import model_image_size

    name = item["model"]
    try:
        if name not in sizes:
            sizes[name] = model_image_size(name)
        init, size = item.get("init"), sizes[name]
        if init is not None and size is not None:
            check_image_size(*init.size, size, item["resize"], name, spell='"resize": "{}"')
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _checked_item(raw: dict[str, Any], d: JobDefaults, index: int) -> dict[str, Any]:
    """One line's item: its fields, or the job's defaults, checked against the ranges the other
    entry points accept (:mod:`noisewise.limits`), so a bad line fails when the file is read rather
    than partway through the job."""
    item = {
        "id": raw.get("id", f"{index:06d}"),
        "prompt": raw.get("prompt", ""),
        "negative_prompt": raw.get("negative_prompt", d.negative_prompt),
        "negative_scale": raw.get("negative_scale", d.negative_scale),
        "negative_above": raw.get("negative_above", d.negative_above),
        "negative_perpendicular": raw.get("negative_perpendicular", d.negative_perpendicular),
        "model": raw.get("model", d.model),
        "sampler": raw.get("sampler", d.sampler),
        "steps": raw.get("steps", d.steps),
        "guidance_scale": raw.get("guidance_scale", d.guidance_scale),
        "compose": raw.get("compose", d.compose),
        "seed": raw.get("seed", d.base_seed + index),
        "num_images": raw.get("num_images", d.num_images),
    }
    if isinstance(item["id"], int) and not isinstance(item["id"], bool):
        item["id"] = str(item["id"])
    for key, optional in (("id", False), ("prompt", False), ("model", False), ("negative_prompt", True),
                          ("sampler", True)):
        if not isinstance(item[key], str) and not (optional and item[key] is None):
            raise ValueError(f"{key} must be a string{' or null (the default)' if optional else ''}, "
                             f"got {item[key]!r}")
    if not _ID.match(item["id"]):
        raise ValueError(f"id {item['id']!r} must be letters, digits, '.', '_' or '-' (it names the output files)")
    if item["negative_perpendicular"] is not None and not isinstance(item["negative_perpendicular"], bool):
        raise ValueError(f"negative_perpendicular must be true, false or null (the model's default), "
                         f"got {item['negative_perpendicular']!r}")
    if item["sampler"] is not None:  # a typo fails here, with "did you mean", not when its line runs
        from ..solvers import get_sampler

        get_sampler(item["sampler"])
    if item["compose"] is not None and item["compose"] not in COMPOSE_MODES:
        raise ValueError(f"compose must be one of {', '.join(COMPOSE_MODES)} or null (the model's default), "
                         f"got {item['compose']!r}")
    item["seed"] = limits.check_int(item["seed"], limits.SEED, "seed")
    item["num_images"] = limits.check_int(item["num_images"], limits.NUM_IMAGES, "num_images")
    if item["steps"] is not None:  # None: the model's default
        item["steps"] = limits.check_int(item["steps"], limits.STEPS, "steps")
    for key, bounds in (("guidance_scale", limits.GUIDANCE_SCALE), ("negative_scale", limits.NEGATIVE_SCALE),
                        ("negative_above", limits.NEGATIVE_ABOVE)):
        if item[key] is not None:
            item[key] = limits.check_float(item[key], bounds, key)
    return item


def _read_init_image(item: dict[str, Any], raw: dict[str, Any], base: Path, pictures: dict[Path, Any],
                     where: str, default_resize: str | None = None) -> None:
    """``image`` / ``strength`` of one line -> ``item["image"]`` (the path as written), ``item["init"]``
    (a decoded :class:`noisewise.server.service.InitImage`), ``item["strength"]`` (default 0.8) and
    ``item["resize"]`` (default ``default_resize``, else ``"auto"``; :func:`_check_model` then checks the size
    against the model)."""
    from ..pipeline.img2img import DEFAULT_STRENGTH, check_resize
    from ..server.service import decode_image_bytes

    image, strength = raw.get("image"), raw.get("strength")
    if image is None:
        for k in ("strength", "resize"):
            if raw.get(k) is not None:
                raise ValueError(f"{where}: {k} needs an image (a PNG/JPEG path); leave {k} out for "
                                 "text-to-image")
        return
    try:
        resize = check_resize(raw.get("resize", default_resize))
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    if not isinstance(image, str) or not image:
        raise ValueError(f"{where}: image must be a PNG/JPEG file path (relative to the JSONL file's folder)")
    if strength is None:
        strength = DEFAULT_STRENGTH
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < float(strength) <= 1.0:
        raise ValueError(f"{where}: strength must be above 0 and at most 1 (1 ignores the image), got {strength!r}")
    file = (base / image).expanduser()
    key = file.resolve()
    if key not in pictures:
        try:
            data = file.read_bytes()
        except OSError as e:
            raise ValueError(f"{where}: cannot read image {image!r} ({e.strerror or e}); paths are relative to "
                             f"{base}") from None
        try:
            pictures[key] = decode_image_bytes(data, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS,
                                               what=f"image {image!r}", where="")
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    item.update(image=image, init=pictures[key], strength=float(strength), resize=resize)


class ItemRunner:
    """Generates one item at a time; keeps one pipeline per model. Used in-process (local engine)
    and as the Ray actor class."""

    def __init__(self, torch_threads: int | None = None) -> None:
        self._pipes: dict[str, Any] = {}
        if torch_threads:
            import torch

            torch.set_num_threads(int(torch_threads))

    def pipe(self, model: str) -> Any:
        if model not in self._pipes:
            from ..pipeline import Pipeline

            self._pipes[model] = Pipeline.from_pretrained(model)
        return self._pipes[model]

    def run_or_fail(self, item: dict[str, Any]) -> tuple[str, Any, Any, int]:
        """:meth:`run`, with a failure returned as ``(id, None, "<error>: <message>", 0)`` instead of
        raised, so that one item that fails does not stop the others."""
        try:
            return self.run(item)
        except Exception as e:  # noqa: BLE001 - reported per item; the job goes on
            return item["id"], None, f"{type(e).__name__}: {e}", 0

    def run(self, item: dict[str, Any]) -> tuple[str, Any, list[dict[str, Any]], int]:
        """``(id, uint8 images NHWC, metadata per image, nfe)``."""
        pipe = self.pipe(item["model"])
        sampler = item["sampler"] or pipe.defaults["sampler"]
        extra: dict[str, Any] = {}  # a stochastic sampler's step noise: seeded per image by the pipeline
        init = item.get("init")
        if init is not None:
            extra.update(image=init.pixels, strength=item["strength"], resize=item["resize"])
        res = pipe(item["prompt"], negative_prompt=item["negative_prompt"], negative_scale=item.get("negative_scale"),
                   negative_above=item.get("negative_above"),
                   negative_perpendicular=item.get("negative_perpendicular"), num_images=item["num_images"],
                   seed=item["seed"], sampler=sampler, steps=item["steps"], guidance_scale=item["guidance_scale"],
                   compose=item.get("compose"), **extra)
        meta = [dict(m, id=item["id"]) for m in res.metadata]
        if init is not None:  # as over HTTP: the init image's hashes and path (the pipeline records the strength)
            for m in meta:
                m.update(init_image=dict(init.info(), path=item["image"]))
        return item["id"], res.images, meta, int(res.nfe)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def item_done(out: Path, item_id: str) -> bool:
    return (out / f"{item_id}.json").is_file()


def write_item(out: Path, item_id: str, images: Any, meta: list[dict[str, Any]], nfe: int) -> list[Path]:
    """PNGs first, then the JSON that marks the item finished; each via a temporary file + rename."""
    from ..server.service import png_bytes

    paths = [out / (f"{item_id}.png" if len(images) == 1 else f"{item_id}-{i}.png") for i in range(len(images))]
    for p, im, m in zip(paths, images, meta):
        _atomic_write(p, png_bytes(im, m))
    record = {"id": item_id, "files": [p.name for p in paths], "nfe": nfe, "metadata": meta}
    _atomic_write(out / f"{item_id}.json", (json.dumps(record, indent=1) + "\n").encode())
    return paths


@dataclass
class BatchReport:
    total: int
    skipped: int
    done: int
    seconds: float
    nfe: int
    first_result_s: float | None = None  # start-up (engine, model loading) plus the first item
    failed: dict[str, str] = field(default_factory=dict)  # item id -> what went wrong (no files written)

    @property
    def images_per_s(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def steady_items_per_s(self) -> float | None:
        """Items per second after the first result (start-up excluded); None with fewer than 2 items."""
        if self.first_result_s is None or self.done < 2 or self.seconds <= self.first_result_s:
            return None
        return (self.done - 1) / (self.seconds - self.first_result_s)


def _local(items: list[dict[str, Any]], torch_threads: int | None) -> Iterator[tuple[str, Any, Any, int]]:
    runner = ItemRunner(torch_threads)
    for item in items:
        yield runner.run_or_fail(item)


def _ray(items: list[dict[str, Any]], workers: int, address: str | None,
         torch_threads: int | None) -> Iterator[tuple[str, Any, Any, int]]:
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as e:
        raise ImportError("--engine ray needs Ray: pip install 'noisewise[ray]'") from e
    started_here = not ray.is_initialized()
    if started_here:
        kw: dict[str, Any] = {"address": address, "include_dashboard": False, "log_to_driver": False,
                              "ignore_reinit_error": True}
        if address is None:
            kw["num_cpus"] = max(workers, 1)
        ray.init(**kw)
    try:
        actor = ray.remote(num_cpus=1)(ItemRunner)
        pool = ActorPool([actor.remote(torch_threads or 1) for _ in range(workers)])
        yield from pool.map_unordered(lambda a, it: a.run_or_fail.remote(it), items)
    finally:
        if started_here:
            ray.shutdown()


def run_batch(
    items: Iterable[dict[str, Any]], out: str | os.PathLike[str], *, engine: Literal["local", "ray"] = "local",
    workers: int = 2, address: str | None = None, torch_threads: int | None = None, progress: bool = True,
) -> BatchReport:
    """Generate every unfinished item into ``out`` (finished items are skipped: resumable). An item that
    fails is logged and reported in ``BatchReport.failed``, writes no files, and the job goes on; a
    rerun tries it again."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    items = list(items)
    pending = [it for it in items if not item_done(out_dir, it["id"])]
    skipped = len(items) - len(pending)
    if engine not in ("local", "ray"):
        raise ValueError(f"engine must be 'local' or 'ray', got {engine!r}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=skipped, desc=f"batch ({engine})", unit="item", file=sys.stderr)
    t0 = time.perf_counter()
    done = nfe = 0
    first: float | None = None
    failed: dict[str, str] = {}
    try:
        if pending:
            results = _local(pending, torch_threads) if engine == "local" else _ray(pending, workers, address,
                                                                                  torch_threads)
            for item_id, images, meta, n in results:
                if images is None:
                    failed[item_id] = str(meta)
                    logger.error("item %s failed: %s", item_id, meta)
                else:
                    write_item(out_dir, item_id, images, meta, n)
                    done += 1
                    nfe += n
                if first is None:
                    first = time.perf_counter() - t0
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return BatchReport(len(items), skipped, done, time.perf_counter() - t0, nfe, first, failed)
