"""The public API contract: results, NFE accounting, callbacks, step-by-step driving, dtypes,
statelessness."""

import threading

import pytest
import torch

import noisewise as nw
from noisewise.gmm import GaussianMixture

F64 = torch.float64
GMM = GaussianMixture.default(dim=4)
SD = nw.DiscreteVP(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def _noise(n=8, dtype=F64, seed=0):
    return torch.randn(n, 4, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def test_names_are_listed():
    assert {"ddim", "euler", "heun", "dpm_solver", "dpmpp_2m", "dpmpp_3m", "unipc", "flow_euler"} <= set(nw.samplers())
    assert {"leading", "trailing", "linspace", "karras", "exponential", "uniform_lambda", "time_quadratic",
            "beta"} <= set(nw.spacings())


@pytest.mark.parametrize("sampler", nw.samplers())
def test_return_info_counts_evaluations_and_rows(sampler):
    calls = []

    def model(x, t):
        calls.append(x.shape[0])
        return GMM.model(SD)(x, t)

    r = nw.sample(model, _noise(), schedule=SD, sampler=sampler, nfe=10, return_info=True)
    assert isinstance(r, nw.SampleResult)
    assert r.nfe == len(calls) and r.rows == sum(calls)
    if sampler != "dpm_adaptive":
        assert r.nfe <= 10
    assert r.x.shape == (8, 4) and r.x.dtype == F64


def test_nfe_budget_for_second_order_samplers():
    r = nw.sample(None, _noise(), schedule=SD, sampler="heun", nfe=9, denoiser=GMM.denoiser(), return_info=True)
    assert r.steps == 5 and r.nfe == 9  # the last step into sigma = 0 needs one evaluation
    r = nw.sample(None, _noise(), schedule=SD, sampler="heun", steps=5, denoiser=GMM.denoiser(), return_info=True)
    assert r.nfe == 9


def test_callback_sees_every_step():
    seen = []
    out = nw.sample(None, _noise(), schedule=SD, sampler="dpmpp_2m", steps=6, denoiser=GMM.denoiser(),
                    callback=seen.append)
    assert [s.i for s in seen] == list(range(6))
    assert all(isinstance(s, nw.StepInfo) for s in seen)
    assert seen[-1].level.sigma == 0.0 and torch.equal(seen[-1].x, out)
    lams = [s.level.lam for s in seen]
    assert lams == sorted(lams)


def test_default_sampler_is_the_recommendation():
    name, opts, spacing = nw.recommended(SD, 10)
    a = nw.sample(None, _noise(), schedule=SD, nfe=10, denoiser=GMM.denoiser())
    b = nw.sample(None, _noise(), schedule=SD, sampler=name, nfe=10, spacing=spacing, denoiser=GMM.denoiser(), **opts)
    assert torch.equal(a, b)


def test_solvers_keep_no_state_between_calls_and_threads():
    kw = dict(schedule=SD, sampler="unipc", steps=7, denoiser=GMM.denoiser(), order=3)
    ref = [nw.sample(None, _noise(seed=s), **kw) for s in range(4)]
    out = [None] * 4

    def work(s):
        out[s] = nw.sample(None, _noise(seed=s), **kw)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(ref, out):
        assert torch.equal(a, b)


def test_step_by_step_driving_batches_two_requests_into_one_forward():
    """Two requests with different samplers and step counts, advanced in lockstep by an outside
    driver that evaluates all pending requests in ONE batched call with per-sample levels."""
    xa, xb = _noise(3, seed=1), _noise(5, seed=2)
    ga = nw.make_grid(SD, 6, "karras")
    gb = nw.make_grid(SD, 9, "uniform_lambda")
    ref_a, _ = nw.run(nw.get_sampler("dpmpp_3m").fn(xa.clone(), ga), GMM.denoiser())
    ref_b, _ = nw.run(nw.get_sampler("heun").fn(xb.clone(), gb), GMM.denoiser())

    gens = {"a": nw.get_sampler("dpmpp_3m").fn(xa.clone(), ga), "b": nw.get_sampler("heun").fn(xb.clone(), gb)}
    pending = {k: next(g) for k, g in gens.items()}
    done, forwards = {}, 0
    while pending:
        # one forward for everything pending: per-sample alpha/sigma
        xs = torch.cat([x for x, _ in pending.values()])
        lv = [lv for x, lv in pending.values() for _ in range(x.shape[0])]
        x0 = torch.cat([GMM.posterior_mean(xs[i:i + 1], lv[i].alpha, lv[i].sigma) for i in range(len(lv))])
        forwards += 1
        off = 0
        for k in list(pending):
            n = pending[k][0].shape[0]
            try:
                pending[k] = gens[k].send(x0[off:off + n])
            except StopIteration as e:
                done[k] = e.value
                del pending[k]
            off += n
    assert forwards == max(6, 2 * 9 - 1)
    assert torch.allclose(done["a"], ref_a, rtol=1e-13, atol=1e-13)
    assert torch.allclose(done["b"], ref_b, rtol=1e-13, atol=1e-13)


class HalfNet(torch.nn.Module):
    """An fp16 'network' wrapping the exact model: checks it is fed fp16 and gets fp32 solver maths."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones((), dtype=torch.float16))
        self.seen = set()
        self.exact = GMM.model(SD)

    def forward(self, x, t):
        self.seen.add(x.dtype)
        return (self.exact(x.double(), t.double()) * self.scale.double()).half()


def test_float16_network_float32_solver():
    net = HalfNet()
    noise = _noise(16, torch.float32)
    out = nw.sample(net, noise, schedule=SD, sampler="dpmpp_2m", steps=10, spacing="karras")
    assert net.seen == {torch.float16}
    assert out.dtype == torch.float32
    ref = nw.sample(GMM.model(SD), noise.double(), schedule=SD, sampler="dpmpp_2m", steps=10, spacing="karras")
    assert float((out.double() - ref).abs().max()) < 2e-2  # fp16 network error only


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_float_dtype_end_to_end(dtype):
    out = nw.sample(GMM.model(SD), _noise(dtype=dtype), schedule=SD, sampler="unipc", steps=8)
    assert out.dtype == dtype and bool(torch.isfinite(out).all())


def test_explicit_timesteps_and_grid():
    ts = [999, 800, 600, 400, 200, 50]
    r = nw.sample(GMM.model(SD), _noise(), schedule=SD, sampler="ddim", spacing=ts, return_info=True)
    assert r.steps == 6 and r.grid.model_times[:-1] == ts and r.grid[-1].sigma == 0.0
    g = nw.make_grid(SD, 6, ts)
    r2 = nw.sample(GMM.model(SD), _noise(), schedule=SD, sampler="ddim", grid=g, return_info=True)
    assert torch.equal(r.x, r2.x)
    r3 = nw.sample(GMM.model(SD), _noise(), schedule=SD, sampler="ddim", spacing=ts, final="none", return_info=True)
    assert r3.steps == 5 and r3.grid[-1].model_time == 50
