"""Text-to-image pipeline: text encoder (+ cache) -> guided denoiser -> sampler -> VAE decoder.

Heavy libraries (transformers, diffusers) load only when a model is loaded.
"""

from .t2i import DEFAULT_NEGATIVE_PROMPT, GenerationResult, Pipeline, available_models, resolve_model
from .text import TextEncoder
from .vae import LatentCodec, images_to_tensor, tensor_to_images

__all__ = [
    "Pipeline", "GenerationResult", "available_models", "resolve_model", "DEFAULT_NEGATIVE_PROMPT",
    "TextEncoder", "LatentCodec", "images_to_tensor", "tensor_to_images",
]
