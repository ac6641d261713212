"""Image-to-image over HTTP on the shipped shapes-vp model: the init image travels base64 in the JSON
body, results equal ``pipe(prompt, image=..., strength=..., seed=...)`` (exactly alone; to one uint8
level when batched with other requests), the PNG metadata names the strength and the init image's
hashes, bad uploads get 422 with what to do, and img2img rows share forwards with text-to-image rows
without being mixed up."""

import base64
import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")
pytest.importorskip("diffusers")
from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402
from PIL.PngImagePlugin import PngInfo  # noqa: E402

from noisewise.pipeline import Pipeline, available_models  # noqa: E402
from noisewise.server import GenerationService, ServerConfig, create_app  # noqa: E402
from tests.test_server import _metric, _png  # noqa: E402
from tests.test_server_faults import FakePipe  # noqa: E402

pytestmark = pytest.mark.skipif("shapes-vp" not in available_models(), reason="shipped weights not installed")

MAX_IMAGE_BYTES = 6000
MAX_IMAGE_PIXELS = 40 * 40


def scene(prompt: str = "a large red circle on the left", seed: int = 3) -> np.ndarray:
    from noisewise.shapes.captions import parse_prompt, scene_for_request
    from noisewise.shapes.world import render

    return render(scene_for_request(parse_prompt(prompt), np.random.default_rng(seed)))


