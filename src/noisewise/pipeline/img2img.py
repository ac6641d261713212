"""Image-to-image: encode the input image(s) with the VAE (cached by content), then sample from
the noised encoding at the ``strength`` level of the sampler's grid (``nw.sample(init=, strength=)``).

``strength`` follows diffusers' img2img pipelines: of ``steps`` steps the last
``int(steps * strength)`` run; ``1`` starts from (almost) pure noise, ``0`` returns the input.
The VAE encodes to the posterior mean (deterministic, so an image is encoded once); diffusers
samples the posterior instead, a difference of one posterior standard deviation in the start state.

An input image of another size is brought to the model's (``resize``, :data:`RESIZE_MODES`): ``"auto"``
scales a square image and refuses any other shape, ``"crop"`` cuts the centre square first, ``"stretch"``
scales each side on its own, ``"off"`` refuses every other size. Shrinking is the exact area average,
so an image enlarged by a whole factor with nearest-neighbour pixels (``noisewise generate``'s pixel-exact
view) shrinks back to exactly its pixels; enlarging is bicubic.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from ..limits import RESIZE_MODES
from .vae import LatentCodec

Tensor = torch.Tensor
DEFAULT_STRENGTH = 0.8
DEFAULT_RESIZE = "auto"


def _to_chw_list(image: Any) -> list[Tensor]:
    """Images in any accepted form -> list of float ``(3, H, W)`` tensors in [0, 1]."""
    if isinstance(image, (list, tuple)):
        out: list[Tensor] = []
        for im in image:
            out.extend(_to_chw_list(im))
        return out
    if hasattr(image, "convert") and hasattr(image, "size") and not isinstance(image, (np.ndarray, Tensor)):
        image = np.asarray(image.convert("RGB"))  # a PIL image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (H, W, 3) or (B, H, W, 3), got dtype {image.dtype}")
        if image.ndim == 3:
            image = image[None]
        if image.ndim != 4 or image.shape[-1] != 3:
            raise ValueError(f"numpy images must be (H, W, 3) or (B, H, W, 3) RGB, got shape {image.shape}")
        t = torch.tensor(image).permute(0, 3, 1, 2).float() / 255.0  # a copy: the input may be read-only
        return list(t)
    if isinstance(image, Tensor):
        if image.dtype == torch.uint8:
            t = image[None] if image.ndim == 3 else image
            if t.ndim != 4 or t.shape[-1] != 3:
                raise ValueError(f"uint8 image tensors must be (B, H, W, 3), got shape {tuple(image.shape)}")
            return list(t.permute(0, 3, 1, 2).float() / 255.0)
        if not image.is_floating_point():
            raise TypeError(f"image tensors must be uint8 (B, H, W, 3) or float (B, 3, H, W), got {image.dtype}")
        t = image[None] if image.ndim == 3 else image
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"float image tensors must be (B, 3, H, W) in [0, 1], got shape {tuple(image.shape)}")
        if not bool(torch.isfinite(t).all()) or float(t.min()) < -1e-6 or float(t.max()) > 1 + 1e-6:
            raise ValueError("float image tensors must hold finite values in [0, 1]")
        return list(t.detach().float().cpu())
    raise TypeError(
        f"image must be a PIL image, a uint8 numpy array (H, W, 3), a tensor, or a list of them; "
        f"got {type(image).__name__}"
    )


def image_key(img: Tensor) -> str:
    """Content hash of one ``(3, H, W)`` float image."""
    t = img.detach().to(torch.float32).contiguous().cpu()
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


class LatentCache:
    """LRU ``(image content hash, codec state) -> latent`` with ``hits``/``misses``/``encoded`` counters
    (``encoded``: images actually run through the VAE encoder)."""

    def __init__(self, max_entries: int = 256) -> None:
        self.max_entries = int(max_entries)
        self._d: OrderedDict[tuple[str, str], Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.encoded = 0

    def encode(self, codec: LatentCodec, images: list[Tensor]) -> Tensor:
        state = f"{id(codec.vae)}|{codec.dtype}|{codec.device}"
        keys = [(image_key(im), state) for im in images]
        with self._lock:
            found = [self._d.get(k) for k in keys]
            for k, f in zip(keys, found):
                if f is not None:
                    self._d.move_to_end(k)
            self.hits += sum(f is not None for f in found)
            self.misses += sum(f is None for f in found)
        todo = list(dict.fromkeys(k for k, f in zip(keys, found) if f is None))
        fresh: dict[tuple[str, str], Tensor] = {}
        if todo:
            first = {k: im for k, im in zip(keys, images)}
            z = codec.encode(torch.stack([first[k] for k in todo])).cpu()
            with self._lock:
                self.encoded += len(todo)
                for k, zi in zip(todo, z):
                    fresh[k] = zi
                    if self.max_entries > 0:
                        self._d[k] = zi.clone()
                        self._d.move_to_end(k)
                while len(self._d) > self.max_entries:
                    self._d.popitem(last=False)
        return torch.stack([f if f is not None else fresh[k] for k, f in zip(keys, found)]).clone()

    def info(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses, "encoded": self.encoded, "size": len(self._d)}


def latent_cache(pipe: Any) -> LatentCache:
    c = pipe.__dict__.get("image_latent_cache")
    if c is None:
        c = pipe.__dict__.setdefault("image_latent_cache", LatentCache())
    return c


def check_resize(resize: Any) -> str:
    """``resize`` checked: one of :data:`RESIZE_MODES` (``None`` = :data:`DEFAULT_RESIZE`)."""
    if resize is None:
        return DEFAULT_RESIZE
    if not isinstance(resize, str) or resize not in RESIZE_MODES:
        raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)} (how an input image of another size "
                         f"becomes the model's), got {resize!r}")
    return resize


def check_image_size(width: int, height: int, size: int, resize: str, model: str,
                     spell: str = "resize={!r}") -> None:
    """ValueError saying what to do when a ``width`` x ``height`` input image cannot become the
    ``size`` x ``size`` input of ``model`` under ``resize`` (a checked mode). ``spell`` writes the option
    with a value as the caller's user types it (``"--resize {}"`` on the command line)."""
    if (width, height) == (size, size) or resize in ("crop", "stretch"):
        return
    if resize == "off":
        raise ValueError(f"input images must be {size}x{size} pixels for model {model!r}, got {width}x{height} "
                         f"with {spell.format('off')}; resize them first (e.g. PIL Image.resize(({size}, {size}))), "
                         f"or use {spell.format('auto')}")
    if width != height:
        raise ValueError(f"the input image is {width}x{height} pixels, not square, and model {model!r} takes "
                         f"{size}x{size} images: use {spell.format('crop')} (the centre square, scaled) or "
                         f"{spell.format('stretch')} (each side scaled on its own), or crop it yourself")


