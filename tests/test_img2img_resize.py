"""How image-to-image brings an input image to the model's size (``resize``): checked against exact
area averages computed here from their definition (pixels repeated onto a common finer grid, then
block means), exact crops, and the refusals that say what to do instead."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from noisewise.limits import RESIZE_MODES
from noisewise.pipeline.img2img import check_image_size, check_resize, fit_image


def area_average(img: torch.Tensor, h_out: int, w_out: int) -> torch.Tensor:
    """The exact area average of a ``(3, H, W)`` image on an ``h_out`` x ``w_out`` grid, by its
    definition: repeat every pixel onto the grid whose sides are the least common multiples, then take
    the mean of each output pixel's block there."""
    h, w = int(img.shape[1]), int(img.shape[2])
    lh, lw = np.lcm(h, h_out), np.lcm(w, w_out)
    x = img.double().repeat_interleave(lh // h, dim=1).repeat_interleave(lw // w, dim=2)
    return x.reshape(3, h_out, lh // h_out, w_out, lw // w_out).mean(dim=(2, 4))


def rand_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("factor", [2, 3, 7, 8])
def test_a_whole_factor_nearest_neighbour_view_shrinks_back_to_its_pixels(factor: int) -> None:
    """``noisewise generate`` writes an 8x nearest-neighbour view; fed back, it is the native image,
    to the last bit of its float32 values."""
    native = torch.randint(0, 256, (3, 32, 32), generator=torch.Generator().manual_seed(factor)).float() / 255
    view = native.repeat_interleave(factor, dim=1).repeat_interleave(factor, dim=2)
    out = fit_image(view, 32, "auto", "m")
    assert out.dtype == torch.float32 and out.shape == (3, 32, 32)
    assert torch.equal(out, native)


@pytest.mark.parametrize("side", [48, 50, 100, 33])
def test_shrinking_is_the_exact_area_average(side: int) -> None:
    img = rand_image(side, side, seed=side)
    out = fit_image(img, 32, "auto", "m")
    assert float((out.double() - area_average(img, 32, 32)).abs().max()) < 1e-6


@pytest.mark.parametrize("factor", [2, 4, 8])
def test_whole_factor_shrinking_agrees_with_pillows_reduce(factor: int) -> None:
    """An outside reference: Pillow's ``Image.reduce`` (the mean of each factor x factor block, rounded
    to uint8) on a uint8 picture is our exact mean, rounded. (At factor 3 Pillow's fixed-point division
    is itself up to 0.56 of a level off the mean, so it is no reference there.)"""
    from PIL import Image

    pic = np.random.default_rng(factor).integers(0, 256, (32 * factor, 32 * factor, 3), dtype=np.uint8)
    theirs = np.asarray(Image.fromarray(pic).reduce(factor)).astype(np.int16)
    ours = fit_image(torch.tensor(pic).permute(2, 0, 1).float() / 255, 32, "auto", "m")
    ours = (ours.double() * 255).permute(1, 2, 0).numpy()
    assert np.abs(ours - theirs).max() <= 0.5 + 1e-4  # Pillow's level is our exact mean, rounded


def test_crop_takes_the_centre_square() -> None:
    img = rand_image(32, 40)  # 40 wide, 32 high: the centre square is columns 4..35
    assert torch.equal(fit_image(img, 32, "crop", "m"), img[:, :, 4:36])
    tall = rand_image(81, 64, seed=2)  # 64 wide, 81 high: rows 8..71, then shrunk by 2
    want = area_average(tall[:, 8:72, :], 32, 32)
    assert float((fit_image(tall, 32, "crop", "m").double() - want).abs().max()) < 1e-6


def test_stretch_scales_each_side_on_its_own() -> None:
    img = rand_image(32, 64, seed=3)  # width halves, height stays
    want = area_average(img, 32, 32)
    assert torch.allclose(want, (img[:, :, 0::2] + img[:, :, 1::2]).double() / 2, atol=1e-12)  # the oracle itself
    assert float((fit_image(img, 32, "stretch", "m").double() - want).abs().max()) < 1e-6
    grows = fit_image(rand_image(16, 48, seed=4), 32, "stretch", "m")  # one side grows: bicubic, in range
    assert grows.shape == (3, 32, 32) and float(grows.min()) >= 0.0 and float(grows.max()) <= 1.0


def test_enlarging_keeps_flat_areas_and_the_range() -> None:
    flat = torch.full((3, 16, 16), 0.25)
    assert torch.allclose(fit_image(flat, 32, "auto", "m"), torch.full((3, 32, 32), 0.25), atol=1e-6)
    edge = torch.zeros(3, 16, 16)
    edge[:, :, 8:] = 1.0  # a hard edge overshoots under bicubic; the result is clamped to [0, 1]
    out = fit_image(edge, 32, "auto", "m")
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert float(out[:, :, :12].max()) < 0.05 and float(out[:, :, 20:].min()) > 0.95


def test_the_models_size_passes_through_untouched() -> None:
    img = rand_image(32, 32)
    for mode in RESIZE_MODES:
        assert fit_image(img, 32, mode, "m") is img


def test_refusals_say_what_to_do() -> None:
    with pytest.raises(ValueError, match="not square.*use resize='crop'.*resize='stretch'"):
        fit_image(rand_image(20, 40), 32, "auto", "shapes-vp")
    with pytest.raises(ValueError, match="must be 32x32 pixels for model 'shapes-vp', got 64x64 with resize='off'"):
        fit_image(rand_image(64, 64), 32, "off", "shapes-vp")
    check_image_size(40, 20, 32, "crop", "m")  # crop and stretch take any shape
    check_image_size(40, 20, 32, "stretch", "m")
    assert check_resize(None) == "auto" and check_resize("crop") == "crop"
    for bad in ("fit", "", 1, True, "AUTO"):
        with pytest.raises(ValueError, match="resize must be one of auto, crop, stretch, off"):
            check_resize(bad)
