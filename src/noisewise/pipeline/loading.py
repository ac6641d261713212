"""Loading users' diffusers checkpoints from disk: Stable Diffusion 1.x/2.x and SD3 folders.

A diffusers pipeline folder has ``model_index.json`` naming each component's library and class,
and one sub-folder per component (``unet/`` or ``transformer/``, ``vae/``, ``text_encoder*/``,
``tokenizer*/``, ``scheduler/scheduler_config.json``). This module checks what is there before
loading anything, so a wrong or unsupported folder fails with a message that says what was found,
what is supported and what to do:

- weights must be safetensors: pickle files (``*.bin``, ``*.ckpt``, ``*.pt``, ``*.pth``) can run
  arbitrary code when loaded, so a component that has only those is refused (convert it once, in
  an environment you trust, with diffusers' / transformers'
  ``save_pretrained(..., safe_serialization=True)``);
- supported families: ``StableDiffusionPipeline``-style folders (``UNet2DConditionModel`` +
  ``CLIPTextModel``, epsilon or v-prediction from the scheduler config) and
  ``StableDiffusion3Pipeline``-style folders (``SD3Transformer2DModel`` + two
  ``CLIPTextModelWithProjection`` + an optional T5 encoder, flow matching);
- the training schedule (betas, prediction type, flow shift) comes from
  ``scheduler/scheduler_config.json`` through :meth:`noisewise.Schedule.from_diffusers`; the
  scheduler *class* named there is not used: any noisewise sampler runs on that schedule.

The text side reproduces diffusers' pipelines exactly: CLIP prompts are padded to the tokenizer's
``model_max_length`` and encoded without an attention mask (``StableDiffusionPipeline.encode_prompt``
uses the last layer's states; SD3 the penultimate layer's plus the pooled projections, see
:mod:`noisewise.pipeline.sd3`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch

from .text import TextEncoder

logger = logging.getLogger(__name__)
Tensor = torch.Tensor

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
SAFE_SUFFIX = ".safetensors"

#: pipeline class in model_index.json -> family
FAMILIES = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionInpaintPipeline": None,
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
}
SUPPORTED = {
    "sd": {
        "unet": ("UNet2DConditionModel",), "vae": ("AutoencoderKL",), "text_encoder": ("CLIPTextModel",),
        "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"),
    },
    "sd3": {
        "transformer": ("SD3Transformer2DModel",), "vae": ("AutoencoderKL",),
        "text_encoder": ("CLIPTextModelWithProjection",), "text_encoder_2": ("CLIPTextModelWithProjection",),
        "tokenizer": ("CLIPTokenizer", "CLIPTokenizerFast"), "tokenizer_2": ("CLIPTokenizer", "CLIPTokenizerFast"),
        "text_encoder_3": ("T5EncoderModel",), "tokenizer_3": ("T5Tokenizer", "T5TokenizerFast"),
    },
}
OPTIONAL = {"sd3": ("text_encoder_3", "tokenizer_3")}
# components of a diffusers folder that noisewise does not use (and may be null)
IGNORED = ("safety_checker", "feature_extractor", "image_encoder", "requires_safety_checker")


class UnsafeWeightsError(ValueError):
    """A component folder holds only pickle-based weights."""


class CheckpointError(ValueError):
    """A model folder is incomplete or uses a class noisewise does not support."""


def _supported_summary() -> str:
    return (
        "supported: Stable Diffusion 1.x/2.x folders (StableDiffusionPipeline: UNet2DConditionModel, AutoencoderKL, "
        "CLIPTextModel + CLIPTokenizer, scheduler_config.json with prediction_type epsilon or v_prediction) and SD3 "
        "folders (StableDiffusion3Pipeline: SD3Transformer2DModel, AutoencoderKL, 2 x CLIPTextModelWithProjection "
        "+ CLIPTokenizer, optional T5EncoderModel, FlowMatchEulerDiscreteScheduler config)"
    )


def require_safetensors(folder: str | os.PathLike[str], component: str | None = None) -> list[Path]:
    """The ``*.safetensors`` files of a component folder; refuses a folder with only pickle weights.

    Raises:
        UnsafeWeightsError: the folder has ``*.bin`` / ``*.ckpt`` / ``*.pt`` / ``*.pth`` weights and
            no safetensors (loading pickle can execute arbitrary code).
        CheckpointError: the folder has no weights at all.
    """
    folder = Path(folder)
    name = component or folder.name
    files = [p for p in folder.rglob("*") if p.is_file()]
    safe = sorted(p for p in files if p.name.endswith(SAFE_SUFFIX))
    if safe:
        return safe
    pickles = sorted(p.name for p in files if p.name.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise UnsafeWeightsError(
            f"{name}/ in {folder.parent} has only pickle-based weights ({', '.join(pickles[:4])}); noisewise loads "
            "only safetensors, because unpickling a checkpoint can execute arbitrary code from the file. Convert it "
            "once, in an environment you trust, e.g. "
            "`DiffusionPipeline.from_pretrained(path).save_pretrained(path, safe_serialization=True)` "
            "(or the component's own from_pretrained(...).save_pretrained(..., safe_serialization=True)), "
            "then load the converted folder"
        )
    raise CheckpointError(f"{name}/ in {folder.parent} has no weights (*.safetensors); is the download complete?")


def _folder_class(folder: Path) -> tuple[str, str] | None:
    """(library, class) of a component folder from its own config, as diffusers writes it into
    model_index.json: ``_class_name`` (diffusers), ``architectures[0]`` (transformers models),
    ``tokenizer_class`` (tokenizers)."""
    for name, key, lib in (("config.json", "_class_name", "diffusers"),
                           ("config.json", "architectures", "transformers"),
                           ("scheduler_config.json", "_class_name", "diffusers"),
                           ("tokenizer_config.json", "tokenizer_class", "transformers")):
        f = folder / name
        if f.is_file():
            try:
                v = json.loads(f.read_text()).get(key)
            except json.JSONDecodeError:
                continue
            if isinstance(v, list):
                v = v[0] if v else None
            if isinstance(v, str) and v:
                return lib, v
    return None


def infer_index(root: Path) -> dict[str, Any]:
    """A model_index.json for a hand-assembled SD / SD3 folder that lacks one (``{}`` when the folder
    does not look like either: then it is a noisewise-native folder)."""
    comps = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        found = _folder_class(sub)
        if found is not None:
            comps[sub.name] = list(found)
    te = comps.get("text_encoder", [None, ""])[1]
    if comps.get("transformer", [None, None])[1] == "SD3Transformer2DModel":
        return {"_class_name": "StableDiffusion3Pipeline", **comps}
    if comps.get("unet", [None, None])[1] == "UNet2DConditionModel" and te.startswith("CLIPTextModel") \
            and "text_encoder_2" not in comps:
        return {"_class_name": "StableDiffusionPipeline", **comps}
    return {}


def read_index(root: Path) -> dict[str, Any]:
    """model_index.json, or one inferred from the component folders' configs (:func:`infer_index`)."""
    f = root / "model_index.json"
    if not f.is_file():
        return infer_index(root)
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{f} is not valid JSON: {e}") from e


