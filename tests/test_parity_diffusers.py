"""Parity with the reference implementation: diffusers' schedulers, driven the standard way.

Each test drives a diffusers scheduler exactly as a pipeline does (``set_timesteps``,
``latents * init_noise_sigma``, ``scale_model_input``, ``model(latent, t)``, ``scheduler.step``)
with an exact Gaussian-mixture "network", and runs our sampler with the same network from the
same starting state on the same levels. The outputs must agree to ~1e-5 relative: diffusers keeps
its schedule in float32 (and several schedulers step in float32), we work in float64.

How the comparison is made apples-to-apples (every difference is documented where it is used):

- Levels. Our grid is built from the scheduler's own ``sigmas``/``timesteps``/``alphas_cumprod``
  (:func:`vp_grid`, :func:`flow_grid`, :func:`ddim_grid`): diffusers' sigmas of VP schedulers are
  VE sigmas (``alpha = 1/sqrt(1+s^2)``, ``sigma = s alpha``), flow sigmas are ``t``
  (``alpha = 1 - t``). The network is conditioned on diffusers' own timesteps (rounded or not).
  Where our named spacings reproduce diffusers' levels exactly, we also run end to end from the
  spacing name (see also ``test_spacing_parity.py``).
- Start. Our start is diffusers' first model input (``scale_model_input(latents *
  init_noise_sigma)``), i.e. the same VP state; Euler/Heun start from ``sigma_max * noise`` in VE
  coordinates (not ``sqrt(1 + sigma_max^2) * noise``), which this takes care of.
- Final step into sigma = 0: ours always returns the data prediction x0 (to_final); diffusers'
  first-order step into sigma = 0 computes the same thing.
- Options: our defaults, except where ours deliberately departs: ``heun`` keeps the Euler predictor
  on a step that shrinks sigma/alpha more than ``max_sigma_ratio``-fold (diffusers always corrects),
  ``dpmpp_3m`` uses the exact D2 weight (``variant="diffusers"`` reproduces diffusers). The
  multistep step-ratio guards (``max_step_ratio``) stay on: they must not trigger on these grids.

Known diffusers 0.42.1 defects, reproduced here and absent in noisewise:

- ``UniPCMultistepScheduler(solver_type="bh1")`` with its default ``final_sigmas_type="zero"``
  returns NaN: its last step computes ``B(h) = -h = -inf`` times a zero residual.
- ``DPMSolverMultistepScheduler(solver_order=3, final_sigmas_type="sigma_min")`` with
  karras/exponential/Lu sigmas returns NaN at 15+ steps: the appended final sigma repeats the
  spacing's last sigma (a zero-length step, h = 0) and, without ``lower_order_final`` below 15
  steps, the third-order update divides by h.
- DPM-Solver++(3M)'s D2 term carries half its exact weight in diffusers (and k-diffusion), which
  makes "3M" second order; our ``dpmpp_3m`` is third order by default and reproduces diffusers
  with ``variant="diffusers"``.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch

import noisewise as nw
from noisewise.gmm import GaussianMixture

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64
DIM, BATCH = 4, 12
GMM = GaussianMixture.default(dim=DIM)
T = 1000
SD = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LINEAR = dict(num_train_timesteps=T, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
RTOL = 1e-5


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def _noise(seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, DIM, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _net(config: dict[str, Any], prediction_type: str) -> Callable[..., torch.Tensor]:
    """The exact network for a diffusers config (float64 schedule of our own)."""
    return GMM.model(nw.Schedule.from_diffusers(config), prediction_type)


def run_diffusers(
    scheduler: Any, net: Callable[..., torch.Tensor], noise: torch.Tensor, steps: int | None, **set_kw: Any
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Drive ``scheduler`` like a pipeline. Returns (final latents, first model input, the
    latents after every step)."""
    scheduler.set_timesteps(steps, **set_kw)
    x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # FlowMatch schedulers have none
    first = None
    states = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in scheduler.timesteps:
            inp = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
            if first is None:
                first = inp.clone()
            out = net(inp, t.to(F64).expand(inp.shape[0]))
            x = scheduler.step(out, t, x).prev_sample
            states.append(x.to(F64))
    assert first is not None
    return x.to(F64), first.to(F64), states


