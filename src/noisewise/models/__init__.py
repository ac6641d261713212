from .denoiser import ModelDenoiser
from .parameterization import from_x0, to_x0

__all__ = ["ModelDenoiser", "to_x0", "from_x0"]
