"""Continuous batching: concurrent requests with different samplers, step counts and seeds share
network forwards and get exactly what they would get alone."""

import threading

import pytest
import torch

import noisewise as nw
from noisewise.gmm import GaussianMixture
from noisewise.serving import BatchEngine, Cancelled

GMM = GaussianMixture.default(dim=4)
SD = nw.DiscreteVP(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
F64 = torch.float64


def _model():
    exact = GMM.model(SD)

    def net(x, t):
        # a per-row network (one model_time per sample) like a real denoiser
        return torch.cat([exact(x[i:i + 1], t[i:i + 1]) for i in range(x.shape[0])])

    return net


REQUESTS = [
    dict(sampler="dpmpp_2m", steps=8, seed=1, n=2),
    dict(sampler="unipc", steps=12, seed=2, n=3, order=3),
    dict(sampler="heun", steps=5, seed=3, n=1),
    dict(sampler="ddim", steps=10, seed=4, n=2),
    dict(sampler="dpm_solver", steps=9, seed=5, n=4, order=3),
]


def _run(model, r):
    r = dict(r)
    noise = torch.randn(r.pop("n"), 4, generator=torch.Generator().manual_seed(r.pop("seed")), dtype=F64)
    return nw.sample(model, noise, schedule=SD, return_info=True, **r)


def test_concurrent_requests_equal_solo_runs_and_share_forwards():
    net = _model()
    alone = [_run(net, r) for r in REQUESTS]
    engine = BatchEngine(net, max_batch=64, max_wait_s=0.05)
    try:
        handles = [engine.submit(lambda m, r=r: _run(m, r)) for r in REQUESTS]
        results = [h.result(timeout=60) for h in handles]
    finally:
        engine.close()
    for a, b in zip(alone, results):
        assert torch.equal(a.x, b.x) and a.nfe == b.nfe
    total_calls = sum(r.nfe for r in alone)
    assert engine.batcher.forwards < total_calls  # requests were batched together
    assert max(engine.batcher.batch_sizes) > 4  # rows of several requests in one forward
    assert engine.batcher.rows == sum(r.rows for r in alone)


def test_cancel_frees_the_slot_and_others_finish():
    net = _model()
    gate = threading.Event()

    def slow(x, t):
        gate.wait(5)
        return net(x, t)

    engine = BatchEngine(slow, max_wait_s=0.01)
    try:
        h1 = engine.submit(lambda m: _run(m, REQUESTS[0]))
        h2 = engine.submit(lambda m: _run(m, REQUESTS[3]))
        h1.cancel()
        gate.set()
        with pytest.raises(Cancelled):
            h1.result(timeout=30)
        assert torch.equal(h2.result(timeout=30).x, _run(net, REQUESTS[3]).x)
    finally:
        engine.close()


def test_model_errors_reach_the_request():
    def broken(x, t):
        raise RuntimeError("CUDA out of memory (simulated)")

    engine = BatchEngine(broken)
    try:
        h = engine.submit(lambda m: _run(m, REQUESTS[0]))
        with pytest.raises(RuntimeError, match="simulated"):
            h.result(timeout=30)
    finally:
        engine.close()


def test_max_active_bounds_concurrency():
    net = _model()
    engine = BatchEngine(net, max_active=2, max_wait_s=0.01)
    try:
        hs = [engine.submit(lambda m, r=r: _run(m, r)) for r in REQUESTS]
        for h in hs:
            h.result(timeout=60)
        assert max(engine.batcher.batch_sizes) <= 3 + 4  # at most two requests' rows at once
    finally:
        engine.close()
