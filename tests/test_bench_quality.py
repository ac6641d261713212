"""bench/bench_quality.py (issue 6): its statistics against exact references, and the report's
structure and sanity on real (tiny) runs of the shipped models."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from noisewise.shapes.evaluator import frechet_distance

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("bench_quality", ROOT / "bench" / "bench_quality.py")
bq = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bq)


@pytest.mark.parametrize("n,d", [(12, 40), (64, 256), (300, 32)])
def test_fast_fd_equals_evaluator_fd(n, d):
    g = torch.Generator().manual_seed(n)
    ref = torch.randn(500, d, generator=g) * torch.linspace(0.5, 2.0, d) + 0.3
    f = torch.randn(n, d, generator=g) @ (torch.eye(d) + 0.1 * torch.randn(d, d, generator=g)) + 1.0
    fd = bq.FDRef(ref)
    want = frechet_distance(f, ref)
    assert fd(f) == pytest.approx(want, rel=1e-7, abs=1e-7)
    assert fd(ref) == pytest.approx(frechet_distance(ref, ref), abs=1e-6 * float(torch.cov(ref.T).trace()))


def test_bootstrap_ratio_of_identical_sets_is_one_and_brackets_a_shift():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(400, 8, generator=g)
    f = torch.randn(60, 8, generator=g)
    fd = bq.FDRef(ref)
    lo, hi = bq.bootstrap_ratio(fd, f, f, reps=30)
    assert lo == pytest.approx(1.0) and hi == pytest.approx(1.0)
    lo, hi = bq.bootstrap_ratio(fd, f + 2.0, f, reps=60)
    point = fd(f + 2.0) / fd(f)
    assert 1.0 < lo <= hi and lo < point * 1.5


def test_diversity_and_saturation_on_hand_built_inputs():
    # two prompts x three seeds; features of a group at distance 1 / 3 apart
    f = torch.tensor([[0.0], [1.0], [2.0], [5.0], [5.0], [5.0]])
    # pairwise distances group 1: 1, 2, 1 (each twice) -> mean 4/3; group 2: 0
    assert bq.diversity(f, 2) == pytest.approx((4 / 3 + 0) / 2)
    img = np.zeros((2, 32, 32, 3), np.uint8)
    img[0, 10:20, 10:20] = (255, 0, 0)  # pure red square on black: saturation 1
    img[1] = 128
    img[1, 5:10, 5:10] = (200, 200, 200)  # grey object on grey: saturation 0
    obj, whole = bq.saturation(img)
    assert obj == pytest.approx(0.5)
    assert whole == pytest.approx((100 / 1024) / 2)


def _row(model, impl, sampler, nfe, ratio):
    return {"section": "speed", "model": model, "impl": impl, "sampler": sampler, "nfe": nfe, "fd_ratio": ratio,
            "speedup_time": 1000 / nfe, "speedup_calls": 1000 / nfe, "all": 0.5}


def test_reach_table_takes_the_first_nfe_that_stays_within():
    rows = {str(i): r for i, r in enumerate([
        _row("m", "noisewise", "a", 4, 1.5), _row("m", "noisewise", "a", 8, 1.04), _row("m", "noisewise", "a", 10, 1.2),
        _row("m", "noisewise", "a", 15, 1.01), _row("m", "noisewise", "a", 20, 0.97),
        _row("m", "noisewise", "b", 4, 1.3), _row("m", "noisewise", "b", 8, 1.06),
        _row("m", "noisewise", "c", 4, 0.8), _row("m", "noisewise", "c", 8, 0.9),
    ])}
    t = {r["sampler"]: r for r in bq.reach_table(rows)}
    assert t["a"]["reach_nfe"] == 15 and t["a"]["reach_nfe_no_worse"] == 15  # 8 dips in but 10 leaves again
    assert t["a"]["speedup_calls"] == pytest.approx(1000 / 15)
    assert t["a"]["closest_nfe"] == 15
    assert t["b"]["reach_nfe"] is None and t["b"]["speedup_time"] is None
    # 20% below DDPM is not "within 5%", but it is "no worse"
    assert t["c"]["reach_nfe"] is None and t["c"]["reach_nfe_no_worse"] == 4


def _check_report(out: Path, models: list[str], ddpm_nfes_expected: bool) -> dict:
    for name in ("quality.md", "quality.json", "quality_speed.csv", "quality_reach.csv", "quality_guidance.csv",
                 "quality_negative.csv", "quality_speed.png", "quality_guidance.png", "quality_samples.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    doc = json.loads((out / "quality.json").read_text())
    rows = doc["rows"]
    ref = [r for r in rows.values() if r.get("reference")]
    assert len(ref) == 1 and ref[0]["sampler"] == "ddpm"
    for r in rows.values():
        for k in ("all", "color", "shape", "position", "size", "defect_rate"):
            if not math.isnan(r[k]):
                assert 0.0 <= r[k] <= 1.0, (r["key"], k)
        assert r["fd"] > 0 and r["sec_per_image"] > 0
        if r["section"] == "speed":
            assert r["calls_per_image"] <= r["nfe"], r["key"]
            assert r["fd_ratio"] == pytest.approx(r["fd"] / ref[0]["fd"])
        if r["section"] == "guidance":
            assert r["diversity"] >= 0 and r["saturation"] >= 0
        if r["section"] == "negative" and r["prompt_set"] == "nocolor":
            assert 0.0 <= r["red_fraction"] <= 1.0
    # every row of the table is in the markdown, and the reach answer agrees with the rows
    md = (out / "quality.md").read_text()
    for r in rows.values():
        if r["section"] == "speed":
            assert f"| {r['model']} | {r['impl']} | {r['sampler']} |" in md
    for t in doc["meta"]["reach"]:
        rs = sorted([r for r in rows.values() if r["section"] == "speed" and r["model"] == t["model"]
                     and r["impl"] == t["impl"] and r["sampler"] == t["sampler"]], key=lambda r: r["nfe"])
        ok = [r["nfe"] for i, r in enumerate(rs) if all(abs(x["fd_ratio"] - 1) <= 0.05 for x in rs[i:])]
        assert t["reach_nfe"] == (ok[0] if ok else None)
        ok = [r["nfe"] for i, r in enumerate(rs) if all(x["fd_ratio"] <= 1.05 for x in rs[i:])]
        assert t["reach_nfe_no_worse"] == (ok[0] if ok else None)
    for p in doc["meta"]["parity"]:  # ours and diffusers agree at equal settings, closely on their defaults
        assert p["max_abs_diff_same_times"] < 1e-4 * p["latent_rms"], p
        assert p["rms_diff"] < 0.1 * p["latent_rms"], p
    return doc


def test_tiny_run_writes_a_consistent_report(tmp_path):
    out = tmp_path / "out"
    args = ["--models", "shapes-vp", "--prompts", "3", "--guidance-prompts", "2", "--guidance-seeds", "2",
            "--nocolor-prompts", "2", "--ref-per-prompt", "3", "--nfe", "4", "8", "--ddpm-steps", "12",
            "--samplers", "ddim", "dpmpp_2m", "auto", "--schedulers", "DDIMScheduler", "--scales", "1", "4",
            "--methods", "cfg", "apg", "--guidance-nfe", "3", "--default-steps", "3", "--bootstrap", "5",
            "--out", str(out), "--cache", str(tmp_path / "cache")]
    # in two parts, as parallel runs do: the second sees the first's rows through the cache
    bq.main(args + ["--sections", "reference", "speed"])
    assert not any("|diffusers|" in k for k in json.loads((out / "quality.json").read_text())["rows"])
    bq.main(args + ["--sections", "diffusers", "guidance", "negative"])
    doc = _check_report(out, ["shapes-vp"], False)
    keys = set(doc["rows"])
    for s in ("ddim", "dpmpp_2m", "auto"):
        for n in (4, 8):
            assert f"shapes-vp|ours|{s}|{n}" in keys
    assert {"shapes-vp|diffusers|DDIMScheduler|4", "shapes-vp|guidance|apg|4",
            "shapes-vp|negative|nocolor|red|2"} <= keys
    # a full run resumes: nothing is sampled again, the rows are identical
    before = json.loads((out / "quality.json").read_text())["rows"]
    bq.main(args)
    after = json.loads((out / "quality.json").read_text())["rows"]
    assert {k: v["fd"] for k, v in before.items()} == {k: v["fd"] for k, v in after.items()}
    assert {k: v["seconds"] for k, v in before.items()} == {k: v["seconds"] for k, v in after.items()}


@pytest.mark.slow
def test_quick_mode(tmp_path):
    out = tmp_path / "out"
    bq.main(["--quick", "--out", str(out), "--cache", str(tmp_path / "cache")])
    doc = _check_report(out, ["shapes-vp", "shapes-flow"], True)
    rows = doc["rows"]
    # more steps do not make DDPM worse beyond the noise of 8 images (one image = 0.125). FD on 8 images in
    # 256 dimensions rewards low spread (a blurry 4-step set can score lower than DDPM-50), so FD only
    # guards against a collapse here; accuracy and defects carry the comparison.
    ddpm = sorted([r for r in rows.values() if r["section"] == "speed" and r["sampler"] == "ddpm"],
                  key=lambda r: r["nfe"])
    ref = next(r for r in rows.values() if r.get("reference"))
    assert len(ddpm) >= 2
    for more, fewer in ((ddpm[-1], ddpm[0]), (ref, ddpm[0]), (ref, ddpm[-1])):
        assert more["all"] >= fewer["all"] - 0.25, (more["key"], fewer["key"])
        assert more["defect_rate"] <= fewer["defect_rate"] + 0.25, (more["key"], fewer["key"])
        assert more["fd"] <= 2.0 * fewer["fd"], (more["key"], fewer["key"])
    for m in ("shapes-vp", "shapes-flow"):
        assert any(r["model"] == m and r["section"] == "guidance" for r in rows.values())

