"""HTTP API on the shipped shapes-vp model: results equal direct pipeline runs (alone and under
continuous batching), validation with clear 4xx, SSE progress, metrics, OpenAPI."""

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
from fastapi.testclient import TestClient  # noqa: E402

from noisewise.server import ServerConfig, create_app  # noqa: E402

STEPS = 4


@pytest.fixture(scope="module")
def client():
    app = create_app(ServerConfig(models=("shapes-vp",), preload=("shapes-vp",), max_steps=50, max_images=2,
                                  max_prompt_chars=100, max_wait_s=0.02), wait_ready=True)
    with TestClient(app) as c:
        yield c


@pytest.fixture(scope="module")
def pipe(client):
    return client.app.state.service.get("shapes-vp").pipe


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            rest = line[len(name):]
            if rest[:1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_generate_json_equals_the_pipeline(client, pipe):
    body = {"prompt": "a red circle", "sampler": "dpmpp_2m", "steps": STEPS, "seed": 11, "guidance_scale": 5.0}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    j = r.json()
    direct = pipe("a red circle", sampler="dpmpp_2m", steps=STEPS, seed=11, guidance_scale=5.0)
    assert np.array_equal(_png(j["images"][0]["png_base64"]), direct.images[0])
    meta = j["images"][0]["metadata"]
    assert meta["seed"] == 11 and meta["sampler"] == "dpmpp_2m" and meta["steps"] == STEPS
    assert j["nfe"] == direct.nfe
    # the PNG endpoint returns the same image with its parameters embedded
    r = client.post("/v1/generate.png", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    from PIL import Image

    im = Image.open(io.BytesIO(r.content))
    assert np.array_equal(np.asarray(im.convert("RGB")), direct.images[0])
    assert json.loads(im.text["parameters"])["seed"] == 11


def test_two_object_prompt_is_composed_by_default_like_the_pipeline(client, pipe):
    prompt = "a red circle and a blue square on grey"  # the shapes models compose by regions by default
    r = client.post("/v1/generate", json={"prompt": prompt, "steps": STEPS, "seed": 7})
    assert r.status_code == 200, r.text
    direct = pipe(prompt, steps=STEPS, seed=7)
    assert direct.metadata[0]["compose"] == "regions" and len(direct.metadata[0]["components"]) == 2
    assert np.array_equal(_png(r.json()["images"][0]["png_base64"]), direct.images[0])
    meta = r.json()["images"][0]["metadata"]
    assert meta["compose"] == "regions" and meta["components"] == direct.metadata[0]["components"]
    off = client.post("/v1/generate", json={"prompt": prompt, "steps": STEPS, "seed": 7, "compose": "off"})
    assert off.status_code == 200, off.text
    off_meta = off.json()["images"][0]["metadata"]
    assert off_meta["compose"] == "off" and "components" not in off_meta
    assert np.array_equal(_png(off.json()["images"][0]["png_base64"]), pipe(prompt, steps=STEPS, seed=7,
                                                                             compose="off").images[0])
    bad = client.post("/v1/generate", json={"prompt": prompt, "compose": "everything"})
    assert bad.status_code == 422 and "compose" in bad.text
    # the HTTP schema offers exactly the modes a batch file accepts (one list: serving.jobs.ComposeMode)
    from noisewise.serving.jobs import COMPOSE_MODES

    schema = client.get("/openapi.json").json()["components"]["schemas"]
    compose = schema["GenerateRequest"]["properties"]["compose"]
    assert {v for alt in compose["anyOf"] for v in alt.get("enum", [])} == set(COMPOSE_MODES) == {"off", "and",
                                                                                                 "regions"}


def test_concurrent_mixed_requests_are_batched_and_match_solo_runs(client, pipe):
    reqs = [
        {"prompt": "a red circle", "sampler": "dpmpp_2m", "steps": 4, "seed": 1, "guidance_scale": 7.5},
        {"prompt": "a blue square on the right", "sampler": "euler", "steps": 6, "seed": 2, "guidance_scale": 3.0},
        {"prompt": "a green triangle", "sampler": "unipc", "steps": 5, "seed": 3, "guidance_scale": 1.0},
        {"prompt": "a small yellow star", "sampler": "euler_ancestral", "steps": 4, "seed": 4, "num_images": 2},
    ]
    before = _metric(client.get("/metrics").text, "noisewise_batch_size_count")
    with ThreadPoolExecutor(len(reqs)) as ex:
        outs = list(ex.map(lambda b: client.post("/v1/generate", json=b), reqs))
    assert all(o.status_code == 200 for o in outs), [o.text for o in outs]
    forwards = _metric(client.get("/metrics").text, "noisewise_batch_size_count") - before
    # each request makes one network call per evaluation (both CFG branches in one call); run
    # together they shared forwards
    assert 0 < forwards < sum(o.json()["nfe"] for o in outs)
    for body, o in zip(reqs, outs):
        got = np.stack([_png(im["png_base64"]) for im in o.json()["images"]])
        solo = client.post("/v1/generate", json=body).json()  # alone (nothing else running)
        solo_im = np.stack([_png(im["png_base64"]) for im in solo["images"]])
        assert got.shape == solo_im.shape == (body.get("num_images", 1), 32, 32, 3)
        assert o.json()["nfe"] == solo["nfe"]
        # equal up to the convolution's batch-size-dependent rounding (one uint8 level at most)
        assert np.abs(got.astype(int) - solo_im.astype(int)).max() <= 1
        assert (got != solo_im).mean() < 0.01


def test_stochastic_sampler_is_seeded(client):
    body = {"prompt": "a red circle", "sampler": "euler_ancestral", "steps": STEPS, "seed": 5}
    a = client.post("/v1/generate", json=body).json()["images"][0]["png_base64"]
    b = client.post("/v1/generate", json=body).json()["images"][0]["png_base64"]
    c = client.post("/v1/generate", json=dict(body, seed=6)).json()["images"][0]["png_base64"]
    assert np.array_equal(_png(a), _png(b)) and not np.array_equal(_png(a), _png(c))


@pytest.mark.parametrize("body, status, words", [
    ({"prompt": "x", "steps": 500}, 422, "limit of 50"),
    ({"prompt": "x", "num_images": 3}, 422, "limit of 2"),
    ({"prompt": "x" * 101}, 422, "limit of 100"),
    ({"prompt": "x", "sampler": "dpmpp2m"}, 422, "did you mean 'dpmpp_2m'"),
    ({"prompt": "x", "model": "shapes-vq"}, 422, "did you mean 'shapes-vp'"),
    ({"prompt": "x", "model": "../../etc/passwd"}, 422, "pattern"),
    ({"prompt": "x", "model": "/tmp"}, 422, "pattern"),
    ({"prompt": "x", "preset": "fastest"}, 422, "unknown preset"),
    ({"prompt": "x", "guidance_scale": -1}, 422, "greater than or equal"),
    ({"prompt": "x", "steps": 0}, 422, "greater than or equal"),
    ({"prompt": "x", "unknown_field": 1}, 422, "Extra inputs"),
])
def test_bad_requests_get_clear_4xx(client, body, status, words):
    r = client.post("/v1/generate", json=body)
    assert r.status_code == status
    assert words in json.dumps(r.json())


def test_malformed_and_oversize_bodies(client):
    r = client.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    limit = client.app.state.service.config.body_limit  # the text fields + a base64 init image of the limit
    r = client.post("/v1/generate", content=b'{"prompt": "' + b"x" * limit + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and f"over {limit} bytes" in r.text
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.post("/v1/generate", json={"prompt": "ok", "steps": 2}).status_code == 200


def test_presets_models_samplers_and_openapi(client):
    names = [p["name"] for p in client.get("/v1/presets").json()["presets"]]
    assert {"realtime", "balanced", "quality"} <= set(names)
    r = client.post("/v1/generate", json={"prompt": "a red circle", "preset": "realtime", "steps": 2, "seed": 0})
    assert r.status_code == 200
    meta = r.json()["images"][0]["metadata"]
    assert meta["steps"] == 2 and meta["sampler"] == "dpmpp_2m"  # explicit steps win over the preset
    models = client.get("/v1/models").json()["models"]
    assert models[0]["name"] == "shapes-vp" and models[0]["loaded"]
    import noisewise as nw

    assert [s["name"] for s in client.get("/v1/samplers").json()["samplers"]] == list(nw.samplers())
    spec = client.get("/openapi.json").json()
    assert "/v1/generate" in spec["paths"] and "GenerateRequest" in spec["components"]["schemas"]
    assert client.get("/readyz").status_code == 200


def test_sse_stream_sends_step_previews_then_the_image(client):
    body = {"prompt": "a blue square", "sampler": "dpmpp_2m", "steps": STEPS, "seed": 3}
    events = []
    with client.stream("POST", "/v1/generate/stream", json=body) as s:
        assert s.headers["content-type"].startswith("text/event-stream")
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    kinds = [e["event"] for e in events]
    assert kinds == ["queued", "started"] + ["step"] * STEPS + ["done"]
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(1, STEPS + 1))
    assert _png(events[2]["preview"]).shape == (32, 32, 3)
    plain = client.post("/v1/generate", json=body).json()["images"][0]["png_base64"]
    assert np.array_equal(_png(events[-1]["images"][0]["png_base64"]), _png(plain))


def test_metrics_report_queue_batches_latency_nfe_and_cache(client):
    client.post("/v1/generate", json={"prompt": "a red circle", "steps": 2})
    client.post("/v1/generate", json={"prompt": "a red circle", "steps": 2})
    text = client.get("/metrics").text
    for name in ("noisewise_queue_depth", "noisewise_active_requests", "noisewise_batch_size_bucket",
                 "noisewise_request_latency_seconds_bucket", "noisewise_nfe_total", "noisewise_nfe_per_second",
                 "noisewise_text_cache_hit_ratio", "noisewise_forward_seconds_bucket"):
        assert name in text, name
    assert _metric(text, "noisewise_text_cache_hit_ratio") > 0
    assert _metric(text, "noisewise_nfe_total") > 0
    assert _metric(text, "noisewise_queue_depth") == 0 and _metric(text, "noisewise_active_requests") == 0


def test_web_page_is_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    for el in ('id="prompt"', 'id="negative_prompt"', 'id="sampler"', 'id="steps"', 'id="guidance_scale"',
               'id="seed"', 'id="init_image"', 'id="strength"', "/v1/generate/stream"):
        assert el in r.text
