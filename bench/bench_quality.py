#!/usr/bin/env python
"""The seed's sampler and guidance claims, measured on the shipped models (issue 6).

Sections (each row is one configuration, run on the same prompts and the same initial noise):

* ``speed``     every sampler at NFE in {4, 6, 8, 10, 15, 20, 30, 50} and DDPM-1000 (ancestral, the
                reference): wall time per image, forward passes, FD, attribute accuracy; the FD ratio to
                DDPM-1000 with a paired bootstrap interval.
* ``diffusers`` the same network, noise, prompts and guidance through diffusers' own schedulers
                (plain ``set_timesteps`` / ``scale_model_input`` / ``step`` loop around ``pipe.model_fn``),
                after a parity check of DDIM (ours) vs DDIMScheduler (theirs) at equal settings.
* ``guidance``  plain CFG, rescale, APG, CFG++ and the guidance interval at w in {1, 2, 3, 5, 7.5, 10, 15}:
                accuracy, FD, diversity (mean pairwise feature distance across seeds of one prompt, over
                the renders' value) and colour saturation of the object pixels (over the renders').
* ``negative``  no negative prompt, the default one, all defects, and a targeted "red" on prompts that
                name no colour (share of red objects).

Results are cached per configuration in ``quality.json`` (written after every row: an interrupted run
resumes); features for the bootstrap live in ``--cache``. Writes ``quality.md``, ``quality_*.csv``,
``quality_*.png`` into ``--out``.

    python bench/bench_quality.py                  # the documented run (< 1 h on 2 CPU cores)
    python bench/bench_quality.py --quick --out /tmp/q   # CI-sized (< 5 min)
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "docs" / "benchmarks"
NFES = (4, 6, 8, 10, 15, 20, 30, 50)
SCALES = (1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0)
WITHIN = 0.05  # "reaches DDPM-1000 quality": FD at most 5% above DDPM-1000's
DEFAULT_NEG = "blurry, watermark"
ALL_DEFECTS_NEG = "blurry, noisy, watermark"
ACC_KEYS = ("all", "color", "shape", "position", "size", "background")

# (sampler name for nw.sample or None = the recommended default, spacing or None = sampler's default)
OURS = {
    "shapes-vp": {
        "full": ["ddim", "dpmpp_2m", "auto"],
        "short": ["ddpm", "unipc", "heun", "dpmpp_3m", "dpm_solver"],  # euler: identical to ddim on VP
    },
    "shapes-flow": {
        "full": ["flow_euler", "dpmpp_2m", "auto"],
        "short": ["flow_heun", "unipc", "dpm_solver"],
    },
}
THEIRS = {
    "shapes-vp": {"full": ["DDIMScheduler"],
                  "short": ["DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "EulerDiscreteScheduler"]},
    "shapes-flow": {"full": ["FlowMatchEulerDiscreteScheduler"], "short": ["DPMSolverMultistepScheduler"]},
}
METHODS = ("cfg", "rescale", "apg", "cfg++", "interval")
SECTIONS = ("reference", "speed", "diffusers", "guidance", "negative", "parity", "report")


# ------------------------------------------------------------------------------------------------
# statistics
class FDRef:
    """Fréchet distance to a fixed reference set, fast for small generated sets: with ``X`` the centred
    generated features (n x d), the non-zero eigenvalues of ``S1^1/2 S2 S1^1/2`` are those of
    ``X S2 X^T / (n - 1)`` (n x n), so no d x d square root is needed. Equals
    :func:`noisewise.shapes.evaluator.frechet_distance` (tested)."""

    def __init__(self, ref: torch.Tensor) -> None:
        r = ref.double()
        self.mu = r.mean(0)
        self.cov = torch.cov(r.T)
        self.tr = float(self.cov.trace())

    def __call__(self, f: torch.Tensor) -> float:
        a = f.double()
        n = a.shape[0]
        mu = a.mean(0)
        x = a - mu
        if n > x.shape[1]:  # more samples than features: the d x d form (as the evaluator)
            w, v = torch.linalg.eigh(x.T @ x / (n - 1))
            s1h = (v * w.clamp(min=0).sqrt()) @ v.T
            m = s1h @ self.cov @ s1h
        else:
            m = x @ self.cov @ x.T / (n - 1)
        tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
        tr1 = float(x.pow(2).sum()) / (n - 1)
        return float((mu - self.mu).pow(2).sum() + tr1 + self.tr - 2 * tr_sqrt)


def bootstrap_ratio(fd: FDRef, f: torch.Tensor, f_base: torch.Tensor, reps: int, seed: int = 0) -> tuple[float, float]:
    """5% and 95% quantiles of FD(f[idx]) / FD(f_base[idx]) over paired resamples idx (same images)."""
    if reps <= 0:
        return float("nan"), float("nan")
    g = np.random.default_rng(seed)
    n = f.shape[0]
    r = []
    for _ in range(reps):
        idx = torch.as_tensor(g.integers(0, n, n))
        r.append(fd(f[idx]) / fd(f_base[idx]))
    return float(np.quantile(r, 0.05)), float(np.quantile(r, 0.95))


def diversity(feats: torch.Tensor, groups: int) -> float:
    """Mean pairwise L2 feature distance between images of the same prompt (rows grouped by prompt)."""
    f = feats.double().view(groups, -1, feats.shape[-1])
    d = torch.cdist(f, f)
    k = f.shape[1]
    return float(d.sum() / (groups * k * (k - 1)))


def saturation(images: np.ndarray) -> tuple[float, float]:
    """(mean HSV saturation of object pixels, of whole images). Object pixels: those further than 0.15
    (max channel difference, in [0, 1]) from the image's background, estimated as the median border pixel."""
    x = images.astype(np.float64) / 255.0
    mx, mn = x.max(-1), x.min(-1)
    s = np.where(mx > 1e-6, (mx - mn) / np.maximum(mx, 1e-6), 0.0)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    bg = np.median(border, axis=1)
    obj = np.abs(x - bg[:, None, None, :]).max(-1) > 0.15
    obj_s = [float(si[m].mean()) for si, m in zip(s, obj) if m.any()]
    return (float(np.mean(obj_s)) if obj_s else float("nan")), float(s.mean())


