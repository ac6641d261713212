"""``noisewise generate`` end to end, in a subprocess: files, metadata, and clean errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("PIL")

from noisewise.pipeline import available_models  # noqa: E402

SRC = str(Path(__file__).resolve().parent.parent / "src")


def run_cli(*args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **extra_env, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "noisewise.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.mark.skipif("shapes-vp" not in available_models(), reason="shipped weights not present")
def test_generate_writes_pngs_with_parameters(tmp_path):
    from PIL import Image

    out = tmp_path / "sub" / "out.png"
    r = run_cli("generate", "a large red circle on the left", "--steps", "2", "--num-images", "2", "--seed", "3",
                "--out", str(out), "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert str(out) in r.stdout and "Traceback" not in r.stderr
    assert "accelerate" not in r.stderr  # diffusers' advice to install it, printed on every load, is not
    view = Image.open(out)
    assert view.size == (8 * (2 * 32 + 1), 8 * 32)  # two 32x32 images side by side, 8x, 1-pixel gap
    params = json.loads(view.text["parameters"])
    assert params["prompt"] == "a large red circle on the left" and params["seeds"] == [3, 4]
    assert params["negative_prompt"] == "blurry, watermark" and params["steps"] == 2
    native = Image.open(tmp_path / "sub" / "out-1.png")
    assert native.size == (32, 32)
    meta = json.loads(native.text["parameters"])
    assert meta["seed"] == 4 and meta["model"] == "shapes-vp" and meta["sampler"] == "dpmpp_2m"
    # the native image is the view's pixels (pixel-exact upscaling)
    import numpy as np

    v = np.asarray(view.convert("RGB"))[::8, ::8][:, 33:]
    np.testing.assert_array_equal(v, np.asarray(native.convert("RGB")))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "shapes-pv"], "did you mean 'shapes-vp'"),
        (["--out", "/proc/forbidden/out.png"], "cannot"),
        (["--out", "x.jpg"], ".png"),
        (["--num-images", "100000"], "--num-images must be from 1 to 64"),
        (["--steps", "0"], "--steps must be from 1 to 1000"),
        (["--sampler", "dpm++2m", "--steps", "1"], "dpmpp_2m"),
        (["--spacing", "karas", "--steps", "1"], "did you mean 'karras'"),
        (["--spacing", "tuned", "--steps", "3"],
         "noisewise tune-schedule --model shapes-vp --sampler dpmpp_2m --nfe 3"),
    ],
)
def test_user_mistakes_exit_cleanly(args, message, tmp_path):
    if args[0] == "--out" and args[1].endswith(".jpg"):
        args = ["--out", str(tmp_path / "x.jpg")]
    out = [] if args[0] == "--out" else ["--out", str(tmp_path / "o.png")]
    r = run_cli("generate", "a red circle", *out, *args, "--quiet",
                NOISEWISE_TUNED_CACHE=str(tmp_path / "no-tuned-schedules.json"))
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif("shapes-vp" not in available_models(), reason="shipped weights not present")
def test_an_earlier_runs_images_are_kept_unless_overwrite(tmp_path, capsys):
    """A second run at the same --out writes <out>_2.png (and its natives) and says so; the first run's
    files are untouched. --overwrite replaces them in place."""
    from PIL import Image

    from noisewise.cli import main

    out = tmp_path / "out.png"
    args = ["generate", "a red circle", "--steps", "1", "--num-images", "2", "--quiet"]
    assert main([*args, "--seed", "1", "--out", str(out)]) == 0
    first = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(first) == ["out-0.png", "out-1.png", "out.png"]
    capsys.readouterr()
    assert main([*args, "--seed", "2", "--out", str(out)]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {tmp_path / 'out_2.png'} (a grid of 2 images")
    assert said.rstrip().endswith(f"; {out} was there already and is kept (--overwrite replaces it)")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name in first} == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-0.png", "out-1.png", "out.png", "out_2-0.png",
                                                          "out_2-1.png", "out_2.png"]
    assert json.loads(Image.open(tmp_path / "out_2-1.png").text["parameters"])["seed"] == 3
    # one native file of a run is enough to move on: out.png alone gone, out-0.png still there
    (tmp_path / "out.png").unlink()
    assert main([*args[:-3], "--quiet", "--out", str(out)]) == 0
    assert (tmp_path / "out_3.png").is_file() and not (tmp_path / "out.png").exists()
    capsys.readouterr()
    assert main([*args, "--seed", "2", "--out", str(tmp_path / "out_2.png"), "--overwrite"]) == 0
    assert "was there already" not in capsys.readouterr().out
    assert not (tmp_path / "out_2_2.png").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # written through temporary files


@pytest.mark.skipif("shapes-flow" not in available_models(), reason="shipped weights not present")
def test_from_a_png_makes_the_same_image_again(tmp_path, capsys):
    """``generate --from`` a native PNG, or a grid's view, gives the same pixels and the same parameters
    (composition, a weighted, gated, perpendicular negative, sampler options included); options given
    beside it replace the recorded ones; bad sources get one clear line."""
    import numpy as np
    from PIL import Image

    from noisewise.cli import main

    def px(p):
        return np.asarray(Image.open(p).convert("RGB"))

    def params(p):
        return json.loads(Image.open(p).text["parameters"])

    out = tmp_path / "out.png"
    assert main(["generate", "two shapes: a red circle on the left and a yellow square on the right",
                 "--model", "shapes-flow", "--sampler", "unipc", "--steps", "4", "--spacing", "karras",
                 "--guidance-scale", "3", "--seed", "7", "--num-images", "2", "--negative-scale", "0.5",
                 "--negative-above", "0.4", "--negative-perpendicular", "--region-sigma", "0.1", "--quiet",
                 "--out", str(out)]) == 0
    capsys.readouterr()
    # a native image: that one image again
    assert main(["generate", "--from", str(tmp_path / "out-1.png"), "--out", str(tmp_path / "a.png"), "--quiet"]) == 0
    assert f"pixel-identical to {tmp_path / 'out-1.png'}" in capsys.readouterr().out
    assert np.array_equal(px(tmp_path / "a-0.png"), px(tmp_path / "out-1.png"))
    assert params(tmp_path / "a-0.png") == params(tmp_path / "out-1.png")
    assert not (tmp_path / "a-1.png").exists()
    # the grid's view: the whole grid again
    assert main(["generate", "--from", str(out), "--out", str(tmp_path / "b.png"), "--quiet"]) == 0
    assert "pixel-identical" in capsys.readouterr().out
    assert np.array_equal(px(tmp_path / "b.png"), px(out))
    assert params(tmp_path / "b.png") == params(out)
    # an option given beside --from replaces the recorded one; the rest stay
    assert main(["generate", "--from", str(tmp_path / "out-1.png"), "--steps", "6", "--out", str(tmp_path / "c.png"),
                 "--quiet"]) == 0
    assert "differs from" in capsys.readouterr().out
    changed, old = params(tmp_path / "c-0.png"), params(tmp_path / "out-1.png")
    assert changed["steps"] == 6 and {k: v for k, v in changed.items() if k != "steps"} == \
        {k: v for k, v in old.items() if k != "steps"}
    # a prompt given beside --from replaces the recorded prompt
    assert main(["generate", "a green cross", "--from", str(tmp_path / "out-1.png"), "--out",
                 str(tmp_path / "d.png"), "--quiet"]) == 0
    assert params(tmp_path / "d-0.png")["prompt"] == "a green cross"
    assert params(tmp_path / "d-0.png")["negative_above"] == 0.4
    # bad sources
    plain = tmp_path / "plain.png"
    Image.new("RGB", (32, 32)).save(plain)
    for args, words in ((["--from", str(plain)], "carries no noisewise generation parameters"),
                        (["--from", str(tmp_path / "missing.png")], "cannot read --from"),
                        ([], "give a prompt")):
        assert main(["generate", *args, "--out", str(tmp_path / "e.png"), "--quiet"]) == 2
        assert words in capsys.readouterr().err


@pytest.mark.skipif("shapes-vp" not in available_models(), reason="shipped weights not present")
def test_from_an_image_to_image_png_uses_its_recorded_init_image(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from noisewise.cli import main

    src = tmp_path / "in.png"
    img = np.zeros((32, 32, 3), np.uint8)
    img[8:24, 8:24] = (220, 30, 30)
    Image.fromarray(img).save(src)
    assert main(["generate", "a blue square", "--image", str(src), "--strength", "0.6", "--steps", "5", "--seed", "3",
                 "--out", str(tmp_path / "out.png"), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["generate", "--from", str(tmp_path / "out-0.png"), "--out", str(tmp_path / "a.png"),
                 "--quiet"]) == 0
    assert "pixel-identical" in capsys.readouterr().out
    meta = json.loads(Image.open(tmp_path / "a-0.png").text["parameters"])
    assert meta["strength"] == 0.6 and meta["init_image"]["path"] == str(src)
    img[0, 0] = 255  # the init image changed since: refused unless given again on purpose
    Image.fromarray(img).save(src)
    assert main(["generate", "--from", str(tmp_path / "out-0.png"), "--out", str(tmp_path / "b.png"), "--quiet"]) == 2
    assert "is not the one recorded" in capsys.readouterr().err
    assert main(["generate", "--from", str(tmp_path / "out-0.png"), "--image", str(src), "--out",
                 str(tmp_path / "b.png"), "--quiet"]) == 0
    src.unlink()
    assert main(["generate", "--from", str(tmp_path / "out-0.png"), "--out", str(tmp_path / "c.png"), "--quiet"]) == 2
    assert "which is not there; pass it with --image" in capsys.readouterr().err