def vp_grid(sigmas: torch.Tensor, timesteps: torch.Tensor) -> nw.Grid:
    """Our grid from a VP scheduler's VE ``sigmas`` (n + 1, the last one final) and ``timesteps`` (n)."""
    s = sigmas.to(F64)
    a = 1.0 / torch.sqrt(1.0 + s * s)
    times = timesteps.to(F64).tolist() + [0.0]
    return nw.Grid.from_arrays(a.tolist(), (s * a).tolist(), times)


def flow_grid(sigmas: torch.Tensor, timesteps: torch.Tensor) -> nw.Grid:
    """Our grid from a flow scheduler's sigmas (= t) and timesteps (= 1000 t)."""
    s = sigmas.to(F64)
    return nw.Grid.from_arrays((1.0 - s).tolist(), s.tolist(), timesteps.to(F64).tolist() + [0.0])


def ddim_grid(scheduler: Any) -> nw.Grid:
    """Our grid from DDIMScheduler: levels at its timesteps, each step going to
    ``alphas_cumprod[t - T // n]`` (or ``final_alpha_cumprod`` past 0)."""
    ts = scheduler.timesteps.tolist()
    ratio = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
    for t, nxt in zip(ts[:-1], ts[1:]):
        assert t - ratio == nxt, "DDIM steps to t - T//n; only spacings where that is the next timestep compare"
    acp = scheduler.alphas_cumprod.to(F64)
    ab = [float(acp[t]) for t in ts] + [float(scheduler.final_alpha_cumprod)]
    return nw.Grid.from_arrays([math.sqrt(v) for v in ab], [math.sqrt(1.0 - v) for v in ab], ts + [0.0])