def component_class(index: dict[str, Any], name: str) -> str | None:
    """The class model_index.json names for ``name`` (``None`` when absent or null)."""
    spec = index.get(name)
    if isinstance(spec, (list, tuple)) and len(spec) == 2 and spec[1] is not None:
        return str(spec[1])
    return None


def family_of(index: dict[str, Any], root: Path) -> str | None:
    """``"sd"``, ``"sd3"``, or ``None`` for a noisewise-native folder (the shipped shapes models).

    Raises :class:`CheckpointError` for diffusers pipelines noisewise cannot run."""
    cls = str(index.get("_class_name", ""))
    if not cls or cls.startswith("Noisewise"):
        return None
    if cls in FAMILIES and FAMILIES[cls] is not None:
        return FAMILIES[cls]
    # an unknown pipeline class loads only when its components are exactly a supported family's
    # (a ControlNet / adapter / refiner component would otherwise be silently ignored)
    den = component_class(index, "unet") or component_class(index, "transformer")
    named = {k for k in index if not k.startswith("_") and k not in IGNORED and k != "scheduler"
             and component_class(index, k)}
    for fam, comps in SUPPORTED.items():
        required = set(comps) - set(OPTIONAL.get(fam, ()))
        if required <= named <= set(comps) and "Inpaint" not in cls and all(
            component_class(index, k) in comps[k] for k in named
        ):
            return fam
    extra = sorted(named - set(SUPPORTED["sd"]) - set(SUPPORTED["sd3"]))
    more = f", with components noisewise does not use: {', '.join(extra)}" if extra else ""
    raise CheckpointError(
        f"{root} is a {cls} folder (denoiser {den or 'unknown'}{more}), which noisewise cannot run; "
        f"{_supported_summary()}"
    )


