"""Server fault cases on a controllable stand-in pipeline: full queue (429), timeout (504),
client disconnect frees the slot, draining (503) and graceful shutdown finishing in-flight work.
A real uvicorn on a free loopback port where the connection itself matters."""

import json
import socket
import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
import httpx  # noqa: E402
from fastapi.testclient import TestClient  # noqa: E402

from noisewise.pipeline import GenerationResult  # noqa: E402
from noisewise.server import GenerationService, ServerConfig, create_app  # noqa: E402


class FakePipe:
    """Calls the (batched) network once per step; the network waits on ``gate`` and sleeps ``delay``."""

    def __init__(self, delay: float = 0.0) -> None:
        self.gate = threading.Event()
        self.gate.set()
        self.delay = delay
        self.defaults = {"sampler": "euler", "steps": 4, "guidance_scale": 1.0, "negative_prompt": ""}
        self.sample_size = 8
        self.schedule = SimpleNamespace(prediction_type="epsilon")
        self.text_encoder = SimpleNamespace(hits=0, misses=0)

    def model_fn(self, x, t, cond):
        self.gate.wait(30)
        time.sleep(self.delay)
        return x * 0.5 + t[:, None]

    def decode(self, x):
        return np.zeros((x.shape[0], 8, 8, 3), np.uint8)

    def __call__(self, prompt, *, num_images=1, seed=0, steps=None, callback=None, model=None, **kw):
        steps = steps or 4
        x = torch.full((num_images, 3), float(seed))
        for i in range(steps):
            x = model(x, torch.full((num_images,), float(i)), torch.zeros(num_images, 1))
            if callback is not None:
                callback(SimpleNamespace(i=i, x=x, x0=x))
        img = np.full((num_images, 8, 8, 3), int(x[0, 0]) % 256, np.uint8)
        return GenerationResult(img, [{"model": "fake", "seed": seed + j} for j in range(num_images)], steps)


def _service(pipe, **cfg):
    c = ServerConfig(models=("fake",), preload=("fake",), **cfg)
    return GenerationService(c, pipeline_factory=lambda name: pipe)


def _wait(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return False


def _counter(svc, status):
    return svc.metrics.requests.labels("fake", status)._value.get()


def test_full_queue_gets_429_and_the_rest_finish():
    pipe = FakePipe()
    svc = _service(pipe, max_active=1, max_queue=1)
    with TestClient(create_app(service=svc, wait_ready=True)) as c:
        pipe.gate.clear()
        results = []
        threads = [threading.Thread(target=lambda s=s: results.append(c.post("/v1/generate", json={"seed": s})))
                   for s in (1, 2)]
        for t in threads:
            t.start()
        assert _wait(lambda: svc.running == 1 and svc.waiting == 1)
        r = c.post("/v1/generate", json={"seed": 3})
        assert r.status_code == 429 and "queue is full" in r.json()["detail"] and r.headers["retry-after"] == "1"
        pipe.gate.set()
        for t in threads:
            t.join(30)
        assert sorted(r.status_code for r in results) == [200, 200]
        assert svc.running == svc.waiting == 0
        assert c.post("/v1/generate", json={"seed": 4}).status_code == 200
        assert "noisewise_rejected_total{reason=\"queue_full\"} 1.0" in c.get("/metrics").text


def test_timeout_gets_504_and_frees_the_slot():
    pipe = FakePipe()
    svc = _service(pipe, request_timeout_s=0.3)
    with TestClient(create_app(service=svc, wait_ready=True)) as c:
        pipe.gate.clear()
        r = c.post("/v1/generate", json={"seed": 1})
        assert r.status_code == 504 and "did not finish within 0.3 s" in r.json()["detail"]
        pipe.gate.set()
        assert _wait(lambda: svc.running == 0 and _counter(svc, "cancelled") == 1)
        assert c.post("/v1/generate", json={"seed": 2, "steps": 2}).status_code == 200


def test_draining_rejects_new_work_with_503():
    svc = _service(FakePipe())
    with TestClient(create_app(service=svc, wait_ready=True)) as c:
        assert c.get("/readyz").status_code == 200
        svc.begin_drain()
        r = c.post("/v1/generate", json={"seed": 1})
        assert r.status_code == 503 and "shutting down" in r.json()["detail"]
        assert c.get("/readyz").status_code == 503 and c.get("/healthz").status_code == 200


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Uvicorn:
    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        assert _wait(lambda: self.server.started)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)


def test_client_disconnect_cancels_and_frees_the_slot():
    pipe = FakePipe(delay=0.05)
    svc = _service(pipe, max_steps=400)
    with _Uvicorn(create_app(service=svc, wait_ready=True)) as url:
        with httpx.Client(base_url=url, timeout=30) as http:
            with http.stream("POST", "/v1/generate/stream", json={"seed": 1, "steps": 400}) as s:
                for line in s.iter_lines():
                    if line.startswith("data: ") and json.loads(line[6:])["event"] == "step":
                        break
                assert svc.running == 1
            # the connection is closed here, ~390 steps early
            assert _wait(lambda: svc.running == 0 and svc.waiting == 0)
            assert _counter(svc, "cancelled") == 1 and _counter(svc, "ok") == 0
            # same for the plain JSON endpoint: the client gives up after 0.5 s
            with pytest.raises(httpx.ReadTimeout):
                http.post("/v1/generate", json={"seed": 2, "steps": 400}, timeout=0.5)
            assert _wait(lambda: svc.running == 0 and _counter(svc, "cancelled") == 2)
            r = http.post("/v1/generate", json={"seed": 3, "steps": 3})
            assert r.status_code == 200 and http.get("/healthz").status_code == 200


def test_graceful_shutdown_finishes_in_flight_requests():
    pipe = FakePipe()
    svc = _service(pipe)
    srv = _Uvicorn(create_app(service=svc, wait_ready=True))
    url = srv.__enter__()
    pipe.gate.clear()
    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", httpx.post(f"{url}/v1/generate", json={"seed": 1},
                                                                       timeout=30)))
    t.start()
    assert _wait(lambda: svc.running == 1)
    svc.begin_drain()  # what SIGTERM does in noisewise serve, before uvicorn stops listening
    assert httpx.post(f"{url}/v1/generate", json={"seed": 2}, timeout=10).status_code == 503
    srv.server.should_exit = True
    time.sleep(0.3)
    pipe.gate.set()
    t.join(30)
    srv.thread.join(30)
    assert box["r"].status_code == 200 and box["r"].json()["images"][0]["metadata"]["seed"] == 1
    assert not srv.thread.is_alive()
