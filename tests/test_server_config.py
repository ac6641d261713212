"""The server's operator settings are checked where they are made: ``ServerConfig`` (Python) and
``noisewise serve`` / ``noisewise batch`` options, from one table (``noisewise.limits.SERVER_SETTINGS``),
each refusal naming the setting (or the option) and what it takes."""

from __future__ import annotations

import pytest

from noisewise import limits
from noisewise.server import ServerConfig

BAD = {  # setting -> values it must refuse
    "max_active": [0, -1, 2.5, True, "4"],
    "max_queue": [-1, 1.5],
    "max_batch": [0],
    "max_wait_s": [-0.001, float("nan")],
    "max_steps": [0, limits.STEPS[1] + 1],
    "max_images": [0, limits.NUM_IMAGES[1] + 1],
    "max_prompt_chars": [0, 2001],
    "request_timeout_s": [0, -5.0, float("inf")],
    "max_body_bytes": [100],
    "max_image_bytes": [0],
    "max_image_pixels": [-1],
    "shutdown_grace_s": [-1.0],
    "torch_threads": [0],
}


def test_the_table_covers_every_numeric_setting():
    import dataclasses

    numeric = {f.name for f in dataclasses.fields(ServerConfig)
               if f.name not in ("models", "preload", "batching", "device")}
    assert set(limits.SERVER_SETTINGS) == numeric == set(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_settings_are_refused_by_name(name):
    for v in BAD[name]:
        with pytest.raises(ValueError, match=f"^{name} must be a (whole )?number"):
            ServerConfig(**{name: v})


def test_good_settings_pass_and_whole_floats_become_ints():
    c = ServerConfig(max_queue=0, max_steps=4.0, request_timeout_s=1, max_wait_s=0, shutdown_grace_s=0,
                     torch_threads=None)
    assert c.max_steps == 4 and isinstance(c.max_steps, int) and c.max_queue == 0
    assert c.request_timeout_s == 1.0 and isinstance(c.request_timeout_s, float)
    assert ServerConfig(torch_threads=2).torch_threads == 2


def test_models_and_preload_are_checked():
    with pytest.raises(ValueError, match="models must name at least one model"):
        ServerConfig(models=(), preload=())
    with pytest.raises(ValueError, match="preload names 'shapes-flw', not among the models"):
        ServerConfig(models=("shapes-vp", "shapes-flow"), preload=("shapes-flw",))
    assert ServerConfig(models=["shapes-vp"], preload=[]).models == ("shapes-vp",)
    assert ServerConfig(models=("shapes-flow",)).preload == ("shapes-flow",)  # default: the first model
    assert ServerConfig(models="shapes-flow").models == ("shapes-flow",)  # one name, not its letters
    assert ServerConfig(preload="shapes-flow").preload == ("shapes-flow",)


@pytest.mark.parametrize("args, words", [
    (["--max-batch", "0"], "--max-batch must be a whole number at least 1, got 0"),
    (["--max-active", "two"], "--max-active must be a number, got 'two'"),
    (["--timeout", "0"], "--timeout must be a number above 0, got 0"),
    (["--max-steps", "5000"], "--max-steps must be a whole number at least 1 and at most 1000"),
    (["--torch-threads", "1.5"], "--torch-threads must be a whole number at least 1, got 1.5"),
    (["--port", "70000"], "--port must be from 0 to 65535"),
])
def test_serve_options_are_checked_as_they_are_parsed(args, words, capsys):
    from noisewise.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", *args])
    assert words in capsys.readouterr().err


def test_serve_refuses_a_stray_preload_in_one_line(capsys):
    from noisewise.cli import main

    rc = main(["serve", "--models", "shapes-vp", "--preload", "shapes-flow"])
    err = capsys.readouterr().err
    assert rc == 2 and "--preload names 'shapes-flow', not among the models" in err and "Traceback" not in err


def test_batch_options_are_checked(capsys):
    from noisewise.cli import build_parser

    for args, words in ((["--workers", "0"], "--workers must be from 1 to 4096"),
                        (["--torch-threads", "0"], "--torch-threads must be a whole number at least 1")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["batch", "p.jsonl", "--out", "o", *args])
        assert words in capsys.readouterr().err
    a = build_parser().parse_args(["serve", "--max-queue", "0", "--timeout", "2.5", "--torch-threads", "2"])
    assert (a.max_queue, a.timeout, a.torch_threads) == (0, 2.5, 2)


def test_serve_refuses_an_unknown_model_before_listening(tmp_path):
    """A typo in --models (or a folder that is no model) stops ``noisewise serve`` in one line with exit 2,
    instead of a server that listens but never turns ready."""
    from tests.test_cli_generate import run_cli

    r = run_cli("serve", "--models", "shapes-vp,shapes-vq", "--port", "0", timeout=120)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "--models: unknown model 'shapes-vq'; did you mean 'shapes-vp'?" in r.stderr
    assert "Traceback" not in r.stderr and "Uvicorn running" not in r.stderr
    r = run_cli("serve", "--models", str(tmp_path), "--port", "0", timeout=120)
    assert r.returncode == 2 and "is not a model folder" in r.stderr