# ------------------------------------------------------------------------------------------------
# sampling
def sample_ours(pipe: Any, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, *, sampler: str,
                nfe: int, w: float, guidance: Any = None, spacing: str | None = None, seed: int = 0) -> tuple[Any, Any]:
    import noisewise as nw

    opts: dict[str, Any] = {}
    if sampler.endswith("+tuned"):  # e.g. "dpmpp_2m+tuned": the schedule stored by `noisewise tune-schedule`
        sampler, spacing = sampler[: -len("+tuned")], "tuned"
    name = None if sampler == "auto" else sampler
    if name is not None and nw.get_sampler(name).stochastic:
        opts["generator"] = [torch.Generator().manual_seed(10_000 + seed + i) for i in range(noise.shape[0])]
    kw: dict[str, Any] = {"steps": nfe} if name == "ddpm" else {"nfe": nfe}
    res = nw.sample(pipe.model_fn, noise, schedule=pipe.schedule, sampler=name, cond=cond, uncond=uncond,
                    guidance_scale=w, guidance=guidance, spacing=spacing, return_info=True, **kw, **opts)
    return res.x, {"steps": res.steps, "calls": res.calls, "rows": res.rows, "sampler_used": res.sampler,
                   "spacing": spacing or ("recommended" if name is None else pipe.schedule.default_spacing)}


def diffusers_scheduler(pipe: Any, cls_name: str, **overrides: Any) -> Any:
    import diffusers

    cfg_file = Path(pipe.source) / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_file.read_text())
    cls = getattr(diffusers, cls_name)
    extra: dict[str, Any] = {}
    if cfg["_class_name"] == "FlowMatchEulerDiscreteScheduler" and cls_name != cfg["_class_name"]:
        # diffusers' multistep solvers on a flow model: flow sigmas, flow prediction
        extra = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": cfg.get("shift", 1.0)}
    return cls.from_config({k: v for k, v in cfg.items() if k != "_class_name"}, **{**extra, **overrides})


