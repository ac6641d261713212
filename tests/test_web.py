"""The web page end to end in headless Chromium (Debian's chromium driven by Playwright): fill the
form, watch streamed step previews, get the image with its parameters; a bad value shows the
server's message. Skipped when chromium or playwright is missing."""

import json
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH (apt-get install -y chromium; scripts/test.sh does it as root)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")

from noisewise.server import ServerConfig, create_app  # noqa: E402
from tests.test_server_faults import _Uvicorn  # noqa: E402

ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def app():
    return create_app(ServerConfig(models=("shapes-vp",), preload=("shapes-vp",), max_steps=50), wait_ready=True)


@pytest.fixture(scope="module")
def url(app):
    with _Uvicorn(app) as u:
        yield u


@pytest.fixture(scope="module")
def page(url):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        pg = browser.new_page()
        pg.goto(url + "/")
        pg.wait_for_selector("body[data-ready='1']", timeout=20_000)
        yield pg
        browser.close()


def test_generate_from_the_page_with_streamed_previews(page):
    page.fill("#prompt", "a large red circle on the left")
    page.fill("#negative_prompt", "blurry")
    page.fill("#negative_scale", "0.5")
    page.fill("#negative_above", "0.4")
    page.select_option("#negative_perpendicular", "true")
    page.select_option("#sampler", "unipc")
    page.fill("#steps", "4")
    page.fill("#guidance_scale", "6")
    page.fill("#seed", "42")
    page.click("#generate")
    page.wait_for_function("document.getElementById('params').textContent.length > 0", timeout=60_000)
    meta = json.loads(page.text_content("#params"))
    assert meta["prompt"] == "a large red circle on the left" and meta["negative_prompt"] == "blurry"
    assert meta["sampler"] == "unipc" and meta["steps"] == 4 and meta["seed"] == 42
    assert meta["guidance_scale"] == 6.0 and meta["model"] == "shapes-vp" and meta["negative_scale"] == 0.5
    assert meta["negative_above"] == 0.4 and meta["negative_perpendicular"] is True
    assert page.get_attribute("#result", "src").startswith("data:image/png;base64,")
    assert page.get_attribute("#preview", "src").startswith("data:image/png;base64,")
    assert page.get_attribute("#preview", "data-steps") == "4"  # the last streamed preview was step 4
    assert page.evaluate("document.getElementById('progress').value") == 4
    assert page.evaluate("document.getElementById('result').naturalWidth") == 32  # the image decoded
    assert page.text_content("#status").startswith("done")
    assert page.text_content("#error") == ""


def test_the_page_shows_the_servers_message_for_a_bad_request(page):
    page.fill("#steps", "500")
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
    assert "error 422" in page.text_content("#error") and "limit of 50" in page.text_content("#error")


def _scene_png(scale: int = 1) -> bytes:
    """A rendered scene as PNG bytes; ``scale`` > 1: enlarged that many times, nearest-neighbour."""
    import io

    import numpy as np
    from PIL import Image

    from noisewise.shapes.captions import parse_prompt, scene_for_request
    from noisewise.shapes.world import render

    img = render(scene_for_request(parse_prompt("a large red circle on the left"), np.random.default_rng(3)))
    buf = io.BytesIO()
    Image.fromarray(img).resize((32 * scale, 32 * scale), Image.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def _set_strength(page, value: float) -> None:
    page.evaluate("v => { const s = document.getElementById('strength'); s.value = v; "
                  "s.dispatchEvent(new Event('input')); }", str(value))


def test_image_to_image_from_an_uploaded_picture(page, app):
    import base64
    import hashlib
    import io

    import numpy as np
    from PIL import Image

    data = _scene_png(scale=2)  # a 64x64 view: resized to the model's 32x32 ("auto" scales a square picture)
    page.fill("#prompt", "a green square")
    page.fill("#negative_prompt", "")
    page.fill("#negative_scale", "")  # blank: the model's default, as in the direct call below
    page.fill("#negative_above", "")
    page.select_option("#negative_perpendicular", "")
    page.select_option("#sampler", "dpmpp_2m")
    page.fill("#steps", "6")
    page.fill("#guidance_scale", "2")
    page.fill("#seed", "7")
    assert page.is_disabled("#strength") and page.is_disabled("#resize")  # no image yet: text-to-image
    page.set_input_files("#init_image", files=[{"name": "scene.png", "mimeType": "image/png", "buffer": data}])
    page.wait_for_function("!document.getElementById('strength').disabled", timeout=10_000)
    assert page.get_attribute("#init_preview", "src").startswith("data:image/png;base64,")
    assert page.input_value("#resize") == "auto" and not page.is_disabled("#resize")
    _set_strength(page, 0.5)
    assert page.text_content("#strength_value") == "0.5"
    page.click("#generate")
    page.wait_for_function("document.getElementById('params').textContent.length > 0", timeout=60_000)
    assert page.text_content("#error") == ""
    meta = json.loads(page.text_content("#params"))
    assert meta["strength"] == 0.5 and meta["init_image"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert meta["steps"] == 6 and meta["seed"] == 7 and meta["prompt"] == "a green square"
    assert meta["resize"] == "auto" and meta["init_image"]["size"] == [64, 64]
    assert page.get_attribute("#preview", "data-steps") == "3"  # int(6 * 0.5) steps ran, previewed
    src = page.get_attribute("#result", "src")
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1]))).convert("RGB"))
    img = np.asarray(Image.open(io.BytesIO(_scene_png())).convert("RGB"))  # the native 32x32 scene
    direct = app.state.service.get("shapes-vp").pipe("a green square", image=img, strength=0.5, sampler="dpmpp_2m",
                                                      steps=6, guidance_scale=2.0, seed=7)
    assert np.array_equal(got, direct.images[0])  # alone on the server: bit for bit the Python API's image
    # text-to-image again once the picture is removed
    page.click("#clear_image")
    assert page.is_disabled("#strength") and page.get_attribute("#init_preview", "src") is None
    assert page.is_disabled("#resize")


def test_a_bad_upload_shows_the_servers_message(page):
    page.fill("#steps", "4")
    page.set_input_files("#init_image", files=[{"name": "notes.png", "mimeType": "image/png",
                                                "buffer": b"these are notes, not a picture"}])
    page.wait_for_function("!document.getElementById('strength').disabled", timeout=10_000)
    page.click("#generate")
    page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=30_000)
    err = page.text_content("#error")
    assert err.startswith("error 422: image: ") and "not a PNG or JPEG picture" in err
    assert page.text_content("#status") == "rejected"
    page.click("#clear_image")
