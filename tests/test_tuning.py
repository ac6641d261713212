"""Tuned step schedules (noisewise.tuning): better than their start against the exact ODE on noise
disjoint from the calibration noise, usable through nw.sample, cached, and strict about bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import noisewise as nw
from noisewise import tuning
from noisewise.gmm import GaussianMixture
from noisewise.tuning import TunedSchedule, calibration_noise, evaluation_noise, tune_schedule

F64 = torch.float64
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
EVAL_SEED = 1  # evaluation noise seed; the calibration seed is 0 (tune_schedule's default)


@pytest.fixture(scope="module")
def gmm() -> GaussianMixture:
    return GaussianMixture.default()


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch, tmp_path):
    monkeypatch.setenv(tuning.CACHE_ENV, str(tmp_path / "default-cache.json"))
    tuning.clear_cache()
    yield
    tuning.clear_cache()


class CountingDenoiser:
    """The exact mixture denoiser, counting its calls."""

    def __init__(self, g: GaussianMixture, name: str | None = None) -> None:
        self.D = g.denoiser()
        self.calls = 0
        if name is not None:
            self.noisewise_model_id = name

    def __call__(self, x, level):
        self.calls += 1
        return self.D(x, level)


def exact_error(g: GaussianMixture, x: torch.Tensor, noise: torch.Tensor, grid: nw.Grid) -> float:
    """Median L2 distance to the exact probability-flow ODE solution from the grid's first level."""
    f = grid[0]
    ex = g.ode_solution(noise * math.sqrt(f.alpha**2 + f.sigma**2), f, nw.Level(1.0, 0.0, math.inf, 0.0))
    return float((x.to(F64) - ex).norm(dim=1).median())


def tuned_vs_start(g: GaussianMixture, schedule: nw.Schedule, nfe: int) -> tuple[float, float, TunedSchedule]:
    D = g.denoiser()
    tuned = tune_schedule(None, denoiser=D, schedule=schedule, nfe=nfe, shape=(2,), batch=128, dtype=F64)
    noise = evaluation_noise(tuned, 256, (2,), EVAL_SEED)
    r = nw.sample(None, noise, schedule=schedule, denoiser=D, spacing=tuned, return_info=True)
    r0 = nw.sample(None, noise, schedule=schedule, denoiser=D, sampler=tuned.sampler, spacing=tuned.start, nfe=nfe,
                   return_info=True, **tuned.sampler_options)
    return exact_error(g, r.x, noise, r.grid), exact_error(g, r0.x, noise, r0.grid), tuned


def test_tuned_beats_its_start_against_the_exact_ode_vp(gmm):
    err, err_start, tuned = tuned_vs_start(gmm, nw.DiscreteVP(**SD), 6)
    assert tuned.sampler == nw.recommended(nw.DiscreteVP(**SD), 6)[0]
    assert tuned.loss < tuned.start_loss
    assert err < 0.8 * err_start, (err, err_start, tuned)


def test_tuned_beats_its_start_against_the_exact_ode_flow(gmm):
    sched = nw.RectifiedFlow(shift=3.0)
    err, err_start, tuned = tuned_vs_start(gmm, sched, 5)
    assert err < 0.8 * err_start, (err, err_start, tuned)
    # the shift is in the tuned levels already: sampling must not shift them again
    r = nw.sample(None, torch.zeros(1, 2, dtype=F64), schedule=sched, denoiser=gmm.denoiser(), spacing=tuned,
                  return_info=True)
    assert r.grid.model_times[:-1] == pytest.approx(list(tuned.model_times), abs=1e-9)
    assert tuned.model_times[0] == sched.t_max  # flow starts from pure noise (time_quadratic's first level)


def test_calibration_and_evaluation_noise_are_disjoint():
    tuned = tune_schedule(None, denoiser=GaussianMixture.default().denoiser(), schedule=nw.DiscreteVP(**SD),
                          nfe=3, shape=(2,), batch=16, dtype=F64, seed=7, max_evals=5, reference_steps=32)
    assert tuned.seed == 7
    with pytest.raises(ValueError, match="calibration seed"):
        evaluation_noise(tuned, 16, (2,), 7)
    # even an evaluation that reuses the number draws different noise: the calibration seed is derived
    cal = calibration_noise(7, 16, (2,), F64)
    ev = torch.randn(16, 2, generator=torch.Generator().manual_seed(7), dtype=F64)
    assert not torch.allclose(cal, ev)
    assert not torch.allclose(cal, calibration_noise(8, 16, (2,), F64))


