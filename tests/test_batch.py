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


@pytest.mark.parametrize("field, value, message", [
    ("steps", "abc", "steps must be a whole number from 1 to 1000, got 'abc'"),
    ("steps", 0, "steps must be from 1 to 1000, got 0"),
    ("steps", 2.5, "steps must be a whole number"),
    ("guidance_scale", 1e9, "guidance_scale must be from 0 to 50, got 1e[+]09"),
    ("guidance_scale", "7", "guidance_scale must be a number from 0 to 50"),
    ("negative_scale", 51, "negative_scale must be from 0 to 50, got 51"),
    ("num_images", 100000, "num_images must be from 1 to 64, got 100000"),
    ("num_images", True, "num_images must be a whole number"),
    ("seed", -1, "seed must be from 0 to"),
    ("seed", None, "seed must be a whole number"),
    ("prompt", None, "prompt must be a string, got None"),
    ("sampler", 3, "sampler must be a string or null"),
    ("sampler", "dpm++2m", "unknown sampler 'dpm[+][+]2m'; did you mean 'dpmpp_2m'"),
    ("model", ["shapes-vp"], "model must be a string"),
])
def test_every_field_is_checked_when_the_file_is_read(tmp_path, field, value, message):
    """A bad value stops the job before any work, naming its line, with the ranges generate and HTTP use."""
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps({"prompt": "ok"}) + "\n" + json.dumps({"prompt": "x", field: value}) + "\n")
    with pytest.raises(ValueError, match=f"bad.jsonl:2: {message}"):
        jobs.read_items(p)


def test_good_values_pass_through_as_numbers(tmp_path):
    p = tmp_path / "ok.jsonl"
    p.write_text(json.dumps({"prompt": "x", "steps": 4.0, "guidance_scale": 3, "num_images": 2, "seed": 9, "id": 5})
                 + "\n" + json.dumps({"prompt": "y"}) + "\n")
    a, b = jobs.read_items(p, jobs.JobDefaults(steps=7, base_seed=100))
    assert (a["id"], a["steps"], a["guidance_scale"], a["num_images"], a["seed"]) == ("5", 4, 3.0, 2, 9)
    assert type(a["steps"]) is int and type(a["guidance_scale"]) is float
    assert (b["id"], b["steps"], b["guidance_scale"], b["num_images"], b["seed"]) == ("000001", 7, None, 1, 101)


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


def test_image_to_image_items(tmp_path):
    import hashlib
    import re

    from PIL import Image

    from noisewise.pipeline import Pipeline
    from noisewise.shapes.captions import parse_prompt, scene_for_request
    from noisewise.shapes.world import render

    img = render(scene_for_request(parse_prompt("a large red circle on the left"), np.random.default_rng(3)))
    (tmp_path / "pics").mkdir()
    Image.fromarray(img).save(tmp_path / "pics" / "in.png")
    Image.fromarray(img).resize((64, 64), Image.NEAREST).save(tmp_path / "pics" / "view.png")
    p = tmp_path / "img.jsonl"
    p.write_text(json.dumps({"prompt": "a green square", "image": "pics/in.png", "strength": 0.5, "steps": 6,
                             "seed": 4, "id": "half"}) + "\n"
                 + json.dumps({"prompt": "a green square", "image": "pics/in.png", "steps": 5, "seed": 4}) + "\n"
                 + json.dumps({"prompt": "a green square", "image": "pics/view.png", "steps": 5, "seed": 4,
                               "resize": "stretch", "id": "view"}) + "\n")
    items = jobs.read_items(p)
    assert items[0]["init"] is items[1]["init"]  # one decode per file
    assert [it["resize"] for it in items] == ["auto", "auto", "stretch"]
    # the job's default for lines without their own: --resize crop
    assert [it["resize"] for it in jobs.read_items(p, jobs.JobDefaults(resize="crop"))] == ["crop", "crop", "stretch"]
    out = tmp_path / "out"
    assert jobs.run_batch(items, out, progress=False).done == 3
    pipe = Pipeline.from_pretrained("shapes-vp")
    view = json.loads((out / "view.json").read_text())  # a 2x view, scaled back: the native image's result
    assert np.array_equal(_images(out, view)[0], _images(out, json.loads((out / "000001.json").read_text()))[0])
    assert view["metadata"][0]["resize"] == "stretch" and view["metadata"][0]["init_image"]["size"] == [64, 64]
    for item_id, strength, steps in (("half", 0.5, 6), ("000001", 0.8, 5)):
        rec = json.loads((out / f"{item_id}.json").read_text())
        direct = pipe("a green square", image=img, strength=strength, steps=steps, seed=4)
        assert np.array_equal(_images(out, rec)[0], direct.images[0]) and rec["nfe"] == direct.nfe
        meta = rec["metadata"][0]
        assert meta["strength"] == strength and meta["init_image"]["path"] == "pics/in.png"
        assert meta["init_image"]["sha256"] == hashlib.sha256((tmp_path / "pics" / "in.png").read_bytes()).hexdigest()
    # bad image lines are reported with their line number before anything runs
    (tmp_path / "notes.png").write_text("not a picture")
    Image.new("RGB", (48, 32)).save(tmp_path / "wide.png")
    for line, words in [({"prompt": "x", "strength": 0.5}, "strength needs an image"),
                        ({"prompt": "x", "image": "missing.png"}, "cannot read image 'missing.png'"),
                        ({"prompt": "x", "image": "notes.png"}, "image 'notes.png' is not a PNG or JPEG picture"),
                        ({"prompt": "x", "image": "pics/in.png", "strength": 0}, "strength must be above 0"),
                        ({"prompt": "x", "resize": "crop"}, "resize needs an image"),
                        ({"prompt": "x", "image": "pics/in.png", "resize": "fit"}, "resize must be one of auto"),
                        ({"prompt": "x", "image": "wide.png"}, 'the input image is 48x32 pixels, not square, and '
                                                               'model \'shapes-vp\' takes 32x32 images: use '
                                                               '"resize": "crop"'),
                        ({"prompt": "x", "image": "wide.png", "resize": "crop", "model": "shapes-vq"},
                         "unknown model 'shapes-vq'; did you mean 'shapes-vp'?")]:
        p.write_text(json.dumps(line) + "\n")
        with pytest.raises(ValueError, match=r"img.jsonl:1: " + re.escape(words)):
            jobs.read_items(p)