def check_components(root: Path, index: dict[str, Any], family: str) -> dict[str, Path | None]:
    """Each component's folder, after checking its class and its weights; optional ones may be ``None``."""
    out: dict[str, Path | None] = {}
    wanted = SUPPORTED[family]
    for name, classes in wanted.items():
        cls = component_class(index, name)
        folder = root / name
        if cls is None:
            if name in OPTIONAL.get(family, ()):
                out[name] = None
                continue
            raise CheckpointError(
                f"{root}/model_index.json has no {name!r} component (a {family.upper()} folder needs "
                f"{', '.join(wanted)}); {_supported_summary()}"
            )
        if cls not in classes:
            raise CheckpointError(
                f"{name} in {root} is a {cls}; noisewise supports {' or '.join(classes)} there. {_supported_summary()}"
            )
        if not folder.is_dir():
            raise CheckpointError(f"model_index.json in {root} names {name} ({cls}) but there is no {name}/ folder")
        if not name.startswith("tokenizer"):
            require_safetensors(folder, name)
        out[name] = folder
    sched = root / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise CheckpointError(f"{root} has no scheduler/scheduler_config.json (the training schedule comes from it)")
    out["scheduler"] = sched.parent
    return out


def _offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_tokenizer(folder: Path, class_name: str | None = None) -> Any:
    """A transformers tokenizer from ``folder`` (the class model_index.json names, else AutoTokenizer)."""
    _offline()
    import transformers

    cls = getattr(transformers, class_name, None) if class_name else None
    cls = cls or transformers.AutoTokenizer
    return cls.from_pretrained(str(folder))


_PLAIN = re.compile(r"^(?:diffusion_pytorch_model|model)(?:-\d+-of-\d+)?\.safetensors(?:\.index\.json)?$")
_VARIANT = re.compile(r"^(?:diffusion_pytorch_model|model)(?:\.safetensors\.index)?\.([A-Za-z0-9_]+)"
                      r"(?:-\d+-of-\d+)?\.(?:safetensors|json)$")


def weight_variant(folder: Path) -> str | None:
    """The weights variant to ask diffusers / transformers for: ``None`` when the folder has the plain
    ``diffusion_pytorch_model.safetensors`` / ``model.safetensors`` (or their shards), else the
    variant of the only (or, preferring ``fp16``, the first) variant file, e.g. ``fp16`` for
    ``diffusion_pytorch_model.fp16.safetensors`` (checkpoints saved with ``variant="fp16"``)."""
    names = [p.name for p in folder.iterdir() if p.is_file()]
    if any(_PLAIN.match(n) for n in names):
        return None
    found = sorted({m.group(1) for n in names if (m := _VARIANT.match(n)) and m.group(1) != "safetensors"})
    if not found:
        return None
    choice = "fp16" if "fp16" in found else found[0]
    if len(found) > 1:
        logger.info("%s has weight variants %s; loading %r", folder, found, choice)
    return choice


def load_transformers_model(folder: Path, class_name: str, dtype: torch.dtype, device: str | torch.device) -> Any:
    """A frozen transformers model of class ``class_name`` from safetensors only."""
    _offline()
    require_safetensors(folder)
    import transformers

    transformers.utils.logging.disable_progress_bar()
    cls = getattr(transformers, class_name)
    kw: dict[str, Any] = {"use_safetensors": True, "variant": weight_variant(folder)}
    try:
        model = cls.from_pretrained(str(folder), dtype=dtype, **kw)
    except TypeError:  # transformers < 4.56 names it torch_dtype
        model = cls.from_pretrained(str(folder), torch_dtype=dtype, **kw)
    return model.eval().requires_grad_(False).to(device)


