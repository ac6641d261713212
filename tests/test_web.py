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
def url():
    app = create_app(ServerConfig(models=("shapes-vp",), preload=("shapes-vp",), max_steps=50), wait_ready=True)
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
    page.select_option("#sampler", "unipc")
    page.fill("#steps", "4")
    page.fill("#guidance_scale", "6")
    page.fill("#seed", "42")
    page.click("#generate")
    page.wait_for_function("document.getElementById('params').textContent.length > 0", timeout=60_000)
    meta = json.loads(page.text_content("#params"))
    assert meta["prompt"] == "a large red circle on the left" and meta["negative_prompt"] == "blurry"
    assert meta["sampler"] == "unipc" and meta["steps"] == 4 and meta["seed"] == 42
    assert meta["guidance_scale"] == 6.0 and meta["model"] == "shapes-vp"
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