def test_compose_field_and_default(tmp_path):
    from noisewise.pipeline import Pipeline

    prompt = "a red circle on the left and a blue square on the right"
    p = tmp_path / "compose.jsonl"
    p.write_text(json.dumps({"prompt": prompt, "compose": "off", "steps": 2, "seed": 1, "id": "off"}) + "\n"
                 + json.dumps({"prompt": prompt, "steps": 2, "seed": 1, "id": "default"}) + "\n")
    items = jobs.read_items(p, jobs.JobDefaults(compose="regions"))
    assert [i["compose"] for i in items] == ["off", "regions"]  # the line wins over the job default
    out = tmp_path / "out"
    assert jobs.run_batch(items, out, progress=False).done == 2
    pipe = Pipeline.from_pretrained("shapes-vp")
    for item_id, mode in (("off", "off"), ("default", "regions")):
        rec = json.loads((out / f"{item_id}.json").read_text())
        direct = pipe(prompt, compose=mode, steps=2, seed=1)
        assert np.array_equal(_images(out, rec)[0], direct.images[0]) and rec["nfe"] == direct.nfe
        assert rec["metadata"][0].get("compose", "off") == mode
    off, default = (json.loads((out / f"{k}.json").read_text())["nfe"] for k in ("off", "default"))
    assert default > off  # the regions rows were spent
    p.write_text(json.dumps({"prompt": prompt, "compose": "region"}) + "\n")
    with pytest.raises(ValueError, match=r"compose.jsonl:1: compose must be one of off, and, regions"):
        jobs.read_items(p)


def test_negative_scale_field(tmp_path):
    from noisewise.pipeline import Pipeline

    p = tmp_path / "neg.jsonl"
    p.write_text(json.dumps({"prompt": "a red circle", "steps": 2, "seed": 3, "negative_scale": 0.5, "id": "n"}) + "\n")
    out = tmp_path / "out"
    assert jobs.run_batch(jobs.read_items(p), out, progress=False).done == 1
    rec = json.loads((out / "n.json").read_text())
    direct = Pipeline.from_pretrained("shapes-vp")("a red circle", steps=2, seed=3, negative_scale=0.5)
    assert np.array_equal(_images(out, rec)[0], direct.images[0]) and rec["metadata"][0]["negative_scale"] == 0.5
    p.write_text(json.dumps({"prompt": "a red circle", "negative_scale": -2}) + "\n")
    with pytest.raises(ValueError, match=r"neg.jsonl:1: negative_scale must be from 0 to 50, got -2"):
        jobs.read_items(p)
    # the job default fills items without one; a line's own value wins
    p.write_text(json.dumps({"prompt": "a"}) + "\n" + json.dumps({"prompt": "b", "negative_scale": 1.5}) + "\n")
    assert [i["negative_scale"] for i in jobs.read_items(p, jobs.JobDefaults(negative_scale=0.25))] == [0.25, 1.5]
    with pytest.raises(ValueError, match="neg.jsonl:1: negative_scale must be"):
        jobs.read_items(p, jobs.JobDefaults(negative_scale=float("nan")))


