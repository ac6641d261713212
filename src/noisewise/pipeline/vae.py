"""Latent <-> image through a diffusers ``AutoencoderKL`` (scaled as in diffusers).

Images are float tensors in ``[0, 1]``, ``(batch, 3, H, W)``; latents are the VAE's posterior
mean (or a sample) times ``scaling_factor`` (after subtracting ``shift_factor`` when the config has
one), the space the denoisers are trained in.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor
logger = logging.getLogger(__name__)
HALF = (torch.float16, torch.bfloat16)


def images_to_tensor(images: np.ndarray | Tensor) -> Tensor:
    """``uint8`` ``(B, H, W, 3)`` arrays (or float ``(B, 3, H, W)`` in [0, 1]) -> float ``(B, 3, H, W)``."""
    if isinstance(images, np.ndarray):
        if images.dtype != np.uint8:
            raise TypeError(f"numpy images must be uint8 (B, H, W, 3), got {images.dtype}")
        t = torch.from_numpy(images)
        if t.ndim == 3:
            t = t[None]
        return t.permute(0, 3, 1, 2).float() / 255.0
    if images.dtype == torch.uint8:
        return images.permute(0, 3, 1, 2).float() / 255.0
    return images.float()


def tensor_to_images(x: Tensor) -> np.ndarray:
    """float ``(B, 3, H, W)`` in [0, 1] -> ``uint8`` ``(B, H, W, 3)``."""
    return (x.detach().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


class LatentCodec:
    """Encode images to scaled latents and decode them back with an ``AutoencoderKL``."""

    def __init__(self, vae: Any, *, guard: bool = True) -> None:
        self.vae = vae
        self.guard = guard  # half-precision decode: detect NaN / constant (black) images, redo in fp32
        self.fallbacks = 0
        self._fp32: tuple[Any, Any] | None = None  # (source vae, its fp32 copy)
        self._fp32_lock = threading.Lock()
        cfg = vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", 0.0) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.downsample = 2 ** (len(cfg.block_out_channels) - 1)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> LatentCodec:
        from diffusers import AutoencoderKL

        from .loading import diffusers_load_options

        vae = AutoencoderKL.from_pretrained(str(path), torch_dtype=dtype, use_safetensors=True,
                                            **diffusers_load_options())
        return cls(vae.eval().requires_grad_(False))

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.latent_channels, height // self.downsample, width // self.downsample)

    @torch.no_grad()
    def encode(
        self, images: np.ndarray | Tensor, *, sample: bool = False, generator: torch.Generator | None = None
    ) -> Tensor:
        """Images (uint8 arrays or [0, 1] tensors) -> scaled latents (float32)."""
        x = images_to_tensor(images).to(self.device) * 2.0 - 1.0
        dist = self.vae.encode(x.to(self.dtype)).latent_dist
        if self.guard and self.dtype in HALF and not bool(torch.isfinite(dist.mean).all()):
            self._fell_back("encode", x.shape[0])
            dist = self.fp32_vae().encode(x.float()).latent_dist
        z = dist.sample(generator) if sample else dist.mean
        return ((z.float() - self.shift_factor) * self.scaling_factor)

    def fp32_vae(self) -> Any:
        """A float32 copy of the VAE (made once, on first need) for the half-precision fallback."""
        with self._fp32_lock:
            if self._fp32 is None or self._fp32[0] is not self.vae:
                self._fp32 = (self.vae, copy.deepcopy(self.vae).float())
            return self._fp32[1]

    def _fell_back(self, what: str, rows: int) -> None:
        self.fallbacks += rows
        logger.warning(
            "%s VAE %s gave NaN/Inf or a constant image for %d of the images; redone in float32 "
            "(known fp16 VAE overflow; load the VAE in float32 or bfloat16 to avoid the extra pass)",
            str(self.dtype).replace("torch.", ""), what, rows,
        )

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        """Scaled latents -> images, float ``(B, 3, H, W)`` in [0, 1]."""
        z = latents.to(self.device, torch.float32) / self.scaling_factor + self.shift_factor
        x = self.vae.decode(z.to(self.dtype)).sample.float()
        if self.guard and self.dtype in HALF:
            bad = bad_images(x)
            if bool(bad.any()):
                self._fell_back("decode", int(bad.sum()))
                x[bad] = self.fp32_vae().decode(z[bad]).sample.float()
        return ((x + 1.0) / 2.0).clamp(0.0, 1.0)


def bad_images(x: Tensor, tol: float = 1e-3) -> Tensor:
    """Per image of a decoded batch ``(B, C, H, W)`` in [-1, 1]: any NaN/Inf, or (almost) constant
    over all pixels and channels (the black image a fp16 VAE overflow produces)."""
    flat = x.reshape(x.shape[0], -1)
    finite = torch.isfinite(flat).all(dim=1)
    spread = flat.nan_to_num(0.0, 0.0, 0.0).amax(dim=1) - flat.nan_to_num(0.0, 0.0, 0.0).amin(dim=1)
    return ~finite | (spread < tol)
