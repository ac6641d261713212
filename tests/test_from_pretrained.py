"""Users' diffusers checkpoints from disk: noisewise reproduces diffusers' own pipelines.

Tiny randomly initialised components of the real classes (tests/tiny_checkpoints.py) are saved by
diffusers' ``save_pretrained`` into a temporary folder; ``noisewise.Pipeline.from_pretrained``
loads that folder, and the oracle is diffusers' ``StableDiffusionPipeline`` /
``StableDiffusion3Pipeline`` loaded from the same folder, given the same starting latents
(``latents=`` = noisewise's ``initial_noise(seed)``), prompt, negative prompt and guidance scale.
The samplers are the equivalent ones: DDIM / DPM-Solver++(2M) / Euler with diffusers' ``trailing``
timesteps = noisewise's ``trailing`` spacing (step counts dividing 1000: diffusers' DDIM steps to
``t - 1000 // n``, which is the next timestep only then), and SD3's FlowMatchEuler with the
pipelines' ``sigmas = linspace(1, 1/n, n)`` = noisewise's flow ``linspace`` spacing.

Measured parity (max abs difference) is printed with ``-s``; docs/checkpoints.md quotes it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from noisewise.pipeline import Pipeline  # noqa: E402
from noisewise.pipeline.loading import CheckpointError, UnsafeWeightsError  # noqa: E402

from .tiny_checkpoints import save_sd, save_sd3  # noqa: E402

PROMPT, NEGATIVE = "a big red circle on the green square", "blurry watermark"
LATENT_ATOL = 1e-4
IMAGE_ATOL = 1e-4


def _capture() -> tuple[list[torch.Tensor], Any]:
    states: list[torch.Tensor] = []
    return states, lambda info: states.append(info.x.detach().clone())


def _report(name: str, lat: float, scale: float, img: float) -> None:
    print(f"\nparity {name}: latents max|diff| = {lat:.2e} (max|latent| = {scale:.3g}), "
          f"decoded image max|diff| = {img:.2e}")


# (id, prediction type, diffusers scheduler class, its config extras, noisewise sample() options, sampler, steps,
#  the tokenizer's pad token: SD 1.x pads with <|endoftext|>, SD 2.x with "!")
TRAILING = ({"timestep_spacing": "trailing"}, {"spacing": "trailing"})
# SD 1.5's own DDIM config is 'leading' with steps_offset=1 (set_alpha_to_one=True: its last step lands on
# sigma = 0, noisewise's final node; with False diffusers stops at alphas_cumprod[0] instead)
LEADING = ({"timestep_spacing": "leading", "steps_offset": 1, "set_alpha_to_one": True},
           {"spacing": "leading", "spacing_options": {"steps_offset": 1}})
SD_CASES = [
    ("ddim-eps", "epsilon", "DDIMScheduler", *TRAILING, "ddim", 10, "<|endoftext|>"),
    ("ddim-eps-sd15-leading", "epsilon", "DDIMScheduler", *LEADING, "ddim", 10, "<|endoftext|>"),
    ("ddim-v-sd2tok", "v_prediction", "DDIMScheduler", *TRAILING, "ddim", 10, "!"),
    ("dpmpp2m-eps", "epsilon", "DPMSolverMultistepScheduler", *TRAILING, "dpmpp_2m", 10, "<|endoftext|>"),
    ("dpmpp2m-v", "v_prediction", "DPMSolverMultistepScheduler", *TRAILING, "dpmpp_2m", 8, "!"),
    ("euler-v", "v_prediction", "EulerDiscreteScheduler", *TRAILING, "euler", 8, "<|endoftext|>"),
]


@pytest.mark.parametrize("name, pred, sched, sched_kw, opts, sampler, steps, pad", SD_CASES,
                         ids=[c[0] for c in SD_CASES])
def test_sd_folder_matches_diffusers(
    tmp_path: Path, name: str, pred: str, sched: str, sched_kw: dict[str, Any], opts: dict[str, Any],
    sampler: str, steps: int, pad: str,
) -> None:
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    folder = tmp_path / "sd"
    save_sd(folder, prediction_type=pred, scheduler=sched, pad_token=pad, **sched_kw)
    ref = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.schedule.prediction_type == pred
    assert pipe.text_encoder.max_length == ref.tokenizer.model_max_length

    # the prompt states are diffusers' encode_prompt exactly (CLIP, padded to model_max_length, no mask)
    with torch.no_grad():  # (as inside the pipelines' __call__: SDPA may pick another kernel with autograd on)
        pe, ne = ref.encode_prompt(PROMPT, "cpu", 1, True, NEGATIVE)
    assert torch.equal(pipe.encode_prompt([PROMPT]), pe.float())
    assert torch.equal(pipe.encode_prompt([NEGATIVE]), ne.float())

    seed = 3
    latents = pipe.initial_noise([seed])
    start = latents.clone()
    if sched == "EulerDiscreteScheduler":
        # diffusers' Euler starts from init_noise_sigma * latents in VE coordinates, with init_noise_sigma =
        # sigma_max for 'trailing' (not sqrt(1 + sigma_max^2)): scale its latents so that its first VP state
        # is noisewise's start, the noise itself
        ref.scheduler.set_timesteps(steps)
        s_max = float(ref.scheduler.sigmas.max())
        assert abs(float(ref.scheduler.init_noise_sigma) - s_max) < 1e-6
        start = latents * ((1.0 + s_max**2) ** 0.5 / s_max)
    kw = dict(negative_prompt=NEGATIVE, latents=start, num_inference_steps=steps, guidance_scale=7.5)
    with torch.no_grad():
        theirs = ref(PROMPT, output_type="latent", **kw).images
        theirs_img = ref(PROMPT, output_type="np", **kw).images
    states, cb = _capture()
    res = pipe(PROMPT, negative_prompt=NEGATIVE, seed=seed, sampler=sampler, steps=steps, guidance_scale=7.5,
               callback=cb, **opts)
    ours = states[-1]
    assert len(states) == steps
    lat_err = float((ours - theirs).abs().max())
    ours_img = pipe.codec.decode(ours).permute(0, 2, 3, 1).numpy()
    img_err = float(np.abs(ours_img - theirs_img).max())
    _report(f"SD {name}", lat_err, float(theirs.abs().max()), img_err)
    scale = float(theirs.abs().max())
    assert scale > 0.5  # a real, non-degenerate trajectory
    assert lat_err < LATENT_ATOL, (lat_err, scale)
    assert img_err < IMAGE_ATOL, img_err
    # the pipeline's uint8 images are diffusers' float images rounded
    assert np.abs(res.images.astype(np.float64) - np.round(theirs_img * 255.0)).max() <= 1.0
    # guidance matters here (the comparison is not of two unguided runs)
    with torch.no_grad():
        plain = ref(PROMPT, output_type="latent", **dict(kw, guidance_scale=1.0)).images
    assert float((plain - theirs).abs().max()) > 100 * LATENT_ATOL


SD3_CASES = [("no-t5", False, 3.0, {}), ("t5", True, 3.0, {}), ("t5-shift1", True, 1.0, {}),
             ("dynamic-shift", False, 1.0, dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                 base_image_seq_len=16, max_image_seq_len=256))]


@pytest.mark.parametrize("name, with_t5, shift, sched_kw", SD3_CASES, ids=[c[0] for c in SD3_CASES])
def test_sd3_folder_matches_diffusers(
    tmp_path: Path, name: str, with_t5: bool, shift: float, sched_kw: dict[str, Any]
) -> None:
    from diffusers import StableDiffusion3Pipeline

    torch.set_num_threads(1)
    folder = tmp_path / "sd3"
    save_sd3(folder, with_t5=with_t5, shift=shift, **sched_kw)
    extra = {} if with_t5 else {"text_encoder_3": None, "tokenizer_3": None}
    ref = StableDiffusion3Pipeline.from_pretrained(str(folder), **extra)
    ref.set_progress_bar_config(disable=True)
    pipe = Pipeline.from_pretrained(folder)
    assert pipe.schedule.prediction_type == "flow"
    if sched_kw.get("use_dynamic_shifting"):  # resolved at the native size: 8x8 latent tokens
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        mu = calculate_shift(64, 16, 256, 0.5, 1.15)
        assert abs(pipe.schedule.shift - np.exp(mu)) < 1e-12 and abs(pipe.schedule.shift - 1.0) > 0.1
    else:
        assert pipe.schedule.shift == shift

    with torch.no_grad():
        pe, ne, pp, npp = ref.encode_prompt(PROMPT, PROMPT, PROMPT, negative_prompt=NEGATIVE, device="cpu")
    mine = pipe.encode_prompt([PROMPT])
    assert torch.equal(mine["encoder_hidden_states"], pe.float())
    assert torch.equal(mine["pooled_projections"], pp.float())
    neg = pipe.encode_prompt([NEGATIVE])
    assert torch.equal(neg["encoder_hidden_states"], ne.float())
    assert torch.equal(neg["pooled_projections"], npp.float())
    info = pipe.text_encoder.cache_info()
    assert (info["misses"], info["size"]) == (2, 2)
    again = pipe.encode_prompt([PROMPT, NEGATIVE])  # served from the cache, equal to a fresh encode
    assert pipe.text_encoder.cache_info()["hits"] == info["hits"] + 2
    assert torch.equal(again["encoder_hidden_states"][0], mine["encoder_hidden_states"][0])
    assert torch.equal(again["pooled_projections"][1], neg["pooled_projections"][0])

    steps, seed = 8, 11
    latents = pipe.initial_noise([seed])
    sigmas = [1.0 - i / steps for i in range(steps)]
    kw = dict(negative_prompt=NEGATIVE, latents=latents.clone(), num_inference_steps=steps, guidance_scale=5.0,
              sigmas=sigmas)
    with torch.no_grad():
        theirs = ref(PROMPT, output_type="latent", **kw).images
        theirs_img = ref(PROMPT, output_type="np", **kw).images
    states, cb = _capture()
    res = pipe(PROMPT, negative_prompt=NEGATIVE, seed=seed, sampler="flow_euler", steps=steps, guidance_scale=5.0,
               spacing="linspace", callback=cb)
    ours = states[-1]
    lat_err = float((ours - theirs).abs().max())
    ours_img = pipe.codec.decode(ours).permute(0, 2, 3, 1).numpy()
    img_err = float(np.abs(ours_img - theirs_img).max())
    _report(f"SD3 {name}", lat_err, float(theirs.abs().max()), img_err)
    assert float(theirs.abs().max()) > 0.5
    assert lat_err < LATENT_ATOL, lat_err
    assert img_err < IMAGE_ATOL, img_err
    assert np.abs(res.images.astype(np.float64) - np.round(theirs_img * 255.0)).max() <= 1.0
    with torch.no_grad():
        plain = ref(PROMPT, output_type="latent", **dict(kw, guidance_scale=1.0)).images
    assert float((plain - theirs).abs().max()) > 100 * LATENT_ATOL


def test_sd3_embedding_cache_is_bounded_in_bytes_and_keeps_the_default_negative(tmp_path: Path) -> None:
    """SD3 states are large (with T5 about 5 MB a prompt at full size): the cache evicts by bytes, and the
    pipeline's default negative prompt (here "", the unconditional branch) stays pinned."""
    from noisewise.pipeline.embcache import tensor_bytes
    from noisewise.pipeline.sd3 import SD3TextEncoder

    torch.set_num_threads(1)
    save_sd3(tmp_path / "sd3", with_t5=True)
    pipe = Pipeline.from_pretrained(tmp_path / "sd3")
    te = pipe.text_encoder
    assert te.pinned_prompts == {""}
    per_prompt = tensor_bytes({k: v[0] for k, v in te.encode_uncached(["x"]).items()})
    small = SD3TextEncoder(te.clips, te.t5, joint_attention_dim=te.joint_attention_dim,
                           cache_bytes=int(2.5 * per_prompt))
    small.pinned_prompts.add("")
    first = small.encode([""])
    for p in ("a red circle", "a blue square", "a green cross", "a gray triangle"):
        small.encode([p])
    info = small.cache_info()
    assert info["bytes"] <= int(2.5 * per_prompt) and info["evictions"] == 3 and info["pinned"] == 1
    assert "" in small._cache and "a red circle" not in small._cache and "a gray triangle" in small._cache
    assert torch.equal(small.encode([""])["encoder_hidden_states"], first["encoder_hidden_states"])
    assert small.cache_info()["hits"] == info["hits"] + 1
    off = SD3TextEncoder(te.clips, te.t5, joint_attention_dim=te.joint_attention_dim, cache_size=0)
    off.encode(["a red circle"])
    assert off.cache_info()["size"] == 0


