"""Image-to-image: encode the input image(s) with the VAE (cached by content), then sample from
the noised encoding at the ``strength`` level of the sampler's grid (``nw.sample(init=, strength=)``).

``strength`` follows diffusers' img2img pipelines: of ``steps`` steps the last
``int(steps * strength)`` run; ``1`` starts from (almost) pure noise, ``0`` returns the input.
The VAE encodes to the posterior mean (deterministic, so an image is encoded once); diffusers
samples the posterior instead, a difference of one posterior standard deviation in the start state.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .vae import LatentCodec

Tensor = torch.Tensor
DEFAULT_STRENGTH = 0.8


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


def encode_images(pipe: Any, image: Any, n: int) -> Tensor:
    """Latents ``(n, C, h, w)`` for ``n`` generations: one input image for all, or one per image."""
    imgs = _to_chw_list(image)
    if not imgs:
        raise ValueError("give at least one input image")
    size = pipe.sample_size
    for im in imgs:
        if tuple(im.shape[1:]) != (size, size):
            raise ValueError(
                f"input images must be {size}x{size} pixels for model {pipe.name!r}, got "
                f"{im.shape[2]}x{im.shape[1]}; resize them first (e.g. PIL Image.resize(({size}, {size})))"
            )
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