def test_round_trip_through_sample_and_json(gmm):
    sched = nw.DiscreteVP(**SD)
    D = gmm.denoiser()
    tuned = tune_schedule(None, denoiser=D, schedule=sched, sampler="dpmpp_2m", nfe=5, shape=(2,), batch=64,
                          dtype=F64, max_evals=40)
    noise = evaluation_noise(tuned, 32, (2,), EVAL_SEED)
    r = nw.sample(None, noise, schedule=sched, denoiser=D, spacing=tuned, return_info=True)
    assert r.sampler == "dpmpp_2m" and r.nfe == 5 and tuned.nfe == 5
    assert r.grid.model_times[:-1] == pytest.approx(list(tuned.model_times), abs=1e-9)
    grid = nw.Grid.from_model_times(sched, list(tuned.model_times))
    direct = nw.sample(None, noise, schedule=sched, denoiser=D, sampler="dpmpp_2m", grid=grid)
    assert torch.equal(r.x, direct)
    # by name, once tuned, with the same sampler and budget
    by_name = nw.sample(None, noise, schedule=sched, denoiser=D, sampler="dpmpp_2m", nfe=5, spacing="tuned")
    assert torch.equal(by_name, direct)
    # JSON round trip
    back = TunedSchedule.from_dict(json.loads(json.dumps(tuned.to_dict())))
    assert back == tuned
    assert torch.equal(nw.sample(None, noise, schedule=sched, denoiser=D, spacing=back), direct)
    # the recorded loss is what the schedule does on the calibration noise (the network memo is exact)
    cal = calibration_noise(tuned.seed, tuned.batch, (2,), F64)
    ref_grid = tuning.reference_grid(sched, tuned.model_times[0], tuned.reference_steps)
    assert ref_grid[-2].ve_sigma == pytest.approx(sched.ve_sigma(0.0).item())  # down to the cleanest level
    ref = nw.sample(None, cal, schedule=sched, denoiser=D, sampler="lms", order=3, grid=ref_grid)
    x = nw.sample(None, cal, schedule=sched, denoiser=D, spacing=tuned)
    assert float((x - ref).norm(dim=1).median()) == pytest.approx(tuned.loss, rel=1e-9)


def test_memory_cache_hit_miss_and_tuned_by_name(gmm):
    sched = nw.DiscreteVP(**SD)
    D = CountingDenoiser(gmm)
    kw = dict(denoiser=D, schedule=sched, sampler="unipc", order=2, nfe=4, shape=(2,), batch=32, dtype=F64,
              max_evals=20, reference_steps=32)
    noise = evaluation_noise([], 8, (2,), EVAL_SEED)
    with pytest.raises(ValueError, match="call nw.tune_schedule"):
        nw.sample(None, noise, schedule=sched, denoiser=D, sampler="unipc", order=2, nfe=4, spacing="tuned")
    first = tune_schedule(None, **kw)
    spent = D.calls
    assert spent > 0
    assert tune_schedule(None, **kw) is first and D.calls == spent  # hit: no model call
    again = tune_schedule(None, force=True, **kw)  # force: tuned again (same noise: same result)
    assert D.calls > spent and again.model_times == first.model_times
    x = nw.sample(None, noise, schedule=sched, denoiser=D, sampler="unipc", order=2, nfe=4, spacing="tuned")
    assert torch.equal(x, nw.sample(None, noise, schedule=sched, denoiser=D, spacing=first))
    # another budget, another sampler option, another model: misses, with the call to make
    for other in (dict(nfe=5), dict(order=3)):
        args = {**dict(sampler="unipc", order=2, nfe=4), **other}
        with pytest.raises(ValueError, match="no tuned schedule is cached") as miss:
            nw.sample(None, noise, schedule=sched, denoiser=D, spacing="tuned", **args)
        assert isinstance(miss.value, tuning.NoTunedSchedule)  # what to tune, for callers such as the CLI
        assert (miss.value.sampler, miss.value.options, miss.value.nfe) == ("unipc", {"order": args["order"]},
                                                                           args["nfe"])
    with pytest.raises(ValueError, match="no tuned schedule is cached"):
        nw.sample(None, noise, schedule=sched, denoiser=CountingDenoiser(gmm), sampler="unipc", order=2, nfe=4,
                  spacing="tuned")
    tuning.clear_cache()
    with pytest.raises(ValueError, match="no tuned schedule is cached"):
        nw.sample(None, noise, schedule=sched, denoiser=D, sampler="unipc", order=2, nfe=4, spacing="tuned")