def area_weights(n_in: int, n_out: int) -> Tensor:
    """``(n_out, n_in)`` float64 weights: row ``i`` averages the input over output pixel ``i``'s span
    ``[i r, (i + 1) r)`` (``r = n_in / n_out >= 1``), a partly covered pixel weighted by its overlap."""
    r = n_in / n_out
    lo = torch.arange(n_out, dtype=torch.float64)[:, None] * r
    j = torch.arange(n_in, dtype=torch.float64)[None, :]
    return (torch.minimum(lo + r, j + 1) - torch.maximum(lo, j)).clamp(min=0.0) / r


def fit_image(img: Tensor, size: int, resize: str, model: str) -> Tensor:
    """One float ``(3, H, W)`` image in [0, 1] brought to ``(3, size, size)`` under ``resize`` (a checked
    mode; ValueError from :func:`check_image_size` when it refuses). A side that shrinks is the exact
    area average (so a whole-factor nearest-neighbour enlargement shrinks back to its pixels); a side
    that grows is bicubic, clamped to [0, 1]."""
    import torch.nn.functional as F

    h, w = int(img.shape[1]), int(img.shape[2])
    check_image_size(w, h, size, resize, model)
    if (h, w) == (size, size):
        return img
    if resize == "crop" and h != w:
        m = min(h, w)
        top, left = (h - m) // 2, (w - m) // 2
        img = img[:, top:top + m, left:left + m]
        h = w = m
    # float64, so that averaging equal pixels gives back their float32 value exactly; one channel at a
    # time, the height first, so a 4096x4096 picture needs one 128 MiB channel copy at most
    ah = area_weights(h, size) if h > size else None
    aw = area_weights(w, size) if w > size else None
    chans = []
    for c in img.detach().cpu():
        c = c.to(torch.float64)
        if ah is not None:
            c = ah @ c
        if aw is not None:
            c = c @ aw.T
        chans.append(c)
    x = torch.stack(chans)
    if tuple(x.shape[1:]) != (size, size):  # a side grows (bicubic leaves a side already at size as it is)
        x = F.interpolate(x[None], size=(size, size), mode="bicubic", align_corners=False)[0]
    return x.clamp(0.0, 1.0).to(torch.float32)


def encode_images(pipe: Any, image: Any, n: int, resize: str = DEFAULT_RESIZE) -> Tensor:
    """Latents ``(n, C, h, w)`` for ``n`` generations: one input image for all, or one per image, each
    brought to the model's size under ``resize`` (:func:`fit_image`)."""
    resize = check_resize(resize)
    imgs = _to_chw_list(image)
    if not imgs:
        raise ValueError("give at least one input image")
    size = int(pipe.sample_size)
    imgs = [fit_image(im, size, resize, pipe.name) for im in imgs]
    if len(imgs) == 1:
        imgs = imgs * n
    elif len(imgs) != n:
        raise ValueError(f"got {len(imgs)} input images for {n} generations: give one image, or one per image")
    return latent_cache(pipe).encode(pipe.codec, imgs).to(pipe.device)


def check_strength(strength: Any) -> float:
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 <= float(strength) <= 1.0:
        raise ValueError(
            f"strength must be a number from 0 to 1 (0 = return the input, 1 = ignore it), got {strength!r}"
        )
    return float(strength)


def img2img(pipe: Any, image: Any, prompt: str | Sequence[str], *, strength: float = DEFAULT_STRENGTH,
            **kwargs: Any) -> Any:
    """``pipe(prompt, image=image, strength=strength, **kwargs)``."""
    return pipe(prompt, image=image, strength=strength, **kwargs)
