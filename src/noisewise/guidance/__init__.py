"""Guidance: classifier-free guidance in one batched forward, negative prompts, and the modern family.

    import noisewise as nw
    x = nw.sample(model, noise, schedule=sched, steps=20, cond=c, uncond=u, guidance_scale=7.5,
                  guidance=[nw.Rescale(0.7), nw.Interval()])

See ``docs/guidance.md``.
"""

from .compose import ComposedDenoiser, Composition
from .guided import GuidedDenoiser, check_scale, conditional_denoiser, describe, from_space, to_space
from .methods import (
    APG,
    CFG,
    OPTIONS,
    Autoguidance,
    CFGPlusPlus,
    CFGZeroStar,
    DynamicThreshold,
    GuidanceOption,
    Interval,
    Rescale,
    apg,
    cfg,
    cfg_zero_star,
    cfgpp_scale,
    dynamic_threshold,
    guidance_methods,
    parse_guidance,
    rescale,
)

__all__ = [
    "GuidedDenoiser", "ComposedDenoiser", "Composition", "conditional_denoiser", "check_scale", "describe",
    "to_space", "from_space",
    "GuidanceOption", "CFG", "Rescale", "Interval", "DynamicThreshold", "APG", "CFGZeroStar", "CFGPlusPlus",
    "Autoguidance", "OPTIONS", "guidance_methods", "parse_guidance",
    "cfg", "rescale", "apg", "cfg_zero_star", "dynamic_threshold", "cfgpp_scale",
]
