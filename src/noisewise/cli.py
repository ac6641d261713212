"""``noisewise`` command line: a thin layer over the Python API.

    noisewise generate "a large red circle on the left" --out out.png
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import limits
from .pipeline.presets import PRESETS

DEFAULT_MODEL = "shapes-vp"


class UserError(Exception):
    """A mistake in the command's input: reported as one line, exit status 2."""


def _int_range(lo: int, hi: int, what: str) -> Any:
    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be an integer, got {s!r}") from None
        try:
            return limits.check_int(v, (lo, hi), what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _float_range(lo: float, hi: float, what: str) -> Any:
    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} must be a number, got {s!r}") from None
        try:
            return limits.check_float(v, (lo, hi), what)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return parse


def _check_writable(out: Path) -> None:
    if out.suffix.lower() != ".png":
        raise UserError(f"--out must be a .png path, got {str(out)!r}")
    parent = out.parent if str(out.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {str(parent)!r}: {e.strerror or e}") from None
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise UserError(f"cannot write to {str(out)!r}: permission denied")
    if out.is_dir():
        raise UserError(f"--out {str(out)!r} is a folder; give a file name such as {str(out / 'image.png')!r}")


def _outputs(out: Path, n: int) -> list[Path]:
    """The files a run writes for ``--out out``: the view, then ``n`` native images ``<stem>-<i>.png``."""
    return [out] + [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(n)]


def _free_out(out: Path, n: int) -> Path:
    """``out`` if none of the files a run would write there exists, else the first free ``<stem>_<k>.png``
    (k = 2, 3, ...): an earlier run's images are never replaced without ``--overwrite``."""
    cand, k = out, 1
    while any(p.exists() for p in _outputs(cand, n)):
        k += 1
        cand = out.with_name(f"{out.stem}_{k}{out.suffix}")
    return cand


def _save_png(image: Any, path: Path, meta: dict[str, Any], scale: int) -> None:
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    info.add_text("parameters", json.dumps(meta))
    for k, v in meta.items():
        if isinstance(v, (str, int, float)):
            info.add_text(k, str(v))
    img = Image.fromarray(image)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # whole files only, even with --overwrite
    try:
        img.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _grid(images: Any, cols: int, pad: int = 1) -> Any:
    import numpy as np

    n, h, w, c = images.shape
    rows = (n + cols - 1) // cols
    g = np.full((rows * (h + pad) - pad, cols * (w + pad) - pad, c), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, q = divmod(i, cols)
        g[r * (h + pad) : r * (h + pad) + h, q * (w + pad) : q * (w + pad) + w] = im
    return g


# generate options a PNG's parameters fill when they were not given (--from): metadata key -> option
_FROM_KEYS = ("prompt", "negative_prompt", "negative_scale", "negative_above", "negative_perpendicular", "model",
              "sampler", "steps", "guidance_scale", "preset", "strength", "resize", "compose", "compose_scale",
              "region_sigma", "region_context_below")


def _read_parameters(path: str) -> dict[str, Any]:
    """The generation parameters a noisewise PNG carries (its ``parameters`` text chunk)."""
    try:
        from PIL import Image

        with Image.open(path) as im:
            text = getattr(im, "text", {}).get("parameters")
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"cannot read --from {path!r}: {e}") from None
    try:
        meta = json.loads(text) if text is not None else None
    except json.JSONDecodeError:
        meta = None
    if not isinstance(meta, dict) or "prompt" not in meta or "seed" not in meta:
        raise UserError(f"--from {path!r} carries no noisewise generation parameters (a 'parameters' PNG text "
                        "chunk as noisewise generate, serve and batch write); give the prompt and options instead")
    return meta


def _apply_from(a: argparse.Namespace, meta: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """Fill ``a``'s options that were not given from a PNG's parameters ``meta``. Returns the pipeline
    arguments the command line has no option for (sampler options, ``compose_full_scale``,
    ``phrase_states``) and the pixels SHA-256 the init image must have when its recorded path is used."""
    for key in _FROM_KEYS:
        if getattr(a, key) is None and meta.get(key) is not None:
            setattr(a, key, meta[key])
    if a.seed is None:
        a.seed = int(meta["seed"])
    if a.num_images is None:  # a grid's view records how many; a native image is one
        a.num_images = int(meta.get("num_images", 1))
    extra = {k: meta[k] for k in ("compose_full_scale", "phrase_states") if meta.get(k) is not None}
    opts = meta.get("sampler_options") or {}
    if isinstance(opts, dict) and a.sampler == meta.get("sampler"):  # options of another sampler do not carry
        extra.update({k: v for k, v in opts.items() if k not in ("strength", "spacing")})
        if a.spacing is None and isinstance(opts.get("spacing"), str):
            a.spacing = opts["spacing"]
    want = None
    init = meta.get("init_image")
    if a.image is None and isinstance(init, dict):
        if not init.get("path") or not Path(str(init["path"])).is_file():
            where = f"at {init['path']!r}, which is not there" if init.get("path") else "without its path"
            raise UserError(f"--from: this image was made from an init image (pixels SHA-256 "
                            f"{init.get('pixels_sha256', '?')}) recorded {where}; pass it with --image")
        a.image, want = str(init["path"]), init.get("pixels_sha256")
    return extra, want


def cmd_generate(a: argparse.Namespace) -> int:
    import torch

    from .pipeline import Pipeline
    from .tuning import NoTunedSchedule

    out = Path(a.out)
    _check_writable(out)
    extra: dict[str, Any] = {}
    want_init = None
    if a.from_png is not None:
        extra, want_init = _apply_from(a, _read_parameters(a.from_png))
    elif a.prompt is None:
        raise UserError("give a prompt (\"\" samples unconditionally), or --from a PNG to make it again")
    a.model = a.model if a.model is not None else DEFAULT_MODEL
    a.seed = a.seed if a.seed is not None else 0
    a.num_images = a.num_images if a.num_images is not None else 1
    if a.sampler is not None:
        from .solvers import get_sampler

        try:  # before loading the model: a typo should cost nothing
            get_sampler(a.sampler)
        except (KeyError, ValueError) as e:
            raise UserError(str(e).strip("'\"")) from None
    if a.spacing is not None and a.spacing != "tuned":
        from .core.spacing import get_spacing

        try:
            get_spacing(a.spacing)
        except ValueError as e:
            raise UserError(str(e) + ", or tuned") from None
    device = a.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here; use --device cpu")
    image = None
    init_info: dict[str, Any] = {}
    if a.image is not None:
        import io

        import numpy as np

        from .server.service import InitImage

        try:
            from PIL import Image

            data = Path(a.image).read_bytes()
            with Image.open(io.BytesIO(data)) as im:
                init = InitImage.of(data, np.asarray(im.convert("RGB"), dtype=np.uint8), str(im.format))
        except (OSError, ImportError, ValueError, SyntaxError) as e:
            raise UserError(f"cannot read --image {a.image!r}: {e}") from None
        image = init.pixels
        if want_init is not None and init.pixels_sha256 != want_init:
            raise UserError(f"--from: the init image at {a.image!r} is not the one recorded (its pixels' SHA-256 "
                            "differs); pass --image to use it anyway")
        # what identifies the init image, as the server records it: the file's and the pixels' SHA-256
        init_info = {"init_image": dict(init.info(), path=str(a.image))}
    elif a.strength is not None or a.resize is not None:
        raise UserError(f"{'--strength' if a.strength is not None else '--resize'} needs --image (image-to-image)")
    try:
        pipe = Pipeline.from_pretrained(a.model, device=device)
        if a.preset is not None:
            from .pipeline.presets import prepare

            prepare(pipe, a.preset)  # the preset's pipeline-level optimizations (e.g. bfloat16)
    except (ValueError, FileNotFoundError, OSError) as e:
        raise UserError(str(e)) from None
    steps = a.steps if a.steps is not None else (
        PRESETS[a.preset].steps if a.preset is not None else pipe.defaults["steps"])
    if image is not None:
        from .core.grid import strength_start
        from .pipeline.img2img import check_image_size

        try:  # before sampling, in this command's own words
            check_image_size(image.shape[1], image.shape[0], int(pipe.sample_size), a.resize or "auto", a.model,
                             spell="--resize {}")
        except ValueError as e:
            raise UserError(str(e)) from None

        steps -= strength_start(steps, 0.8 if a.strength is None else a.strength)
    bar = None
    if not a.quiet:
        try:
            from tqdm.auto import tqdm

            bar = tqdm(total=steps, desc="sampling", unit="step", leave=False, file=sys.stderr)
        except ImportError:  # pragma: no cover
            bar = None

    def on_step(info: Any) -> None:
        if bar is not None:
            bar.update(1)

    try:
        res = pipe(
            a.prompt, negative_prompt=a.negative_prompt, negative_scale=a.negative_scale, num_images=a.num_images,
            seed=a.seed,
            sampler=a.sampler, steps=a.steps, guidance_scale=a.guidance_scale, callback=on_step, preset=a.preset,
            **({"image": image, "strength": a.strength, "resize": a.resize} if image is not None else {}),
            **({"spacing": a.spacing} if a.spacing is not None else {}),
            **{k: v for k, v in (("negative_above", a.negative_above),
                                 ("negative_perpendicular", a.negative_perpendicular), ("compose", a.compose),
                                 ("compose_scale", a.compose_scale),
                                 ("region_sigma", a.region_sigma),
                                 ("region_context_below", a.region_context_below)) if v is not None},
            **extra,
        )
    except NoTunedSchedule as e:
        w = a.guidance_scale if a.guidance_scale is not None else pipe.defaults["guidance_scale"]
        order = f" --order {e.options['order']}" if "order" in e.options else ""
        raise UserError(f"no tuned schedule is cached for {a.model} with sampler {e.sampler!r} at {e.nfe} NFE "
                        f"({e.steps} steps) and guidance scale {w:g}; tune one first (a few minutes): noisewise "
                        f"tune-schedule --model {a.model} --sampler {e.sampler}{order} --nfe {e.nfe} "
                        f"--guidance-scale {w:g} (docs/tuning.md)") from None
    except (ValueError, TypeError) as e:
        raise UserError(str(e)) from None
    finally:
        if bar is not None:
            bar.close()
    metadata = [dict(m, **init_info) for m in res.metadata]
    view = res.images[0] if len(res) == 1 else _grid(res.images, min(len(res), a.cols))
    view_meta = dict(metadata[0], num_images=len(res), seeds=[m["seed"] for m in metadata])
    view_meta.pop("seed")
    view_meta["seed"] = a.seed
    written = []
    asked = out
    if not a.overwrite:  # chosen again now: another run may have written there while this one sampled
        out = _free_out(out, len(res))
    try:
        paths = _outputs(out, len(res))
        _save_png(view, paths[0], view_meta, a.scale)
        written.append(str(paths[0]))
        for img, meta, p in zip(res.images, metadata, paths[1:]):
            _save_png(img, p, meta, 1)
            written.append(str(p))
    except OSError as e:
        raise UserError(f"cannot write {str(out)!r}: {e.strerror or e}") from None
    what = f"a grid of {len(res)} images" if len(res) > 1 else "the image"
    kept = f"; {asked} was there already and is kept (--overwrite replaces it)" if out != asked else ""
    print(f"wrote {out} ({what}, {a.scale}x pixel-exact view) and {len(res)} native "
          f"{res.images.shape[1]}x{res.images.shape[2]} PNG(s): {', '.join(written[1:])}{kept}")
    if a.from_png is not None:
        print(_compare_with(a.from_png, view, res.images))
    return 0


def _compare_with(path: str, view: Any, images: Any) -> str:
    """How the images made ``--from path`` compare with that PNG's pixels (a native image, or a view at
    any whole-number scale)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        old = np.asarray(im.convert("RGB"))
    new = images[0] if len(images) == 1 else view
    h, w = new.shape[:2]
    k = old.shape[0] // h if h else 0
    if k < 1 or old.shape[:2] != (k * h, k * w):
        return f"(not compared with {path}: it is {old.shape[1]}x{old.shape[0]}, these are {w}x{h})"
    old = old[::k, ::k]
    diff = np.abs(old.astype(np.int16) - new.astype(np.int16))
    if not diff.any():
        return f"pixel-identical to {path}"
    return (f"differs from {path} in {int(diff.any(axis=-1).sum())} of {h * w} pixels (at most {int(diff.max())} "
            "levels): options changed, or another device or library version")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="noisewise", description="Sampling and guidance for diffusion and flow models.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser(
        "generate", help="text-to-image with a shipped model or a diffusers-style folder",
        description="Generate images from a prompt. Every parameter is stored in the PNGs' text metadata.",
    )
    g.add_argument("prompt", nargs="?", default=None,
                   help='what to draw, e.g. "a large red circle on the left" ("" = unconditional); with --from, '
                        "the PNG's prompt")
    g.add_argument("--from", dest="from_png", metavar="PNG", default=None,
                   help="make an image again from the parameters a noisewise PNG carries (generate, serve and "
                        "batch write them); options given here replace the recorded ones, and the result is "
                        "compared with the PNG's pixels")
    g.add_argument("--negative-prompt", default=None,
                   help='what to steer away from (default: the model\'s: "blurry, watermark" for the shipped '
                        'shapes models, none for other checkpoints; "" for none)')
    g.add_argument("--negative-scale", type=_float_range(*limits.NEGATIVE_SCALE, "--negative-scale"), default=None,
                   help="the negative prompt's own weight s: D(u) + w (D(c) - D(u)) - s (D(neg) - D(u)), one more "
                        "network row per image (default: the model's; for a model without one the negative prompt "
                        "replaces the unconditional branch, which is s = guidance scale - 1)")
    g.add_argument("--negative-above", type=_float_range(*limits.NEGATIVE_ABOVE, "--negative-above"), default=None,
                   help="with a negative scale: the negative prompt acts only at noise levels sigma/alpha at or "
                        "above this, so it steers the coarse image without retouching colours late (0 = every "
                        "level; default: the model's)")
    g.add_argument("--negative-perpendicular", action=argparse.BooleanOptionalAction, default=None,
                   help="with a negative scale: subtract only the part of the negative prompt's direction "
                        "perpendicular to the prompt's guided direction (Perp-Neg), so the negative does not also "
                        "push harder along the prompt (default: the model's)")
    g.add_argument("--model", default=None, help="shapes-vp (the default), shapes-flow, or a model folder")
    g.add_argument("--sampler", default=None, help="sampler name (default: the model's, dpmpp_2m)")
    g.add_argument("--steps", type=_int_range(*limits.STEPS, "--steps"), default=None, help="default: the model's (10)")
    g.add_argument("--spacing", default=None,
                   help="where the steps sit: leading, trailing, linspace, karras, exponential, uniform_lambda, "
                        "time_quadratic, beta, or tuned (a schedule stored by `noisewise tune-schedule` for this "
                        "model, sampler, NFE and guidance scale); default: the sampler's recommendation")
    g.add_argument("--guidance-scale", type=_float_range(*limits.GUIDANCE_SCALE, "--guidance-scale"), default=None,
                   help="classifier-free guidance scale (default: the model's)")
    g.add_argument("--seed", type=_int_range(*limits.SEED, "--seed"), default=None,
                   help="image i uses seed + i (default 0)")
    g.add_argument("--preset", choices=list(PRESETS), default=None,
                   help="latency/quality preset (sampler, steps, precision; the model's guidance scale); explicit "
                        "options win")
    g.add_argument("--image", default=None,
                   help="image-to-image: start from this PNG/JPEG picture, brought to the model's size by --resize")
    g.add_argument("--strength", type=_float_range(0.0, 1.0, "--strength"), default=None,
                   help="image-to-image strength: 0 keeps the image, 1 ignores it (default 0.8)")
    g.add_argument("--resize", choices=list(limits.RESIZE_MODES), default=None,
                   help="image-to-image: how a picture of another size becomes the model's: 'auto' (default) "
                        "scales a square picture and refuses other shapes, 'crop' scales the centre square, "
                        "'stretch' scales each side on its own, 'off' refuses every other size. A view this "
                        "command wrote (--scale) shrinks back to exactly its pixels")
    g.add_argument("--compose", choices=["off", "and", "regions", "objects", "binding", "layout"], default=None,
                   help="prompt composition (docs/composition.md): 'regions' lays out the two objects of "
                        "a shapes prompt and guides each with its own phrase in its region (the shapes models' "
                        "default); 'and' composes the parts of 'A AND B' (any model); 'off' = plain CFG")
    g.add_argument("--compose-scale", type=_float_range(0.0, 50.0, "--compose-scale"), default=None,
                   help="weight of each component (regions: 1 = the object's phrase replaces the prompt in its "
                        "region; default: the model's, else 1)")
    g.add_argument("--region-sigma", type=_float_range(0.01, 1.0, "--region-sigma"), default=None,
                   help="width of a region (fraction of the image; default: the model's, else 0.12)")
    g.add_argument("--region-context-below", type=_float_range(0.0, 1e6, "--region-context-below"), default=None,
                   help="regions: at noise levels sigma/alpha at or below this, each object's phrase also names the "
                        "other object by its position, so it does not erase what is drawn (0 = off; default: the "
                        "model's, else 0.6)")
    g.add_argument("--num-images", type=_int_range(*limits.NUM_IMAGES, "--num-images"), default=None,
                   help="default 1")
    g.add_argument("--out", default="out.png",
                   help="the viewable PNG; native images go to <out>-<i>.png. If any of these files exists, the "
                        "run writes <out>_2.png (_3, ...) instead and says so")
    g.add_argument("--overwrite", action="store_true", help="replace the files at --out instead")
    g.add_argument("--scale", type=_int_range(1, 64, "--scale"), default=8, help="pixel-exact upscaling of the view")
    g.add_argument("--cols", type=_int_range(1, 64, "--cols"), default=4, help="grid columns for several images")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_generate)
    from .tuning import add_cli as add_tune_schedule  # noisewise tune-schedule (docs/tuning.md)

    add_tune_schedule(sub)
    from .server.cli import add_cli as add_serve_batch  # noisewise serve / batch (docs/serving.md)

    add_serve_batch(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="noisewise: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "diffusers", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"noisewise: error: {e}", file=sys.stderr)
        return 2
    except ImportError as e:
        print(f"noisewise: error: {e}. Install the model extras: pip install 'noisewise[models]'", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # python -m noisewise.cli: run the package's module, so that the UserError
    from noisewise.cli import main as _main  # raised by its subcommands (serve, batch) is the one caught

    sys.exit(_main())
