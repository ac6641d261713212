"""The real ``noisewise serve`` process under SIGTERM, the signal path through uvicorn that a container
orchestrator uses: new work is refused, in-flight work that fits in the grace period finishes, what
does not is cancelled with an explicit 503 (never a 500 or a dropped connection), and the process exits
cleanly. (The in-process drain logic is tested in test_server_faults.py.)"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("diffusers")

from noisewise.pipeline import available_models  # noqa: E402

SRC = str(Path(__file__).resolve().parent.parent / "src")
GRACE_S = 6.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(cond, timeout: float = 120.0) -> bool:
    end = time.time() + timeout
    while time.time() < end:
        try:
            if cond():
                return True
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    return False


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return float("nan")


@pytest.mark.skipif("shapes-vp" not in available_models(), reason="shipped weights not present")
def test_sigterm_drains_finishes_what_fits_and_cancels_the_rest_explicitly():
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "noisewise.cli", "serve", "--port", str(port), "--models", "shapes-vp",
         "--torch-threads", "1", "--max-steps", "1000", "--shutdown-grace", str(GRACE_S), "--log-level", "warning"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert _wait(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200), "server never got ready"
        box: dict = {}

        def post(key: str, body: dict) -> None:
            box[key] = httpx.post(f"{url}/v1/generate", json=body, timeout=120)

        # far more work than the grace period allows (1000 guided steps x 4 images), and a short request
        long = threading.Thread(target=post, args=("long", {"prompt": "a red circle", "steps": 1000, "seed": 5,
                                                            "num_images": 4, "sampler": "ddim"}))
        long.start()
        assert _wait(lambda: _metric(url, "noisewise_active_requests") == 1, timeout=30)
        short = threading.Thread(target=post, args=("short", {"prompt": "a blue square", "steps": 8, "seed": 7}))
        short.start()
        assert _wait(lambda: _metric(url, "noisewise_active_requests") == 2, timeout=30)
        t_term = time.time()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        try:  # new work: refused while draining (503), or the listening socket is already closed
            late = httpx.post(f"{url}/v1/generate", json={"prompt": "a green cross", "steps": 2}, timeout=10)
            assert late.status_code == 503, late.text
        except httpx.TransportError:
            pass
        short.join(120)
        long.join(120)
        assert box["short"].status_code == 200, box["short"].text
        assert box["short"].json()["images"][0]["metadata"]["seed"] == 7
        assert box["long"].status_code == 503, box["long"].text
        assert "shutting down" in box["long"].json()["detail"]
        # uvicorn re-raises the captured signal once shut down, so a supervisor sees "terminated by SIGTERM"
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        assert time.time() - t_term < GRACE_S + 30
        out = proc.stdout.read() if proc.stdout else ""
        assert "Traceback" not in out and "cancelled 1 unfinished request" in out, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