def diffusers_load_options() -> dict[str, Any]:
    """Options for a diffusers ``from_pretrained`` here: without ``accelerate`` installed (it is not a
    dependency), ``low_cpu_mem_usage=False`` said outright, which is what diffusers falls back to anyway,
    so that it does not print a warning that recommends installing it on every load."""
    import importlib.util

    return {} if importlib.util.find_spec("accelerate") is not None else {"low_cpu_mem_usage": False}


def load_diffusers_model(folder: Path, class_name: str, dtype: torch.dtype, device: str | torch.device) -> Any:
    """A frozen diffusers model of class ``class_name`` from safetensors only (a UNet folder written
    by :func:`noisewise.pipeline.prune.save_pruned` is rebuilt pruned)."""
    _offline()
    require_safetensors(folder)
    if class_name == "UNet2DConditionModel":
        from .prune import is_pruned, load_pruned

        if is_pruned(folder):
            return load_pruned(folder, dtype=dtype, device=device)
    import diffusers

    cls = getattr(diffusers, class_name)
    model = cls.from_pretrained(str(folder), torch_dtype=dtype, use_safetensors=True, variant=weight_variant(folder),
                                **diffusers_load_options())
    return model.eval().requires_grad_(False).to(device)


def single_file_message(path: Path) -> str:
    """Why a single checkpoint file is not loaded, and how to turn it into a folder."""
    if path.name.lower().endswith(PICKLE_SUFFIXES):
        why = ("it is a pickle-based file, which can execute arbitrary code when loaded, and a single file "
               "carries no component configs")
    else:
        why = "a single-file checkpoint carries no component configs (model_index.json, unet/config.json, ...)"
    return (
        f"{path} is a single checkpoint file; noisewise loads diffusers-format folders only ({why}). Convert it "
        "once, in an environment you trust, e.g. `StableDiffusionPipeline.from_single_file(file)"
        ".save_pretrained(folder, safe_serialization=True)` with diffusers, then pass the folder"
    )


def tokenizer_max_length(folder: Path, default: int = 77) -> int:
    """``model_max_length`` from a tokenizer folder's config (diffusers pads CLIP prompts to it)."""
    f = folder / "tokenizer_config.json"
    if f.is_file():
        v = json.loads(f.read_text()).get("model_max_length")
        if isinstance(v, (int, float)) and 0 < v < 1e6:
            return int(v)
    return default


class CLIPPromptEncoder(TextEncoder):
    """A CLIP text encoder used exactly as ``StableDiffusionPipeline.encode_prompt`` uses it.

    Prompts are padded (``padding="max_length"``) and truncated to the tokenizer's
    ``model_max_length``; the ids go to ``CLIPTextModel`` *without* an attention mask (the causal
    mask alone, as diffusers does for CLIP); the states are the last layer's
    ``last_hidden_state`` (after the final layer norm). Weights load from safetensors only.
    Everything else (caching, truncation warnings) is :class:`TextEncoder`'s.
    """

    def __init__(self, path: str | os.PathLike[str], *, tokenizer_path: str | os.PathLike[str],
                 model_class: str = "CLIPTextModel", tokenizer_class: str | None = "CLIPTokenizer",
                 max_length: int | None = None, **kw: Any) -> None:
        if max_length is None:
            max_length = tokenizer_max_length(Path(tokenizer_path))
        super().__init__(path, tokenizer_path=tokenizer_path, max_length=max_length, **kw)
        self.model_class = model_class
        self.tokenizer_class = tokenizer_class

    def _load(self) -> None:
        if self._model is not None:
            return
        assert self.path is not None and self.tokenizer_path is not None
        self._tokenizer = load_tokenizer(Path(self.tokenizer_path), self.tokenizer_class)
        self._model = load_transformers_model(Path(self.path), self.model_class, self.dtype, self.device)
        logger.info("loaded %s from %s", self.model_class, self.path)

    @property
    def hidden_size(self) -> int:
        self._load()
        return int(self._model.config.hidden_size)

    @torch.no_grad()
    def encode_uncached(self, prompts: Any, *, warn: bool = True) -> Tensor:
        batch, truncated = self.tokenize(list(prompts), check=warn)
        if warn:
            for p, t in zip(prompts, truncated):
                if t:
                    logger.warning("prompt is longer than %d CLIP tokens and was truncated: %r",
                                   self.max_length, p[:80])
        ids = batch["input_ids"].to(self.device)
        return self._model(ids).last_hidden_state.float()


