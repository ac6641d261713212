"""Schedules and spacings vs diffusers 0.42.1: ``Schedule.from_diffusers`` against diffusers' own
``alphas_cumprod`` / flow sigmas, and our named spacings against diffusers' ``timesteps``/``sigmas``
where the two are meant to agree.

Where diffusers' semantics differ, the test says how, and asserts the precise relation:

- DDIM/Euler/Heun ``linspace`` is ``linspace(0, T-1, n)``; DPMSolverMultistep/Singlestep/UniPC
  ``linspace`` uses n + 1 points and drops the 0: it is our ``linspace`` for n + 1 steps without its
  last level. Their ``leading`` likewise uses ``T // (n + 1)``.
- Euler/Heun ``linspace`` keeps fractional timesteps ``linspace(0, T-1, n)`` and interpolates the
  VE sigma *linearly* in t (``np.interp``); ours rounds to training steps (DDIM semantics) and
  interpolates log sigma between steps (as diffusers' own ``_sigma_to_t`` does for karras).
- Karras / exponential / beta / Lu sigmas: the sigmas agree; DPMSolver rounds karras and Lu
  timesteps to integers while keeping the unrounded sigmas (the network sees a slightly different
  level than the solver steps to), and *truncates* exponential/beta timesteps (int64 cast). Ours
  keep the exact fractional model time of each sigma. Euler keeps fractional timesteps, equal to ours.
- FlowMatchEuler's default ``set_timesteps(n)`` spaces ``linspace(1, s(1/T), n)`` where
  ``s(1/T)`` is already shifted, then shifts again: sigma_min is shifted twice. The SD3/Flux
  pipelines pass ``sigmas = linspace(1, 1/n, n)``, which is our flow ``linspace`` + shift.
- Defects: ``trailing`` via ``np.arange(T, 0, -T/n)`` yields n + 1 timesteps for some n (61, 103,
  ...), the last being -1, which DDIM reads as the noisiest ``alphas_cumprod[-1]`` (garbage output);
  DDIM steps to ``t - T // n``, which is not the next timestep unless T % n == 0; ``leading`` with
  n = T and steps_offset = 1 produces timestep T (out of range).
- Zero terminal SNR: DDIM keeps ``alphas_cumprod[-1] = 0``; Euler/DPMSolver/UniPC set it to 2^-24.
  Ours is exactly 0 (alpha = 0 is handled exactly by every solver).
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

import noisewise as nw
from noisewise.core.spacing import get_spacing

diffusers = pytest.importorskip("diffusers")

F64 = torch.float64
T = 1000
SD = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
LINEAR = dict(num_train_timesteps=T, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
COSINE = dict(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
FLUX = dict(
    num_train_timesteps=T, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=256, max_image_seq_len=4096,
)
STEPS = [1, 2, 3, 7, 10, 20, 25, 27, 48, 50, 999]


def _make(name: str, **config: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, name)(**config)


def _timesteps(name: str, n: int, **config: Any) -> torch.Tensor:
    s = _make(name, **config)
    s.set_timesteps(n)
    return s.timesteps.to(F64)


def _ve_sigmas(grid: nw.Grid) -> torch.Tensor:
    """VE sigmas of a grid's levels before its final node."""
    return torch.tensor([lv.sigma / lv.alpha for lv in grid.levels[:-1]], dtype=F64)


# ------------------------------------------------------------------------------------------------
# Schedule.from_diffusers
# ------------------------------------------------------------------------------------------------

TRAINED = (torch.linspace(0.0002, 0.03, T, dtype=F64) ** 1.1).tolist()


