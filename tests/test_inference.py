"""Production inference on the shipped models: image-to-image with the VAE-encoding cache, half
precision with the fp16 VAE guard, INT8, torch.compile (slow), presets in the pipeline and CLI."""

from __future__ import annotations

import copy
import hashlib
import json
import logging

import numpy as np
import pytest
import torch

from noisewise.pipeline import Pipeline, available_models
from noisewise.pipeline.img2img import LatentCache, latent_cache
from noisewise.pipeline.optimize import compile_unet, is_quantized, parse_dtype, quantize_int8
from noisewise.pipeline.presets import PRESETS, apply_preset, get_preset
from noisewise.pipeline.vae import LatentCodec, bad_images

pytest.importorskip("diffusers")
pytestmark = pytest.mark.skipif("shapes-vp" not in available_models(), reason="shipped weights not installed")

_PIPES: dict[str, Pipeline] = {}


def shipped(name: str) -> Pipeline:
    if name not in _PIPES:
        _PIPES[name] = Pipeline.from_pretrained(name)
    return _PIPES[name]


def scene(seed: int = 3) -> np.ndarray:
    from noisewise.shapes.captions import parse_prompt, scene_for_request
    from noisewise.shapes.world import render

    return render(scene_for_request(parse_prompt("a large red circle on the left on a black background"),
                                    np.random.default_rng(seed)))


# -- image-to-image ---------------------------------------------------------------------------------


def test_img2img_strength_zero_returns_the_encoded_input_and_caches_the_encoding():
    pipe = shipped("shapes-vp")
    img = scene()
    pipe.__dict__.pop("image_latent_cache", None)
    calls = []
    enc = pipe.codec.vae.encode

    def spy(x, *a, **k):
        calls.append(x.shape[0])
        return enc(x, *a, **k)

    pipe.codec.vae.encode = spy
    try:
        res = pipe.img2img(img, "a red circle", strength=0.0, num_images=2, seed=5)
        assert res.nfe == 0 and calls == [1]  # one image for two generations: encoded once
        want = pipe.decode(pipe.codec.encode(img[None]))  # reconstruction through the VAE (not cached)
        assert calls == [1, 1]
        np.testing.assert_array_equal(res.images[0], want[0])
        np.testing.assert_array_equal(res.images[1], want[0])
        again = pipe(["a red circle"], image=img.copy(), strength=0.5, steps=4, seed=1)  # same content, new array
        assert calls == [1, 1] and latent_cache(pipe).info()["encoded"] == 1
        assert latent_cache(pipe).hits >= 1 and again.nfe == 2 * 2  # int(4 * 0.5) guided steps
        assert again.metadata[0]["sampler_options"]["strength"] == 0.5
        other = img.copy()
        other[0, 0] = 255 - other[0, 0]
        pipe(["a red circle"], image=other, strength=0.5, steps=2)
        assert calls == [1, 1, 1]  # other content: encoded
    finally:
        del pipe.codec.vae.encode


def test_img2img_flow_strength_one_is_text_to_image():
    """On a flow schedule the first level has alpha = 0: strength 1 ignores the image entirely."""
    pipe = shipped("shapes-flow")
    a = pipe("a blue square", image=scene(), strength=1.0, steps=4, seed=2)
    b = pipe("a blue square", steps=4, seed=2)
    np.testing.assert_array_equal(a.images, b.images)


def test_img2img_strength_trades_input_for_prompt():
    """A red circle on the left, prompt "a green square": low strength keeps the input's colour and
    layout, middle strength keeps the layout, strength 1 follows the prompt alone (evaluator)."""
    from noisewise.shapes.evaluator import Evaluator

    ev = Evaluator.from_pretrained()
    pipe = shipped("shapes-vp")
    src = np.stack([scene(s) for s in range(4)])
    assert all([(o.shape, o.color, o.position) for o in p.objects] == [("circle", "red", "left")]
               for p in ev.predict(src))

    def objs(strength: float) -> list:
        out = pipe(["a green square"] * 4, image=src, strength=strength, steps=20, seed=0)
        return [o for p in ev.predict(out.images) for o in p.objects]

    low, mid, full = objs(0.1), objs(0.5), objs(1.0)
    assert len(low) == 4 and all(o.color == "red" and o.position == "left" for o in low)
    assert all(o.position == "left" for o in mid) and sum(o.color == "red" for o in mid) <= 2
    assert all(o.color == "green" and o.shape == "square" for o in full)
    assert sum(o.position != "left" for o in full) >= 2