def encode(img: np.ndarray, fmt: str = "PNG", pad: int = 0, **kw) -> bytes:
    buf = io.BytesIO()
    if pad:
        info = PngInfo()
        info.add_text("pad", "x" * pad)
        kw["pnginfo"] = info
    Image.fromarray(img).save(buf, format=fmt, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


@pytest.fixture(scope="module")
def client():
    pipes = {"shapes-vp": Pipeline.from_pretrained("shapes-vp"), "noenc": FakePipe()}  # noenc: no VAE encoder
    cfg = ServerConfig(models=("shapes-vp", "noenc"), preload=("shapes-vp",), max_steps=50, max_images=2,
                       max_wait_s=0.02, max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_IMAGE_PIXELS)
    svc = GenerationService(cfg, pipeline_factory=pipes.__getitem__)
    with TestClient(create_app(service=svc, wait_ready=True)) as c:
        yield c


@pytest.fixture(scope="module")
def pipe(client):
    return client.app.state.service.get("shapes-vp").pipe


def test_img2img_json_and_png_equal_the_pipeline_with_the_image_recorded(client, pipe):
    img = scene()
    data = encode(img)
    body = {"prompt": "a green square", "image": b64(data), "strength": 0.5, "sampler": "dpmpp_2m", "steps": 6,
            "seed": 11, "guidance_scale": 3.0}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    direct = pipe("a green square", image=img, strength=0.5, sampler="dpmpp_2m", steps=6, seed=11,
                  guidance_scale=3.0)
    got = _png(r.json()["images"][0]["png_base64"])
    assert np.array_equal(got, direct.images[0])  # alone in the server: the same forwards, bit for bit
    assert r.json()["nfe"] == direct.nfe == 2 * 3  # int(6 * 0.5) steps, both guidance branches counted
    # the image really was used: text-to-image with the same seed gives another picture
    assert not np.array_equal(got, pipe("a green square", sampler="dpmpp_2m", steps=6, seed=11,
                                        guidance_scale=3.0).images[0])
    meta = r.json()["images"][0]["metadata"]
    want = {"sha256": hashlib.sha256(data).hexdigest(), "pixels_sha256": hashlib.sha256(img.tobytes()).hexdigest(),
            "format": "png", "size": [32, 32], "bytes": len(data)}
    assert meta["strength"] == 0.5 and meta["init_image"] == want and meta["steps"] == 6 and meta["seed"] == 11

    r = client.post("/v1/generate.png", json=body)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert np.array_equal(np.asarray(im.convert("RGB")), direct.images[0])
    params = json.loads(im.text["parameters"])
    assert params["strength"] == 0.5 and params["init_image"]["sha256"] == want["sha256"]
    assert json.loads(r.headers["x-noisewise-parameters"])["init_image"] == want


def test_an_image_of_another_size_is_resized_as_asked(client, pipe):
    """A wide picture with the scene in its centre, ``"resize": "crop"``: the scene's own result, and the
    metadata says how (the init image's record keeps the uploaded size)."""
    img = scene()
    wide = np.zeros((32, 40, 3), np.uint8)
    wide[:, 4:36] = img
    data = encode(wide)
    body = {"prompt": "a green square", "image": b64(data), "strength": 0.5, "steps": 4, "seed": 5, "resize": "crop"}
    r = client.post("/v1/generate", json=body)
    assert r.status_code == 200, r.text
    direct = pipe("a green square", image=img, strength=0.5, steps=4, seed=5)
    assert np.array_equal(_png(r.json()["images"][0]["png_base64"]), direct.images[0])
    meta = r.json()["images"][0]["metadata"]
    assert meta["resize"] == "crop" and meta["init_image"]["size"] == [40, 32]
    square = np.asarray(Image.fromarray(img).resize((36, 36), Image.BICUBIC))  # "auto" scales a square picture
    r = client.post("/v1/generate", json={**body, "image": b64(encode(square)), "resize": None})
    assert r.status_code == 200, r.text
    assert r.json()["images"][0]["metadata"]["resize"] == "auto"


def test_jpeg_data_url_and_default_strength(client, pipe):
    img = scene("a small blue square at the top", seed=5)
    jpg = encode(img, "JPEG", quality=90)
    decoded = np.asarray(Image.open(io.BytesIO(jpg)).convert("RGB"))  # lossy: the server sees these pixels
    assert not np.array_equal(decoded, img)
    r = client.post("/v1/generate", json={"prompt": "a red circle", "image": "data:image/jpeg;base64," + b64(jpg),
                                          "steps": 5, "seed": 2})
    assert r.status_code == 200, r.text
    direct = pipe("a red circle", image=decoded, steps=5, seed=2)  # strength: the pipeline's default 0.8
    assert np.array_equal(_png(r.json()["images"][0]["png_base64"]), direct.images[0])
    meta = r.json()["images"][0]["metadata"]
    assert meta["strength"] == 0.8 and meta["init_image"]["format"] == "jpeg"
    assert meta["init_image"]["pixels_sha256"] == hashlib.sha256(decoded.tobytes()).hexdigest()
    assert r.json()["nfe"] == direct.nfe == 2 * 4  # int(5 * 0.8) steps, two branches


def test_a_strength_too_small_for_one_step_returns_the_vae_reconstruction(client, pipe):
    img = scene()
    r = client.post("/v1/generate", json={"prompt": "a green square", "image": b64(encode(img)), "strength": 0.1,
                                          "steps": 4, "seed": 0})  # int(4 * 0.1) = 0 steps: no network call
    assert r.status_code == 200, r.text
    assert r.json()["nfe"] == 0
    want = pipe.decode(pipe.codec.encode(img[None]))[0]
    assert np.array_equal(_png(r.json()["images"][0]["png_base64"]), want)


def test_img2img_and_text_to_image_share_forwards_without_mixing_rows(client, pipe):
    a, b = scene(), scene("a large green triangle on the right", seed=7)
    reqs = [
        {"prompt": "a blue square", "sampler": "dpmpp_2m", "steps": 8, "seed": 1, "image": a, "strength": 0.5},
        {"prompt": "a blue square", "sampler": "dpmpp_2m", "steps": 8, "seed": 1, "image": a, "strength": 0.75},
        {"prompt": "a blue square", "sampler": "dpmpp_2m", "steps": 8, "seed": 1, "image": b, "strength": 0.75},
        {"prompt": "a blue square", "sampler": "dpmpp_2m", "steps": 8, "seed": 1},
        {"prompt": "a red circle", "sampler": "unipc", "steps": 6, "seed": 4, "image": b, "strength": 0.9,
         "guidance_scale": 5.0, "num_images": 2},
        {"prompt": "a yellow star", "sampler": "euler_ancestral", "steps": 5, "seed": 9, "image": a, "strength": 0.6},
    ]

    def http(req):
        body = dict(req)
        if "image" in body:
            body["image"] = b64(encode(body["image"]))
        return client.post("/v1/generate", json=body)

    before = _metric(client.get("/metrics").text, "noisewise_batch_size_count")
    with ThreadPoolExecutor(len(reqs)) as ex:
        outs = list(ex.map(http, reqs))
    assert all(o.status_code == 200 for o in outs), [o.text for o in outs]
    forwards = _metric(client.get("/metrics").text, "noisewise_batch_size_count") - before
    assert 0 < forwards < sum(o.json()["nfe"] for o in outs)  # rows of different requests shared forwards
    directs = []
    for req, o in zip(reqs, outs):
        kw = {k: v for k, v in req.items() if k not in ("prompt", "num_images")}
        n = req.get("num_images", 1)
        if req["sampler"] == "euler_ancestral":  # the server seeds one generator per image
            kw["generator"] = [torch.Generator().manual_seed(req["seed"] + i + 0x5EED) for i in range(n)]
        direct = pipe(req["prompt"], num_images=n, **kw)
        got = np.stack([_png(im["png_base64"]) for im in o.json()["images"]])
        assert got.shape == direct.images.shape and o.json()["nfe"] == direct.nfe
        # equal up to the convolution's batch-size-dependent rounding (one uint8 level at most)
        assert np.abs(got.astype(int) - direct.images.astype(int)).max() <= 1
        assert (got != direct.images).mean() < 0.01
        assert [im["metadata"].get("strength") for im in o.json()["images"]] == [req.get("strength")] * n
        directs.append(direct.images)
    # the requests that differ only in strength, init image or img2img-vs-text give clearly different
    # pictures, so rows handed to the wrong request would have failed the comparisons above
    for i, j in [(0, 1), (1, 2), (0, 3), (2, 3)]:
        assert np.abs(directs[i].astype(int) - directs[j].astype(int)).max() > 8


def test_sse_stream_counts_the_steps_that_run(client, pipe):
    img = scene()
    data = encode(img)
    body = {"prompt": "a green square", "image": b64(data), "strength": 0.5, "steps": 8, "seed": 3}
    events = []
    with client.stream("POST", "/v1/generate/stream", json=body) as s:
        for line in s.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    assert [e["event"] for e in events] == ["queued", "started"] + ["step"] * 4 + ["done"]
    assert [(e["step"], e["steps"]) for e in events if e["event"] == "step"] == [(i, 4) for i in range(1, 5)]
    queued = events[0]["params"]
    assert queued["strength"] == 0.5 and queued["init_image"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert "image" not in queued  # the pixels are not echoed
    direct = pipe("a green square", image=img, strength=0.5, steps=8, seed=3)
    assert np.array_equal(_png(events[-1]["images"][0]["png_base64"]), direct.images[0])


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(scene()).save(buf, format="GIF")
    return buf.getvalue()


@pytest.mark.parametrize("fields, words", [
    ({"image": "not base64!"}, "not valid base64"),
    ({"image": b64(b"just some text, not a picture")}, "not a PNG or JPEG picture"),
    ({"image": b64(_gif())}, "is a GIF picture; send PNG or JPEG"),
    ({"image": b64(encode(scene())[:120])}, "could not be decoded"),
    ({"image": b64(encode(scene(), pad=MAX_IMAGE_BYTES))}, f"limit of {MAX_IMAGE_BYTES} bytes"),
    ({"image": b64(encode(np.zeros((64, 64, 3), np.uint8)))}, f"limit of {MAX_IMAGE_PIXELS}"),
    ({"image": b64(encode(np.zeros((32, 40, 3), np.uint8)))}, 'not square, and model \'shapes-vp\' takes 32x32 '
                                                              'images: use \\"resize\\": \\"crop\\"'),
    ({"image": b64(encode(np.zeros((36, 36, 3), np.uint8))), "resize": "off"}, 'got 36x36 with \\"resize\\": '),
    ({"image": b64(encode(scene())), "resize": "fit"}, "'auto', 'crop', 'stretch' or 'off'"),
    ({"resize": "crop"}, "resize needs an init image"),
    ({"image": b64(encode(scene())), "strength": 0}, "strength must be above 0"),
    ({"image": b64(encode(scene())), "strength": 1.5}, "strength must be above 0"),
    ({"image": b64(encode(scene())), "strength": "lots"}, "valid number"),
    ({"strength": 0.5}, "strength needs an init image"),
    ({"image": b64(encode(scene())), "model": "noenc"}, "cannot do image-to-image"),
    ({"image": 7}, "image must be a string"),
])
def test_bad_init_images_get_422_saying_what_to_do(client, fields, words):
    r = client.post("/v1/generate", json={"prompt": "x", "steps": 2, **fields})
    assert r.status_code == 422, r.text
    assert words in json.dumps(r.json()), r.text
    assert len(r.content) < 4000  # a rejected image is not echoed back whole


def test_limits_models_metrics_and_body_size(client):
    limits = client.get("/v1/limits").json()
    assert limits["max_image_bytes"] == MAX_IMAGE_BYTES and limits["max_image_pixels"] == MAX_IMAGE_PIXELS
    models = {m["name"]: m for m in client.get("/v1/models").json()["models"]}
    assert models["shapes-vp"]["img2img"] is True and models["noenc"]["img2img"] is False
    # an init image of exactly the byte limit (a data URL, too) fits in the body limit
    data = encode(scene(), pad=1 + MAX_IMAGE_BYTES - len(encode(scene(), pad=1)))  # tEXt bytes add 1:1
    assert len(data) == MAX_IMAGE_BYTES
    text = client.get("/metrics").text
    before = _metric(text, 'noisewise_requests_by_kind_total{kind="img2img",model="shapes-vp",status="ok"}')
    before_t2i = _metric(text, 'noisewise_requests_by_kind_total{kind="txt2img",model="shapes-vp",status="ok"}')
    r = client.post("/v1/generate", json={"prompt": "x" * 100, "steps": 2, "strength": 1.0,
                                          "image": "data:image/png;base64," + b64(data)})
    assert r.status_code == 200, r.text
    assert client.post("/v1/generate", json={"prompt": "x", "steps": 2}).status_code == 200
    text = client.get("/metrics").text
    assert _metric(text, 'noisewise_requests_by_kind_total{kind="img2img",model="shapes-vp",status="ok"}') == \
        before + 1
    assert _metric(text, 'noisewise_requests_by_kind_total{kind="txt2img",model="shapes-vp",status="ok"}') == \
        before_t2i + 1
    r = client.post("/v1/generate", content=b'{"prompt": "' + b"x" * limits["max_body_bytes"] + b'"}',
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and f"base64 init image of at most {MAX_IMAGE_BYTES} bytes" in r.text
