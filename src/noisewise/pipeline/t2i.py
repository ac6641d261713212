"""Text-to-image: text encoder -> guided denoiser -> noisewise sampler -> VAE decoder.

The pipeline only composes. Models load from a diffusers-style folder (``model_index.json``,
``unet/``, ``vae/``, ``scheduler/scheduler_config.json``; optionally ``text_encoder/`` +
``tokenizer/``) through diffusers' and transformers' own classes, the same code path for the
shipped ``shapes-*`` models and for a user's checkpoint on disk.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..core.schedules import Schedule
from .text import DEFAULT_TEXT_ENCODER, TextEncoder
from .vae import LatentCodec, tensor_to_images

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

DEFAULT_NEGATIVE_PROMPT = "blurry, watermark"
MAX_IMAGES = 64
MAX_STEPS = 1000
MAX_GUIDANCE = 50.0


def _check_weight(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= MAX_GUIDANCE:
        raise ValueError(f"{name} must be a number from 0 to {MAX_GUIDANCE}, got {v!r}")
    return float(v)


def weights_root() -> Path:
    return Path(__file__).resolve().parent.parent / "weights"


def available_models() -> dict[str, Path]:
    """Shipped text-to-image models: name -> folder."""
    root = weights_root()
    if not root.is_dir():
        return {}
    return {p.name: p for p in sorted(root.iterdir()) if (p / "model_index.json").is_file()}


def resolve_model(name_or_path: str | os.PathLike[str]) -> Path:
    """A shipped model name or a folder holding ``model_index.json``; a teaching error otherwise."""
    models = available_models()
    s = str(name_or_path)
    if s in models:
        return models[s]
    p = Path(s).expanduser()
    if p.is_file():
        from .loading import single_file_message

        raise ValueError(single_file_message(p))
    if p.is_dir():
        if (p / "model_index.json").is_file() or (p / "unet").is_dir():
            return p
        raise ValueError(
            f"{p} is not a model folder: expected model_index.json with unet/, vae/ and scheduler/ inside "
            "(a diffusers-style pipeline folder)"
        )
    hint = difflib.get_close_matches(s, list(models), n=1)
    did = f"; did you mean {hint[0]!r}?" if hint else ""
    raise ValueError(f"unknown model {s!r}{did} Shipped models: {', '.join(models) or 'none'}; or pass a folder path")


def model_image_size(name_or_path: str | os.PathLike[str]) -> int | None:
    """The side in pixels of the images a model folder makes (``Pipeline.sample_size``), read from its
    ``unet/`` and ``vae/`` configs without loading any weights; ValueError from :func:`resolve_model` for
    a name that is no model, None where the folder's layout does not tell (e.g. a transformer)."""
    root = resolve_model(name_or_path)
    try:
        index_file = root / "model_index.json"
        index = json.loads(index_file.read_text()) if index_file.is_file() else {}
        unet = json.loads((_component_dir(root, index, "unet") / "config.json").read_text())
        vae = json.loads((_component_dir(root, index, "vae") / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _component_dir(root: Path, index: dict[str, Any], name: str) -> Path:
    direct = root / name
    if direct.is_dir():
        return direct
    rel = index.get("_noisewise", {}).get("components", {}).get(name)
    if rel is not None and (root / rel).is_dir():
        return (root / rel).resolve()
    raise FileNotFoundError(f"model folder {root} has no {name}/ component")


STEP_SEED_OFFSET = 0x5EED  # Pipeline.step_generators: seed + this, apart from the initial noise's seed


@dataclass
class GenerationResult:
    """``images``: uint8 ``(N, H, W, 3)``; ``metadata``: one dict per image with every parameter
    needed to reproduce it (its own ``seed``)."""

    images: np.ndarray
    metadata: list[dict[str, Any]]
    nfe: int = 0
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.images)


class Pipeline:
    """Text-to-image pipeline over a ``UNet2DConditionModel``, an ``AutoencoderKL`` and a schedule.

    ``pipe = Pipeline.from_pretrained("shapes-vp")``; ``pipe("a red circle", num_images=4, seed=0)``.
    """

    def __init__(
        self,
        unet: Any,
        codec: LatentCodec,
        text_encoder: TextEncoder,
        schedule: Schedule,
        *,
        name: str = "custom",
        defaults: dict[str, Any] | None = None,
        source: Path | None = None,
        index: dict[str, Any] | None = None,
    ) -> None:
        self.unet = unet
        self.codec = codec
        self.text_encoder = text_encoder
        self.schedule = schedule
        self.name = name
        self.defaults = {
            "sampler": "dpmpp_2m", "steps": 20, "guidance_scale": 7.5, "negative_prompt": DEFAULT_NEGATIVE_PROMPT,
            **(defaults or {}),
        }
        self.source = source
        self.index = index or {}
        pinned = getattr(text_encoder, "pinned_prompts", None)
        if pinned is not None:  # the default negative prompt stays warm in the embedding cache
            pinned.add(self.defaults["negative_prompt"])
        cfg = unet.config
        self.sample_size = int(cfg.sample_size) * codec.downsample
        self.latent_shape = (int(cfg.in_channels), int(cfg.sample_size), int(cfg.sample_size))

    # -- loading ------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls, name_or_path: str | os.PathLike[str], *, device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> Pipeline:
        """Load a shipped model (``"shapes-vp"``, ``"shapes-flow"``) or a diffusers-style folder."""
        root = resolve_model(name_or_path)
        from .loading import family_of, load_checkpoint, load_diffusers_model, read_index, require_safetensors

        index = read_index(root)
        family = family_of(index, root)
        if family is not None:  # a user's diffusers checkpoint (SD 1.x/2.x, SD3): see noisewise.pipeline.loading
            parts = load_checkpoint(root, index, family, device=device, dtype=dtype)
            return cls(**parts, name=root.name, source=root, index=index)
        require_safetensors(_component_dir(root, index, "unet"), "unet")
        require_safetensors(_component_dir(root, index, "vae"), "vae")
        unet = load_diffusers_model(_component_dir(root, index, "unet"), "UNet2DConditionModel", dtype, device)
        codec = LatentCodec.from_pretrained(_component_dir(root, index, "vae"), dtype=dtype)
        codec.vae.to(device)
        schedule = Schedule.from_diffusers(_component_dir(root, index, "scheduler"))
        nw = index.get("_noisewise", {})
        max_len = int(nw.get("text_max_length", 77))
        if (root / "text_encoder").is_dir():
            tok = root / "tokenizer" if (root / "tokenizer").is_dir() else None
            text = TextEncoder(root / "text_encoder", tokenizer_path=tok, max_length=max_len, device=device)
        else:
            te = index.get("text_encoder", [None, DEFAULT_TEXT_ENCODER])
            te_name = te[1] if isinstance(te, list) and len(te) > 1 else DEFAULT_TEXT_ENCODER
            if te_name != DEFAULT_TEXT_ENCODER:
                raise ValueError(
                    f"model {root} names text encoder {te_name!r} but has no text_encoder/ folder; "
                    f"add text_encoder/ and tokenizer/ folders or use {DEFAULT_TEXT_ENCODER!r}"
                )
            text = TextEncoder(None, max_length=max_len, device=device)
        name = root.name if str(name_or_path) not in available_models() else str(name_or_path)
        return cls(unet, codec, text, schedule, name=name, defaults=nw.get("defaults"), source=root, index=index)

    def save_pretrained(self, path: str | os.PathLike[str]) -> None:
        """Write a self-contained diffusers-style folder (the text encoder stays a reference unless
        the pipeline was loaded with its own ``text_encoder/``)."""
        from .loading import family_of

        if self.source is not None and family_of(self.index, self.source) is not None:
            raise ValueError(
                f"this pipeline was loaded from a user's diffusers checkpoint ({self.source}), which is already a "
                "diffusers folder: copy that folder instead of saving it again"
            )
        out = Path(path)
        out.mkdir(parents=True, exist_ok=True)
        self.unet.save_pretrained(str(out / "unet"))
        self.codec.vae.save_pretrained(str(out / "vae"))
        sched_dir = out / "scheduler"
        sched_dir.mkdir(exist_ok=True)
        src = None
        if self.source is not None:
            try:
                src = _component_dir(self.source, self.index, "scheduler") / "scheduler_config.json"
            except FileNotFoundError:
                src = None
        if src is not None and src.is_file():
            shutil.copyfile(src, sched_dir / "scheduler_config.json")
        else:
            raise ValueError("this pipeline was not loaded from a folder; cannot write its scheduler config")
        index = {k: v for k, v in self.index.items()}
        nw = dict(index.get("_noisewise", {}))
        nw.pop("components", None)
        nw["defaults"] = dict(self.defaults)
        nw["text_max_length"] = self.text_encoder.max_length
        index["_noisewise"] = nw
        (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Pipeline:
        """Move the networks to ``device`` and/or cast them to ``dtype`` (``torch.float16`` /
        ``torch.bfloat16``: the UNet, VAE and text encoder run in half precision while the solver
        keeps its state in float32; a half VAE decode falls back to float32 on NaN/black images)."""
        if device is not None:
            self.unet.to(device)
            self.codec.vae.to(device)
            self.text_encoder.to(device)
        if dtype is not None:
            self.unet.to(dtype=dtype)
            self.codec.vae.to(dtype=dtype)
            self.text_encoder.to(dtype=dtype)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    # -- the pieces ---------------------------------------------------------------------------
    def model_fn(self, x: Tensor, model_time: Tensor, cond: Tensor) -> Tensor:
        """The raw network: ``unet(x, t, encoder_hidden_states=cond)`` (cond batch-aligned with x);
        classifier-free guidance (:mod:`noisewise.guidance`) calls it with both branches in one batch.
        A dict ``cond`` (SD3: ``encoder_hidden_states`` + ``pooled_projections``) goes in as keywords."""
        dt = next(self.unet.parameters()).dtype
        if isinstance(cond, dict):
            kw = {k: v.to(dt) for k, v in cond.items()}
            return self.unet(x.to(dt), timestep=model_time, **kw).sample
        return self.unet(x.to(dt), model_time, encoder_hidden_states=cond.to(dt)).sample

    def encode_prompt(self, prompts: Sequence[str]) -> Tensor:
        out = self.text_encoder.encode(list(prompts))
        if isinstance(out, dict):  # SD3: {"encoder_hidden_states", "pooled_projections"}
            return {k: v.to(self.device) for k, v in out.items()}  # type: ignore[return-value]
        return out.to(self.device)

    def resolve_negative(self, negative_prompt: str | None = None, negative_scale: float | None = None,
                         negative_above: float | None = None, guidance: Any = None,
                         negative_perpendicular: bool | None = None) -> tuple[str, float | None, float, bool]:
        """The negative prompt, its own scale (None: it replaces the unconditional branch), the noise
        level it acts at or above and whether only its part perpendicular to the prompt's direction
        acts, as a call with these arguments uses them: the model's defaults filled in, then checked. A
        ``guidance=`` method gets the replacing negative, not the model's scale; the model's
        ``negative_above`` and ``negative_perpendicular`` go with a weighted negative only; no negative
        prompt weighs, gates or projects nothing."""
        from ..guidance.guided import (
            check_flag,
            check_negative_above,
            check_negative_perpendicular,
            check_negative_scale,
            check_noise_level,
        )

        neg = self.defaults["negative_prompt"] if negative_prompt is None else negative_prompt
        if negative_scale is None and guidance is None:
            negative_scale = self.defaults.get("negative_scale")
        neg_scale = check_negative_scale(negative_scale)
        if negative_above is not None:
            above = check_noise_level(negative_above, "negative_above")
        else:
            above = float(self.defaults.get("negative_above", 0.0)) if neg_scale is not None else 0.0
        if negative_perpendicular is not None:
            perp = check_flag(negative_perpendicular, "negative_perpendicular")
        else:
            perp = bool(self.defaults.get("negative_perpendicular", False)) and neg_scale is not None
        if not neg.strip():
            neg_scale, above, perp = None, 0.0, False
        return neg, neg_scale, check_negative_above(above, neg_scale), check_negative_perpendicular(perp, neg_scale)

    def initial_noise(self, seeds: Sequence[int]) -> Tensor:
        """One standard-normal latent per seed (CPU generator: identical on every device)."""
        noise = [torch.randn(self.latent_shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
        return torch.stack(noise).to(self.device)

    @staticmethod
    def step_generators(seeds: Sequence[int]) -> list[torch.Generator]:
        """One CPU generator per image for the noise a stochastic sampler adds at its steps, seeded by
        the image's seed (offset from :meth:`initial_noise`'s): the same image whatever the batch or entry
        point (Python, ``generate``, the server, batch jobs)."""
        return [torch.Generator().manual_seed(int(s) + STEP_SEED_OFFSET) for s in seeds]

    def decode(self, latents: Tensor) -> np.ndarray:
        return tensor_to_images(self.codec.decode(latents))

    def _sample(
        self, noise: Tensor, cond: Tensor, uncond: Tensor, guidance_scale: float, sampler: str, steps: int,
        callback: Callable[[Any], Any] | None, model: Callable[..., Tensor] | None = None, **options: Any,
    ) -> tuple[Tensor, int]:
        from ..sampling import sample

        model_fn = self.model_fn if model is None else model
        if callable(getattr(model, "reset", None)):  # a stateful stand-in (e.g. DeepCacheUNet): fresh per run
            model.reset()  # type: ignore[union-attr]
        res = sample(
            model_fn, noise, schedule=self.schedule, sampler=sampler, steps=steps, cond=cond, uncond=uncond,
            guidance_scale=guidance_scale, callback=callback, return_info=True, **options,
        )
        return res.x, res.nfe  # type: ignore[union-attr]

    # -- the call -----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        negative_prompt: str | None = None,
        negative_scale: float | None = None,
        negative_above: float | None = None,
        negative_perpendicular: bool | None = None,
        num_images: int = 1,
        seed: int = 0,
        sampler: str | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        callback: Callable[[Any], Any] | None = None,
        model: Callable[..., Tensor] | None = None,
        image: Any = None,
        strength: float | None = None,
        resize: str | None = None,
        preset: str | None = None,
        compose: str | None = None,
        compose_scale: float | None = None,
        compose_full_scale: float | None = None,
        phrase_states: str | None = None,
        region_sigma: float | None = None,
        region_context_below: float | None = None,
        **sampler_options: Any,
    ) -> GenerationResult:
        """Generate ``num_images`` images per prompt; image ``i`` uses seed ``seed + i``.

        Args:
            prompt: a prompt, or one prompt per image (then ``num_images`` is ignored).
            negative_prompt: replaces the unconditional branch of classifier-free guidance;
                default: the model's (``"blurry, watermark"`` for the shapes models); ``""`` for plain CFG.
            negative_scale: give the negative prompt its own weight ``s`` instead of letting it replace
                the unconditional branch: ``D(u) + w (D(c) - D(u)) - s (D(neg) - D(u))``, one more
                network row per image (replacing it is ``s = w - 1``). Default: the model's, else
                None (replace); with a ``guidance=`` method None (CFG++ and autoguidance refuse a scale).
            negative_above: with a ``negative_scale``: the negative prompt acts only at noise levels
                ``sigma / alpha`` at or above this, and its rows are skipped below (0: at every level).
                A negative against defects then shapes the coarse image without retouching colours
                late. Default: the model's when the negative prompt has its own scale, else 0.
            negative_perpendicular: with a ``negative_scale``: only the part of the negative prompt's
                direction perpendicular to the prompt's guided direction is subtracted, per image
                (Perp-Neg): a negative that points against the prompt otherwise also raises the
                guidance along it. Same rows. Default: the model's when the negative prompt has its own
                scale, else False.
            sampler / steps / guidance_scale: default to the model's recommendation.
            model: a stand-in for the network called as ``model(x, model_time, cond)`` instead of
                :meth:`model_fn` (e.g. a :class:`noisewise.serving.ForwardBatcher` over it).
            image / strength: image-to-image (:mod:`noisewise.pipeline.img2img`): start from the VAE
                encoding of ``image`` (one, or one per generated image) noised to the ``strength``
                level (default 0.8; 1 ignores the image, 0 returns it).
            resize: how an input image of another size becomes the model's: ``"auto"`` (default) scales
                a square image and refuses other shapes, ``"crop"`` scales the centre square, ``"stretch"``
                scales each side on its own, ``"off"`` refuses every other size. Shrinking averages pixel
                areas, so an image enlarged by a whole factor (``noisewise generate``'s view) gives back
                exactly its pixels.
            preset: ``"realtime"``, ``"balanced"`` or ``"quality"`` (:mod:`noisewise.pipeline.presets`):
                sampler, steps, guidance and sampler options; explicit arguments override it.
            compose: prompt composition (``docs/composition.md``; all rows in one batched forward):
                ``"regions"`` lays out the two objects of a shapes prompt (a free position is drawn
                from the seed) and guides each with its own phrase inside a soft region around its
                position (the shapes models' default); ``"and"`` adds
                ``compose_scale * (D(part) - D(negative))`` per part of an upper-case ``A AND B``
                prompt (any model); ``"objects"`` does that with the object phrases of a shapes
                prompt; ``"binding"`` contrasts against the wrongly bound prompts; ``"layout"`` only
                writes the chosen positions into the prompt; ``"off"`` = plain CFG. Prompts with
                fewer than two components get plain CFG. Default: the model's, else ``"off"``; with a
                ``guidance=`` method (APG, CFG++, ...) the default is ``"off"`` (the two do not combine).
            compose_scale: weight of each component (regions: 1 = inside its region the object's
                phrase replaces the prompt; default: the model's, else 1).
            compose_full_scale: guidance scale on the full prompt of a composed prompt (default:
                ``guidance_scale``; 0 = the components alone, Liu et al.'s AND).
            phrase_states: ``"replace"`` or ``"mean"``: encode each object phrase on its own and put
                its token states into the full prompt's (shapes prompts with two objects); default off.
            region_sigma: width of a region, a fraction of the image (default: the model's, else 0.12).
            region_context_below: regions only: at noise levels ``sigma / alpha`` at or below this, each
                object's phrase also names the other object by its position ("two shapes: a red circle on
                the left and a shape on the right"): a one-object phrase would otherwise erase the other
                object, or its own, once both are drawn. 0 turns it off; default: the model's, else 0.6.
                Same rows per step.
        """
        if isinstance(prompt, str) and (
            isinstance(num_images, bool) or not isinstance(num_images, int) or not 1 <= num_images <= MAX_IMAGES
        ):
            raise ValueError(f"num_images must be an integer from 1 to {MAX_IMAGES}, got {num_images!r}")
        prompts = [prompt] * num_images if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("give at least one prompt")
        if preset is not None:
            from .presets import apply_preset

            sampler, steps, guidance_scale, sampler_options = apply_preset(
                preset, sampler, steps, guidance_scale, sampler_options
            )
        sampler = sampler or self.defaults["sampler"]
        steps = int(steps if steps is not None else self.defaults["steps"])
        if not 1 <= steps <= MAX_STEPS:
            raise ValueError(f"steps must be from 1 to {MAX_STEPS}, got {steps}")
        w = float(guidance_scale if guidance_scale is not None else self.defaults["guidance_scale"])
        if not (0.0 <= w <= MAX_GUIDANCE) or w != w:
            raise ValueError(f"guidance_scale must be from 0 to {MAX_GUIDANCE}, got {guidance_scale}")
        from ..guidance.guided import _map

        neg, neg_scale, above, perp = self.resolve_negative(negative_prompt, negative_scale, negative_above,
                                                            guidance=sampler_options.get("guidance"),
                                                            negative_perpendicular=negative_perpendicular)
        for p in dict.fromkeys(prompts):
            if not p.strip():
                logger.warning("empty prompt: sampling unconditionally (only the negative prompt steers)")
        seeds = [seed + i for i in range(len(prompts))]
        from ..guidance.compose import check_noise_level
        from .compose import REGION_CONTEXT_BELOW, REGION_SIGMA, build, check_mode, check_phrase_mode
        from .compose import phrase_states as _phrase_states

        if compose is None and sampler_options.get("guidance") is not None:
            compose = "off"  # a guidance method was asked for: the model's default composition yields to it
        mode = check_mode(compose if compose is not None else self.defaults.get("compose"))
        if mode != "off" and sampler_options.get("guidance") is not None:
            raise ValueError(f"compose={mode!r} combines plain classifier-free guidance terms and cannot be used "
                             f"with guidance={sampler_options['guidance']!r}; pass compose='off' to use the "
                             "guidance method, or leave guidance out")
        c_scale = _check_weight(compose_scale if compose_scale is not None else self.defaults.get("compose_scale", 1.0),
                                "compose_scale")
        c_full = _check_weight(w if compose_full_scale is None else compose_full_scale, "compose_full_scale")
        if mode.startswith("binding"):  # w (c - u) + s (c - mean of the wrongly bound prompts)
            c_full += c_scale
        phrase = check_phrase_mode(phrase_states if phrase_states is not None else self.defaults.get("phrase_states"))
        sigma = float(region_sigma if region_sigma is not None else self.defaults.get("region_sigma", REGION_SIGMA))
        if not 0.01 <= sigma <= 1.0:
            raise ValueError(f"region_sigma must be from 0.01 to 1 (a fraction of the image), got {region_sigma!r}")
        context = check_noise_level(region_context_below if region_context_below is not None
                                    else self.defaults.get("region_context_below", REGION_CONTEXT_BELOW),
                                    "region_context_below")
        composed = build(self, prompts, mode, c_scale, seeds, c_full, sigma, context)
        cond = self.encode_prompt(composed.prompts)
        if phrase != "off":
            cond = _phrase_states(self, composed.prompts, cond, phrase)
        guide_kw: dict[str, Any] = {}
        if neg_scale is None:
            uncond = self.encode_prompt([neg] * len(prompts))
        else:  # the empty prompt guides; the negative prompt gets its own rows and weight
            both = self.encode_prompt(["", neg])
            uncond = _map(lambda t: t[:1].expand(len(prompts), *t.shape[1:]), both)
            guide_kw = {"negative": _map(lambda t: t[1:].expand(len(prompts), *t.shape[1:]), both),
                        "negative_scale": neg_scale, "negative_above": above, "negative_perpendicular": perp}
        scale: Any = w
        if composed.composition is not None:
            sampler_options = {**sampler_options, "composition": composed.composition}
            if c_full != w:
                scale = torch.tensor([c_full if c else w for c in composed.components], dtype=torch.float64)
        noise = self.initial_noise(seeds)
        if image is not None or strength is not None or resize is not None:
            from .img2img import DEFAULT_STRENGTH, check_resize, check_strength, encode_images

            if image is None:
                what = "strength=" if strength is not None else "resize="
                raise ValueError(f"{what} needs image= (the input image of image-to-image)")
            s = check_strength(DEFAULT_STRENGTH if strength is None else strength)
            resize = check_resize(resize)
            sampler_options = {**sampler_options, "init": encode_images(self, image, len(prompts), resize),
                               "strength": s}
        if sampler_options.get("generator") is None:  # a stochastic sampler's noise is seeded per image too
            sampler_options = {**sampler_options, "generator": self.step_generators(seeds)}
        latents, nfe = self._sample(noise, cond, uncond, scale, sampler, steps, callback, model=model,
                                    **sampler_options, **guide_kw)
        images = self.decode(latents)
        from .. import __version__

        meta = [
            {
                "prompt": p, "negative_prompt": neg, **({"negative_scale": neg_scale} if neg_scale is not None else {}),
                **({"negative_above": above, "negative_perpendicular": perp}  # a rerun must not take the model's
                   if neg_scale is not None else {}),
                "model": self.name, "sampler": sampler, "steps": steps,
                "guidance_scale": w, "seed": s, "sampler_options": {k: v for k, v in sampler_options.items()
                                                                      if isinstance(v, (int, float, str, bool))},
                "size": [int(images.shape[1]), int(images.shape[2])], "noisewise": __version__,
                **({"preset": preset} if preset is not None else {}),
                **({"strength": sampler_options["strength"], "resize": resize} if "init" in sampler_options else {}),
                "compose": mode,  # always: a rerun without it would get the model's default composition
                **({"compose_scale": c_scale, "compose_full_scale": c_full, "components": cs,
                    **({"region_sigma": sigma, "region_context_below": context} if mode.startswith("regions")
                       else {})} if cs else {}),
                **({"composed_prompt": fp} if fp != p else {}),
                **({"phrase_states": phrase} if phrase != "off" else {}),
            }
            for p, s, cs, fp in zip(prompts, seeds, composed.components, composed.prompts)
        ]
        return GenerationResult(images, meta, nfe, {"truncated": [self.text_encoder.truncates(p) for p in prompts]})

    def img2img(
        self, image: Any, prompt: str | Sequence[str], *, strength: float = 0.8, **kwargs: Any
    ) -> GenerationResult:
        """Image-to-image: ``self(prompt, image=image, strength=strength, **kwargs)``."""
        return self(prompt, image=image, strength=strength, **kwargs)
