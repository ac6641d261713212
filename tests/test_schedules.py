"""Schedules: alpha/sigma/lambda consistency, inverses, diffusers configs, shifts, both ends."""

import json
import math

import pytest
import torch

import noisewise as nw

F64 = torch.float64

SCHEDULES = {
    "sd_discrete": lambda: nw.DiscreteVP(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "linear_discrete": lambda: nw.DiscreteVP(),
    "cos_discrete": lambda: nw.DiscreteVP(beta_schedule="squaredcos_cap_v2"),
    "zsnr_discrete": lambda: nw.DiscreteVP(
        beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, rescale_betas_zero_snr=True,
        prediction_type="v_prediction",
    ),
    "linear_vp": lambda: nw.LinearVP(),
    "cosine_vp": lambda: nw.CosineVP(),
    "flow": lambda: nw.RectifiedFlow(),
    "flow_shift3": lambda: nw.RectifiedFlow(shift=3.0),
    "edm": lambda: nw.EDM(),
}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_alpha_sigma_lambda_consistent(name):
    s = SCHEDULES[name]()
    ts = torch.linspace(s.t_min, s.t_max, 101, dtype=F64)[1:-1]
    a, sg, lam = s.alpha(ts), s.sigma(ts), s.lam(ts)
    assert torch.allclose(lam, torch.log(a / sg), atol=1e-10, rtol=1e-10)
    if not isinstance(s, nw.EDM):
        if isinstance(s, nw.RectifiedFlow):
            assert torch.allclose(a + sg, torch.ones_like(a), atol=1e-14)
        else:
            assert torch.allclose(a**2 + sg**2, torch.ones_like(a), atol=1e-12)
    # lambda strictly decreasing in model_time
    assert bool((lam[1:] < lam[:-1]).all())


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_inverse_lambda_round_trip(name):
    s = SCHEDULES[name]()
    ts = torch.linspace(s.t_min, s.t_max, 57, dtype=F64)[1:-1]
    back = s.inverse_lambda(s.lam(ts))
    scale = s.t_max - s.t_min
    assert torch.allclose(back, ts, atol=1e-9 * scale, rtol=1e-9)


def test_discrete_matches_alphas_cumprod_at_integer_steps():
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2
    acp = torch.cumprod(1 - betas, 0)
    s = nw.DiscreteVP(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    t = torch.arange(1000, dtype=F64)
    assert torch.allclose(s.alpha(t), acp.sqrt(), atol=1e-15, rtol=0)
    assert torch.allclose(s.sigma(t), (1 - acp).sqrt(), atol=1e-15, rtol=0)
    # given alphas_cumprod directly: same schedule
    s2 = nw.DiscreteVP(alphas_cumprod=acp)
    assert torch.allclose(s2.lam(t), s.lam(t), atol=0, rtol=1e-14)


def test_discrete_interpolates_lambda_linearly_between_steps():
    s = nw.DiscreteVP()
    lam = s.lam(torch.tensor([10.0, 11.0, 10.25], dtype=F64))
    assert float(lam[2]) == pytest.approx(0.75 * float(lam[0]) + 0.25 * float(lam[1]), abs=1e-13)


def test_zero_terminal_snr_has_alpha_zero_at_last_step_and_finite_inverse():
    s = SCHEDULES["zsnr_discrete"]()
    assert float(s.alpha(999)) == 0.0
    assert float(s.sigma(999)) == 1.0
    assert s.lam_min == -math.inf
    t = s.inverse_lambda(torch.tensor([-1e9, -20.0, 0.0], dtype=F64))
    assert float(t[0]) == 999.0 and 998.0 <= float(t[1]) <= 999.0
    # the angle interpolation in the last segment stays monotone
    ts = torch.linspace(998, 999, 11, dtype=F64)
    a = s.alpha(ts)
    assert bool((a[1:] < a[:-1]).all()) and float(a[-1]) == 0.0


def test_flow_shift_is_a_constant_lambda_offset():
    s = nw.RectifiedFlow(shift=3.0)
    t = torch.linspace(0.05, 0.95, 19, dtype=F64)
    shifted = 3.0 * t / (1 + 2.0 * t)  # SD3's formula
    ts = nw.core.spacing.apply_shift(s, t * 1000, 3.0) / 1000
    assert torch.allclose(ts, shifted, atol=1e-14)
    lam = s.lam(t * 1000)
    assert torch.allclose(s.lam(ts * 1000), lam - math.log(3.0), atol=1e-12)


def test_dynamic_shift_from_sequence_length():
    s = nw.RectifiedFlow(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
    assert s.shift_for(256) == pytest.approx(math.exp(0.5))
    assert s.shift_for(4096) == pytest.approx(math.exp(1.15))
    with pytest.raises(ValueError, match="image_seq_len"):
        s.shift_for(None)


def test_from_diffusers_dict_and_path(tmp_path):
    cfg = {
        "_class_name": "DDIMScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "prediction_type": "v_prediction", "rescale_betas_zero_snr": False,
    }
    s = nw.Schedule.from_diffusers(cfg)
    assert isinstance(s, nw.DiscreteVP) and s.prediction_type == "v_prediction"
    (tmp_path / "scheduler").mkdir()
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    s2 = nw.Schedule.from_diffusers(tmp_path)
    s3 = nw.Schedule.from_diffusers(tmp_path / "scheduler" / "scheduler_config.json")
    t = torch.arange(0, 1000, 7, dtype=F64)
    assert torch.equal(s.lam(t), s2.lam(t)) and torch.equal(s.lam(t), s3.lam(t))
    flow = nw.Schedule.from_diffusers({"_class_name": "FlowMatchEulerDiscreteScheduler", "shift": 3.0})
    assert isinstance(flow, nw.RectifiedFlow) and flow.shift == 3.0 and flow.time_scale == 1000
    with pytest.raises(FileNotFoundError):
        nw.Schedule.from_diffusers(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="beta_schedule"):
        nw.Schedule.from_diffusers({"beta_schedule": "quadratic"})


def test_bad_schedule_input():
    with pytest.raises(ValueError, match="non-increasing"):
        nw.DiscreteVP(alphas_cumprod=[0.5, 0.9, 0.1])
    with pytest.raises(ValueError, match="prediction_type"):
        nw.DiscreteVP(prediction_type="eps")
    with pytest.raises(ValueError):
        nw.RectifiedFlow(shift=0.0)


def test_discrete_inverse_lambda_is_exact_inverse_everywhere():
    for s in (nw.DiscreteVP(), nw.DiscreteVP(rescale_betas_zero_snr=True)):
        t = torch.cat([torch.arange(0, 1000, dtype=F64), torch.rand(500, dtype=F64) * 999])
        back = s.inverse_lambda(s.lam(t))
        finite = torch.isfinite(s.lam(t))
        assert torch.allclose(back[finite], t[finite], atol=1e-8)
        assert float(s.inverse_lambda(torch.tensor(1e6, dtype=F64))) == 0.0
        assert float(s.inverse_lambda(torch.tensor(-1e6, dtype=F64))) == 999.0


def test_grids_are_cached_per_schedule_and_shift():
    s = nw.RectifiedFlow(shift=3.0)
    g1 = nw.make_grid(s, 10, "linspace")
    assert nw.make_grid(s, 10, "linspace") is g1
    assert nw.make_grid(s, 10, "linspace", shift=1.0) is not g1
    s.shift = 2.0  # a changed schedule does not get a stale grid
    assert nw.make_grid(s, 10, "linspace").model_times != g1.model_times