def test_disk_cache_for_stable_identities(gmm, tmp_path, monkeypatch):
    sched = nw.RectifiedFlow(shift=3.0)
    path = tmp_path / "tuned.json"
    D = CountingDenoiser(gmm, name="gmm-exact")
    tuned = tune_schedule(None, denoiser=D, schedule=sched, nfe=4, shape=(2,), batch=32, dtype=F64, max_evals=20,
                          reference_steps=32, cache_file=path)
    assert list(json.loads(path.read_text())) == [tuned.key]
    tuning.clear_cache()
    # a new process would find it: a fresh object with the same id, read from the file
    D2 = CountingDenoiser(gmm, name="gmm-exact")
    again = tune_schedule(None, denoiser=D2, schedule=sched, nfe=4, shape=(2,), batch=32, dtype=F64,
                          cache_file=path)
    assert again == tuned and D2.calls == 0
    # spacing="tuned" reads $NOISEWISE_TUNED_CACHE (or ~/.cache/noisewise/tuned_schedules.json)
    tuning.clear_cache()
    noise = evaluation_noise(tuned, 8, (2,), EVAL_SEED)
    with pytest.raises(ValueError, match="no tuned schedule is cached"):
        nw.sample(None, noise, schedule=sched, denoiser=D2, nfe=4, spacing="tuned")
    monkeypatch.setenv(tuning.CACHE_ENV, str(path))
    x = nw.sample(None, noise, schedule=sched, denoiser=D2, nfe=4, spacing="tuned")
    assert torch.equal(x, nw.sample(None, noise, schedule=sched, denoiser=D2, spacing=tuned))
    # an object without a stable identity is never written to the file
    tune_schedule(None, denoiser=gmm.denoiser(), schedule=sched, nfe=4, shape=(2,), batch=8, dtype=F64,
                  max_evals=5, reference_steps=32, cache_file=path)
    assert list(json.loads(path.read_text())) == [tuned.key]


def test_module_identity_follows_the_weights():
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    b.load_state_dict(a.state_dict())
    ida, stable = tuning.model_identity(a)
    assert stable and ida == tuning.model_identity(b)[0]
    assert tuning.model_identity(a.forward)[0] != ida  # a bound method is its own entry, still stable
    assert tuning.model_identity(a.forward)[1]
    with torch.no_grad():
        b.weight.add_(1.0)
    assert tuning.model_identity(b)[0] != ida
    assert tuning.model_identity(lambda x, t: x)[1] is False


def test_guided_tuning_is_keyed_by_the_scale(gmm):
    sched = nw.DiscreteVP(**SD)
    model = gmm.model(sched, "epsilon")
    cond, uncond = torch.ones(1, dtype=torch.long), torch.full((1,), -1, dtype=torch.long)
    kw = dict(schedule=sched, cond=cond, uncond=uncond)
    tuned = tune_schedule(model, nfe=5, shape=(2,), batch=64, dtype=F64, guidance_scale=3.0, **kw)
    assert tuned.loss < tuned.start_loss
    noise = evaluation_noise(tuned, 128, (2,), EVAL_SEED)
    x = nw.sample(model, noise, nfe=5, spacing="tuned", guidance_scale=3.0, **kw)
    with pytest.raises(ValueError, match="no tuned schedule is cached"):
        nw.sample(model, noise, nfe=5, spacing="tuned", guidance_scale=5.0, **kw)
    # on evaluation noise, closer to a fine guided solve than the spacing it started from
    fine = nw.sample(model, noise, sampler="unipc", order=3, steps=200, spacing="uniform_lambda",
                     guidance_scale=3.0, **kw)
    start = nw.sample(model, noise, sampler=tuned.sampler, nfe=5, spacing=tuned.start, guidance_scale=3.0,
                      **tuned.sampler_options, **kw)
    e_t, e_s = ((v - fine).norm(dim=1).median() for v in (x, start))
    assert e_t < e_s, (float(e_t), float(e_s))