def run_ours(
    net: Callable[..., torch.Tensor], start: torch.Tensor, sampler: str, prediction_type: str, **kw: Any
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Our sampler from the state ``start`` (diffusers' first model input) on ``grid=`` or a
    ``schedule=``/``spacing=``; returns (final, the states after each step)."""
    states: list[torch.Tensor] = []
    out = nw.sample(
        net, start, sampler=sampler, prediction_type=prediction_type,
        callback=lambda info: states.append(info.x.clone()), **kw,
    )
    return out, states


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm())


def assert_parity(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = RTOL) -> None:
    assert torch.isfinite(ours).all() and torch.isfinite(theirs).all()
    err = rel_err(ours, theirs)
    assert err < rtol, f"relative difference {err:.3g} exceeds {rtol:g}"


def _scheduler(name: str, config: dict[str, Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, name)(**config)


def _grid_for(kind: str, scheduler: Any) -> nw.Grid:
    if kind == "vp":
        return vp_grid(scheduler.sigmas, scheduler.timesteps)
    if kind == "heun":
        # HeunDiscrete repeats every interior level (predictor, then corrector evaluation there)
        return vp_grid(torch.unique_consecutive(scheduler.sigmas), torch.unique_consecutive(scheduler.timesteps))
    if kind == "ddim":
        return ddim_grid(scheduler)
    if kind == "flow":
        return flow_grid(scheduler.sigmas, scheduler.timesteps)
    raise AssertionError(kind)


# ------------------------------------------------------------------------------------------------
# 1. Same levels, same network, same start: same output
# ------------------------------------------------------------------------------------------------

# DDIM: clip_sample=False as in every Stable Diffusion scheduler_config.json (DDIM's default clips
# x0_hat to [-1, 1], which is a different sampler).
DDIM = dict(SD, clip_sample=False)
FLUX = dict(
    num_train_timesteps=T, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)

# (id, diffusers class, config, steps, set_timesteps kwargs, grid kind, our sampler, our options)
CASES: list[tuple[str, str, dict[str, Any], int | None, dict[str, Any], str, str, dict[str, Any]]] = [
    ("ddim-leading-offset1", "DDIMScheduler",
     dict(DDIM, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False), 10, {}, "ddim", "ddim", {}),
    ("ddim-leading-offset1-alpha1", "DDIMScheduler",
     dict(DDIM, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True), 25, {}, "ddim", "ddim", {}),
    ("ddim-trailing", "DDIMScheduler", dict(DDIM, timestep_spacing="trailing"), 10, {}, "ddim", "ddim", {}),
    # zero terminal SNR: the first level has alpha = 0 exactly (t = 999), a v-prediction model
    ("ddim-trailing-zero-snr-v", "DDIMScheduler",
     dict(DDIM, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
     10, {}, "ddim", "ddim", {}),
    ("dpmpp_2m", "DPMSolverMultistepScheduler", dict(SD), 8, {}, "vp", "dpmpp_2m", {}),
    ("dpmpp_2m-20", "DPMSolverMultistepScheduler", dict(SD), 20, {}, "vp", "dpmpp_2m", {}),
    ("dpmpp_2m-karras", "DPMSolverMultistepScheduler", dict(SD, use_karras_sigmas=True), 10, {}, "vp", "dpmpp_2m", {}),
    ("dpmpp_2m-v", "DPMSolverMultistepScheduler", dict(LINEAR, prediction_type="v_prediction"), 10, {}, "vp",
     "dpmpp_2m", {}),
    ("dpmpp_3m", "DPMSolverMultistepScheduler", dict(SD, solver_order=3), 10, {}, "vp", "dpmpp_3m",
     {"variant": "diffusers"}),
    ("dpmpp_3m-karras-20", "DPMSolverMultistepScheduler", dict(SD, solver_order=3, use_karras_sigmas=True), 20, {},
     "vp", "dpmpp_3m", {"variant": "diffusers"}),
    ("dpm_solver-2-odd", "DPMSolverSinglestepScheduler", dict(SD, solver_order=2), 9, {}, "vp", "dpm_solver",
     {"order": 2}),
    ("dpm_solver-2-even", "DPMSolverSinglestepScheduler", dict(SD, solver_order=2), 10, {}, "vp", "dpm_solver",
     {"order": 2}),
    ("dpm_solver-3-mod0", "DPMSolverSinglestepScheduler", dict(SD, solver_order=3), 9, {}, "vp", "dpm_solver",
     {"order": 3}),
    ("dpm_solver-3-mod1", "DPMSolverSinglestepScheduler", dict(SD, solver_order=3), 10, {}, "vp", "dpm_solver",
     {"order": 3}),
    ("dpm_solver-3-mod2-karras", "DPMSolverSinglestepScheduler", dict(SD, solver_order=3, use_karras_sigmas=True),
     11, {}, "vp", "dpm_solver", {"order": 3}),
    ("dpm_solver-3-v", "DPMSolverSinglestepScheduler", dict(LINEAR, solver_order=3, prediction_type="v_prediction"),
     12, {}, "vp", "dpm_solver", {"order": 3}),
    *[
        (f"unipc-bh2-order{k}", "UniPCMultistepScheduler", dict(SD, solver_type="bh2", solver_order=k), 10, {}, "vp",
         "unipc", {"order": k, "variant": "bh2"})
        for k in (1, 2, 3)
    ],
    # bh1 into sigma = 0 is NaN in diffusers (test_unipc_bh1_final_step_nan); compare it on its
    # 'sigma_min' final level, where both end with an ordinary predictor step
    *[
        (f"unipc-bh1-order{k}-sigma_min", "UniPCMultistepScheduler",
         dict(SD, solver_type="bh1", solver_order=k, final_sigmas_type="sigma_min"), 10, {}, "vp", "unipc",
         {"order": k, "variant": "bh1"})
        for k in (1, 2, 3)
    ],
    ("unipc-bh2-order3-karras-v", "UniPCMultistepScheduler",
     dict(LINEAR, solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction"), 15, {}, "vp", "unipc",
     {"order": 3}),
    # zero terminal SNR in DPMSolver/UniPC: alphas_cumprod[-1] = 2^-24 there (not 0), alpha = 2^-12
    ("dpmpp_2m-trailing-zero-snr-v", "DPMSolverMultistepScheduler",
     dict(SD, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"), 10, {},
     "vp", "dpmpp_2m", {}),
    ("unipc-trailing-zero-snr-v", "UniPCMultistepScheduler",
     dict(SD, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction",
          solver_order=3), 10, {}, "vp", "unipc", {"order": 3}),
    ("euler", "EulerDiscreteScheduler", dict(SD), 10, {}, "vp", "euler", {}),
    ("euler-karras", "EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True), 10, {}, "vp", "euler", {}),
    ("euler-v", "EulerDiscreteScheduler", dict(LINEAR, prediction_type="v_prediction"), 10, {}, "vp", "euler", {}),
    # our heun keeps the Euler predictor on a step that shrinks sigma/alpha more than 8-fold (its
    # explicit corrector is unstable there); diffusers always corrects: max_sigma_ratio=None does too
    ("heun", "HeunDiscreteScheduler", dict(SD), 8, {}, "heun", "heun", {"max_sigma_ratio": None}),
    ("heun-v", "HeunDiscreteScheduler", dict(LINEAR, prediction_type="v_prediction"), 8, {}, "heun", "heun",
     {"max_sigma_ratio": None}),
    ("flow_euler-shift3", "FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=T, shift=3.0), 10, {}, "flow",
     "flow_euler", {}),
    ("flow_euler-dynamic", "FlowMatchEulerDiscreteScheduler", FLUX, None,
     {"sigmas": [1.0 - i / 10 for i in range(10)], "mu": 0.9}, "flow", "flow_euler", {}),
]


@pytest.mark.parametrize(
    "name, cls, config, steps, set_kw, kind, sampler, opts", CASES, ids=[c[0] for c in CASES]
)
def test_same_levels_same_output(
    name: str, cls: str, config: dict[str, Any], steps: int | None, set_kw: dict[str, Any], kind: str,
    sampler: str, opts: dict[str, Any],
) -> None:
    """Our sampler on diffusers' own levels reproduces diffusers' output."""
    pt = "flow" if kind == "flow" else config.get("prediction_type", "epsilon")
    net = GMM.model(nw.RectifiedFlow(), "flow") if kind == "flow" else _net(config, pt)
    scheduler = _scheduler(cls, config)
    theirs, start, _ = run_diffusers(scheduler, net, _noise(), steps, **set_kw)
    grid = _grid_for(kind, scheduler)
    ours, _ = run_ours(net, start, sampler, pt, grid=grid, **opts)
    assert_parity(ours, theirs)


# ------------------------------------------------------------------------------------------------
# 2. End to end from our schedule and spacing names (where they mean what diffusers means)
# ------------------------------------------------------------------------------------------------

# (id, diffusers class, config, steps, set_timesteps kwargs, our sampler, sample() kwargs)
# The schedule is always Schedule.from_diffusers(config); levels come from our own spacing.
E2E: list[tuple[str, str, dict[str, Any], int | None, dict[str, Any], str, dict[str, Any]]] = [
    ("ddim-trailing", "DDIMScheduler", dict(DDIM, timestep_spacing="trailing"), 20, {}, "ddim",
     {"spacing": "trailing"}),
    # set_alpha_to_one=True: DDIM's last step lands on sigma = 0, our grid's final node
    ("ddim-leading-offset1", "DDIMScheduler",
     dict(DDIM, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=True), 10, {}, "ddim",
     {"spacing": "leading", "spacing_options": {"steps_offset": 1}}),
    ("ddim-linspace-1step", "DDIMScheduler", dict(DDIM, timestep_spacing="linspace"), 1, {}, "ddim",
     {"spacing": "linspace"}),
    ("ddim-trailing-zero-snr-v", "DDIMScheduler",
     dict(DDIM, timestep_spacing="trailing", rescale_betas_zero_snr=True, prediction_type="v_prediction"),
     10, {}, "ddim", {"spacing": "trailing"}),
    # Euler/Heun keep fractional timesteps for sigma spacings; ours interpolate like diffusers'
    # _sigma_to_t (log sigma linear in t), so the network sees the same times
    ("euler-karras", "EulerDiscreteScheduler", dict(SD, use_karras_sigmas=True), 10, {}, "euler",
     {"spacing": "karras"}),
    ("euler-exponential", "EulerDiscreteScheduler", dict(SD, use_exponential_sigmas=True), 10, {}, "euler",
     {"spacing": "exponential"}),
    # (scaled_linear betas: with 'linear' ones, beta_0 = 1e-4, diffusers' float32 alphas_cumprod puts
    # sigma_min = sqrt((1 - acp[0]) / acp[0]) ~1e-4 relative off, which alone moves the output ~1e-5)
    ("heun-karras-v", "HeunDiscreteScheduler", dict(SD, use_karras_sigmas=True, prediction_type="v_prediction"),
     6, {}, "heun", {"spacing": "karras", "max_sigma_ratio": None}),
    ("euler-beta", "EulerDiscreteScheduler", dict(SD, use_beta_sigmas=True), 10, {}, "euler", {"spacing": "beta"}),
    # FlowMatchEuler given the SD3/Flux pipelines' sigmas linspace(1, 1/n, n) = our flow 'linspace'
    ("flow-shift3", "FlowMatchEulerDiscreteScheduler", dict(num_train_timesteps=T, shift=3.0), None,
     {"sigmas": [1.0 - i / 12 for i in range(12)]}, "flow_euler", {"steps": 12, "spacing": "linspace"}),
]


@pytest.mark.parametrize("name, cls, config, steps, set_kw, sampler, kw", E2E, ids=[c[0] for c in E2E])
def test_named_spacing_end_to_end(
    name: str, cls: str, config: dict[str, Any], steps: int | None, set_kw: dict[str, Any], sampler: str,
    kw: dict[str, Any],
) -> None:
    """nw.sample with our schedule and spacing names gives diffusers' output."""
    schedule = nw.Schedule.from_diffusers(config if cls != "FlowMatchEulerDiscreteScheduler"
                                          else dict(config, _class_name=cls))
    pt = schedule.prediction_type
    net = GMM.model(schedule, pt)
    theirs, start, _ = run_diffusers(_scheduler(cls, config), net, _noise(), steps, **set_kw)
    kw = dict(kw)
    kw.setdefault("steps", steps)
    ours, _ = run_ours(net, start, sampler, pt, schedule=schedule, **kw)
    assert_parity(ours, theirs)


def test_flux_dynamic_shift_end_to_end() -> None:
    """Flux: use_dynamic_shifting with the pipeline's mu = calculate_shift(image_seq_len) equals our
    schedule.shift_for(image_seq_len)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    n, seq_len = 8, 1024
    schedule = nw.Schedule.from_diffusers(dict(FLUX, _class_name="FlowMatchEulerDiscreteScheduler"))
    net = GMM.model(schedule, "flow")
    mu = calculate_shift(seq_len, FLUX["base_image_seq_len"], FLUX["max_image_seq_len"], FLUX["base_shift"],
                         FLUX["max_shift"])
    sigmas = [1.0 - i / n for i in range(n)]
    theirs, start, _ = run_diffusers(_scheduler("FlowMatchEulerDiscreteScheduler", FLUX), net, _noise(), None,
                                     sigmas=sigmas, mu=mu)
    ours, _ = run_ours(net, start, "flow_euler", "flow", schedule=schedule, steps=n, image_seq_len=seq_len)
    assert_parity(ours, theirs)


def test_dpm_multistep_linspace_as_explicit_timesteps() -> None:
    """DPMSolverMultistep/UniPC 'linspace' is ``linspace(0, T-1, n+1).round()`` without its 0 (n + 1
    points, unlike DDIM's): pass those timesteps as an explicit list and sample end to end."""
    for cls, sampler, opts in (
        ("DPMSolverMultistepScheduler", "dpmpp_2m", {}),
        ("UniPCMultistepScheduler", "unipc", {"order": 3, "variant": "bh2"}),
    ):
        schedule = nw.Schedule.from_diffusers(SD)
        net = GMM.model(schedule, "epsilon")
        scheduler = _scheduler(cls, dict(SD, solver_order=opts.get("order", 2)))
        theirs, start, _ = run_diffusers(scheduler, net, _noise(), 12)
        ours, _ = run_ours(net, start, sampler, "epsilon", schedule=schedule,
                           spacing=scheduler.timesteps.tolist(), **opts)
        assert_parity(ours, theirs)


# ------------------------------------------------------------------------------------------------
# 3. Known diffusers defects: reproduced (skipped once diffusers fixes them), absent here
# ------------------------------------------------------------------------------------------------


def _median_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x - ref).norm(dim=1).median())


@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_bh1_final_step_nan(order: int) -> None:
    """diffusers' UniPC bh1 into its default final sigma = 0 multiplies B(h) = -h = -inf by a zero
    residual and returns NaN. Ours: identical up to the last step, then the final denoise; the
    result is as accurate (vs the exact ODE solution) as diffusers' working bh2."""
    n = 10
    net = _net(SD, "epsilon")
    scheduler = _scheduler("UniPCMultistepScheduler", dict(SD, solver_type="bh1", solver_order=order))
    theirs, start, their_states = run_diffusers(scheduler, net, _noise(), n)
    if torch.isfinite(theirs).all():
        pytest.skip(f"diffusers {diffusers.__version__} no longer returns NaN for UniPC bh1 into sigma = 0")
    grid = _grid_for("vp", scheduler)
    assert grid[-1].sigma == 0.0
    ours, our_states = run_ours(net, start, "unipc", "epsilon", grid=grid, order=order, variant="bh1")
    assert torch.isfinite(ours).all()
    for a, b in zip(our_states[:-1], their_states[:-1]):  # every state before the final step
        assert_parity(a, b)
    bh2 = _scheduler("UniPCMultistepScheduler", dict(SD, solver_type="bh2", solver_order=order))
    theirs_bh2, _, _ = run_diffusers(bh2, net, _noise(), n)
    exact = GMM.ode_solution(start, grid[0], grid[-1])
    assert _median_err(ours, exact) <= 1.05 * _median_err(theirs_bh2, exact)


@pytest.mark.parametrize("n", [15, 20])
def test_dpm_3m_sigma_min_nan(n: int) -> None:
    """diffusers' DPMSolverMultistep order 3 with final_sigmas_type='sigma_min' and karras sigmas
    appends a final sigma equal to the last karras sigma: a zero-length step (h = 0). From 15 steps
    on, lower_order_final no longer applies and the third-order update divides by h: NaN.

    Ours refuses a repeated level with a clear error; on the same levels without the repeat (which
    is what that step means) it matches diffusers' states before the NaN and ends finite and
    accurate at sigma_min."""
    net = _net(SD, "epsilon")
    cfg = dict(SD, solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min")
    scheduler = _scheduler("DPMSolverMultistepScheduler", cfg)
    theirs, start, their_states = run_diffusers(scheduler, net, _noise(), n)
    if torch.isfinite(theirs).all():
        pytest.skip(f"diffusers {diffusers.__version__} no longer returns NaN here")
    assert float(scheduler.sigmas[-1]) == float(scheduler.sigmas[-2])  # the zero-length final step
    with pytest.raises(ValueError, match="strictly"):
        vp_grid(scheduler.sigmas, scheduler.timesteps)
    grid = vp_grid(scheduler.sigmas[:-1], scheduler.timesteps[:-1])  # n - 1 steps, ends at sigma_min
    assert grid[-1].sigma > 0
    # diffusers applies no lower-order tail from 15 steps on; neither do we here
    same, our_states = run_ours(net, start, "dpmpp_3m", "epsilon", grid=grid, variant="diffusers",
                                lower_order_final=False)
    for a, b in zip(our_states, their_states[:-1]):
        assert_parity(a, b)
    # Without the repeated level, diffusers' result would be its state at sigma_min, which ours
    # reproduced above. With our own karras spacing ending at sigma_min (final='none') there is no
    # repeated level at all; there the (consistent) network gives a finite result as accurate as
    # DPM-Solver++(2M) on the same levels (vs the exact ODE solution).
    schedule = nw.Schedule.from_diffusers(SD)
    errs = {}
    for sampler in ("dpmpp_3m", "dpmpp_2m"):
        own = nw.sample(net, start, schedule=schedule, sampler=sampler, steps=n, spacing="karras", final="none",
                        return_info=True)
        assert own.grid.steps == n - 1 and own.grid[-1].sigma > 0 and torch.isfinite(own.x).all()
        errs[sampler] = _median_err(own.x, GMM.ode_solution(start, own.grid[0], own.grid[-1]))
    assert errs["dpmpp_3m"] <= 1.5 * errs["dpmpp_2m"]


def test_dpmpp_3m_d2_weight() -> None:
    """diffusers' (and k-diffusion's) DPM-Solver++(3M) weights D2 ~ h^2 x0''/2 by
    ``(e^{-h} - 1 + h)/h^2 - 1/2`` where the Taylor expansion of the exponential integrator needs
    twice that; our default 3M uses the exact weight (third order, see the convergence tests),
    ``variant='diffusers'`` reproduces diffusers. The two differ exactly by that term."""
    n = 10
    net = _net(SD, "epsilon")
    scheduler = _scheduler("DPMSolverMultistepScheduler", dict(SD, solver_order=3))
    theirs, start, _ = run_diffusers(scheduler, net, _noise(), n)
    grid = _grid_for("vp", scheduler)
    same, _ = run_ours(net, start, "dpmpp_3m", "epsilon", grid=grid, variant="diffusers")
    exact, _ = run_ours(net, start, "dpmpp_3m", "epsilon", grid=grid)
    assert_parity(same, theirs)
    assert rel_err(exact, theirs) > 100 * RTOL
