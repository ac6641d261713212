"""noisewise: samplers and guidance for diffusion and flow-matching models.

    import noisewise as nw
    sched = nw.Schedule.from_diffusers({...})
    x0 = nw.sample(model, noise, schedule=sched, sampler="unipc", steps=10)
"""

from .core.grid import Grid, Level, make_grid
from .core.schedules import EDM, VE, CosineVP, DiscreteVP, LinearVP, RectifiedFlow, Schedule
from .core.spacing import spacings
from .guidance import (
    APG,
    CFG,
    Autoguidance,
    CFGPlusPlus,
    CFGZeroStar,
    DynamicThreshold,
    GuidedDenoiser,
    Interval,
    Rescale,
    guidance_methods,
)
from .models.denoiser import ModelDenoiser, NonFiniteError
from .models.parameterization import from_x0, to_x0
from .pipeline import GenerationResult, Pipeline
from .sampling import SampleResult, recommended, sample
from .solvers import SAMPLERS, StepInfo, get_sampler, run, samplers
from .solvers.stiffness import StiffGuard
from .tuning import TunedSchedule, tune_schedule

__version__ = "0.1.0"

__all__ = [
    "Schedule", "DiscreteVP", "LinearVP", "CosineVP", "RectifiedFlow", "EDM", "VE",
    "Grid", "Level", "make_grid", "spacings", "samplers", "get_sampler", "SAMPLERS", "run", "StepInfo",
    "StiffGuard",
    "ModelDenoiser", "NonFiniteError", "to_x0", "from_x0", "sample", "SampleResult", "recommended",
    "Pipeline", "GenerationResult",
    "tune_schedule", "TunedSchedule",
    "GuidedDenoiser", "guidance_methods", "CFG", "Rescale", "Interval", "DynamicThreshold", "APG", "CFGZeroStar",
    "CFGPlusPlus", "Autoguidance",
]