def test_negative_above_field(tmp_path):
    """A line's ``negative_above`` (or the job's) reaches the pipeline: the same image as in Python."""
    from noisewise.pipeline import Pipeline

    p = tmp_path / "gate.jsonl"
    p.write_text(json.dumps({"prompt": "a red circle", "steps": 3, "seed": 3, "negative_scale": 1.0, "id": "g"}) + "\n")
    out = tmp_path / "out"
    assert jobs.run_batch(jobs.read_items(p, jobs.JobDefaults(negative_above=1.0)), out, progress=False).done == 1
    rec = json.loads((out / "g.json").read_text())
    direct = Pipeline.from_pretrained("shapes-vp")("a red circle", steps=3, seed=3, negative_scale=1.0,
                                                  negative_above=1.0)
    assert np.array_equal(_images(out, rec)[0], direct.images[0]) and rec["metadata"][0]["negative_above"] == 1.0
    p.write_text(json.dumps({"prompt": "a", "negative_above": 0.5}) + "\n")
    assert [i["negative_above"] for i in jobs.read_items(p, jobs.JobDefaults(negative_above=1.0))] == [0.5]


def test_negative_perpendicular_field(tmp_path):
    """A line's ``negative_perpendicular`` (or the job's) reaches the pipeline: the same image as in
    Python; a non-boolean stops the job when the file is read, naming its line."""
    from noisewise.pipeline import Pipeline

    p = tmp_path / "perp.jsonl"
    p.write_text(json.dumps({"prompt": "a red circle", "steps": 3, "seed": 3, "negative_scale": 1.0, "id": "q"}) + "\n")
    out = tmp_path / "out"
    items = jobs.read_items(p, jobs.JobDefaults(negative_perpendicular=True))
    assert jobs.run_batch(items, out, progress=False).done == 1
    rec = json.loads((out / "q.json").read_text())
    direct = Pipeline.from_pretrained("shapes-vp")("a red circle", steps=3, seed=3, negative_scale=1.0,
                                                  negative_perpendicular=True)
    assert np.array_equal(_images(out, rec)[0], direct.images[0])
    assert rec["metadata"][0]["negative_perpendicular"] is True
    p.write_text(json.dumps({"prompt": "a", "negative_perpendicular": False}) + "\n")
    assert [i["negative_perpendicular"] for i in jobs.read_items(p, jobs.JobDefaults(negative_perpendicular=True))] \
        == [False]
    p.write_text(json.dumps({"prompt": "a", "negative_perpendicular": "yes"}) + "\n")
    with pytest.raises(ValueError, match=r"perp.jsonl:1: negative_perpendicular must be true, false or null"):
        jobs.read_items(p)


def test_cli_batch_negative_scale_default(tmp_path):
    from tests.test_cli_generate import run_cli

    p = tmp_path / "p.jsonl"
    p.write_text(json.dumps({"prompt": "a red circle", "steps": 2, "id": "a"}) + "\n"
                 + json.dumps({"prompt": "a blue square", "steps": 2, "id": "b", "negative_scale": 1.5}) + "\n")
    r = run_cli("batch", str(p), "--out", str(tmp_path / "out"), "--negative-scale", "0.5", "--negative-perpendicular",
                "--quiet")
    assert r.returncode == 0, r.stderr
    meta = [json.loads((tmp_path / "out" / f"{i}.json").read_text())["metadata"][0] for i in "ab"]
    assert [m["negative_scale"] for m in meta] == [0.5, 1.5]
    assert [m["negative_perpendicular"] for m in meta] == [True, True]
    bad = run_cli("batch", str(p), "--out", str(tmp_path / "bad"), "--negative-scale", "-1")
    assert bad.returncode != 0 and "--negative-scale must be from 0 to 50, got -1" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_an_item_that_fails_is_reported_and_the_job_goes_on(tmp_path, monkeypatch, capsys):
    """One item failing at run time writes nothing for it, the others are generated, the command says
    which failed and why and exits 1; the same command again redoes only that item."""
    from noisewise.cli import main

    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": f"a red circle {i}", "steps": 1, "id": f"i{i}"}) + "\n"
                         for i in range(3)))
    run = jobs.ItemRunner.run

    def flaky(self, item):
        if item["id"] == "i1":
            raise RuntimeError("the network returned NaN")
        return run(self, item)

    monkeypatch.setattr(jobs.ItemRunner, "run", flaky)
    out = tmp_path / "out"
    assert main(["batch", str(p), "--out", str(out), "--quiet"]) == 1
    said = capsys.readouterr()
    assert "2 item(s) generated, 0 already done, 1 failed, 3 in all" in said.out
    assert "item i1 failed: RuntimeError: the network returned NaN" in said.err and "Traceback" not in said.err
    assert sorted(f.name for f in out.iterdir()) == ["i0.json", "i0.png", "i2.json", "i2.png"]
    monkeypatch.setattr(jobs.ItemRunner, "run", run)
    assert main(["batch", str(p), "--out", str(out), "--quiet"]) == 0
    assert "1 item(s) generated, 2 already done, 3 in all" in capsys.readouterr().out
    assert (out / "i1.json").is_file()
    rep = jobs.run_batch(jobs.read_items(p), out, progress=False)
    assert (rep.done, rep.skipped, rep.failed) == (0, 3, {})
