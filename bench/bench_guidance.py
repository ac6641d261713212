"""Guidance on the exact class-conditional Gaussian mixture, plus its cost on a real UNet.

    python bench/bench_guidance.py                      # every section (~25 min on a busy 2-core CPU)
    python bench/bench_guidance.py --only stability     # one section: adherence, negative, stability,
                                                        # interval, cost (comma-separated)
    python bench/bench_guidance.py --quick              # fewer samples and configurations
    python bench/bench_guidance.py --only cost --device cuda --out /tmp/x.json   # the cost section on a GPU,
    python bench/bench_guidance.py --merge /tmp/x.json                          # then added to the page

Writes docs/benchmarks/guidance.md, guidance.json (every number, including each stability
configuration), guidance_<section>.csv and guidance_*.png. Sections run separately merge into
guidance.json; the page is rebuilt from it.

- adherence: class adherence (fraction of samples in the requested class), diversity (within-class
  spread vs the true class's) and sliced Wasserstein distance to the true class distribution for
  w in {1, 2, 3, 5, 7.5, 10, 15}, for CFG, rescale, APG and CFG++;
- negative: the fraction of samples left in a class used as the negative prompt;
- stability: error against the exact guided ODE solution of every multistep sampler vs DDIM, at
  w = 1..15 and NFE 4..20, with and without the stiffness guard, and diffusers' schedulers at the
  reference point w = 7.5, NFE 5;
- interval: network evaluations saved by the guidance interval at equal quality;
- cost: time per step of a guided step (cond + uncond batched) vs an unguided one vs two separate
  forwards, on a diffusers UNet2DConditionModel of a few million parameters.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

import noisewise as nw  # noqa: E402
from noisewise.gmm import GaussianMixture, sliced_wasserstein  # noqa: E402
from noisewise.guidance.exact import class_of, guided_ode_solution  # noqa: E402

OUT = os.path.join(os.path.dirname(HERE), "docs", "benchmarks")
F64 = torch.float64
GMM = GaussianMixture.default()
SCHED = nw.DiscreteVP(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # Stable Diffusion's
WS = [1.0, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0]
SECTIONS = ("adherence", "negative", "stability", "interval", "cost")


def machine(device: str = "cpu") -> str:
    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} GPU, torch {torch.__version__}"
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU, {torch.get_num_threads()} torch thread(s), "
            f"torch {torch.__version__}")


def cond_denoiser(x: torch.Tensor, level: nw.Level, cls: torch.Tensor) -> torch.Tensor:
    return GMM.posterior_mean(x, level.alpha, level.sigma, cls)


def noise(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, GMM.dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def class_stats(x: torch.Tensor, want: torch.Tensor, truth: dict[int, torch.Tensor]) -> dict[str, float]:
    """Adherence, spread ratio (within requested class, vs the true class), radius ratio and SW."""
    got = class_of(GMM, x)
    adherence = (got == want).double().mean().item()
    spread, radius, sw, tv = [], [], [], []
    for c, t in truth.items():
        xs = x[want == c]
        # mode balance: total variation between the samples' component histogram and the class's weights
        members = (GMM.component_class == c).nonzero().reshape(-1)
        comp = nearest_component(xs)
        hist = torch.stack([(comp == k).double().mean() for k in members])
        true_w = GMM.weights[members] / GMM.weights[members].sum()
        tv.append(0.5 * (hist - true_w).abs().sum().item() + 0.5 * (1 - hist.sum().item()))
        rms = ((xs - xs.mean(0)) ** 2).sum(1).mean().sqrt().item()
        spread.append(rms / ((t - t.mean(0)) ** 2).sum(1).mean().sqrt().item())
        radius.append(xs.norm(dim=1).mean().item() / t.norm(dim=1).mean().item())
        sw.append(sliced_wasserstein(xs, t[: len(xs)]))
    return {"adherence": adherence, "spread_ratio": statistics.mean(spread), "radius_ratio": statistics.mean(radius),
            "mode_tv": statistics.mean(tv), "sw": statistics.mean(sw)}


def nearest_component(x: torch.Tensor) -> torch.Tensor:
    var = GMM.stds**2
    logp = -0.5 * (((x[:, None, :] - GMM.means[None]) ** 2) / var[None]).sum(-1) - 0.5 * torch.log(var).sum(-1)[None]
    return (torch.log(GMM.weights)[None] + logp).argmax(1)


def truth_samples(n: int) -> dict[int, torch.Tensor]:
    return {c: GMM.sample(n, torch.Generator().manual_seed(100 + c), cls=c)[0] for c in (0, 1)}


# -- adherence / diversity ------------------------------------------------------------------------
def mean_h(grid: nw.Grid) -> float:
    hs = [b - a for a, b in zip(grid.lams[:-1], grid.lams[1:]) if math.isfinite(b - a)]
    return statistics.mean(hs)


def run_adherence(args: argparse.Namespace) -> dict:
    global GMM
    n = 400 if args.quick else 2000
    grid = nw.make_grid(SCHED, 30, "karras")
    hbar = mean_h(grid)
    out: dict = {"rows": [], "n": n, "grid": "karras, 30 steps, dpmpp_2m", "hbar": hbar}
    base = GMM
    try:
        for dim in (2, 16):
            GMM = base if dim == 2 else GaussianMixture.default(dim=dim)
            res = _adherence(n, grid, hbar, dim)
            out["rows"] += res["rows"]
            if dim == 2:
                out.update({k: v for k, v in res.items() if k != "rows"})
    finally:
        GMM = base
    return out


def _adherence(n: int, grid: nw.Grid, hbar: float, dim: int) -> dict:
    z = noise(n, 1)
    want = (torch.arange(n) >= n // 2).long()
    truth = truth_samples(n)
    methods = {
        "cfg": lambda w: dict(guidance="cfg", guidance_scale=w),
        "rescale (phi=0.7, v)": lambda w: dict(guidance="rescale", guidance_scale=w),
        "apg (eta=0, beta=-0.5)": lambda w: dict(guidance="apg", guidance_scale=w),
        "cfg++ (lambda=w(1-e^-h))": lambda w: dict(guidance="cfg++", guidance_scale=w * (-math.expm1(-hbar))),
    }
    rows, scatter = [], {}
    pick = torch.cat([torch.arange(300), n // 2 + torch.arange(300)])  # 300 samples of each class
    for (mname, make), w in itertools.product(methods.items(), WS):
        kw = make(w)
        x = nw.sample(None, z, grid=grid, sampler="dpmpp_2m", denoiser=cond_denoiser, cond=want,
                      uncond=torch.tensor([-1]), **kw)
        st = class_stats(x, want, truth)
        rows.append({"dim": dim, "method": mname, "w": w, "scale_passed": round(float(kw["guidance_scale"]), 4), **st})
        if w in (1.0, 3.0, 7.5, 15.0) and dim == 2:
            scatter[f"{mname}|{w}"] = x[pick].tolist()
        print(f"  d={dim} {mname:28s} w={w:5.1f} adherence={st['adherence']:.3f} spread={st['spread_ratio']:.3f} "
              f"radius={st['radius_ratio']:.3f} sw={st['sw']:.3f}", flush=True)
    return {"rows": rows, "scatter": scatter, "want": want[pick].tolist(),
            "truth": {c: t[:300].tolist() for c, t in truth.items()}}


# -- negative prompt ------------------------------------------------------------------------------
def run_negative(args: argparse.Namespace) -> dict:
    n = 300 if args.quick else 1000
    grid = nw.make_grid(SCHED, 30, "karras")
    z = noise(n, 2)
    rows = []
    for w in (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5):
        x = nw.sample(None, z, grid=grid, sampler="dpmpp_2m", denoiser=cond_denoiser, cond=torch.tensor([-1]),
                      negative=torch.tensor([1]), guidance_scale=w)
        ref = guided_ode_solution(GMM, z, grid[0], grid[-1], torch.full((n,), -1), torch.full((n,), 1), w,
                                  rtol=1e-8, atol=1e-9)
        row = {"w": w, "frac_in_negative_class": (class_of(GMM, x) == 1).double().mean().item(),
               "frac_exact_ode": (class_of(GMM, ref) == 1).double().mean().item(),
               "mean_radius": x.norm(dim=1).mean().item()}
        rows.append(row)
        print(f"  negative=class 1, w={w}: {row}", flush=True)
    # positive class 0 with a negative class 1 instead of the unconditional branch
    truth = truth_samples(n)
    want = torch.zeros(n, dtype=torch.long)
    pairs = []
    for w in (3.0, 7.5):
        branches = (("uncond", {"uncond": torch.tensor([-1])}), ("negative class 1", {"negative": torch.tensor([1])}))
        for guide, kw in branches:
            x = nw.sample(None, z, grid=grid, sampler="dpmpp_2m", denoiser=cond_denoiser, cond=want,
                          guidance_scale=w, **kw)
            st = class_stats(x, want, {0: truth[0]})
            pairs.append({"w": w, "guiding_branch": guide, **st})
    return {"rows": rows, "pairs": pairs, "n": n}


# -- stability ------------------------------------------------------------------------------------
GUARDED = [
    ("dpmpp_2m", {}), ("dpmpp_3m", {}), ("dpmpp_3m", {"variant": "diffusers"}),
    ("unipc", {"order": 1}), ("unipc", {"order": 2}), ("unipc", {"order": 3}),
    ("unipc", {"order": 2, "variant": "bh1"}), ("unipc", {"order": 3, "variant": "bh1"}),
    ("dpm_solver", {"order": 2}), ("dpm_solver", {"order": 3}),
]
UNGUARDED = [("dpmpp_2m", {"stiff_guard": None}), ("dpmpp_3m", {"stiff_guard": None}),
             ("unipc", {"order": 2, "stiff_guard": None}), ("unipc", {"order": 3, "stiff_guard": None}),
             ("dpm_solver", {"order": 3, "stiff_guard": None})]


def label(name: str, opts: dict) -> str:
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    return f"{name}({o})" if o else name


def run_stability(args: argparse.Namespace) -> dict:
    import inspect

    B = 128 if args.quick else 256
    z = noise(B, 0)
    cls = torch.arange(B) % 2
    ws = [1.0, 3.0, 7.5, 15.0] if args.quick else [float(w) for w in range(1, 16)]
    ns = [4, 5, 8, 12, 20] if args.quick else list(range(4, 21))
    spacings = ["karras"] if args.quick else ["karras", "uniform_lambda", "trailing"]
    # the classic multisteps (deis, ipndm, lms) with and without the guard; stochastic samplers do not follow
    # the ODE, so their distance to its solution says nothing here (tests/test_guidance_stability.py checks them)
    guarded_extra = [(n, {}) for n, spec in sorted(nw.SAMPLERS.items())
                     if n not in ("dpmpp_2m", "dpmpp_3m", "unipc", "dpm_solver") and not spec.stochastic
                     and "stiff_guard" in inspect.signature(spec.fn).parameters]
    others = [(n, {"stiff_guard": None}) for n, _ in guarded_extra]
    configs = GUARDED + guarded_extra + UNGUARDED + others
    rows = []
    t0 = time.time()
    for spacing in spacings:
        for w, n in itertools.product(ws, ns):
            grid = nw.make_grid(SCHED, n, spacing)
            ref = guided_ode_solution(GMM, z, grid[0], grid[-1], cls, torch.full((B,), -1), w, rtol=1e-8, atol=1e-9)
            kw = dict(grid=grid, denoiser=cond_denoiser, cond=cls, uncond=torch.tensor([-1]), guidance_scale=w)
            e_ddim = None
            for name, opts in [("ddim", {})] + configs:
                e = (nw.sample(None, z, sampler=name, **kw, **opts) - ref).norm(dim=1)
                e_ddim = e if e_ddim is None else e_ddim
                rows.append({"spacing": spacing, "w": w, "nfe": n, "sampler": label(name, opts),
                             "guard": "off" if ("stiff_guard" in opts or (name, opts) in others) else
                             ("n/a" if name == "ddim" else "on"),
                             "mean_err": e.mean().item(), "median_err": e.median().item(),
                             "excess_se": paired_excess_se(e, e_ddim)})
        print(f"  {spacing}: {len(rows)} rows, {time.time() - t0:.0f} s", flush=True)
    summary = stability_summary(rows)
    reseed = stability_reseed(rows, configs, B, n_pairs=8 if args.quick else 16)
    return {"rows": rows, "B": B, "reference_point": diffusers_reference_point(), "summary": summary,
            "reseed": reseed, "load_avg": round(os.getloadavg()[0], 2)}


def paired_excess_se(e: torch.Tensor, e_ddim: torch.Tensor) -> float:
    """How many standard errors a sampler's mean error lies above DDIM's on the same samples
    (paired: ``mean(e - e_ddim) / (std(e - e_ddim) / sqrt(B))``; 0 for DDIM itself and for results
    equal to its own up to rounding)."""
    d = e - e_ddim
    if d.abs().max().item() <= 1e-9 * e_ddim.abs().max().item():
        return 0.0  # DDIM's own result up to rounding (the long-step limit): its tiny spread is no evidence
    se = d.std().item() / math.sqrt(d.numel())
    return d.mean().item() / se if se > 0 else 0.0


def stability_reseed(rows: list[dict], configs: list[tuple[str, dict]], B: int, n_pairs: int) -> list[dict]:
    """The guarded pairs furthest above DDIM, re-run on fresh noise (seeds 1-3, B samples each): whether
    their excess is a property of the sampler or of which few samples of seed 0 switch modes."""
    ddim = {(r["spacing"], r["w"], r["nfe"]): r["mean_err"] for r in rows if r["sampler"] == "ddim"}
    bad = sorted((r for r in rows if r["guard"] == "on"),
                 key=lambda r: -r["mean_err"] / ddim[(r["spacing"], r["w"], r["nfe"])])[:n_pairs]
    by_label = {label(n, o): (n, o) for n, o in configs}
    cls = torch.arange(B) % 2
    out = []
    for r in bad:
        grid = nw.make_grid(SCHED, r["nfe"], r["spacing"])
        kw = dict(grid=grid, denoiser=cond_denoiser, cond=cls, uncond=torch.tensor([-1]), guidance_scale=r["w"])
        name, opts = by_label[r["sampler"]]
        ratios, errs, errs_ddim = [], [], []
        for seed in (0, 1, 2, 3):  # seed 0 again: its per-sample errors enter the pooled paired test
            z = noise(B, seed)
            ref = guided_ode_solution(GMM, z, grid[0], grid[-1], cls, torch.full((B,), -1), r["w"], rtol=1e-8,
                                      atol=1e-9)
            errs_ddim.append((nw.sample(None, z, sampler="ddim", **kw) - ref).norm(dim=1))
            errs.append((nw.sample(None, z, sampler=name, **kw, **opts) - ref).norm(dim=1))
            ratios.append((errs[-1].mean() / errs_ddim[-1].mean()).item())
        e, e_d = torch.cat(errs), torch.cat(errs_ddim)
        out.append({"spacing": r["spacing"], "sampler": r["sampler"], "w": r["w"], "nfe": r["nfe"],
                    "ddim_err_seed0": ddim[(r["spacing"], r["w"], r["nfe"])], "excess_se_seed0": r["excess_se"],
                    "ratio_seed0": ratios[0], "ratio_seed1": ratios[1], "ratio_seed2": ratios[2],
                    "ratio_seed3": ratios[3], "ratio_pooled": (e.mean() / e_d.mean()).item(),
                    "excess_se_pooled": paired_excess_se(e, e_d)})
        print(f"  reseed {out[-1]}", flush=True)
    return out


def stability_summary(rows: list[dict]) -> list[dict]:
    ddim = {(r["spacing"], r["w"], r["nfe"]): r for r in rows if r["sampler"] == "ddim"}
    out = []
    keys = sorted({(r["spacing"], r["sampler"], r["guard"]) for r in rows if r["sampler"] != "ddim"},
                  key=lambda k: (k[0], k[2] != "on", k[1]))
    for spacing, sampler, guard in keys:
        rs = [r for r in rows if r["spacing"] == spacing and r["sampler"] == sampler]
        ratios = [r["mean_err"] / ddim[(spacing, r["w"], r["nfe"])]["mean_err"] for r in rs]
        med = [r["median_err"] / ddim[(spacing, r["w"], r["nfe"])]["median_err"] for r in rs]
        worst = max(range(len(rs)), key=lambda i: ratios[i])
        out.append({"spacing": spacing, "sampler": sampler, "guard": guard, "configs": len(rs),
                    "worse_than_ddim": sum(r > 1.0 + 1e-9 for r in ratios),  # not DDIM's own result rounded
                    "worse_by_10pct": sum(r > 1.1 for r in ratios),
                    "worse_beyond_3se": sum(r.get("excess_se", 0.0) > 3.0 for r in rs),
                    "worst_ratio": ratios[worst], "worst_at": f"w={rs[worst]['w']:g}, NFE {rs[worst]['nfe']}",
                    "worst_err": rs[worst]["mean_err"], "worst_excess_se": max(r.get("excess_se", 0.0) for r in rs),
                    "geomean_ratio": math.exp(statistics.mean(math.log(r) for r in ratios)),
                    "worst_median_ratio": max(med)})
    return out


def stability_verdict(d: dict) -> str:
    """One sentence: how many guarded configurations are worse than DDIM beyond noise, on seed 0 over the grid
    and pooled over four seeds on the pairs furthest above DDIM."""
    on = [r for r in d["rows"] if r["guard"] == "on"]
    beyond = [r for r in on if r["excess_se"] > 3.0]
    pooled = [r for r in d.get("reseed", []) if "excess_se_pooled" in r]
    s = (f"Verdict: {len(beyond)} of {len(on)} guarded configurations have a mean error more than 3 paired standard "
         f"errors above guided DDIM's on seed 0")
    if pooled:
        worst = max(pooled, key=lambda r: r["excess_se_pooled"])
        s += (f"; pooled over four seeds, the {len(pooled)} pairs furthest above DDIM lie at most "
              f"{worst['excess_se_pooled']:.2f} standard errors above it ({worst['sampler']}, {worst['spacing']}, "
              f"w = {worst['w']:g}, NFE {worst['nfe']}: mean error ratio {worst['ratio_pooled']:.3f})")
    return s + "."


def diffusers_reference_point() -> list[dict]:
    """diffusers' multistep schedulers at w = 7.5, NFE 5 on the same mixture and schedule (the issue's
    reference point), each against the exact guided ODE from its own first timestep, beside ours."""
    try:
        import diffusers
    except ImportError:
        return []
    B, w, n = 256, 7.5, 5
    z = noise(B, 0)
    cls = torch.arange(B) % 2
    cfg = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    acp = torch.cumprod(1 - torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=F64) ** 2, 0)

    def guided(x: torch.Tensor, a: float, s: float) -> torch.Tensor:
        c, u = GMM.posterior_mean(x, a, s, cls), GMM.posterior_mean(x, a, s, torch.full((B,), -1))
        return u + w * (c - u)

    out = []
    for label_, cls_name, kw in [
        ("diffusers DDIM", "DDIMScheduler", {}),
        ("diffusers DPMSolverMultistep order 3", "DPMSolverMultistepScheduler", {"solver_order": 3}),
        ("diffusers DPMSolverMultistep order 3, karras", "DPMSolverMultistepScheduler",
         {"solver_order": 3, "use_karras_sigmas": True}),
        ("diffusers UniPC order 3", "UniPCMultistepScheduler", {"solver_order": 3}),
        ("diffusers UniPC order 3, karras", "UniPCMultistepScheduler", {"solver_order": 3, "use_karras_sigmas": True}),
    ]:
        sch = getattr(diffusers, cls_name)(**cfg, **kw)
        sch.set_timesteps(n)
        x = z * sch.init_noise_sigma
        sig = getattr(sch, "sigmas", None)
        use_sigmas = "karras" in label_
        # the exact start: the first level the scheduler evaluates
        if use_sigmas:
            s0 = float(sig[0])
            a, s = 1 / math.sqrt(1 + s0 * s0), s0 / math.sqrt(1 + s0 * s0)
        else:
            t0 = int(sch.timesteps[0])
            a, s = float(acp[t0]) ** 0.5, (1 - float(acp[t0])) ** 0.5
        start = nw.Level(a, s, math.log(a / s), 0.0)
        ref = guided_ode_solution(GMM, z, start, nw.Level(1.0, 0.0, math.inf, 0.0), cls, torch.full((B,), -1), w,
                                  rtol=1e-8, atol=1e-9)
        for i, t in enumerate(sch.timesteps):
            if use_sigmas:
                sg = float(sch.sigmas[i])
                a, s = 1 / math.sqrt(1 + sg * sg), sg / math.sqrt(1 + sg * sg)
            else:
                a, s = float(acp[int(t)]) ** 0.5, (1 - float(acp[int(t)])) ** 0.5
            x0 = guided(x, a, s)
            x = sch.step((x - a * x0) / s, t, x).prev_sample
        e = (x - ref).norm(dim=1)
        out.append({"sampler": label_, "mean_err": e.mean().item(), "median_err": e.median().item()})
    grid = nw.make_grid(SCHED, n, "karras")
    ref = guided_ode_solution(GMM, z, grid[0], grid[-1], cls, torch.full((B,), -1), w, rtol=1e-8, atol=1e-9)
    kw = dict(grid=grid, denoiser=cond_denoiser, cond=cls, uncond=torch.tensor([-1]), guidance_scale=w)
    for name, opts in [("ddim", {}), ("dpmpp_3m", {}), ("unipc", {"order": 3}), ("dpmpp_3m", {"stiff_guard": None}),
                       ("unipc", {"order": 3, "stiff_guard": None})]:
        e = (nw.sample(None, z, sampler=name, **kw, **opts) - ref).norm(dim=1)
        out.append({"sampler": f"noisewise {label(name, opts)}, karras", "mean_err": e.mean().item(),
                    "median_err": e.median().item()})
    for r in out:
        print(f"  w=7.5 NFE 5: {r}", flush=True)
    return out


# -- interval -------------------------------------------------------------------------------------
def run_interval(args: argparse.Namespace) -> dict:
    n = 400 if args.quick else 2000
    steps = 32
    grid = nw.make_grid(SCHED, steps, "karras")
    z = noise(n, 3)
    want = (torch.arange(n) >= n // 2).long()
    truth = truth_samples(n)
    rows = []
    for (iname, guidance), w in itertools.product(
        [("full", None), ("interval (0.28, 5.42]", nw.Interval(0.28, 5.42))], [1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5]
    ):
        r = nw.sample(None, z, grid=grid, sampler="dpmpp_2m", denoiser=cond_denoiser, cond=want,
                      uncond=torch.tensor([-1]), guidance_scale=w, guidance=guidance, return_info=True)
        st = class_stats(r.x, want, truth)
        rows.append({"guidance": iname, "w": w, "nfe_per_sample": r.nfe, "rows": r.rows, **st})
        print(f"  {iname:24s} w={w}: NFE {r.nfe} {st}", flush=True)
    inside = sum(0.28 < lv.sigma / lv.alpha <= 5.42 for lv in grid.levels[:-1])
    return {"rows": rows, "n": n, "steps": steps, "levels_inside": inside}


# -- cost -----------------------------------------------------------------------------------------
def tiny_unet(device: str):  # noqa: ANN201
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=32, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(64, 128),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=128, attention_head_dim=8, norm_num_groups=32,
    ).to(device).eval()


def shipped_unet(device: str):  # noqa: ANN201
    from diffusers import UNet2DConditionModel

    folder = os.path.join(os.path.dirname(HERE), "src", "noisewise", "weights", "shapes-vp", "unet")
    return UNet2DConditionModel.from_pretrained(folder, torch_dtype=torch.float32).to(device).eval()


# (name, builder, latent shape, text states shape): a compute-bound UNet at 32x32 latents, and the shipped
# shapes-vp UNet at the 8x8 latents and 32 MiniLM token states it runs on in `noisewise generate`
COST_MODELS = [
    ("UNet 4x32x32", tiny_unet, (4, 32, 32), (8, 128)),
    ("shapes-vp (shipped)", shipped_unet, (4, 8, 8), (32, 384)),
]


def run_cost(args: argparse.Namespace) -> dict:
    device = args.device
    dtypes = [torch.float32] + ([torch.float16] if device.startswith("cuda") else [])
    batches = [1, 4] if device == "cpu" else [1, 4, 16, 64]
    steps = 8 if device == "cpu" else 20
    reps = 3 if args.quick else 5
    rows, params = [], {}
    for mname, build, lat, txt in COST_MODELS:
        base = build(device)
        params[mname] = sum(p.numel() for p in base.parameters())
        for dtype, B in itertools.product(dtypes, batches):
            unet = base if dtype == torch.float32 else build(device).half()

            def model(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, unet=unet) -> torch.Tensor:  # noqa: ANN001
                return unet(x, t, encoder_hidden_states=cond).sample

            gen = torch.Generator(device="cpu").manual_seed(0)
            z = torch.randn(B, *lat, generator=gen).to(device)
            cond = torch.randn(B, *txt, generator=gen).to(device, dtype)
            uncond = torch.zeros(1, *txt, device=device, dtype=dtype)
            variants = {
                "unguided (w=1)": dict(guidance_scale=1.0),
                "guided, one batched forward": dict(guidance_scale=7.5),
                "guided, two forwards": dict(guidance_scale=7.5, max_batch=B),
                "guided + interval (0.28, 5.42]": dict(guidance_scale=7.5, guidance=nw.Interval()),
            }

            def once(kw: dict, z: torch.Tensor = z, cond: torch.Tensor = cond, uncond: torch.Tensor = uncond,
                     model=model) -> float:  # noqa: ANN001
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                nw.sample(model, z, schedule=SCHED, sampler="dpmpp_2m", steps=steps, spacing="karras", cond=cond,
                          uncond=uncond, check_finite=False, **kw)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                return (time.perf_counter() - t0) / steps

            for kw in variants.values():  # warm-up
                once(kw)
            times: dict[str, list[float]] = {k: [] for k in variants}
            for _ in range(reps):  # interleaved, so drift on a shared machine hits all of them alike
                for k, kw in variants.items():
                    times[k].append(once(kw))
            med = {k: statistics.median(v) for k, v in times.items()}
            ref = med["unguided (w=1)"]
            for k, v in med.items():
                rows.append({"device": machine(device), "model": mname, "dtype": str(dtype).replace("torch.", ""),
                             "batch": B, "variant": k, "ms_per_step": 1000 * v, "ratio_to_unguided": v / ref})
                print(f"  {mname} {dtype} B={B:3d} {k:28s} {1000 * v:8.2f} ms/step  x{v / ref:.2f}", flush=True)
    return {"rows": rows, "params": params, "steps": steps, "reps": reps, "device": machine(device),
            "loadavg_end": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}


# -- page -----------------------------------------------------------------------------------------
def fmt(v: object, nd: int = 3) -> str:
    return f"{v:.{nd}f}" if isinstance(v, float) else str(v)


def table(rows: list[dict], cols: list[str], nd: int = 3) -> list[str]:
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(fmt(r[c], nd) for c in cols) + " |" for r in rows]
    return out


def write_csv(name: str, rows: list[dict]) -> None:
    if not rows:
        return
    with open(os.path.join(OUT, f"guidance_{name}.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def plots(data: dict) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    if "adherence" in data:
        d = data["adherence"]
        methods = list(dict.fromkeys(r["method"] for r in d["rows"]))
        fig, axes = plt.subplots(1, 5, figsize=(21, 3.8))
        for (mi, m), dim in itertools.product(enumerate(methods), (2, 16)):
            rs = [r for r in d["rows"] if r["method"] == m and r.get("dim", 2) == dim]
            for ax, key in zip(axes, ("adherence", "spread_ratio", "mode_tv", "radius_ratio", "sw")):
                ax.plot([r["w"] for r in rs], [r[key] for r in rs], marker="o" if dim == 2 else ".",
                        ls="-" if dim == 2 else "--", color=f"C{mi}", label=f"{m}, {dim}-D")
        for ax, t in zip(axes, ("class adherence", "within-class spread / true", "mode imbalance (TV, 0 = true)",
                                "mean radius / true (saturation)", "sliced W1 to the true class")):
            ax.set_xlabel("guidance scale w")
            ax.set_title(t)
            ax.grid(alpha=0.3)
        axes[1].axhline(1, color="k", lw=0.6)
        axes[3].axhline(1, color="k", lw=0.6)
        axes[1].set_ylim(0.8, 1.3)
        axes[2].set_ylim(0.0, 0.6)
        axes[3].set_ylim(0.9, 1.4)
        axes[0].legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(OUT, "guidance_adherence.png"), dpi=110)
        plt.close(fig)
        ws = [1.0, 3.0, 7.5, 15.0]
        fig, axes = plt.subplots(len(methods), len(ws), figsize=(3.1 * len(ws), 3.0 * len(methods)))
        want = torch.tensor(d["want"])
        for i, m in enumerate(methods):
            for j, w in enumerate(ws):
                ax = axes[i][j]
                for c in (0, 1):
                    t = torch.tensor(d["truth"][str(c)] if str(c) in d["truth"] else d["truth"][c])
                    ax.scatter(t[:, 0], t[:, 1], s=2, c="lightgray")
                x = torch.tensor(d["scatter"][f"{m}|{w}"])
                for c, col in ((0, "tab:blue"), (1, "tab:orange")):
                    xs = x[want[: len(x)] == c]
                    ax.scatter(xs[:, 0], xs[:, 1], s=2, c=col)
                ax.set_xlim(-2.2, 2.2)
                ax.set_ylim(-2.2, 2.2)
                ax.set_xticks([])
                ax.set_yticks([])
                ax.set_title(f"{m.split(' ')[0]}  w={w:g}", fontsize=9)
        fig.tight_layout()
        fig.savefig(os.path.join(OUT, "guidance_samples.png"), dpi=90)
        plt.close(fig)
    if "stability" in data:
        rows = data["stability"]["rows"]
        ws = sorted({r["w"] for r in rows})
        ns = sorted({r["nfe"] for r in rows})
        ddim = {(r["w"], r["nfe"]): r["mean_err"] for r in rows if r["sampler"] == "ddim" and r["spacing"] == "karras"}
        panels = ["dpmpp_3m(stiff_guard=None)", "dpmpp_3m", "unipc(order=3,stiff_guard=None)", "unipc(order=3)"]
        panels = [p for p in panels if any(r["sampler"] == p for r in rows)]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
        for ax, p in zip(axes, panels):
            grid = torch.full((len(ws), len(ns)), float("nan"))
            for r in rows:
                if r["sampler"] == p and r["spacing"] == "karras":
                    grid[ws.index(r["w"]), ns.index(r["nfe"])] = math.log2(r["mean_err"] / ddim[(r["w"], r["nfe"])])
            im = ax.imshow(grid.numpy(), origin="lower", cmap="RdBu_r", vmin=-3, vmax=3, aspect="auto",
                           extent=(ns[0] - 0.5, ns[-1] + 0.5, 0.5, len(ws) + 0.5))
            ax.set_yticks(range(1, len(ws) + 1), [f"{w:g}" for w in ws], fontsize=7)
            ax.set_xlabel("NFE (steps)")
            ax.set_ylabel("w")
            ax.set_title(p.replace("stiff_guard=None", "no guard"), fontsize=9)
        fig.colorbar(im, ax=axes, label="log2(error / guided DDIM's error)")
        fig.savefig(os.path.join(OUT, "guidance_stability.png"), dpi=100, bbox_inches="tight")
        plt.close(fig)


def write_page(data: dict) -> None:
    L = ["# Guidance benchmarks", ""]
    L += [f"Produced by `python bench/bench_guidance.py` (sections: {', '.join(s for s in SECTIONS if s in data)}). "
          "Every number is also in [guidance.json](guidance.json) and the `guidance_*.csv` files; "
          "the user guide is [docs/guidance.md](../guidance.md). Machine: "
          + "; ".join(sorted({str(data[s].get("machine", "?")) for s in SECTIONS if s in data})) + ".", ""]
    L += ["The data: `GaussianMixture.default()` (8 components on a ring of radius 1, data scale 1, components "
          "0, 2, 4, 6 are class 0 and 1, 3, 5, 7 class 1), with exact conditional and unconditional denoisers; the "
          "schedule is Stable Diffusion's (scaled-linear betas 0.00085 to 0.012, epsilon prediction).", ""]
    if "adherence" in data:
        d = data["adherence"]
        L += ["## Class adherence and diversity vs the guidance scale", "",
              f"{d['n']} samples (half per class), {d['grid']}; machine: {d.get('machine', '')}. "
              "adherence = fraction of samples whose most likely component belongs to the requested class; "
              "spread = RMS distance to the class mean of the samples, over the true class's (1 = the true "
              "diversity; below 1 = diversity lost); radius = mean distance from the origin over the true one "
              "(above 1 = samples pushed beyond the data: the 2-D picture of over-saturation); mode_tv = total "
              "variation between the share of samples in each of the class's modes and the true weights (0 = every "
              "mode at its weight; it grows as guidance drops the weaker modes: mode collapse); sw = sliced "
              "Wasserstein-1 distance to exact samples of the class (lower is better).", "",
              f"CFG++ takes lambda, not w: each row uses lambda = w (1 - e^-h) with h = {d['hbar']:.3f}, the mean "
              "step in log-SNR of this grid, i.e. the lambda whose per-step CFG scale lambda / (1 - e^-h) "
              "(see docs/guidance.md) is w on an average step. ", "",
              "![adherence](guidance_adherence.png)", "", "![samples](guidance_samples.png)", ""]
        L += ["Two mixtures: the 2-D ring (classes overlap at high noise, so adherence below 1 is possible), and "
              "`GaussianMixture.default(dim=16)` (the same ring plus 14 dimensions of offsets): rescale takes a "
              "standard deviation over the coordinates of a sample, which is degenerate with two coordinates "
              "(its 2-D rows blow up for that reason) and meaningful with many, as on images.", ""]
        L += table(d["rows"], ["dim", "method", "w", "scale_passed", "adherence", "spread_ratio", "mode_tv",
                               "radius_ratio", "sw"])
        L += [""]
    if "negative" in data:
        d = data["negative"]
        L += ["## Negative prompts: pushing samples out of a class", "",
              f"{d['n']} samples, positive = unconditional, negative = class 1, dpmpp_2m on 30 karras steps, beside "
              "the exact guided ODE solution from the same noise. Unguided (w = 1) the fraction is the class prior.",
              ""]
        L += table(d["rows"], ["w", "frac_in_negative_class", "frac_exact_ode", "mean_radius"])
        L += ["", "Positive class 0, guiding branch = the unconditional model vs a negative class 1:", ""]
        L += table(d["pairs"], ["w", "guiding_branch", "adherence", "spread_ratio", "mode_tv", "radius_ratio", "sw"])
        L += [""]
    if "stability" in data:
        d = data["stability"]
        L += ["## Stability: guided multistep samplers vs guided DDIM", "",
              f"{d['B']} samples (half per class), error = per-sample L2 distance to the exact solution of the guided "
              "probability-flow ODE from the same noise (DOP853, rtol 1e-8), mean over samples (the median is in the "
              "CSV). Every (w, NFE) of the grid is one configuration; `worse_than_ddim` counts configurations whose "
              "mean error exceeds guided DDIM's on the same grid. guard = the stiffness guard "
              "(`noisewise/solvers/stiffness.py`, on by default under guidance; `off` = `stiff_guard=None`, or a "
              "sampler without the option)." + load_note(d), ""]
        if d.get("reference_point"):
            L += ["At the reference point w = 7.5, NFE 5 (diffusers with its own timesteps, each against the exact "
                  "ODE from its own first level):", ""]
            L += table(d["reference_point"], ["sampler", "mean_err", "median_err"])
            L += [""]
        L += ["![stability](guidance_stability.png)", ""]
        L += table(d["summary"], ["spacing", "sampler", "guard", "configs", "worse_than_ddim", "worse_by_10pct",
                                  "worse_beyond_3se", "worst_ratio", "worst_at", "worst_err", "worst_excess_se",
                                  "geomean_ratio", "worst_median_ratio"])
        L += [""]
        if d.get("reseed"):
            L += ["`worse_beyond_3se` counts configurations whose mean error lies more than 3 paired standard errors "
                  "above DDIM's (`excess_se` = mean(e - e_ddim) / (std(e - e_ddim) / sqrt(B)) over the same samples); "
                  "`worst_excess_se` is the largest. The pairs furthest above DDIM, re-run on fresh noise "
                  f"(seeds 1-3, {d['B']} samples each; pooled = mean error over the four seeds / DDIM's, and "
                  f"`excess_se_pooled` the paired test over all {4 * d['B']} samples):", ""]
            L += table(d["reseed"], ["spacing", "sampler", "w", "nfe", "ddim_err_seed0", "excess_se_seed0",
                                     "ratio_seed0", "ratio_seed1", "ratio_seed2", "ratio_seed3", "ratio_pooled",
                                     "excess_se_pooled"])
            L += ["", stability_verdict(d), ""]
    if "interval" in data:
        d = data["interval"]
        L += ["## Guidance interval: network evaluations saved at equal quality", "",
              f"{d['n']} samples, {d['steps']} karras steps of dpmpp_2m; the interval (0.28, 5.42] (the paper's SD-XL "
              f"values, in sigma / alpha) holds {d['levels_inside']} of the {d['steps']} evaluated levels, so a guided "
              "run costs that many unconditional evaluations instead of one per step. NFE counts both branches.", ""]
        L += table(d["rows"], ["guidance", "w", "nfe_per_sample", "adherence", "spread_ratio", "mode_tv",
                               "radius_ratio", "sw"])
        if d.get("verdict"):
            L += ["", d["verdict"]]
        L += [""]
    if "cost" in data or "cost_gpu" in data:
        L += ["## Cost: one batched forward vs two", ""]
        for key in ("cost", "cost_gpu"):
            if key not in data:
                continue
            d = data[key]
            params = d["params"] if isinstance(d["params"], dict) else {COST_MODELS[0][0]: d["params"]}
            shapes = {m: (lat, txt) for m, _, lat, txt in COST_MODELS}
            models = ", ".join(f"{m}: {n / 1e6:.2f} M parameters, latents {'x'.join(map(str, shapes[m][0]))}, "
                               f"{shapes[m][1][0]} text tokens of width {shapes[m][1][1]}" for m, n in params.items())
            L += [f"diffusers `UNet2DConditionModel`s ({models}), `nw.sample(..., sampler='dpmpp_2m', "
                  f"steps={d['steps']}, spacing='karras')`, median of "
                  f"{d['reps']} interleaved runs per variant, on {d['device']}. 'two forwards' is the same guided "
                  "step with `max_batch=B` (cond and uncond in separate calls)."
                  + (f" 1-minute load average {d['loadavg_end']:.1f} at the end of the run; on a shared machine the "
                     "ratios move by about 0.1-0.3 between runs."
                     if d.get("loadavg_end") else ""), ""]
            rows = [{"model": COST_MODELS[0][0], **r} for r in d["rows"]]
            L += table(rows, ["model", "dtype", "batch", "variant", "ms_per_step", "ratio_to_unguided"], nd=2)
            L += ["", "On a CPU the network's cost is linear in the rows once the tensors are large enough to keep "
                  "the cores busy, so one batched forward of 2B rows of the 32x32-latent UNet costs what two "
                  "forwards of B rows cost: about 2x an unguided step; the lever there is to send fewer rows (the "
                  "guidance interval skips the unconditional rows outside (0.28, 5.42], here on the karras "
                  "spacing of the run). At the shipped model's 8x8 latents a forward of one or a few rows is "
                  "dominated by per-layer overhead rather than arithmetic, which the second branch shares when it "
                  "rides in the same batch: that is where batching pays on a CPU, as it does on an accelerator "
                  "whose small batches leave the device idle."]
            L += [""]
    with open(os.path.join(OUT, "guidance.md"), "w") as f:
        f.write("\n".join(L))


def load_note(d: dict) -> str:
    if "load_avg" not in d:
        return ""
    return (f" The machine was shared with other jobs (1-minute load average {d['load_avg']:g} at the end of the "
            f"run, which took {d['seconds']:.0f} s); the errors do not depend on the load.")


def interval_verdict(d: dict) -> str:
    full = [r for r in d["rows"] if r["guidance"] == "full"]
    itv = [r for r in d["rows"] if r["guidance"] != "full"]
    best_full = min(full, key=lambda r: r["sw"])
    ok = [r for r in itv if r["sw"] <= best_full["sw"] and r["adherence"] >= best_full["adherence"] - 0.005]
    if not ok:
        best_itv = min(itv, key=lambda r: r["sw"])
        return (f"Best full guidance: w = {best_full['w']:g}, sw {best_full['sw']:.3f} at "
                f"{best_full['nfe_per_sample']} NFE; the interval's best is w = {best_itv['w']:g}, "
                f"sw {best_itv['sw']:.3f} at "
                f"{best_itv['nfe_per_sample']} NFE: not equal quality on this mixture.")
    cheapest = min(ok, key=lambda r: (r["nfe_per_sample"], r["sw"]))
    saved = 1 - cheapest["nfe_per_sample"] / best_full["nfe_per_sample"]
    return (f"Best full guidance: w = {best_full['w']:g} (sw {best_full['sw']:.3f}, adherence "
            f"{best_full['adherence']:.3f}) at {best_full['nfe_per_sample']} NFE per sample; the interval reaches "
            f"sw {cheapest['sw']:.3f} and adherence {cheapest['adherence']:.3f} at w = {cheapest['w']:g} with "
            f"{cheapest['nfe_per_sample']} NFE: **{100 * saved:.0f}% fewer network evaluations at equal or better "
            "quality** (published: about 40% on their models).")


def _round(v: object, nd: int = 5) -> object:
    if isinstance(v, float):
        return float(f"{v:.{nd}g}")
    if isinstance(v, dict):
        return {k: _round(x, nd) for k, x in v.items()}
    if isinstance(v, list):
        return [_round(x, nd) for x in v]
    return v


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default=",".join(SECTIONS))
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fp16", action="store_true")
    p.add_argument("--out", default=None, help="write this run's JSON here instead of merging into docs/")
    p.add_argument("--merge", default=None, help="merge a GPU cost run written with --out (as cost_gpu) and rebuild")
    args = p.parse_args()
    torch.set_num_threads(1)
    os.makedirs(OUT, exist_ok=True)
    path = os.path.join(OUT, "guidance.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    if args.merge:
        extra = json.load(open(args.merge))
        data.update({("cost_gpu" if k == "cost" else k): v for k, v in extra.items()})  # --out runs are GPU runs
    else:
        new = {}
        for s in [s.strip() for s in args.only.split(",") if s.strip()]:
            if s not in SECTIONS:
                raise SystemExit(f"unknown section {s!r}; known: {', '.join(SECTIONS)}")
            print(f"[{s}]", flush=True)
            t0 = time.time()
            new[s] = globals()[f"run_{s}"](args)
            new[s]["machine"] = machine(args.device)
            new[s]["seconds"] = round(time.time() - t0, 1)
            if s == "interval":
                new[s]["verdict"] = interval_verdict(new[s])
                print("  " + new[s]["verdict"])
        if args.out:
            with open(args.out, "w") as f:
                json.dump(new, f, indent=1)
            return
        data.update(new)
    with open(path, "w") as f:
        json.dump(_round(data), f, separators=(",", ":"))
    for s in SECTIONS + ("cost_gpu",):
        if s in data:
            write_csv(s, data[s]["summary" if s == "stability" else "rows"])
    plots(data)
    write_page(data)
    print(f"-> {OUT}/guidance.md")


if __name__ == "__main__":
    main()