def default_settings(family: str) -> dict[str, Any]:
    """Sampling defaults for a user's checkpoint (diffusers' defaults: CFG 7.5 / 7.0, no negative prompt)."""
    if family == "sd3":
        return {"sampler": "flow_euler", "steps": 28, "guidance_scale": 7.0, "negative_prompt": ""}
    return {"sampler": "dpmpp_2m", "steps": 25, "guidance_scale": 7.5, "negative_prompt": ""}


def load_checkpoint(root: Path, index: dict[str, Any], family: str, *, device: str | torch.device = "cpu",
                    dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Load a checked SD / SD3 folder: returns the Pipeline constructor arguments
    (``unet`` = the denoiser, ``codec``, ``text_encoder``, ``schedule``, ``defaults``)."""
    from ..core.schedules import Schedule
    from .vae import LatentCodec

    parts = check_components(root, index, family)
    schedule = Schedule.from_diffusers(parts["scheduler"])  # type: ignore[arg-type]
    vae = load_diffusers_model(parts["vae"], "AutoencoderKL", dtype, device)  # type: ignore[arg-type]
    codec = LatentCodec(vae)
    if family == "sd":
        if schedule.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise CheckpointError(f"{root}: unsupported prediction_type {schedule.prediction_type!r}")
        unet = load_diffusers_model(parts["unet"], "UNet2DConditionModel", dtype, device)  # type: ignore[arg-type]
        cfg = unet.config
        if getattr(cfg, "addition_embed_type", None) or getattr(cfg, "class_embed_type", None) \
                or getattr(cfg, "encoder_hid_dim_type", None):
            raise CheckpointError(
                f"{root}/unet needs extra conditioning (addition_embed_type={cfg.addition_embed_type!r}, "
                f"class_embed_type={cfg.class_embed_type!r}); noisewise runs text-only UNets (SD 1.x/2.x). "
                + _supported_summary()
            )
        if int(cfg.in_channels) != codec.latent_channels:
            raise CheckpointError(
                f"{root}/unet takes {cfg.in_channels} input channels but the VAE has {codec.latent_channels} latent "
                "channels (inpainting / depth UNets need extra inputs that noisewise does not build)"
            )
        text = CLIPPromptEncoder(
            parts["text_encoder"], tokenizer_path=parts["tokenizer"],  # type: ignore[arg-type]
            model_class=component_class(index, "text_encoder") or "CLIPTextModel",
            tokenizer_class=component_class(index, "tokenizer"), device=device, dtype=dtype,
        )
        den = unet
    else:
        from .sd3 import SD3TextEncoder

        if schedule.prediction_type != "flow":
            raise CheckpointError(f"{root}: an SD3 folder needs a flow-matching scheduler config "
                                  f"(FlowMatchEulerDiscreteScheduler), found {schedule!r}")
        den = load_diffusers_model(parts["transformer"], "SD3Transformer2DModel", dtype, device)  # type: ignore[arg-type]
        if getattr(schedule, "use_dynamic_shifting", False):
            # noisewise samples at the checkpoint's native size, where diffusers' dynamic shift is one
            # number: mu from image_seq_len = (sample_size / patch_size)^2, as StableDiffusion3Pipeline does
            seq = (int(den.config.sample_size) // int(den.config.patch_size)) ** 2
            schedule = dataclasses.replace(schedule, use_dynamic_shifting=False,  # type: ignore[type-var]
                                           shift=schedule.shift_for(seq))
        text = SD3TextEncoder.from_folders(
            parts, joint_attention_dim=int(den.config.joint_attention_dim),
            tokenizer_classes={k: component_class(index, k) for k in ("tokenizer", "tokenizer_2", "tokenizer_3")},
            device=device, dtype=dtype,
        )
    return {"unet": den, "codec": codec, "text_encoder": text, "schedule": schedule,
            "defaults": default_settings(family)}