def test_coordinate_search_improves_and_reuses_evaluations(gmm):
    sched = nw.DiscreteVP(**SD)
    D = CountingDenoiser(gmm)
    tuned = tune_schedule(None, denoiser=D, schedule=sched, sampler="dpmpp_2m", nfe=5, shape=(2,), batch=64,
                          dtype=F64, method="coordinate", max_evals=60, reference_steps=32)
    assert tuned.loss < 0.9 * tuned.start_loss
    # moving level i re-uses the evaluations before it: fewer network calls than solves x NFE
    search_calls = tuned.model_calls - (32 + 1)
    assert search_calls < 0.75 * tuned.evaluations * 5
    assert D.calls == tuned.model_calls


def test_bad_input_fails_clearly(gmm):
    sched = nw.DiscreteVP(**SD)
    D = gmm.denoiser()
    base = dict(denoiser=D, schedule=sched, shape=(2,))
    with pytest.raises(ValueError, match="nfe >= 2"):
        tune_schedule(None, nfe=1, **base)
    with pytest.raises(ValueError, match="did you mean 'dpmpp_2m'"):
        tune_schedule(None, sampler="dpmpp2m", nfe=4, **base)
    with pytest.raises(ValueError, match="stochastic"):
        tune_schedule(None, sampler="euler_ancestral", nfe=4, **base)
    with pytest.raises(ValueError, match="shape="):
        tune_schedule(None, denoiser=D, schedule=sched, nfe=4)
    with pytest.raises(TypeError, match="takes no option"):
        tune_schedule(None, sampler="dpmpp_2m", order=3, nfe=4, **base)
    with pytest.raises(ValueError, match="model"):
        tune_schedule(None, schedule=sched, nfe=4, shape=(2,))
    with pytest.raises(ValueError, match="method"):
        tune_schedule(None, method="powell", nfe=4, **base)
    tuned = tune_schedule(None, nfe=3, batch=16, max_evals=5, reference_steps=32, dtype=F64, **base)
    noise = evaluation_noise(tuned, 4, (2,), EVAL_SEED)
    with pytest.raises(ValueError, match="pass nfe=3"):
        nw.sample(None, noise, schedule=sched, denoiser=D, spacing=tuned, nfe=8)
    with pytest.raises(ValueError, match="tuned on"):
        nw.sample(None, noise, schedule=nw.DiscreteVP(), denoiser=D, spacing=tuned)


def test_cli_rejects_bad_input(capsys):
    cli = pytest.importorskip("noisewise.cli")
    assert cli.main(["tune-schedule", "--nfe", "1", "--model", "shapes-vp"]) == 2
    assert "--nfe must be >= 2" in capsys.readouterr().err
    assert cli.main(["tune-schedule", "--nfe", "4", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err


@pytest.mark.slow
def test_cli_tunes_a_shipped_model_and_the_pipeline_uses_it(tmp_path, monkeypatch, capsys):
    cli = pytest.importorskip("noisewise.cli")
    pytest.importorskip("diffusers")
    from noisewise.pipeline import Pipeline, available_models

    if "shapes-vp" not in available_models():
        pytest.skip("shapes-vp weights not installed")
    path = tmp_path / "cache.json"
    monkeypatch.setenv(tuning.CACHE_ENV, str(path))
    assert cli.main(["tune-schedule", "--model", "shapes-vp", "--sampler", "dpmpp_2m", "--nfe", "3", "--batch", "2",
                     "--max-evals", "3"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["cache_file"] == str(path) and printed["nfe"] == 3
    tuning.clear_cache()
    pipe = Pipeline.from_pretrained("shapes-vp")  # a new instance: found by the weights' hash, from the file
    res = pipe("a red circle", sampler="dpmpp_2m", steps=3, spacing="tuned")
    assert res.nfe == 6  # 3 guided steps
    with pytest.raises(ValueError, match="no tuned schedule is cached"):
        pipe("a red circle", sampler="dpmpp_2m", steps=4, spacing="tuned")
    # the command line: generate --spacing tuned finds it too, and records the spacing
    out = tmp_path / "img.png"
    assert cli.main(["generate", "a red circle", "--sampler", "dpmpp_2m", "--steps", "3", "--spacing", "tuned",
                     "--out", str(out), "--quiet", "--device", "cpu"]) == 0
    from PIL import Image

    meta = json.loads(Image.open(out).text["parameters"])
    assert meta["sampler_options"]["spacing"] == "tuned" and meta["steps"] == 3
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "img-0.png").convert("RGB")),
                                  pipe("a red circle", sampler="dpmpp_2m", steps=3, spacing="tuned").images[0])
