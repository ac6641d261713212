"""Solvers: one generator function per sampler, registered by name (see ``base``)."""

from . import dpm_solver, euler, unipc  # noqa: F401  (registration)
from .base import SAMPLERS, SamplerSpec, StepInfo, get_sampler, run, samplers

__all__ = ["SAMPLERS", "SamplerSpec", "StepInfo", "get_sampler", "run", "samplers"]