def sample_theirs(pipe: Any, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, *, scheduler: str,
                  nfe: int, w: float, **overrides: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """A plain diffusers loop: set_timesteps(nfe), scale_model_input, one CFG forward (both branches in
    one batch, as ours), step."""
    sched = diffusers_scheduler(pipe, scheduler, **overrides)
    sched.set_timesteps(nfe)
    x = noise * float(getattr(sched, "init_noise_sigma", 1.0))  # FlowMatchEuler has none (1)
    scale_in = getattr(sched, "scale_model_input", lambda x, t: x)
    b = noise.shape[0]
    cc = torch.cat([cond, uncond])
    calls = 0
    for t in sched.timesteps:
        xin = scale_in(x, t)
        out = pipe.model_fn(torch.cat([xin, xin]), t.expand(2 * b).to(xin.dtype), cc)
        calls += 1
        c, u = out.chunk(2)
        x = sched.step(u + w * (c - u), t, x).prev_sample
    return x, {"steps": len(sched.timesteps), "calls": calls, "rows": 2 * b * calls, "sampler_used": scheduler,
               "spacing": sched.config.get("timestep_spacing", "")}


# ------------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        from noisewise.shapes.evaluator import Evaluator, benchmark_prompts

        self.a = a
        self.out = Path(a.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.cache = Path(a.cache)
        self.cache.mkdir(parents=True, exist_ok=True)
        self.ev = Evaluator.from_pretrained()
        pool = benchmark_prompts(max(a.prompts, a.guidance_prompts) + 400)
        self.prompts = pool[: a.prompts]
        self.gprompts = pool[: a.guidance_prompts]
        from noisewise.shapes.captions import parse_prompt

        self.nocolor = [p for p in pool if all(o.color is None for o in parse_prompt(p).objects)][: a.nocolor_prompts]
        names = ("prompts", "guidance_prompts", "guidance_seeds", "nocolor_prompts", "ref_per_prompt", "ddpm_steps",
                 "guidance_nfe", "guidance_sampler", "default_steps", "default_sampler")
        self.settings = {k: getattr(a, k) for k in names}
        self.fingerprint = hashlib.sha1(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:12]
        self.json_path = self.out / "quality.json"
        self.rows: dict[str, dict[str, Any]] = {}
        if self.json_path.is_file() and not a.fresh:
            old = json.loads(self.json_path.read_text())
            if old.get("fingerprint") == self.fingerprint:
                self.rows = old.get("rows", {})
                print(f"resuming: {len(self.rows)} rows cached in {self.json_path}", flush=True)
        for f in sorted(self.cache.glob(f"{self.fingerprint}-*.row.json")):  # rows of parallel/earlier runs
            r = json.loads(f.read_text())
            self.rows.setdefault(r["key"], r)
        self.meta: dict[str, Any] = {}
        self.refs: dict[str, Any] = {}
        self.grids: dict[str, np.ndarray] = {}
        self._pipes: dict[str, Any] = {}

    # -- references ---------------------------------------------------------------------------
    def reference(self, prompts: list[str], tag: str) -> dict[str, Any]:
        if tag in self.refs:
            return self.refs[tag]
        from noisewise.shapes.captions import parse_prompt, scene_for_request
        from noisewise.shapes.world import render

        reqs = [parse_prompt(p) for p in prompts]
        k = self.a.ref_per_prompt
        imgs = np.stack([render(scene_for_request(r, np.random.default_rng([7, i, s])))
                         for i, r in enumerate(reqs) for s in range(k)])
        feats = self.ev.features(imgs)
        ref = {"reqs": reqs, "fd": FDRef(feats), "feats": feats, "images": imgs}
        self.refs[tag] = ref
        return ref

    def pipe(self, name: str) -> Any:
        if name not in self._pipes:
            from noisewise.pipeline import Pipeline

            self._pipes = {name: Pipeline.from_pretrained(name)}  # one model in memory at a time
        return self._pipes[name]

    # -- one configuration --------------------------------------------------------------------
    def run(self, key: str, model: str, section: str, prompts_tag: str, fn: Any, info: dict[str, Any],
            grid: bool = False) -> dict[str, Any]:
        feat_file = self.cache / f"{self.fingerprint}-{_slug(key)}.pt"
        if key in self.rows and (feat_file.is_file() or section in ("guidance", "negative")):
            return self.rows[key]
        pipe = self.pipe(model)
        ref = self.reference(*self._prompt_set(prompts_tag))
        lat_file = self.cache / f"{self.fingerprint}-{_slug(key)}.latents.pt"
        if lat_file.is_file():  # sampled before, interrupted before scoring
            lat, extra, secs, load0 = torch.load(lat_file).values()
        else:
            load0 = os.getloadavg()[0]
            t0 = time.perf_counter()
            with torch.no_grad():
                lat, extra = fn(pipe)
            secs = time.perf_counter() - t0
            torch.save({"lat": lat, "extra": extra, "secs": secs, "load0": load0}, lat_file)
        with torch.no_grad():
            imgs = np.concatenate([pipe.decode(lat[i : i + 256]) for i in range(0, lat.shape[0], 256)])
        feats = self.ev.features(imgs)
        torch.save(feats, feat_file)
        from noisewise.shapes.evaluator import attribute_accuracy

        reqs = self._requests(prompts_tag)
        acc = attribute_accuracy(reqs, self.ev.predict(imgs))
        n = imgs.shape[0]
        row = {"key": key, "model": model, "section": section, **info, **extra,
               "images": n, "seconds": round(secs, 3), "sec_per_image": secs / n,
               "calls_per_image": extra["calls"], "load_avg": round((load0 + os.getloadavg()[0]) / 2, 2),
               "fd": ref["fd"](feats)}
        row.update({k: acc[k] for k in ACC_KEYS})
        row["defect_rate"] = acc["defect_rate"]
        for d in ("blurry", "noisy", "watermark"):
            row[f"rate_{d}"] = acc[f"rate_{d}"]
        if prompts_tag == "guidance":
            row["diversity"] = diversity(feats, len(self.gprompts)) / self.meta["render_diversity"]
            obj_s, img_s = saturation(imgs)
            row["saturation"] = obj_s / self.meta["render_saturation"][0]
            row["saturation_image"] = img_s / self.meta["render_saturation"][1]
        if prompts_tag == "nocolor":
            preds = self.ev.predict(imgs)
            objs = [o for p in preds for o in p.objects]
            row["red_fraction"] = float(np.mean([o.color == "red" for o in objs])) if objs else float("nan")
        if grid:
            self.grids[key] = imgs[:16]
            np.save(self.cache / f"{self.fingerprint}-{_slug(key)}-grid.npy", imgs[:16])
        self.rows[key] = row
        _atomic_write(self.cache / f"{self.fingerprint}-{_slug(key)}.row.json", json.dumps(row, default=_jsonable))
        self.save()
        print(f"[{time.strftime('%H:%M:%S')}] {key}: fd {row['fd']:.1f} all {row['all']:.3f} "
              f"{secs / n * 1000:.1f} ms/img calls {extra['calls']} load {row['load_avg']}", flush=True)
        return row

    def _prompt_set(self, tag: str) -> tuple[list[str], str]:
        return {"main": (self.prompts, "main"), "guidance": (self.gprompts, "guidance"),
                "nocolor": (self.nocolor, "nocolor")}[tag]

    def _requests(self, tag: str) -> list[Any]:
        from noisewise.shapes.captions import parse_prompt

        if tag == "guidance":
            return [parse_prompt(p) for p in self.gprompts for _ in range(self.a.guidance_seeds)]
        return [parse_prompt(p) for p in self._prompt_set(tag)[0]]

    def inputs(self, pipe: Any, tag: str, neg: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if tag == "guidance":
            prompts = [p for p in self.gprompts for _ in range(self.a.guidance_seeds)]
            seeds = [1000 * s + i for i in range(len(self.gprompts)) for s in range(self.a.guidance_seeds)]
        else:
            prompts = self._prompt_set(tag)[0]
            seeds = list(range(len(prompts)))
        return pipe.initial_noise(seeds), pipe.encode_prompt(prompts), pipe.encode_prompt([neg] * len(prompts))

    def save(self) -> None:
        doc = {"command": self.meta.get("command"), "machine": self.meta.get("machine"), "settings": self.settings,
               "fingerprint": self.fingerprint, "meta": {k: v for k, v in self.meta.items() if k not in
                                                        ("command", "machine")},
               "rows": self.rows}
        _atomic_write(self.json_path, json.dumps(doc, indent=1, default=_jsonable) + "\n")


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in s)


def _jsonable(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    raise TypeError(type(o))


# ------------------------------------------------------------------------------------------------
def parity(b: Bench, model: str, nfe: int = 10) -> dict[str, Any]:
    """Ours vs diffusers on the main prompts: DDIM / DDIMScheduler (VP), flow Euler /
    FlowMatchEulerDiscreteScheduler (flow), with ours on its default spacing and on diffusers' own
    timesteps (equal settings). Max and RMS latent difference, and the latent's RMS for scale."""
    pipe = b.pipe(model)
    w = float(pipe.defaults["guidance_scale"])
    noise, c, u = b.inputs(pipe, "main", pipe.defaults["negative_prompt"])
    ours_name, theirs_name = (("ddim", "DDIMScheduler") if model == "shapes-vp"
                              else ("flow_euler", "FlowMatchEulerDiscreteScheduler"))
    sched = diffusers_scheduler(pipe, theirs_name)
    sched.set_timesteps(nfe)
    times = [float(t) for t in sched.timesteps]
    with torch.no_grad():
        x2, _ = sample_theirs(pipe, noise, c, u, scheduler=theirs_name, nfe=nfe, w=w)
        x1, _ = sample_ours(pipe, noise, c, u, sampler=ours_name, nfe=nfe, w=w)
        x3, _ = sample_ours(pipe, noise, c, u, sampler=ours_name, nfe=nfe, w=w, spacing=times)  # type: ignore[arg-type]
        if model == "shapes-vp":  # equal settings: diffusers' last DDIM step also ends at sigma = 0
            x2b, _ = sample_theirs(pipe, noise, c, u, scheduler=theirs_name, nfe=nfe, w=w, set_alpha_to_one=True)
        else:
            x2b = x2
    rms = float(x2.pow(2).mean().sqrt())
    return {"model": model, "ours": ours_name, "theirs": theirs_name, "nfe": nfe, "latent_rms": rms,
            "max_abs_diff": float((x1 - x2).abs().max()), "rms_diff": float((x1 - x2).pow(2).mean().sqrt()),
            "max_abs_diff_same_times": float((x3 - x2b).abs().max()),
            "rms_diff_same_times": float((x3 - x2b).pow(2).mean().sqrt()),
            "diffusers_times": times}


def section_speed(b: Bench, model: str, nfes: list[int], short_nfes: list[int], sections: list[str]) -> None:
    a = b.a
    pipe = b.pipe(model)
    w = float(pipe.defaults["guidance_scale"])
    neg = pipe.defaults["negative_prompt"]

    def ours(sampler: str, nfe: int) -> Any:
        def fn(p: Any) -> Any:
            noise, c, u = b.inputs(p, "main", neg)
            return sample_ours(p, noise, c, u, sampler=sampler, nfe=nfe, w=w)
        return fn

    if model == "shapes-vp" and "reference" in sections:
        b.run(f"{model}|ddpm-ref|{a.ddpm_steps}", model, "reference", "main", ours("ddpm", a.ddpm_steps),
              {"impl": "noisewise", "sampler": "ddpm", "nfe": a.ddpm_steps, "guidance_scale": w,
               "negative_prompt": neg, "reference": True}, grid=True)
    ours_nfes, ours_short = (nfes, short_nfes) if "speed" in sections else ([], [])
    grid_cfgs = {("ddim", 10), ("dpmpp_2m", 10), ("auto", 8), ("flow_euler", 4), ("auto", 20), ("dpmpp_2m", 20)}
    full, short = OURS[model]["full"], OURS[model]["short"]
    if b.a.samplers:
        full, short = b.a.samplers, []
    for sampler in full + short:
        for nfe in (ours_nfes if sampler in full else ours_short):
            b.run(f"{model}|ours|{sampler}|{nfe}", model, "speed", "main", ours(sampler, nfe),
                  {"impl": "noisewise", "sampler": sampler, "nfe": nfe, "guidance_scale": w, "negative_prompt": neg},
                  grid=(sampler, nfe) in grid_cfgs)
    if "diffusers" not in sections:
        return
    full, short = THEIRS[model]["full"], THEIRS[model]["short"]
    if b.a.schedulers:
        full, short = b.a.schedulers, []
    for sched in full + short:
        for nfe in (nfes if sched in full else short_nfes):
            def fn(p: Any, sched: str = sched, nfe: int = nfe) -> Any:
                noise, c, u = b.inputs(p, "main", neg)
                return sample_theirs(p, noise, c, u, scheduler=sched, nfe=nfe, w=w)
            b.run(f"{model}|diffusers|{sched}|{nfe}", model, "speed", "main", fn,
                  {"impl": "diffusers", "sampler": sched, "nfe": nfe, "guidance_scale": w, "negative_prompt": neg})


def _guidance_option(method: str, w: float, hbar: float) -> tuple[Any, float]:
    """(guidance=, guidance_scale=) for a method at nominal scale w. CFG++ takes lambda: lambda = w (1 - e^-h)
    with h the grid's mean log-SNR step, i.e. the lambda whose per-step CFG scale is w on an average step."""
    import noisewise as nw

    if method == "cfg":
        return None, w
    if method == "rescale":
        return nw.Rescale(0.7), w
    if method == "apg":
        return nw.APG(), w
    if method == "interval":
        return nw.Interval(), w
    if method == "cfg++":
        return "cfg++", w * (-math.expm1(-hbar))
    raise ValueError(method)


def mean_step(pipe: Any, sampler: str, nfe: int) -> float:
    import noisewise as nw
    from noisewise.core.grid import make_grid

    n = nw.get_sampler(sampler).steps_for_nfe(nfe)
    g = make_grid(pipe.schedule, n, None)
    lams = [lv.lam for lv in g if math.isfinite(lv.lam)]
    return (lams[-1] - lams[0]) / max(1, len(lams) - 1)


def section_guidance(b: Bench, model: str, scales: list[float], methods: list[str]) -> None:
    a = b.a
    pipe = b.pipe(model)
    neg = pipe.defaults["negative_prompt"]
    hbar = mean_step(pipe, a.guidance_sampler, a.guidance_nfe)
    b.meta.setdefault("cfgpp_hbar", {})[model] = hbar
    for method in methods:
        for w in scales:
            opt, scale = _guidance_option(method, w, hbar)
            base = b.rows.get(f"{model}|guidance|cfg|{w:g}")
            if w == 1.0 and method in ("rescale", "apg", "interval") and base is not None:
                # at w = 1 these are the conditional model, as CFG (no unconditional rows): the same samples
                b.rows[f"{model}|guidance|{method}|{w:g}"] = {**base, "key": f"{model}|guidance|{method}|{w:g}",
                                                            "method": method, "same_as": base["key"]}
                continue

            def fn(p: Any, opt: Any = opt, scale: float = scale) -> Any:
                noise, c, u = b.inputs(p, "guidance", neg)
                return sample_ours(p, noise, c, u, sampler=a.guidance_sampler, nfe=a.guidance_nfe, w=scale,
                                   guidance=opt)
            b.run(f"{model}|guidance|{method}|{w:g}", model, "guidance", "guidance", fn,
                  {"impl": "noisewise", "sampler": a.guidance_sampler, "nfe": a.guidance_nfe, "method": method,
                   "guidance_scale": w, "scale_passed": scale, "negative_prompt": neg},
                  grid=method == "cfg" and w in (1.0, 2.0, 7.5, 15.0))


def section_negative(b: Bench, model: str, extra_scale: float) -> None:
    a = b.a
    pipe = b.pipe(model)
    w0 = float(pipe.defaults["guidance_scale"])
    runs = [("main", neg, w0) for neg in ("", DEFAULT_NEG, ALL_DEFECTS_NEG)]
    runs += [("nocolor", neg, w) for w in (w0, extra_scale) for neg in ("", DEFAULT_NEG, "red", "red, " + DEFAULT_NEG)]
    for tag, neg, w in runs:
        def fn(p: Any, tag: str = tag, neg: str = neg, w: float = w) -> Any:
            noise, c, u = b.inputs(p, tag, neg)
            return sample_ours(p, noise, c, u, sampler=a.default_sampler, nfe=a.default_steps, w=w)
        b.run(f"{model}|negative|{tag}|{neg or '-'}|{w:g}", model, "negative", tag, fn,
              {"impl": "noisewise", "sampler": a.default_sampler, "nfe": a.default_steps, "prompt_set": tag,
               "negative_prompt": neg, "guidance_scale": w})


# ------------------------------------------------------------------------------------------------
# analysis
def add_bootstrap(b: Bench) -> None:
    """FD ratio to the DDPM-1000 reference (and its paired bootstrap interval) for every speed row."""
    ref_key = next((k for k, r in b.rows.items() if r.get("reference")), None)
    if ref_key is None:
        return
    ref_row = b.rows[ref_key]
    fd = b.reference(b.prompts, "main")["fd"]
    base_file = b.cache / f"{b.fingerprint}-{_slug(ref_key)}.pt"
    base = torch.load(base_file) if base_file.is_file() else None
    for k, r in b.rows.items():
        if r["section"] not in ("speed", "reference"):
            continue
        r["fd_ratio"] = r["fd"] / ref_row["fd"]
        f_file = b.cache / f"{b.fingerprint}-{_slug(k)}.pt"
        if base is not None and f_file.is_file() and "fd_ratio_q05" not in r:
            lo, hi = bootstrap_ratio(fd, torch.load(f_file), base, b.a.bootstrap, seed=1)
            r["fd_ratio_q05"], r["fd_ratio_q95"] = lo, hi
        r["speedup_time"] = ref_row["sec_per_image"] / r["sec_per_image"]
        r["speedup_calls"] = ref_row["calls_per_image"] / r["calls_per_image"]


def _first_stable(rs: list[dict[str, Any]], ok: Any) -> dict[str, Any] | None:
    for i, r in enumerate(rs):
        if all(ok(x["fd_ratio"]) for x in rs[i:]):
            return r
    return None


def reach_table(rows: dict[str, dict[str, Any]], within: float = WITHIN) -> list[dict[str, Any]]:
    """Per (model, impl, sampler): the fewest NFE from which FD stays within ``within`` of DDPM-1000's
    (|FD / FD_DDPM - 1| <= within) at every larger measured NFE (None if it never does), with the measured
    speed-up there; and the same for the one-sided "no worse than" (FD / FD_DDPM <= 1 + within)."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for r in rows.values():
        if r["section"] == "speed" and "fd_ratio" in r:
            groups.setdefault((r["model"], r["impl"], r["sampler"]), []).append(r)
    out = []
    for (model, impl, sampler), rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["nfe"])
        hit = _first_stable(rs, lambda q: abs(q - 1) <= within)
        le = _first_stable(rs, lambda q: q <= 1 + within)
        best = min(rs, key=lambda r: abs(r["fd_ratio"] - 1))
        out.append({"model": model, "impl": impl, "sampler": sampler, "max_nfe": rs[-1]["nfe"],
                    "reach_nfe": hit["nfe"] if hit else None,
                    "fd_ratio": hit["fd_ratio"] if hit else None,
                    "fd_ratio_q05": hit.get("fd_ratio_q05") if hit else None,
                    "fd_ratio_q95": hit.get("fd_ratio_q95") if hit else None,
                    "speedup_time": hit["speedup_time"] if hit else None,
                    "speedup_calls": hit["speedup_calls"] if hit else None,
                    "all": hit["all"] if hit else None,
                    "reach_nfe_no_worse": le["nfe"] if le else None,
                    "closest_nfe": best["nfe"], "closest_fd_ratio": best["fd_ratio"]})
    return out


def _fmt(v: Any, nd: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return f"{v:.{nd}f}"
    return str(v)


def md_table(rows: list[dict[str, Any]], cols: list[tuple[str, str, int]]) -> str:
    lines = ["| " + " | ".join(h for h, _, _ in cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), nd) for _, k, nd in cols) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    with path.open("w", newline="") as fh:
        wr = csv.DictWriter(fh, fieldnames=keys)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: _fmt(v, 6) if isinstance(v, float) else v for k, v in r.items()})


def plots(b: Bench) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(b.rows.values())
    models = [m for m in b.a.models if any(r["model"] == m and r["section"] == "speed" for r in rows)]
    if models:
        fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.5), squeeze=False)
        ref = next((r for r in rows if r.get("reference")), None)
        for ax, m in zip(axes[0], models):
            groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
            for r in rows:
                if r["model"] == m and r["section"] == "speed":
                    groups.setdefault((r["impl"], r["sampler"]), []).append(r)
            for (impl, s), rs in sorted(groups.items()):
                rs.sort(key=lambda r: r["nfe"])
                ax.plot([r["nfe"] for r in rs], [r["fd"] for r in rs], "--" if impl == "diffusers" else "-",
                        marker="o", ms=3, label=f"{s} ({impl})" if impl == "diffusers" else s)
            if ref is not None:
                ax.axhline(ref["fd"], color="k", lw=1, label=f"DDPM-{ref['nfe']} (shapes-vp)")
                ax.axhline(ref["fd"] * (1 + WITHIN), color="k", lw=0.8, ls=":", label="+5%")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xticks(list(NFES))
            ax.set_xticklabels([str(n) for n in NFES])
            ax.set_xlabel("NFE (CFG forward passes per image)")
            ax.set_ylabel("FD to renders (lower is better)")
            ax.set_title(m)
            ax.legend(fontsize=6, ncol=2)
        fig.tight_layout()
        fig.savefig(b.out / "quality_speed.png", dpi=110)
        plt.close(fig)
    g = [r for r in rows if r["section"] == "guidance"]
    if g:
        gm = [m for m in b.a.models if any(r["model"] == m for r in g)]
        metrics = [("all", "attribute accuracy (all)"), ("fd", "FD to renders"), ("diversity", "diversity / renders'"),
                   ("saturation", "object saturation / renders'")]
        fig, axes = plt.subplots(len(gm), len(metrics), figsize=(16, 3.6 * len(gm)), squeeze=False)
        for i, m in enumerate(gm):
            for j, (k, lab) in enumerate(metrics):
                ax = axes[i][j]
                for method in METHODS:
                    rs = sorted([r for r in g if r["model"] == m and r["method"] == method],
                                key=lambda r: r["guidance_scale"])
                    if rs:
                        ax.plot([r["guidance_scale"] for r in rs], [r[k] for r in rs], marker="o", ms=3, label=method)
                ax.set_xlabel("guidance scale w")
                ax.set_title(f"{m}: {lab}", fontsize=9)
                if k == "fd":
                    ax.set_yscale("log")
                if i == 0 and j == 0:
                    ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(b.out / "quality_guidance.png", dpi=110)
        plt.close(fig)
    # sample grids: 16 images per row, one row per stored config
    keys = [k for k in b.rows if (b.cache / f"{b.fingerprint}-{_slug(k)}-grid.npy").is_file()]
    if keys:
        from PIL import Image, ImageDraw

        ims = [np.load(b.cache / f"{b.fingerprint}-{_slug(k)}-grid.npy") for k in keys]
        h, w = ims[0].shape[1:3]
        scale, label_w = 3, 300
        n = max(len(x) for x in ims)
        canvas = Image.new("RGB", (label_w + n * (w * scale + 2), len(ims) * (h * scale + 2)), "white")
        draw = ImageDraw.Draw(canvas)
        for i, (k, x) in enumerate(zip(keys, ims)):
            y = i * (h * scale + 2)
            draw.text((4, y + h * scale // 2 - 5), k.replace("|", " "), fill="black")
            for j, im in enumerate(x):
                canvas.paste(Image.fromarray(im).resize((w * scale, h * scale), Image.NEAREST),
                             (label_w + j * (w * scale + 2), y))
        canvas.save(b.out / "quality_samples.png")


def report(b: Bench) -> None:
    for k, r in list(b.rows.items()):  # w = 1 rows of rescale / APG / interval are CFG's (see section_guidance)
        if r["section"] == "guidance" and r["method"] == "cfg" and r["guidance_scale"] == 1.0:
            for method in ("rescale", "apg", "interval"):
                key = f"{r['model']}|guidance|{method}|1"
                if method in b.a.methods and key not in b.rows:
                    b.rows[key] = {**r, "key": key, "method": method, "same_as": k}
    add_bootstrap(b)
    reach = reach_table(b.rows)
    b.meta["reach"] = reach
    b.save()
    rows = list(b.rows.values())
    speed = sorted([r for r in rows if r["section"] in ("speed", "reference")],
                   key=lambda r: (r["model"], not r.get("reference", False), r["impl"], r["sampler"], r["nfe"]))
    guid = [r for r in rows if r["section"] == "guidance"]
    neg = [r for r in rows if r["section"] == "negative"]
    write_csv(b.out / "quality_speed.csv", speed)
    if guid:
        write_csv(b.out / "quality_guidance.csv", guid)
    if neg:
        write_csv(b.out / "quality_negative.csv", neg)
    write_csv(b.out / "quality_reach.csv", reach)
    try:
        plots(b)
    except Exception as e:  # plots are a convenience: never lose the tables over them
        print(f"plotting failed: {e!r}", flush=True)
    m = b.meta
    for r in guid:  # the CFG++ step h from the rows (lambda = w (1 - e^-h)), also when this run sampled none
        if r["method"] == "cfg++" and r["guidance_scale"] > 0:
            m.setdefault("cfgpp_hbar", {})[r["model"]] = -math.log1p(-r["scale_passed"] / r["guidance_scale"])
    sampled = [r for r in rows if not r.get("same_as")]
    total_s = sum(r["seconds"] for r in sampled)
    for r in speed:
        r["sec_per_image_ms"] = r["sec_per_image"] * 1000
    speed_table = md_table(speed, [("model", "model", 0), ("impl", "impl", 0), ("sampler", "sampler", 0),
                                   ("spacing", "spacing", 0), ("NFE", "nfe", 0), ("passes", "calls_per_image", 0),
                                   ("ms/img", "sec_per_image_ms", 1), ("FD", "fd", 1), ("FD/DDPM", "fd_ratio", 3),
                                   ("q05", "fd_ratio_q05", 3), ("q95", "fd_ratio_q95", 3), ("all", "all", 3),
                                   ("color", "color", 3), ("shape", "shape", 3), ("position", "position", 3),
                                   ("size", "size", 3), ("defects", "defect_rate", 3)])
    for r in speed:
        r.pop("sec_per_image_ms", None)
    lines = [
        "# Sampler and guidance quality on the shipped models (issue 6)", "",
        f"Produced by `{m.get('command')}` on {m.get('machine')}; {m.get('started')} to {m.get('finished')} "
        f"({m.get('wall_minutes', 0):.1f} min wall, load average {m.get('load_start')} at the start, "
        f"{m.get('load_end')} at the end: other jobs shared the 2 cores, so absolute times are noisy; every "
        f"ratio compares rows of the same run). The {len(sampled)} sampled rows may come from several resumed or "
        f"parallel invocations with the same settings (cache); their sampling took {total_s / 60:.1f} min in all, "
        "and each row records its own wall time and load average in quality.json. All numbers: "
        "[quality.json](quality.json) and the `quality_*.csv` files; the report: [../quality.md](../quality.md).", "",
        f"Settings: {json.dumps(b.settings)}. Speed rows: {len(b.prompts)} `benchmark_prompts()`, image i from "
        "`pipe.initial_noise([i])` for every configuration (paired), each model's default guidance scale and "
        "negative prompt. FD: evaluator features of the generated images vs renders of the same prompts "
        f"({b.a.ref_per_prompt} random scenes per prompt); with {len(b.prompts)} images FD is biased upwards "
        "and noisy, so compare rows (the ratio to DDPM-1000), not with models.md. q05/q95: paired bootstrap "
        f"({b.a.bootstrap} resamples of the same image indices in both rows) of the FD ratio.", "",
    ]
    if m.get("parity"):
        lines += ["## Parity: ours vs diffusers at equal settings", "",
                  "Same prompts, noise and guidance; the latent difference after sampling. 'default spacing': ours on "
                  "its own grid; 'same times': ours on diffusers' timesteps and, on VP, DDIMScheduler with "
                  "set_alpha_to_one=True (the shipped config's False ends its last step at alpha_bar[0] instead of "
                  "sigma = 0: that one step is the whole default-spacing difference).", "",
                  md_table(m["parity"], [("model", "model", 0), ("ours", "ours", 0), ("diffusers", "theirs", 0),
                                         ("NFE", "nfe", 0), ("max diff (default spacing)", "max_abs_diff", 4),
                                         ("RMS diff", "rms_diff", 4),
                                         ("max diff (same times)", "max_abs_diff_same_times", 6),
                                         ("RMS diff (same times)", "rms_diff_same_times", 6),
                                         ("latent RMS", "latent_rms", 3)]), ""]
    lines += ["## Which samplers reach DDPM-1000 quality, and at what NFE", "",
              "reach NFE: the fewest measured NFE from which FD stays within 5% of DDPM-1000's (either way: "
              "|FD / FD_DDPM - 1| <= 0.05) at every larger measured NFE ('-': never, up to max NFE); 'no worse' "
              "is the one-sided version (FD <= 1.05 FD_DDPM). Speed-up: DDPM-1000's wall time per image over "
              "the row's (and forward passes over forward passes). q05/q95: paired bootstrap of the FD ratio at "
              "the reach NFE: where it spans more than 0.95-1.05 the 5% answer is within the noise.", "",
              md_table(reach, [("model", "model", 0), ("impl", "impl", 0), ("sampler", "sampler", 0),
                               ("max NFE", "max_nfe", 0), ("reach NFE", "reach_nfe", 0),
                               ("FD ratio there", "fd_ratio", 3), ("q05", "fd_ratio_q05", 3),
                               ("q95", "fd_ratio_q95", 3), ("speed-up (time)", "speedup_time", 1),
                               ("speed-up (passes)", "speedup_calls", 1), ("acc all there", "all", 3),
                               ("no worse from NFE", "reach_nfe_no_worse", 0), ("closest NFE", "closest_nfe", 0),
                               ("closest FD ratio", "closest_fd_ratio", 3)]), "",
              "## Speed vs quality", "", "![speed](quality_speed.png)", "",
              speed_table, ""]
    if guid:
        lines += ["## Guidance", "",
                  f"{len(b.gprompts)} prompts x {b.a.guidance_seeds} seeds, {b.a.guidance_sampler}, NFE "
                  f"{b.a.guidance_nfe}, the default negative prompt as the guiding branch. diversity: mean pairwise "
                  "feature distance between the seeds of one prompt, over the same for renders (1 = as varied as the "
                  "world); saturation: mean HSV saturation of object pixels over the renders' (image: whole image). "
                  "CFG++ runs lambda = w (1 - e^-h) (h = mean log-SNR step of the grid: "
                  f"{json.dumps({k: round(v, 3) for k, v in m.get('cfgpp_hbar', {}).items()})}), the lambda whose "
                  "per-step CFG scale is w on an average step. rescale: phi 0.7 (v space); APG: the paper's "
                  "defaults; interval: sigma in (0.28, 5.42].", "", "![guidance](quality_guidance.png)", "",
                  md_table(guid, [("model", "model", 0), ("method", "method", 0), ("w", "guidance_scale", 1),
                                  ("passed", "scale_passed", 3), ("all", "all", 3), ("color", "color", 3),
                                  ("shape", "shape", 3), ("FD", "fd", 1), ("diversity", "diversity", 3),
                                  ("saturation", "saturation", 3), ("sat. image", "saturation_image", 3),
                                  ("defects", "defect_rate", 3)]), ""]
    if neg:
        lines += ["## Negative prompts", "",
                  f"main: the {len(b.prompts)} speed prompts; nocolor: {len(b.nocolor)} prompts that name no colour "
                  f"(red_fraction: share of detected objects the evaluator calls red; 1/6 of colours are red). "
                  f"{b.a.default_sampler}, NFE {b.a.default_steps}.", "",
                  md_table(neg, [("model", "model", 0), ("prompts", "prompt_set", 0),
                                 ("negative", "negative_prompt", 0),
                                 ("w", "guidance_scale", 1), ("all", "all", 3), ("color", "color", 3),
                                 ("defects", "defect_rate", 3), ("blurry", "rate_blurry", 3),
                                 ("noisy", "rate_noisy", 3), ("watermark", "rate_watermark", 3),
                                 ("red", "red_fraction", 3), ("FD", "fd", 1)]), ""]
    lines += ["Sample grids (first 16 images of a few configurations): ![samples](quality_samples.png)", ""]
    text = "\n".join(lines)
    (b.out / "quality.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="CI-sized: few prompts, few NFE, short DDPM (< 5 min)")
    ap.add_argument("--models", nargs="+", default=["shapes-vp", "shapes-flow"])
    ap.add_argument("--sections", nargs="+", default=list(SECTIONS),
                    help="what to run (rows cached by earlier or parallel runs are reused; 'report' alone rebuilds "
                         "the tables from the cache)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--guidance-prompts", type=int, default=12)
    ap.add_argument("--guidance-seeds", type=int, default=3)
    ap.add_argument("--nocolor-prompts", type=int, default=24)
    ap.add_argument("--ref-per-prompt", type=int, default=16, help="renders per prompt in the FD reference")
    ap.add_argument("--nfe", type=int, nargs="+", default=list(NFES))
    ap.add_argument("--short-nfe", type=int, nargs="+", default=None,
                    help="NFE list for the secondary samplers (default: those of --nfe up to 20)")
    ap.add_argument("--samplers", nargs="+", default=None, help="noisewise samplers to run ('auto' = the "
                    "recommended default; NAME+tuned = NAME on the schedule `noisewise tune-schedule` stored for "
                    "this model, NFE and the default guidance) at every --nfe, instead of the built-in per-model lists")
    ap.add_argument("--schedulers", nargs="+", default=None, help="diffusers schedulers instead of the built-in lists")
    ap.add_argument("--ddpm-steps", type=int, default=1000)
    ap.add_argument("--scales", type=float, nargs="+", default=list(SCALES))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    ap.add_argument("--guidance-sampler", default="dpmpp_2m")
    ap.add_argument("--guidance-nfe", type=int, default=8)
    ap.add_argument("--default-sampler", default="dpmpp_2m", help="sampler of the negative-prompt section")
    ap.add_argument("--default-steps", type=int, default=10)
    ap.add_argument("--bootstrap", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(OUT))
    ap.add_argument("--cache", default=str(ROOT / "out" / "bench_quality_cache"))
    ap.add_argument("--fresh", action="store_true", help="ignore cached rows")
    a = ap.parse_args(argv)
    if a.quick:
        a.prompts, a.guidance_prompts, a.guidance_seeds, a.nocolor_prompts = 8, 3, 2, 6
        a.ref_per_prompt, a.ddpm_steps, a.bootstrap = 4, 50, 50
        a.nfe, a.scales, a.guidance_nfe, a.default_steps = [4, 10], [1.0, 5.0], 4, 4
    if a.short_nfe is None:
        a.short_nfe = [n for n in a.nfe if n <= 20]
    for m in a.models:
        if m not in OURS:
            raise SystemExit(f"unknown model {m!r}; choose from {sorted(OURS)}")
    bad = [s for s in a.sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")
    torch.set_num_threads(a.threads)
    b = Bench(a)
    t0 = time.time()
    b.meta.update({
        "command": "python " + " ".join([os.path.relpath(sys.argv[0], ROOT) if argv is None else
                                        "bench/bench_quality.py"] + (sys.argv[1:] if argv is None else list(argv))),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU, {a.threads} torch thread(s), "
                   f"torch {torch.__version__}",
        "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_start": round(os.getloadavg()[0], 2),
    })
    # reference statistics of the renders for the guidance metrics
    if "guidance" in a.sections:
        gref = b.reference(b.gprompts, "guidance")
        k = a.ref_per_prompt
        b.meta["render_diversity"] = diversity(gref["feats"], len(b.gprompts))
        b.meta["render_saturation"] = saturation(gref["images"])
        del k
    b.reference(b.nocolor, "nocolor")
    if "diffusers" in a.sections or "parity" in a.sections:
        for m in a.models:
            f = b.cache / f"{b.fingerprint}-parity2-{m}.json"
            if not f.is_file():
                _atomic_write(f, json.dumps(parity(b, m)))
                print("parity:", f.read_text(), flush=True)
    b.meta["parity"] = [json.loads(f.read_text()) for f in sorted(b.cache.glob(f"{b.fingerprint}-parity2-*.json"))]
    for m in a.models:
        if {"reference", "speed", "diffusers"} & set(a.sections):
            section_speed(b, m, a.nfe, a.short_nfe, a.sections)
        if "guidance" in a.sections:
            section_guidance(b, m, a.scales, a.methods)
        if "negative" in a.sections:
            section_negative(b, m, 5.0)
    b.meta.update({"finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   "wall_minutes": (time.time() - t0) / 60, "load_end": round(os.getloadavg()[0], 2)})
    report(b)


if __name__ == "__main__":
    main()
