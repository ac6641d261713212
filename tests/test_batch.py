"""``noisewise batch``: local engine, resumable after a crash, Ray engine gives the same images."""

import json
import os

import numpy as np
import pytest

from noisewise.serving import jobs

ITEMS = [
    {"prompt": "a red circle", "sampler": "dpmpp_2m", "steps": 3, "seed": 7},
    {"prompt": "a blue square", "sampler": "euler_ancestral", "steps": 2, "id": "blue"},
    {"prompt": "a green triangle", "steps": 2, "num_images": 2, "guidance_scale": 3.0},
]


def _images(out, record):
    from PIL import Image

    return [np.asarray(Image.open(out / f).convert("RGB")) for f in record["files"]]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("batch") / "prompts.jsonl"
    p.write_text("\n".join(json.dumps(i) for i in ITEMS) + "\n")
    return p


@pytest.fixture(scope="module")
def local_run(prompts, tmp_path_factory):
    out = tmp_path_factory.mktemp("local")
    rep = jobs.run_batch(jobs.read_items(prompts), out, progress=False)
    return out, rep


def test_local_engine_writes_images_and_parameters(local_run):
    out, rep = local_run
    assert (rep.total, rep.done, rep.skipped) == (3, 3, 0)
    assert 0 < rep.first_result_s < rep.seconds  # start-up + first item, then the steady rate of the other two
    assert rep.steady_items_per_s == pytest.approx(2 / (rep.seconds - rep.first_result_s))
    recs = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json")}
    assert sorted(recs) == ["000000", "000002", "blue"]
    assert recs["000000"]["metadata"][0]["seed"] == 7 and recs["blue"]["metadata"][0]["seed"] == 1  # base + index
    assert recs["000002"]["files"] == ["000002-0.png", "000002-1.png"]
    assert [m["seed"] for m in recs["000002"]["metadata"]] == [2, 3]
    assert not [p for p in os.listdir(out) if p.endswith(".tmp")]
    # same as the pipeline called directly
    from noisewise.pipeline import Pipeline

    direct = Pipeline.from_pretrained("shapes-vp")("a red circle", sampler="dpmpp_2m", steps=3, seed=7)
    assert np.array_equal(_images(out, recs["000000"])[0], direct.images[0])


def test_resume_skips_finished_items(local_run, prompts):
    out, _ = local_run
    before = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    rep = jobs.run_batch(jobs.read_items(prompts), out, progress=False)
    assert (rep.done, rep.skipped) == (0, 3) and rep.first_result_s is None and rep.steady_items_per_s is None
    # a crash after the PNG but before the JSON: that item (only) is redone, with the same image
    (out / "blue.json").unlink()
    png = (out / "blue.png").read_bytes()
    rep = jobs.run_batch(jobs.read_items(prompts), out, progress=False)
    assert (rep.done, rep.skipped) == (1, 2)
    assert (out / "blue.png").read_bytes() == png
    assert (out / "000000.png").stat().st_mtime_ns == before["000000.png"]


def test_bad_lines_are_reported_with_their_line_number(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": "x", "stesp": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: unknown field\(s\) \['stesp'\]"):
        jobs.read_items(p)
    p.write_text('{"prompt": "ok", "id": "../x"}\n')
    with pytest.raises(ValueError, match="names the output files"):
        jobs.read_items(p)
    p.write_text('{"prompt": "ok"\n')
    with pytest.raises(ValueError, match="bad.jsonl:1: not valid JSON"):
        jobs.read_items(p)


def test_ray_engine_matches_the_local_engine(local_run, prompts, tmp_path):
    ray = pytest.importorskip("ray", reason="pip install 'noisewise[ray]'")
    out_local, _ = local_run
    out = tmp_path / "ray"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        rep = jobs.run_batch(jobs.read_items(prompts), out, engine="ray", workers=1, progress=False)
    finally:
        ray.shutdown()
    assert rep.done == 3
    for rec_path in out_local.glob("*.json"):
        a, b = json.loads(rec_path.read_text()), json.loads((out / rec_path.name).read_text())
        assert a["metadata"] == b["metadata"] and a["files"] == b["files"]
        for x, y in zip(_images(out_local, a), _images(out, b)):
            assert np.array_equal(x, y)