@pytest.mark.parametrize(
    "config",
    [
        LINEAR,
        SD,
        COSINE,
        dict(num_train_timesteps=T, trained_betas=TRAINED),
        dict(SD, rescale_betas_zero_snr=True, prediction_type="v_prediction"),
        dict(LINEAR, num_train_timesteps=500),
    ],
    ids=["linear", "scaled_linear", "squaredcos_cap_v2", "trained_betas", "zero_snr", "T500"],
)
def test_from_diffusers_alphas_cumprod(config: dict[str, Any]) -> None:
    """alpha(t)^2 at every training step equals diffusers' float32 alphas_cumprod (to float32
    round-off accumulated over the cumulative product)."""
    ours = nw.Schedule.from_diffusers(config)
    theirs = _make("DDIMScheduler", **config).alphas_cumprod.to(F64)
    n = len(theirs)
    assert isinstance(ours, nw.DiscreteVP) and ours.num_train_timesteps == n and ours.t_max == n - 1
    t = torch.arange(n, dtype=F64)
    acp = ours.alpha(t) ** 2
    torch.testing.assert_close(acp, theirs, rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(ours.alpha(t) ** 2 + ours.sigma(t) ** 2, torch.ones(n, dtype=F64))
    assert ours.prediction_type == config.get("prediction_type", "epsilon")
    if config.get("rescale_betas_zero_snr"):
        assert float(theirs[-1]) == 0.0 and float(ours.alpha(n - 1)) == 0.0 and ours.lam_min == -math.inf
        # the other schedulers keep 2^-24 there instead of 0 (to avoid an infinite VE sigma)
        other = _make("EulerDiscreteScheduler", **config).alphas_cumprod
        assert float(other[-1]) == 2.0**-24


def test_from_diffusers_json_file_and_folder(tmp_path: Any) -> None:
    """A scheduler_config.json path (as diffusers' save_config writes it) or its model folder."""
    scheduler = _make("DPMSolverMultistepScheduler", **dict(SD, prediction_type="v_prediction"))
    folder = tmp_path / "model"
    scheduler.save_config(folder / "scheduler")
    path = folder / "scheduler" / "scheduler_config.json"
    assert json.loads(path.read_text())["_class_name"] == "DPMSolverMultistepScheduler"
    for src in (path, str(path), folder, folder / "scheduler"):
        ours = nw.Schedule.from_diffusers(src)
        assert ours.prediction_type == "v_prediction"
        acp = ours.alpha(torch.arange(T, dtype=F64)) ** 2
        torch.testing.assert_close(acp, scheduler.alphas_cumprod.to(F64), rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_from_diffusers_flow_static_shift(shift: float) -> None:
    """FlowMatchEuler: model_time = 1000 t, alpha = 1 - t, sigma = t; the shift is an inference
    shift. The scheduler's training sigmas are our shifted levels at timesteps 1000 .. 1."""
    scheduler = _make("FlowMatchEulerDiscreteScheduler", num_train_timesteps=T, shift=shift)
    ours = nw.Schedule.from_diffusers(dict(scheduler.config))
    assert isinstance(ours, nw.RectifiedFlow) and ours.shift == shift and ours.prediction_type == "flow"
    t = torch.linspace(0, T, 11, dtype=F64)
    torch.testing.assert_close(ours.sigma(t), t / T)
    torch.testing.assert_close(ours.alpha(t), 1 - t / T)
    grid = nw.make_grid(ours, T, list(range(T, 0, -1)))  # explicit model times, schedule's shift applied
    torch.testing.assert_close(torch.tensor(grid.sigmas[:-1], dtype=F64), scheduler.sigmas.to(F64), rtol=1e-6,
                               atol=1e-7)


@pytest.mark.parametrize("time_shift_type", ["exponential", "linear"])
@pytest.mark.parametrize("seq_len", [256, 1024, 4096])
def test_from_diffusers_flow_dynamic_shift(time_shift_type: str, seq_len: int) -> None:
    """use_dynamic_shifting: our shift_for(image_seq_len) and our flow 'linspace' reproduce the
    scheduler driven like the Flux pipeline (sigmas = linspace(1, 1/n, n), mu from the sequence
    length, linear between (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift))."""
    n = 12
    config = dict(FLUX, time_shift_type=time_shift_type)
    scheduler = _make("FlowMatchEulerDiscreteScheduler", **config)
    ours = nw.Schedule.from_diffusers(dict(scheduler.config))
    assert isinstance(ours, nw.RectifiedFlow) and ours.use_dynamic_shifting
    slope = (FLUX["max_shift"] - FLUX["base_shift"]) / (FLUX["max_image_seq_len"] - FLUX["base_image_seq_len"])
    mu = FLUX["base_shift"] + slope * (seq_len - FLUX["base_image_seq_len"])
    expected_shift = math.exp(mu) if time_shift_type == "exponential" else mu
    assert ours.shift_for(seq_len) == pytest.approx(expected_shift, rel=1e-12)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n), mu=mu)
    grid = nw.make_grid(ours, n, "linspace", image_seq_len=seq_len)
    torch.testing.assert_close(torch.tensor(grid.sigmas, dtype=F64), scheduler.sigmas.to(F64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(grid.model_times[:-1], dtype=F64), scheduler.timesteps.to(F64),
                               rtol=1e-6, atol=1e-4)
    with pytest.raises(ValueError, match="image_seq_len"):
        nw.make_grid(ours, n, "linspace")


def test_flux_pipeline_calculate_shift() -> None:
    """The mu formula above is the Flux pipeline's calculate_shift."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    ours = nw.Schedule.from_diffusers(dict(FLUX, _class_name="FlowMatchEulerDiscreteScheduler"))
    for seq_len in (256, 1024, 4096, 6000):
        mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
        assert ours.shift_for(seq_len) == pytest.approx(math.exp(mu), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Timestep spacings (discrete schedules)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize(
    "spacing, options, config",
    [
        ("leading", {"steps_offset": 1}, dict(timestep_spacing="leading", steps_offset=1)),
        ("leading", {}, dict(timestep_spacing="leading")),
        ("trailing", {}, dict(timestep_spacing="trailing")),
        ("linspace", {}, dict(timestep_spacing="linspace")),
    ],
    ids=["leading-offset1", "leading", "trailing", "linspace"],
)
def test_ddim_timestep_spacings(n: int, spacing: str, options: dict[str, Any], config: dict[str, Any]) -> None:
    """leading / trailing / linspace are DDIM's timesteps exactly (ties included)."""
    schedule = nw.Schedule.from_diffusers(SD)
    ours = get_spacing(spacing)(schedule, n, **options)
    theirs = _timesteps("DDIMScheduler", n, **SD, **config)
    assert torch.equal(ours, theirs)
    if spacing != "linspace":
        # Euler/Heun use the same leading/trailing timesteps (as floats)
        assert torch.equal(ours, _timesteps("EulerDiscreteScheduler", n, **SD, **config))


def test_trailing_n_plus_one_defect() -> None:
    """diffusers' trailing uses np.arange(T, 0, -T/n), which for some n returns n + 1 values ending in
    -1; DDIM then takes an extra step 'at timestep -1', i.e. at alphas_cumprod[-1], the noisiest
    level. Ours: the first n (what trailing means), always n levels, all in range."""
    schedule = nw.Schedule.from_diffusers(SD)
    defective = []
    for n in range(1, T + 1):
        ours = get_spacing("trailing")(schedule, n)
        theirs = np.arange(T, 0, -T / n).round() - 1  # diffusers' formula, every scheduler
        assert len(ours) == n and float(ours.min()) >= 0 and float(ours[0]) == T - 1
        assert torch.equal(ours, torch.from_numpy(theirs[:n]))
        if len(theirs) == n + 1:
            assert theirs[-1] == -1
            defective.append(n)
    if not defective:
        pytest.skip("numpy no longer produces n + 1 trailing timesteps")
    n = defective[0]  # 61
    assert len(_timesteps("DDIMScheduler", n, **SD, timestep_spacing="trailing")) == n + 1


def test_ddim_step_target_is_not_next_timestep() -> None:
    """DDIM steps from t to ``t - T // n``; with trailing (or linspace) spacing and T % n != 0 that is
    not where the network is evaluated next (x is at one level, the network told another).
    Our grid steps between the spacing's own levels, so parity tests use n dividing T."""
    for n, spacing in ((7, "trailing"), (60, "trailing"), (10, "linspace")):
        ts = _timesteps("DDIMScheduler", n, **SD, timestep_spacing=spacing)
        ratio = T // n
        mismatched = [int(a - ratio) != int(b) for a, b in zip(ts[:-1], ts[1:])]
        assert any(mismatched)
        grid = nw.make_grid(nw.Schedule.from_diffusers(SD), n, spacing)
        assert grid.model_times[:-1] == ts.tolist()


def test_leading_full_steps() -> None:
    """leading with n = T and steps_offset = 1 gives diffusers a timestep T (out of range). Ours
    clamps it to T - 1, which repeats a level: the grid refuses that with a clear error."""
    schedule = nw.Schedule.from_diffusers(SD)
    assert float(_timesteps("DDIMScheduler", T, **SD, timestep_spacing="leading", steps_offset=1)[0]) == T
    assert float(get_spacing("leading")(schedule, T, steps_offset=1)[0]) == T - 1
    with pytest.raises(ValueError, match="strictly"):
        nw.make_grid(schedule, T, "leading", spacing_options={"steps_offset": 1})


@pytest.mark.parametrize("n", [1, 5, 10, 27, 50])
@pytest.mark.parametrize("cls", ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler",
                                 "UniPCMultistepScheduler"])