def test_any_sampler_runs_on_a_user_checkpoint(tmp_path: Path) -> None:
    """Other noisewise samplers and guidance options run on the loaded schedule (no diffusers twin)."""
    torch.set_num_threads(1)
    save_sd(tmp_path / "sd", prediction_type="v_prediction")
    pipe = Pipeline.from_pretrained(tmp_path / "sd")
    assert pipe.defaults["negative_prompt"] == "" and pipe.sample_size == 16
    for sampler in ("unipc", "heun"):
        res = pipe(["a red circle", "a blue square"], sampler=sampler, steps=4, guidance_scale=3.0)
        assert res.images.shape == (2, 16, 16, 3) and res.images.dtype == np.uint8
        assert res.metadata[0]["model"] == "sd"
    # guidance methods beyond plain CFG act on the user's model too
    plain = pipe("a red circle", sampler="dpmpp_2m", steps=4, guidance_scale=5.0)
    apg = pipe("a red circle", sampler="dpmpp_2m", steps=4, guidance_scale=5.0, guidance="apg")
    assert apg.images.shape == plain.images.shape and not np.array_equal(apg.images, plain.images)


# ------------------------------------------------------------------------------------------------
# refusals and clear errors
# ------------------------------------------------------------------------------------------------


def _to_pickle(folder: Path) -> None:
    """Replace a component's safetensors by a pickle file of the same tensors (what old checkpoints ship)."""
    from safetensors.torch import load_file

    for f in list(folder.glob("*.safetensors")):
        torch.save(load_file(str(f)), folder / f.name.replace(".safetensors", ".bin"))
        f.unlink()


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt") / "sd"
    save_sd(folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("component", ["unet", "vae", "text_encoder"])
def test_pickle_only_weights_are_refused(sd_folder: Path, tmp_path: Path, component: str) -> None:
    folder = _copy(sd_folder, tmp_path / "m")
    _to_pickle(folder / component)
    with pytest.raises(UnsafeWeightsError, match="arbitrary code") as e:
        Pipeline.from_pretrained(folder)
    msg = str(e.value)
    assert component in msg and "safe_serialization=True" in msg and ".bin" in msg


def test_pickle_only_shipped_style_folder_is_refused(tmp_path: Path) -> None:
    """The noisewise-native folder path (shapes models) refuses pickle weights too."""
    from noisewise.pipeline.t2i import available_models

    src = available_models()["shapes-vp"]
    folder = tmp_path / "shapes"
    shutil.copytree(src, folder)
    index = json.loads((folder / "model_index.json").read_text())
    vae_src = (src / index["_noisewise"]["components"]["vae"]).resolve()
    shutil.copytree(vae_src, folder / "vae")
    _to_pickle(folder / "unet")
    with pytest.raises(UnsafeWeightsError, match="only safetensors"):
        Pipeline.from_pretrained(folder)


def test_missing_component_is_named(sd_folder: Path, tmp_path: Path) -> None:
    folder = _copy(sd_folder, tmp_path / "m")
    shutil.rmtree(folder / "vae")
    with pytest.raises(CheckpointError, match=r"vae \(AutoencoderKL\).*no vae/ folder"):
        Pipeline.from_pretrained(folder)
    folder2 = _copy(sd_folder, tmp_path / "m2")
    (folder2 / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(CheckpointError, match="scheduler_config.json"):
        Pipeline.from_pretrained(folder2)
    folder3 = _copy(sd_folder, tmp_path / "m3")
    for f in (folder3 / "unet").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        Pipeline.from_pretrained(folder3)


def test_unsupported_classes_are_named(sd_folder: Path, tmp_path: Path) -> None:
    folder = _copy(sd_folder, tmp_path / "m")
    index_file = folder / "model_index.json"
    index = json.loads(index_file.read_text())
    index_file.write_text(json.dumps(dict(index, text_encoder=["transformers", "T5EncoderModel"])))
    with pytest.raises(CheckpointError, match="text_encoder in .* is a T5EncoderModel; noisewise supports CLIPText"):
        Pipeline.from_pretrained(folder)
    index_file.write_text(json.dumps(dict(index, _class_name="FluxPipeline", unet=None,
                                          transformer=["diffusers", "FluxTransformer2DModel"])))
    with pytest.raises(CheckpointError, match="FluxPipeline folder.*FluxTransformer2DModel.*supported: Stable"):
        Pipeline.from_pretrained(folder)
    index_file.write_text(json.dumps(dict(index, _class_name="StableDiffusionXLPipeline",
                                          text_encoder_2=["transformers", "CLIPTextModelWithProjection"])))
    with pytest.raises(CheckpointError, match="StableDiffusionXLPipeline"):
        Pipeline.from_pretrained(folder)
    index_file.write_text(json.dumps(dict(index, _class_name="StableDiffusionControlNetPipeline",
                                          controlnet=["diffusers", "ControlNetModel"])))
    with pytest.raises(CheckpointError, match="components noisewise does not use: controlnet"):
        Pipeline.from_pretrained(folder)
    # an unknown pipeline class with exactly SD's components loads as SD
    index_file.write_text(json.dumps(dict(index, _class_name="MyStableDiffusionPipeline")))
    assert Pipeline.from_pretrained(folder).schedule.prediction_type == "epsilon"


def test_folder_without_model_index(sd_folder: Path, tmp_path: Path) -> None:
    """A hand-assembled SD folder (no model_index.json) is recognised from its components' configs
    and encodes prompts exactly as diffusers does (CLIP rules, not the native text encoder's)."""
    from diffusers import StableDiffusionPipeline

    folder = _copy(sd_folder, tmp_path / "m")
    (folder / "model_index.json").unlink()
    pipe = Pipeline.from_pretrained(folder)
    ref = StableDiffusionPipeline.from_pretrained(str(sd_folder))
    with torch.no_grad():
        pe, _ = ref.encode_prompt(PROMPT, "cpu", 1, False)
    assert torch.equal(pipe.encode_prompt([PROMPT]), pe)


def test_fp16_variant_files_load(sd_folder: Path, tmp_path: Path) -> None:
    """Components saved with ``variant="fp16"`` (``diffusion_pytorch_model.fp16.safetensors``,
    ``model.fp16.safetensors``) load, with the same weights."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = _copy(sd_folder, tmp_path / "m")
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"))
    te = CLIPTextModel.from_pretrained(str(folder / "text_encoder"))
    for name, model in (("unet", unet), ("text_encoder", te)):
        for f in (folder / name).glob("*.safetensors"):
            f.unlink()
        model.save_pretrained(str(folder / name), variant="fp16", safe_serialization=True)
        assert any(".fp16." in f.name for f in (folder / name).iterdir())
    pipe = Pipeline.from_pretrained(folder)
    for a, b in zip(pipe.unet.state_dict().values(), unet.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(pipe.encode_prompt([PROMPT]), te(pipe.text_encoder.tokenize([PROMPT])[0]["input_ids"])
                       .last_hidden_state.detach())


def test_single_file_is_explained(tmp_path: Path) -> None:
    for name in ("v1-5-pruned.ckpt", "model.safetensors"):
        f = tmp_path / name
        f.write_bytes(b"\0" * 16)
        with pytest.raises(ValueError, match="single checkpoint file.*from_single_file") as e:
            Pipeline.from_pretrained(f)
        assert ("arbitrary code" in str(e.value)) == name.endswith(".ckpt")


def test_save_pretrained_of_a_user_checkpoint_says_copy(sd_folder: Path, tmp_path: Path) -> None:
    pipe = Pipeline.from_pretrained(sd_folder)
    with pytest.raises(ValueError, match="copy that folder"):
        pipe.save_pretrained(tmp_path / "out")


def test_server_serves_a_user_checkpoint(tmp_path: Path) -> None:
    """The HTTP server runs concurrent SD3 requests (their dict conditioning goes through the server's
    ForwardBatcher) and returns the images the pipeline makes on its own."""
    import base64
    import io
    from concurrent.futures import ThreadPoolExecutor

    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient
    from PIL import Image

    from noisewise.server import ServerConfig, create_app

    torch.set_num_threads(1)
    folder = tmp_path / "sd3"
    save_sd3(folder)
    app = create_app(ServerConfig(models=(str(folder),), preload=(str(folder),), max_steps=10, max_images=2,
                                  max_wait_s=0.05), wait_ready=True)
    # (requests name models, not paths: the operator's folder is the server's first model, the default)
    bodies = [{"prompt": p, "steps": 4, "seed": s, "guidance_scale": 4.0}
              for p, s in (("a red circle", 1), ("a blue square", 2))]
    with TestClient(app) as client:
        with ThreadPoolExecutor(2) as ex:
            replies = list(ex.map(lambda b: client.post("/v1/generate", json=b), bodies))
        pipe = client.app.state.service.get(str(folder)).pipe
    for body, r in zip(bodies, replies):
        assert r.status_code == 200, r.text
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0]["png_base64"]))).convert("RGB"))
        direct = pipe(body["prompt"], steps=4, seed=body["seed"], guidance_scale=4.0)
        assert np.array_equal(img, direct.images[0])


def test_a_pruned_unet_in_a_diffusers_folder_loads(sd_folder: Path, tmp_path: Path) -> None:
    """A Stable Diffusion folder whose unet/ was replaced by noisewise.pipeline.prune.save_pruned."""
    from noisewise.pipeline.prune import count_parameters, model_fn_for, prunable_units, prune_unet, save_pruned

    folder = _copy(sd_folder, tmp_path / "m")
    pipe = Pipeline.from_pretrained(folder)
    units = [u for u in prunable_units(pipe.unet) if u.kind == "transformer"][:1]
    small = prune_unet(pipe.unet, units)
    save_pruned(small, units, folder / "unet")
    loaded = Pipeline.from_pretrained(folder)
    assert count_parameters(loaded.unet) == count_parameters(small) < count_parameters(pipe.unet)
    a = loaded("a cat", steps=2, seed=1, guidance_scale=3.0)
    b = pipe("a cat", steps=2, seed=1, guidance_scale=3.0, model=model_fn_for(small))
    assert np.array_equal(a.images, b.images)