def test_img2img_bad_input_is_explained():
    pipe = shipped("shapes-vp")
    with pytest.raises(ValueError, match="must be 32x32 pixels for model 'shapes-vp', got 64x64 with resize='off'"):
        pipe("x", image=np.zeros((64, 64, 3), np.uint8), resize="off")
    with pytest.raises(ValueError, match="is 64x48 pixels, not square.*resize='crop'"):
        pipe("x", image=np.zeros((48, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="resize must be one of"):
        pipe("x", image=scene(), resize="fit")
    with pytest.raises(ValueError, match="needs image="):
        pipe("x", strength=0.5)
    with pytest.raises(ValueError, match="resize= needs image="):
        pipe("x", resize="crop")
    with pytest.raises(ValueError, match="strength must be"):
        pipe("x", image=scene(), strength=1.5)
    with pytest.raises(ValueError, match="one per image"):
        pipe(["x", "y", "z"], image=np.stack([scene(), scene()]))
    with pytest.raises(TypeError, match="uint8"):
        pipe("x", image=np.zeros((32, 32, 3), np.float32))


def test_img2img_takes_other_sizes_as_resize_says():
    """A whole-factor nearest-neighbour view (as ``noisewise generate`` writes) gives the native image's
    result bit for bit; a wide picture cropped to its centre gives the centre's; the metadata says how."""
    from PIL import Image

    pipe = shipped("shapes-vp")
    img = scene()
    kw = dict(strength=0.5, steps=4, seed=2)
    native = pipe("a red circle", image=img, **kw)
    view = np.asarray(Image.fromarray(img).resize((256, 256), Image.NEAREST))
    np.testing.assert_array_equal(pipe("a red circle", image=view, **kw).images, native.images)
    assert native.metadata[0]["resize"] == "auto" and native.metadata[0]["strength"] == 0.5
    wide = np.zeros((32, 48, 3), np.uint8)
    wide[:, 8:40] = img  # 48 wide: the centre square is the scene
    cropped = pipe("a red circle", image=wide, resize="crop", **kw)
    np.testing.assert_array_equal(cropped.images, native.images)
    assert cropped.metadata[0]["resize"] == "crop"
    stretched = pipe("a red circle", image=wide, resize="stretch", **kw)
    assert stretched.images.shape == native.images.shape and not np.array_equal(stretched.images, native.images)
    assert "resize" not in pipe("a red circle", steps=2).metadata[0]  # text-to-image: nothing to resize


def test_a_stochastic_sampler_is_seeded_per_image_by_default():
    """Without a generator, a stochastic sampler's step noise comes from per-image generators seeded by
    the image's seed: the same image again, whatever the batch, as the server and batch jobs give."""
    import torch

    from noisewise.pipeline.t2i import STEP_SEED_OFFSET

    pipe = shipped("shapes-vp")
    kw = dict(sampler="dpmpp_2m_sde", steps=3)
    two = pipe("a red circle", num_images=2, seed=4, **kw)
    np.testing.assert_array_equal(two.images, pipe("a red circle", num_images=2, seed=4, **kw).images)
    np.testing.assert_array_equal(two.images[1], pipe("a red circle", seed=5, **kw).images[0])
    gens = [torch.Generator().manual_seed(s + STEP_SEED_OFFSET) for s in (4, 5)]
    np.testing.assert_array_equal(two.images, pipe("a red circle", num_images=2, seed=4, generator=gens, **kw).images)
    other = [torch.Generator().manual_seed(s) for s in (4, 5)]  # the step noise matters: another one differs
    assert not np.array_equal(two.images, pipe("a red circle", num_images=2, seed=4, generator=other, **kw).images)


def test_latent_cache_is_bounded():
    c = LatentCache(max_entries=2)
    pipe = shipped("shapes-vp")
    imgs = [torch.full((3, 32, 32), v) for v in (0.1, 0.5, 0.9)]
    c.encode(pipe.codec, imgs)
    assert c.info()["size"] == 2 and c.encoded == 3
    c.encode(pipe.codec, imgs[2:])
    assert c.encoded == 3 and c.hits == 1


# -- precision --------------------------------------------------------------------------------------


def test_bf16_network_fp32_solver():
    pipe = Pipeline.from_pretrained("shapes-vp")
    ref = pipe("a red circle on the left", steps=6, seed=0).images
    pipe.to(dtype=torch.bfloat16)
    assert next(pipe.unet.parameters()).dtype == torch.bfloat16 and pipe.codec.dtype == torch.bfloat16
    seen = []
    inner = pipe.unet.forward

    def spy(x, *a, **k):
        seen.append(x.dtype)
        return inner(x, *a, **k)

    pipe.unet.forward = spy
    states = []
    out = pipe("a red circle on the left", steps=6, seed=0, callback=lambda info: states.append(info.x.dtype))
    assert set(seen) == {torch.bfloat16} and set(states) == {torch.float32}
    assert np.abs(out.images.astype(float) - ref.astype(float)).mean() < 3.0  # 0-255 scale
    assert pipe.codec.fallbacks == 0


def test_fp16_vae_overflow_falls_back_to_fp32(caplog):
    base = shipped("shapes-vp").codec
    vae16 = copy.deepcopy(base.vae)
    with torch.no_grad():  # make fp16 overflow: activations ~1e6 after conv_in (fp16 max 65504)
        vae16.decoder.conv_in.weight.mul_(1e5)
        vae16.decoder.conv_in.bias.mul_(1e5)
    full32 = LatentCodec(copy.deepcopy(vae16))
    codec = LatentCodec(vae16.half())
    ref32 = LatentCodec(copy.deepcopy(vae16).float())  # the same fp16-rounded weights, in fp32
    z = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    unguarded = LatentCodec(vae16, guard=False)
    raw = unguarded.vae.decode(z.half() / unguarded.scaling_factor).sample.float()
    assert bad_images(raw).all()  # the failure is real: fp16 gives NaN/constant images
    with caplog.at_level(logging.WARNING, logger="noisewise.pipeline.vae"):
        out = codec.decode(z)
    assert codec.fallbacks == 3 and "redone in float32" in caplog.text
    torch.testing.assert_close(out, ref32.decode(z), rtol=0, atol=1e-6)
    assert (out - full32.decode(z)).abs().max() < 1e-3
    assert torch.isfinite(out).all()
    # a healthy fp16 VAE takes no fallback and stays close to fp32
    ok = LatentCodec(copy.deepcopy(base.vae).half())
    x = ok.decode(z)
    assert ok.fallbacks == 0 and (x - base.decode(z)).abs().max() < 0.02


def test_bad_images_flags_nan_and_constant():
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    x[1] = float("nan")
    x[2] = -1.0  # black
    x[3, 0, 0, 0] = float("inf")
    assert bad_images(x).tolist() == [False, True, True, True]


def test_parse_dtype():
    assert parse_dtype("bf16") is torch.bfloat16 and parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="bfloat16"):
        parse_dtype("int4")


# -- INT8 ---------------------------------------------------------------------------------------------


def test_int8_dynamic_quantization_of_unet_and_text_encoder():
    pipe = Pipeline.from_pretrained("shapes-vp")
    B = 4
    x = torch.randn(B, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((B,), 500.0)
    cond = pipe.encode_prompt(["a red circle"] * B)
    ref = pipe.model_fn(x, t, cond)
    id_before = pipe.text_encoder.encoder_id
    quantize_int8(pipe, text_encoder=True)
    assert is_quantized(pipe.unet)
    mods = list(pipe.unet.modules())
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized.dynamic") for m in mods)
    assert not any(type(m) is torch.nn.Linear for m in mods)
    assert pipe.text_encoder.variant == "int8-dynamic" and pipe.text_encoder.encoder_id != id_before
    q = pipe.model_fn(x, t, cond)
    rel = float((q - ref).norm() / ref.norm())
    assert 0 < rel < 0.05  # quantized (not identical), but close
    c8 = pipe.encode_prompt(["a red circle"])  # a new cache key: really re-encoded by the INT8 encoder
    assert float((c8[0] - cond[0]).norm()) > 0  # (~50% off on MiniLM: why it is off by default)
    default = quantize_int8(Pipeline.from_pretrained("shapes-vp"))
    assert is_quantized(default.unet) and default.text_encoder.variant == ""
    out = pipe("a red circle", steps=4, seed=0)
    assert out.images.shape == (1, 32, 32, 3)
    with pytest.raises(ValueError, match="INT8"):
        from noisewise.pipeline.optimize import set_precision

        set_precision(pipe, "bf16")


# -- presets ------------------------------------------------------------------------------------------


def test_apply_preset_explicit_arguments_win():
    p = get_preset("balanced")
    assert apply_preset("balanced", None, None, None, {}) == (p.sampler, p.steps, p.guidance_scale, {})
    assert apply_preset("balanced", "euler", 3, 1.5, {"x": 1}) == ("euler", 3, 1.5, {"x": 1})
    with pytest.raises(ValueError, match="did you mean 'balanced'"):
        get_preset("balancd")
    assert set(PRESETS) == {"realtime", "balanced", "quality"}


def test_pipeline_preset():
    pipe = shipped("shapes-vp")
    p = get_preset("realtime")
    res = pipe("a red circle", preset="realtime", seed=0)
    m = res.metadata[0]
    assert p.guidance_scale is None  # the presets keep the model's own guidance scale
    assert (m["sampler"], m["steps"], m["guidance_scale"], m["preset"]) == (p.sampler, p.steps,
                                                                            pipe.defaults["guidance_scale"], "realtime")
    assert res.nfe == p.nfe
    res = pipe("a red circle", preset="quality", steps=3, seed=0)
    assert res.metadata[0]["steps"] == 3
    with pytest.raises(ValueError, match="unknown preset"):
        pipe("a red circle", preset="fastest")


def test_cli_generate_preset_and_image(tmp_path, capsys):
    from PIL import Image

    from noisewise.cli import main

    src = tmp_path / "in.png"
    Image.fromarray(scene()).save(src)
    out = tmp_path / "out.png"
    rc = main(["generate", "a red circle", "--preset", "balanced", "--steps", "2", "--out", str(out), "--quiet"])
    assert rc == 0 and out.is_file()
    rc = main(["generate", "a red circle", "--image", str(src), "--strength", "0", "--out", str(out), "--overwrite",
               "--quiet"])
    assert rc == 0
    got = np.asarray(Image.open(tmp_path / "out-0.png").convert("RGB"))
    pipe = shipped("shapes-vp")
    np.testing.assert_array_equal(got, pipe.decode(pipe.codec.encode(scene()[None]))[0])
    # the PNG records which init image it came from (file and pixel hashes, as the server does)
    meta = json.loads(Image.open(tmp_path / "out-0.png").text["parameters"])
    assert meta["strength"] == 0 and meta["init_image"] == {
        "path": str(src), "sha256": hashlib.sha256(src.read_bytes()).hexdigest(),
        "pixels_sha256": hashlib.sha256(np.ascontiguousarray(scene()).tobytes()).hexdigest(),
        "format": "png", "size": [32, 32], "bytes": src.stat().st_size}
    rc = main(["generate", "a red circle", "--image", str(tmp_path / "missing.png"), "--out", str(out), "--quiet"])
    assert rc != 0 and "cannot read --image" in capsys.readouterr().err
    rc = main(["generate", "x", "--strength", "0.5", "--out", str(out), "--quiet"])
    assert rc != 0 and "--image" in capsys.readouterr().err
    rc = main(["generate", "x", "--resize", "crop", "--out", str(out), "--quiet"])
    assert rc != 0 and "--resize needs --image" in capsys.readouterr().err


def test_cli_generate_takes_its_own_view_back(tmp_path, capsys):
    """``generate`` writes an 8x pixel-exact view; ``--image`` that view is ``--image`` the native PNG."""
    from PIL import Image

    from noisewise.cli import main

    first = tmp_path / "first.png"
    assert main(["generate", "a red circle", "--steps", "2", "--out", str(first), "--quiet"]) == 0
    assert Image.open(first).size == (256, 256) and Image.open(tmp_path / "first-0.png").size == (32, 32)
    outs = {}
    for name, src in (("view", first), ("native", tmp_path / "first-0.png")):
        outs[name] = tmp_path / f"{name}.png"
        rc = main(["generate", "a blue square", "--image", str(src), "--strength", "0.6", "--steps", "4",
                   "--out", str(outs[name]), "--quiet"])
        assert rc == 0, capsys.readouterr().err
    got = {k: np.asarray(Image.open(v.with_name(f"{k}-0.png")).convert("RGB")) for k, v in outs.items()}
    np.testing.assert_array_equal(got["view"], got["native"])
    meta = json.loads(Image.open(tmp_path / "view-0.png").text["parameters"])
    assert meta["resize"] == "auto" and meta["init_image"]["size"] == [256, 256]
    wide = tmp_path / "wide.png"
    Image.new("RGB", (64, 32)).save(wide)
    rc = main(["generate", "x", "--image", str(wide), "--out", str(tmp_path / "w.png"), "--quiet"])
    err = capsys.readouterr().err
    assert rc != 0 and "not square" in err and "--resize crop" in err and "Traceback" not in err
    rc = main(["generate", "x", "--image", str(wide), "--resize", "crop", "--steps", "2",
               "--out", str(tmp_path / "w.png"), "--quiet"])
    assert rc == 0


# -- torch.compile -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_compile_does_not_recompile_per_step():
    """Compiling the shipped UNet takes minutes on 2 CPU cores: slow."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    pipe = Pipeline.from_pretrained("shapes-vp")
    ref = pipe("a red circle", steps=5, seed=0).images
    compile_unet(pipe, warmup_batch=1)
    graphs = counters["stats"]["unique_graphs"]
    assert graphs >= 1
    out = pipe("a red circle", steps=5, seed=0)
    out = pipe("a blue square", steps=8, seed=1)
    assert counters["stats"]["unique_graphs"] == graphs  # 13 more steps, no new graph
    assert sum(counters["recompiles"].values()) == 0
    same = pipe("a red circle", steps=5, seed=0).images
    assert np.abs(same.astype(int) - ref.astype(int)).max() <= 2
    assert out.images.shape == (1, 32, 32, 3)
