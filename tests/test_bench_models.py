"""bench/bench_models.py on a tiny run of the shipped shapes-vp: the report's structure, its image counts
per seed setting, and the second evaluator reading exactly the images (and prompts) the first read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from noisewise.shapes.evaluator import shipped_evaluator_path  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_models", ROOT / "bench" / "bench_models.py")
bm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bm)

ATTRS = ("color", "background", "shape", "position", "size", "all", "defect_rate")


def test_bench_models_report_and_second_evaluator(tmp_path):
    out = tmp_path / "bench"
    bm.main(["--models", "shapes-vp", "--prompts", "6", "--seeds", "2", "--seeds-no-negative", "1",
             "--batch", "6", "--threads", "1", "--device", "cpu", "--out", str(out),
             "--second-evaluator", str(shipped_evaluator_path())])
    report = json.loads((out / "models.json").read_text())
    assert report["command"].startswith("python bench/bench_models.py --models shapes-vp")
    res = report["results"]
    assert set(res) == {"renders", "shapes-vp (default negative prompt)", "shapes-vp (no negative prompt)"}
    with_neg, without = res["shapes-vp (default negative prompt)"], res["shapes-vp (no negative prompt)"]
    assert (with_neg["images"], without["images"]) == (12, 6)
    assert with_neg["negative_prompt"] != "" and without["negative_prompt"] == ""
    for r in (with_neg, without):
        for k in ATTRS:
            assert 0.0 <= r[k] <= 1.0 or r[k] != r[k], k  # NaN only where no prompt names the attribute
        # the second evaluator is the shipped one too: it must agree exactly on the same images and prompts
        for k in ATTRS:
            assert r["second_evaluator"][k] == pytest.approx(r[k], nan_ok=True), k
        assert r["fd"] >= 0
    assert (out / "samples-shapes-vp.png").is_file() and (out / "models-table.md").is_file()
    table = (out / "models-table.md").read_text().splitlines()
    assert len(table) == 2 + len(res)
