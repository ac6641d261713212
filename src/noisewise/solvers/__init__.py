"""Solvers: one generator function per sampler, registered by name (see ``base``)."""

from . import (  # noqa: F401  (registration)
    adaptive,
    ancestral,
    dpm_solver,
    euler,
    multistep_classic,
    noise,
    sde,
    second_order,
    unipc,
)
from .base import SAMPLERS, SamplerSpec, StepInfo, get_sampler, run, samplers

__all__ = ["SAMPLERS", "SamplerSpec", "StepInfo", "get_sampler", "run", "samplers"]