def test_multistep_linspace_is_n_plus_one(cls: str, n: int) -> None:
    """DPMSolver*/UniPC 'linspace' (their default) = our linspace for n + 1 steps without its last
    level (t = 0); their 'leading' = our leading for n + 1 without its last level."""
    schedule = nw.Schedule.from_diffusers(SD)
    theirs = _timesteps(cls, n, **SD)
    assert torch.equal(theirs, get_spacing("linspace")(schedule, n + 1)[:-1])
    if cls != "DPMSolverSinglestepScheduler":  # singlestep has only linspace
        lead = _timesteps(cls, n, **SD, timestep_spacing="leading", steps_offset=1)
        assert torch.equal(lead, get_spacing("leading")(schedule, n + 1, steps_offset=1)[:-1])
        trail = _timesteps(cls, n, **SD, timestep_spacing="trailing")
        assert torch.equal(trail, get_spacing("trailing")(schedule, n))
    # sigmas there: exactly the schedule's at those integer steps
    s = _make(cls, **SD)
    s.set_timesteps(n)
    grid = nw.make_grid(schedule, n, theirs.tolist())
    # (float32 in diffusers: sqrt((1 - acp) / acp) loses digits where acp ~ 1)
    torch.testing.assert_close(_ve_sigmas(grid), s.sigmas[:-1].to(F64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("config", [SD, LINEAR], ids=["scaled_linear", "linear"])
def test_euler_linspace_semantics(config: dict[str, Any]) -> None:
    """Euler's linspace keeps fractional timesteps and interpolates the VE sigma linearly in t
    (np.interp). Ours interpolates log sigma linearly in t between training steps (diffusers' own
    _sigma_to_t convention), which lies below the chord: a documented (~1e-5 relative) difference.
    Both are the training table at integer times."""
    n = 13
    s = _make("EulerDiscreteScheduler", **config)
    s.set_timesteps(n)
    ts = s.timesteps.to(F64)
    frac = ts != ts.round()
    assert bool(frac.any())
    schedule = nw.Schedule.from_diffusers(config)
    table = schedule.ve_sigma(torch.arange(T, dtype=F64))
    lo = ts.floor().long().clamp(max=T - 2)
    w = ts - lo
    linear = (1 - w) * table[lo] + w * table[lo + 1]
    log_linear = torch.exp((1 - w) * table[lo].log() + w * table[lo + 1].log())
    # diffusers = linear interpolation (its float32 table: ~1e-4 relative at t = 0 for beta_0 = 1e-4)
    torch.testing.assert_close(s.sigmas[:-1].to(F64), linear, rtol=1e-4, atol=0)
    ours = schedule.ve_sigma(ts)
    torch.testing.assert_close(ours, log_linear, rtol=1e-12, atol=0)
    assert bool((ours[frac] < linear[frac]).all()) and torch.equal(ours[~frac], linear[~frac])


# ------------------------------------------------------------------------------------------------
# Sigma spacings
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [2, 5, 10, 25])
@pytest.mark.parametrize(
    "spacing, flag",
    [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas"), ("beta", "use_beta_sigmas"),
     ("uniform_lambda", "use_lu_lambdas")],
)
def test_sigma_spacings_vs_dpm_multistep(n: int, spacing: str, flag: str) -> None:
    """karras / exponential / beta / uniform_lambda = DPMSolverMultistep's use_*_sigmas /
    use_lu_lambdas sigmas (from the schedule's sigma_max to sigma_min). DPMSolver rounds karras/Lu
    timesteps and truncates exponential/beta ones; ours keep the exact fractional time of each
    sigma, which rounds (resp. truncates) to diffusers' integer."""
    schedule = nw.Schedule.from_diffusers(SD)
    s = _make("DPMSolverMultistepScheduler", **SD, **{flag: True})
    s.set_timesteps(n)
    grid = nw.make_grid(schedule, n, spacing)
    # diffusers builds them from its float32 sigma table: its sigma_min carries ~1e-5 relative error
    torch.testing.assert_close(_ve_sigmas(grid), s.sigmas[:-1].to(F64), rtol=2e-5, atol=0)
    ours_t = torch.tensor(grid.model_times[:-1], dtype=F64)
    theirs_t = s.timesteps.to(F64)
    if spacing in ("karras", "uniform_lambda"):
        close_to_tie = (ours_t - ours_t.floor() - 0.5).abs() < 1e-3
        assert torch.equal(ours_t.round()[~close_to_tie], theirs_t[~close_to_tie])
    else:
        near_int = (ours_t - ours_t.round()).abs() < 1e-3
        assert torch.equal(ours_t.floor()[~near_int], theirs_t[~near_int])


@pytest.mark.parametrize("spacing, flag", [("karras", "use_karras_sigmas"), ("exponential", "use_exponential_sigmas"),
                                           ("beta", "use_beta_sigmas")])
def test_sigma_spacings_vs_euler_fractional_timesteps(spacing: str, flag: str) -> None:
    """Euler keeps the fractional timesteps of its sigma spacings; diffusers' _sigma_to_t
    interpolates log sigma linearly in t, exactly our DiscreteVP interpolation, so the timesteps
    agree (to float32 precision) along with the sigmas."""
    n = 10
    schedule = nw.Schedule.from_diffusers(SD)
    s = _make("EulerDiscreteScheduler", **SD, **{flag: True})
    s.set_timesteps(n)
    grid = nw.make_grid(schedule, n, spacing)
    torch.testing.assert_close(_ve_sigmas(grid), s.sigmas[:-1].to(F64), rtol=2e-5, atol=0)
    torch.testing.assert_close(torch.tensor(grid.model_times[:-1], dtype=F64), s.timesteps.to(F64), rtol=0,
                               atol=2e-3)


def test_uniform_lambda_equals_exponential_on_vp() -> None:
    """On a VP schedule lambda = -log(VE sigma): uniform-in-lambda and exponential coincide
    (diffusers: use_lu_lambdas and use_exponential_sigmas give the same sigmas)."""
    schedule = nw.Schedule.from_diffusers(SD)
    a = nw.make_grid(schedule, 12, "uniform_lambda")
    b = nw.make_grid(schedule, 12, "exponential")
    torch.testing.assert_close(torch.tensor(a.lams[:-1]), torch.tensor(b.lams[:-1]), rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------
# Flow spacings
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n", [1, 4, 10, 28])
def test_flow_linspace_shift_vs_flowmatch_pipeline_sigmas(n: int, shift: float) -> None:
    """Our flow 'linspace' + shift = FlowMatchEuler given the SD3/Flux pipelines' sigmas
    linspace(1, 1/n, n) (shift applied once, by the scheduler)."""
    s = _make("FlowMatchEulerDiscreteScheduler", num_train_timesteps=T, shift=shift)
    s.set_timesteps(sigmas=np.linspace(1.0, 1 / n, n))
    schedule = nw.Schedule.from_diffusers(dict(s.config))
    grid = nw.make_grid(schedule, n, "linspace")
    torch.testing.assert_close(torch.tensor(grid.sigmas, dtype=F64), s.sigmas.to(F64), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(torch.tensor(grid.model_times[:-1], dtype=F64), s.timesteps.to(F64), rtol=1e-6,
                               atol=1e-4)


@pytest.mark.parametrize("n", [4, 10, 28])
def test_flowmatch_default_timesteps_shift_sigma_min_twice(n: int) -> None:
    """FlowMatchEuler's own set_timesteps(n) spaces linspace(T, T s(1/T), n) (s(1/T) already
    shifted at construction) and shifts again. That is our explicit model times
    linspace(T, T s(1/T), n) with the schedule's shift; and its smallest sigma is s(s(1/T)),
    not s(1/T)."""
    shift = 3.0
    s = _make("FlowMatchEulerDiscreteScheduler", num_train_timesteps=T, shift=shift)
    s.set_timesteps(n)
    schedule = nw.Schedule.from_diffusers(dict(s.config))

    def sh(t: float) -> float:
        return shift * t / (1 + (shift - 1) * t)

    assert float(s.sigmas[-2]) == pytest.approx(sh(sh(1 / T)), rel=1e-5)
    explicit = np.linspace(T, T * sh(1 / T), n).tolist()
    grid = nw.make_grid(schedule, n, explicit)
    torch.testing.assert_close(torch.tensor(grid.sigmas, dtype=F64), s.sigmas.to(F64), rtol=1e-6, atol=1e-7)
    # our flow 'linspace' (the pipelines' convention) differs from that default
    ours = nw.make_grid(schedule, n, "linspace")
    assert abs(ours.sigmas[-2] - float(s.sigmas[-2])) > 1e-3
