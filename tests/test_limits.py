"""One table of ranges (noisewise.limits) for the user-facing entry points: noisewise generate, the HTTP
schema and batch files / options all accept exactly its ranges."""

import json
import math

import pytest

from noisewise import limits

FIELDS = {  # request field -> (its range, the command-line option)
    "steps": (limits.STEPS, "--steps"),
    "guidance_scale": (limits.GUIDANCE_SCALE, "--guidance-scale"),
    "negative_scale": (limits.NEGATIVE_SCALE, "--negative-scale"),
    "negative_above": (limits.NEGATIVE_ABOVE, "--negative-above"),
    "seed": (limits.SEED, "--seed"),
    "num_images": (limits.NUM_IMAGES, "--num-images"),
}


def test_checks_take_the_range_and_refuse_the_rest():
    assert limits.check_int(3, (1, 5), "n") == 3 and limits.check_int(5.0, (1, 5), "n") == 5
    assert limits.check_float(2, (0.0, 50.0), "w") == 2.0 and limits.check_float(50, (0.0, 50.0), "w") == 50.0
    for bad in (0, 6, 2.5, True, "3", None, math.nan):
        with pytest.raises(ValueError, match="n must be"):
            limits.check_int(bad, (1, 5), "n")
    for bad in (-0.1, 50.5, math.inf, math.nan, True, "3", None):
        with pytest.raises(ValueError, match="w must be"):
            limits.check_float(bad, (0.0, 50.0), "w")


def test_http_schema_has_the_table_ranges():
    pytest.importorskip("fastapi")
    from noisewise.server.app import GenerateRequest

    props = GenerateRequest.model_json_schema()["properties"]
    for field, ((lo, hi), _) in FIELDS.items():
        alts = props[field].get("anyOf", [props[field]])
        number = next(a for a in alts if a.get("type") in ("integer", "number"))
        assert (number["minimum"], number["maximum"]) == (lo, hi), field


@pytest.mark.parametrize("command", ["generate", "batch"])
def test_command_line_options_take_the_table_ranges(command, capsys):
    from noisewise.cli import build_parser

    parser = build_parser()
    head = ["generate", "a red circle"] if command == "generate" else ["batch", "p.jsonl", "--out", "o"]
    for field, ((lo, hi), option) in FIELDS.items():
        if command == "batch" and field == "num_images":
            continue  # batch sets images per line only
        ok = parser.parse_args([*head, option, str(hi)])
        assert getattr(ok, field) == hi
        assert getattr(parser.parse_args([*head, option, str(lo)]), field) == lo
        over = hi + 1 if isinstance(hi, int) else hi + 0.5
        with pytest.raises(SystemExit):
            parser.parse_args([*head, option, str(over)])
        assert f"{option} must be from" in capsys.readouterr().err


def test_batch_lines_take_the_table_ranges(tmp_path):
    from noisewise.serving import jobs

    p = tmp_path / "p.jsonl"
    for field, ((lo, hi), _) in FIELDS.items():
        over = hi + 1 if isinstance(hi, int) else hi + 0.5
        p.write_text(json.dumps({"prompt": "x", field: lo}) + "\n" + json.dumps({"prompt": "x", field: hi}) + "\n")
        assert [i[field] for i in jobs.read_items(p)] == [lo, hi]
        p.write_text(json.dumps({"prompt": "x", field: over}) + "\n")
        with pytest.raises(ValueError, match=f"p.jsonl:1: {field} must be from"):
            jobs.read_items(p)


def test_the_resize_modes_are_the_same_everywhere(tmp_path):
    """Image-to-image ``resize``: the pipeline's check, ``generate --resize``, the HTTP schema and batch
    lines all take exactly ``limits.RESIZE_MODES``."""
    pytest.importorskip("fastapi")
    from PIL import Image

    from noisewise.cli import build_parser
    from noisewise.pipeline.img2img import check_resize
    from noisewise.server.app import GenerateRequest
    from noisewise.serving import jobs

    assert limits.RESIZE_MODES == ("auto", "crop", "stretch", "off")
    assert [check_resize(m) for m in limits.RESIZE_MODES] == list(limits.RESIZE_MODES)
    prop = GenerateRequest.model_json_schema()["properties"]["resize"]
    assert next(a["enum"] for a in prop["anyOf"] if "enum" in a) == list(limits.RESIZE_MODES)
    action = next(a for a in build_parser()._subparsers._group_actions[0].choices["generate"]._actions
                  if "--resize" in a.option_strings)
    assert list(action.choices) == list(limits.RESIZE_MODES)
    assert build_parser().parse_args(["batch", "p.jsonl", "--out", "o", "--resize", "crop"]).resize == "crop"
    Image.new("RGB", (32, 32)).save(tmp_path / "in.png")  # the model's size: every mode takes it
    p = tmp_path / "p.jsonl"
    p.write_text("".join(json.dumps({"prompt": "x", "image": "in.png", "resize": m}) + "\n"
                         for m in limits.RESIZE_MODES))
    assert [i["resize"] for i in jobs.read_items(p)] == list(limits.RESIZE_MODES)
