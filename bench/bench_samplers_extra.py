"""Accuracy vs NFE of the issue-3 samplers on exact Gaussian-mixture data, beside diffusers' and
k-diffusion's equivalents fed the same exact denoiser (and, for deterministic samplers, the same
noise), and dpm_adaptive's NFE and error per tolerance.

    python bench/bench_samplers_extra.py            # full run (~10 min on a busy 2-core CPU)
    python bench/bench_samplers_extra.py --quick    # fewer samples, NFEs and configs

Writes docs/benchmarks/samplers_extra.md, samplers_extra_deterministic.csv,
samplers_extra_stochastic.csv, samplers_extra_adaptive.csv and samplers_extra.png.

- Deterministic samplers: median over samples of the L2 distance between the output and the exact
  probability-flow ODE solution (DOP853, rtol 1e-11) from the config's own first level and start
  state to sigma = 0 (the convention of bench/bench_samplers.py).
- Stochastic samplers: sliced Wasserstein distance (256 projections) between the samples and as many
  exact data samples; the table also gives the distance between two independent exact sample sets
  (the floor at this sample size).
- dpm_adaptive: for rtol in {1e-1, 3e-2, 1e-2, 3e-3, 1e-3}, the NFE spent (final denoise included)
  and the error reached, beside k-diffusion's sample_dpm_adaptive at the same rtol (which stops at
  sigma_min: one denoiser call there is added, and counted, to end at sigma = 0 like ours).

The functions are importable (``deterministic_rows``, ``stochastic_rows``, ``adaptive_rows``, the
``run_*`` drivers) so that bench/bench_samplers.py can absorb them later.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

import noisewise as nw
from noisewise.core.spacing import lambda_range
from noisewise.gmm import GaussianMixture, sliced_wasserstein

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
OUT = os.path.join(os.path.dirname(HERE), "docs", "benchmarks")
F64 = torch.float64
NFES = [5, 6, 8, 10, 15, 20]
NFES_STOCHASTIC = [5, 6, 8, 10, 15, 20, 30, 50]
RTOLS = [1e-1, 3e-2, 1e-2, 3e-3, 1e-3]
ZERO = nw.Level(1.0, 0.0, math.inf, 0.0)


@dataclass
class Setting:
    name: str
    schedule: nw.Schedule
    gmm: GaussianMixture


def settings(dim: int) -> list[Setting]:
    gmm = GaussianMixture.default(dim=dim)
    return [
        Setting("sd-vp", nw.DiscreteVP(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012), gmm),
        Setting("flow", nw.RectifiedFlow(shift=3.0), gmm),
    ]


# A run returns (samples at sigma = 0, start state in the schedule's coordinates, first level, NFE spent),
# or None when the config cannot run at that budget.
RunResult = tuple[torch.Tensor, torch.Tensor, nw.Level, int] | None


@dataclass
class Config:
    name: str
    family: str  # "noisewise" | "diffusers" | "k-diffusion"
    run: Callable[[Setting, torch.Tensor, int, int], RunResult]  # (setting, noise, nfe, seed)
    settings: tuple[str, ...] = ("sd-vp", "flow")


# ------------------------------------------------------------------------------------------------
# noisewise
# ------------------------------------------------------------------------------------------------


def run_ours(sampler: str, spacing: str | None, **opts) -> Callable[..., RunResult]:
    def run(st: Setting, noise: torch.Tensor, nfe: int, seed: int) -> RunResult:
        spec = nw.get_sampler(sampler)
        kw = dict(opts)
        if spec.stochastic or "eta" in kw:
            kw["generator"] = torch.Generator().manual_seed(seed)
        r = nw.sample(None, noise, schedule=st.schedule, sampler=sampler, nfe=nfe, spacing=spacing,
                      denoiser=st.gmm.denoiser(), return_info=True, **kw)
        first = r.grid[0]
        return r.x, noise * math.sqrt(first.alpha**2 + first.sigma**2), first, r.nfe

    return run


def ours(sampler: str, spacing: str | None, **opts) -> Config:
    label = sampler + "".join(f" {k}={v}" for k, v in opts.items()) + f" [{spacing or 'default'}]"
    return Config(label, "noisewise", run_ours(sampler, spacing, **opts))


def default_config() -> Config:
    def run(st: Setting, noise: torch.Tensor, nfe: int, seed: int) -> RunResult:
        r = nw.sample(None, noise, schedule=st.schedule, nfe=nfe, denoiser=st.gmm.denoiser(), return_info=True)
        first = r.grid[0]
        return r.x, noise * math.sqrt(first.alpha**2 + first.sigma**2), first, r.nfe

    return Config("noisewise default (issue 2)", "noisewise", run)


# ------------------------------------------------------------------------------------------------
# diffusers: the scheduler's own loop (as a pipeline drives it), the exact model as the network
# ------------------------------------------------------------------------------------------------


def _scheduler(cls_name: str, st: Setting, **kw):
    import diffusers

    cls = getattr(diffusers, cls_name)
    valid = inspect.signature(cls.__init__).parameters
    if st.name == "sd-vp":
        base = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    prediction_type="epsilon")
    elif cls_name.startswith("FlowMatch"):
        base = dict(num_train_timesteps=1000, shift=st.schedule.shift)
    elif "use_flow_sigmas" in valid:
        base = dict(num_train_timesteps=1000, use_flow_sigmas=True, flow_shift=st.schedule.shift,
                    prediction_type="flow_prediction")
    else:
        raise ValueError(f"{cls_name} has no flow mode")
    cfg = {**base, **kw}
    unknown = [k for k in cfg if k not in valid]
    if unknown:
        raise ValueError(f"{cls_name} takes no {unknown}")
    return cls(**cfg)


def run_diffusers(cls_name: str, evals_per_step: int = 1, **kw) -> Callable[..., RunResult]:
    def run(st: Setting, noise: torch.Tensor, nfe: int, seed: int) -> RunResult:
        steps = nfe if evals_per_step == 1 else (nfe + 1) // 2
        sch = _scheduler(cls_name, st, **kw)
        sch.set_timesteps(steps)
        model = st.gmm.model(st.schedule, "epsilon" if st.name == "sd-vp" else "flow")
        init_sigma = float(getattr(sch, "init_noise_sigma", 1.0))
        x = noise.to(torch.float32) * init_sigma
        x_start = x.to(F64)
        step_params = inspect.signature(sch.step).parameters
        extra = {"generator": torch.Generator().manual_seed(seed)} if "generator" in step_params else {}
        calls = 0
        first_t = float(sch.timesteps[0])
        for t in sch.timesteps:
            xin = sch.scale_model_input(x, t) if hasattr(sch, "scale_model_input") else x
            out = model(xin.to(F64), torch.full((x.shape[0],), float(t), dtype=F64)).to(torch.float32)
            calls += 1
            x = sch.step(out, t, x, **extra).prev_sample
        first = nw.gmm.levels_of(st.schedule, [first_t])[0]
        if init_sigma > 1.0001:  # Euler-type schedulers work in x / alpha
            x_start = x_start * first.alpha
        return x.to(F64), x_start, first, calls

    return run


def peer(cls_name: str, label: str, evals_per_step: int = 1, settings: tuple[str, ...] = ("sd-vp",), **kw) -> Config:
    return Config(f"diffusers {label}", "diffusers", run_diffusers(cls_name, evals_per_step, **kw), settings)


# ------------------------------------------------------------------------------------------------
# k-diffusion: its variance-exploding samplers on Karras sigmas over the schedule's range
# ------------------------------------------------------------------------------------------------


def ve_model(st: Setting, calls: list[int]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The exact denoiser in VE coordinates (the GMM posterior mean depends on x/alpha, sigma/alpha only)."""
    D = st.gmm.denoiser()

    def model(xv: torch.Tensor, sigma: torch.Tensor, **kw: object) -> torch.Tensor:
        calls[0] += 1
        s = float(sigma.reshape(-1)[0])
        a = 1.0 / math.sqrt(1.0 + s * s)
        return D(xv * a, nw.Level(a, s * a, -math.log(s), 0.0))

    return model


def run_k(fn_name: str, evals_per_step: int = 1, **kw) -> Callable[..., RunResult]:
    def run(st: Setting, noise: torch.Tensor, nfe: int, seed: int) -> RunResult:
        from tests.oracles import k_sampling

        K = k_sampling()
        steps = nfe if evals_per_step == 1 else (nfe + 1) // 2
        lo, hi = lambda_range(st.schedule)
        sigmas = K.get_sigmas_karras(steps, math.exp(-hi), math.exp(-lo), rho=7.0).to(F64)
        first = nw.Grid.from_model_times(st.schedule, st.schedule.t_from_ve_sigma(sigmas[:1]))[0]
        calls = [0]
        x_start = noise * math.sqrt(first.alpha**2 + first.sigma**2)
        torch.manual_seed(seed)  # k-diffusion's default noise (randn_like, or its Brownian tree for the SDE ones)
        out = getattr(K, fn_name)(ve_model(st, calls), x_start / first.alpha, sigmas, disable=True, **kw)
        return out, x_start, first, calls[0]

    return run


def kconf(fn_name: str, label: str, evals_per_step: int = 1, **kw) -> Config:
    return Config(f"k-diffusion {label} [karras]", "k-diffusion", run_k(fn_name, evals_per_step, **kw))


# ------------------------------------------------------------------------------------------------
# configurations
# ------------------------------------------------------------------------------------------------


def deterministic_configs(quick: bool) -> list[Config]:
    spacings = [None, "karras", "uniform_lambda"] if not quick else [None, "karras"]
    out = [default_config()]
    for name, opts in [("lms", {}), ("deis", {}), ("ipndm", {}), ("dpm_2", {}), ("flow_heun", {})]:
        for sp in spacings:
            out.append(ours(name, sp, **opts))
    out += [
        peer("LMSDiscreteScheduler", "LMS"),
        peer("LMSDiscreteScheduler", "LMS karras", use_karras_sigmas=True),
        peer("DEISMultistepScheduler", "DEIS 3", settings=("sd-vp", "flow")),
        peer("DEISMultistepScheduler", "DEIS 3 karras", use_karras_sigmas=True),
        peer("KDPM2DiscreteScheduler", "KDPM2", evals_per_step=2),
        peer("KDPM2DiscreteScheduler", "KDPM2 karras", evals_per_step=2, use_karras_sigmas=True),
        peer("FlowMatchHeunDiscreteScheduler", "FlowMatchHeun", evals_per_step=2, settings=("flow",)),
        kconf("sample_lms", "lms"),
        kconf("sample_dpm_2", "dpm_2", evals_per_step=2),
    ]
    return out[:4] + out[-3:] if quick else out


def stochastic_configs(quick: bool) -> list[Config]:
    out = []
    for name, opts, sps in [
        ("ddpm", {}, [None]),
        ("ddim", {"eta": 1.0}, [None]),
        ("euler_ancestral", {}, [None, "karras"]),
        ("dpmpp_2s_ancestral", {}, [None, "karras"]),
        ("dpmpp_sde", {}, [None, "karras"]),
        ("dpmpp_2m_sde", {}, [None, "karras"]),
        ("dpmpp_3m_sde", {}, [None, "karras"]),
    ]:
        for sp in sps:
            out.append(ours(name, sp, **opts))
    out += [
        peer("DDPMScheduler", "DDPM", clip_sample=False),
        peer("EulerAncestralDiscreteScheduler", "EulerAncestral"),
        peer("DPMSolverSDEScheduler", "DPMSolverSDE", evals_per_step=2),
        peer("DPMSolverSDEScheduler", "DPMSolverSDE karras", evals_per_step=2, use_karras_sigmas=True),
        peer("DPMSolverMultistepScheduler", "sde-dpmsolver++ 2M", algorithm_type="sde-dpmsolver++",
             settings=("sd-vp", "flow")),
        peer("DPMSolverMultistepScheduler", "sde-dpmsolver++ 2M karras", algorithm_type="sde-dpmsolver++",
             use_karras_sigmas=True),
        peer("DPMSolverMultistepScheduler", "sde-dpmsolver++ 3M", algorithm_type="sde-dpmsolver++", solver_order=3,
             settings=("sd-vp", "flow")),
        kconf("sample_euler_ancestral", "euler_ancestral"),
        kconf("sample_dpmpp_2s_ancestral", "dpmpp_2s_ancestral", evals_per_step=2),
        kconf("sample_dpmpp_sde", "dpmpp_sde", evals_per_step=2),
        kconf("sample_dpmpp_2m_sde", "dpmpp_2m_sde"),
        kconf("sample_dpmpp_3m_sde", "dpmpp_3m_sde"),
    ]
    return out[:4] + out[-3:] if quick else out


# ------------------------------------------------------------------------------------------------
# measurements
# ------------------------------------------------------------------------------------------------


def _budget_ok(spent: int, nfe: int) -> bool:
    """A two-evaluation sampler cannot always spend an even budget exactly, and saves evaluations on
    first-order steps (leaving alpha = 0, guarded steps): accept up to three less (shown in the tables)."""
    return nfe - 3 <= spent <= nfe


def deterministic_rows(
    n: int, dim: int, nfes: list[int], quick: bool, log: Callable[[str], None] = print
) -> list[dict]:
    rows: list[dict] = []
    cache: dict = {}
    for st in settings(dim):
        noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(1234), dtype=F64)
        for cfg in deterministic_configs(quick):
            if st.name not in cfg.settings:
                continue
            for nfe in nfes:
                try:
                    res = cfg.run(st, noise, nfe, 0)
                except ValueError as e:
                    log(f"  skip {cfg.name} on {st.name}: {e}")
                    break
                if res is None or not _budget_ok(res[3], nfe):
                    continue
                x, x_start, first, spent = res
                key = (st.name, round(first.lam, 9), round(float(x_start[0, 0]), 9))
                if key not in cache:
                    cache[key] = st.gmm.ode_solution(x_start, first, ZERO)
                err = (x.to(F64) - cache[key]).norm(dim=1)
                ok = bool(torch.isfinite(err).all())
                rows.append(dict(setting=st.name, family=cfg.family, config=cfg.name, nfe=nfe, nfe_spent=spent,
                                 median_error=float(err.median()) if ok else math.nan, nan=not ok))
            log(f"  {st.name:6s} {cfg.name:45s} " + " ".join(
                f"{r['median_error']:.4f}" for r in rows if r["config"] == cfg.name and r["setting"] == st.name))
    return rows


def stochastic_rows(
    n: int, dim: int, nfes: list[int], quick: bool, log: Callable[[str], None] = print
) -> list[dict]:
    rows: list[dict] = []
    for st in settings(dim):
        data, _ = st.gmm.sample(n, generator=torch.Generator().manual_seed(77))
        other, _ = st.gmm.sample(n, generator=torch.Generator().manual_seed(78))
        floor = sliced_wasserstein(other, data)
        rows.append(dict(setting=st.name, family="exact", config="exact samples (floor)", nfe=0, nfe_spent=0,
                         sliced_wasserstein=floor, nan=False))
        noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(4321), dtype=F64)
        for cfg in stochastic_configs(quick):
            if st.name not in cfg.settings:
                continue
            for nfe in nfes:
                try:
                    res = cfg.run(st, noise, nfe, 99)
                except ValueError as e:
                    log(f"  skip {cfg.name} on {st.name}: {e}")
                    break
                if res is None or not _budget_ok(res[3], nfe):
                    continue
                x, _, _, spent = res
                ok = bool(torch.isfinite(x).all())
                rows.append(dict(setting=st.name, family=cfg.family, config=cfg.name, nfe=nfe, nfe_spent=spent,
                                 sliced_wasserstein=sliced_wasserstein(x, data) if ok else math.nan, nan=not ok))
            log(f"  {st.name:6s} {cfg.name:45s} " + " ".join(
                f"{r['sliced_wasserstein']:.4f}" for r in rows if r["config"] == cfg.name and r["setting"] == st.name))
    return rows


def adaptive_rows(n: int, dim: int, rtols: list[float], log: Callable[[str], None] = print) -> list[dict]:
    """dpm_adaptive (ours, two algorithms) and k-diffusion's sample_dpm_adaptive per rtol (atol = rtol / 10).

    Two errors per run: at the solve's last noisy level (the schedule's cleanest trained level), vs the
    exact ODE to that level, which is what the tolerance controls; and after the final denoise to
    sigma = 0 (every sampler's output), which adds the denoise's own small error."""
    from tests.oracles import k_sampling

    rows: list[dict] = []
    cache: dict = {}

    def exact(st: Setting, x_start: torch.Tensor, a: nw.Level, b: nw.Level) -> torch.Tensor:
        key = (st.name, round(a.lam, 9), round(b.lam, 9))
        if key not in cache:
            cache[key] = st.gmm.ode_solution(x_start, a, b)
        return cache[key]

    def med(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float((x - ref).norm(dim=1).median())

    for st in settings(dim):
        noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(1234), dtype=F64)
        for label, opts in (
            ("dpm_adaptive", {}),
            ("dpm_adaptive algorithm=dpmsolver", {"algorithm": "dpmsolver"}),
            ("dpm_adaptive algorithm=dpmsolver error_norm=batch_rms",
             {"algorithm": "dpmsolver", "error_norm": "batch_rms"}),
        ):
            for rtol in rtols:
                seen: list = []
                r = nw.sample(None, noise, schedule=st.schedule, sampler="dpm_adaptive", rtol=rtol, atol=rtol / 10,
                              denoiser=st.gmm.denoiser(), return_info=True, callback=seen.append, **opts)
                first, end = r.grid[0], seen[-2].level
                x_start = noise * math.sqrt(first.alpha**2 + first.sigma**2)
                rows.append(dict(setting=st.name, family="noisewise", config=label, rtol=rtol, nfe=r.nfe,
                                 error_end=med(seen[-2].x, exact(st, x_start, first, end)),
                                 median_error=med(r.x, exact(st, x_start, first, ZERO)),
                                 start_lambda=first.lam, end_lambda=end.lam))
            log(f"  {st.name:6s} {label:55s} " + " ".join(
                f"{r['nfe']}:{r['error_end']:.1e}/{r['median_error']:.1e}" for r in rows
                if r["config"] == label and r["setting"] == st.name))
        # k-diffusion from sigma_max to sigma_min of the schedule, then one (counted) denoise to sigma = 0
        K = k_sampling()
        lo, hi = lambda_range(st.schedule)
        smax, smin = math.exp(-lo), math.exp(-hi)
        lv = nw.Grid.from_model_times(st.schedule, st.schedule.t_from_ve_sigma(torch.tensor([smax, smin], dtype=F64)),
                                      final="none")
        first, end = lv[0], lv[1]
        x_start = noise * math.sqrt(first.alpha**2 + first.sigma**2)
        for rtol in rtols:
            calls = [0]
            model = ve_model(st, calls)
            default = torch.get_default_dtype()
            torch.set_default_dtype(F64)
            try:
                y = K.sample_dpm_adaptive(model, x_start / first.alpha, smin, smax, rtol=rtol, atol=rtol / 10,
                                          disable=True)
            finally:
                torch.set_default_dtype(default)
            x0 = model(y, torch.tensor([smin], dtype=F64))
            rows.append(dict(setting=st.name, family="k-diffusion", config="k-diffusion sample_dpm_adaptive",
                             rtol=rtol, nfe=calls[0], error_end=med(y * end.alpha, exact(st, x_start, first, end)),
                             median_error=med(x0, exact(st, x_start, first, ZERO)),
                             start_lambda=first.lam, end_lambda=end.lam))
        log(f"  {st.name:6s} {'k-diffusion sample_dpm_adaptive':55s} " + " ".join(
            f"{r['nfe']}:{r['error_end']:.1e}/{r['median_error']:.1e}" for r in rows
            if r["family"] == "k-diffusion" and r["setting"] == st.name))
    return rows


# ------------------------------------------------------------------------------------------------
# output
# ------------------------------------------------------------------------------------------------


def machine() -> str:
    return (f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def _csv(path: str, rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


def _table(rows: list[dict], setting: str, metric: str, nfes: list[int]) -> list[str]:
    sub = [r for r in rows if r["setting"] == setting and r["family"] != "exact"]
    lines = ["| config | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for name in dict.fromkeys(r["config"] for r in sub):
        vals = []
        for nfe in nfes:
            c = [r for r in sub if r["config"] == name and r["nfe"] == nfe]
            if not c:
                vals.append("—")
            elif c[0]["nan"]:
                vals.append("NaN")
            else:
                spent = f" ({c[0]['nfe_spent']})" if c[0]["nfe_spent"] != nfe else ""
                vals.append(f"{c[0][metric]:.4f}{spent}")
        lines.append(f"| {name} | " + " | ".join(vals) + " |")
    return lines


def _best(rows: list[dict], setting: str, metric: str, nfes: list[int]) -> list[str]:
    sub = [r for r in rows if r["setting"] == setting and not r["nan"] and r["family"] != "exact"]
    lines = ["| NFE | best noisewise | best diffusers | best k-diffusion |", "|---|---|---|---|"]
    for nfe in nfes:
        cells = []
        for fam in ("noisewise", "diffusers", "k-diffusion"):
            c = [r for r in sub if r["family"] == fam and r["nfe"] == nfe
                 and not r["config"].startswith("noisewise default")]
            if not c:
                cells.append("—")
                continue
            b = min(c, key=lambda r: r[metric])
            cells.append(f"{b[metric]:.4f} ({b['config'].replace('diffusers ', '').replace('k-diffusion ', '')})")
        lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
    return lines


def write(det: list[dict], sto: list[dict], ada: list[dict], args: argparse.Namespace, nfes: list[int],
          nfes_sto: list[int], seconds: float) -> None:
    os.makedirs(OUT, exist_ok=True)
    _csv(os.path.join(OUT, "samplers_extra_deterministic.csv"), det)
    _csv(os.path.join(OUT, "samplers_extra_stochastic.csv"), sto)
    _csv(os.path.join(OUT, "samplers_extra_adaptive.csv"), ada)
    cmd = "python bench/bench_samplers_extra.py" + (" --quick" if args.quick else "")
    desc = {"sd-vp": "SD 1.x schedule (discrete VP, scaled_linear)", "flow": "rectified flow, shift 3 (SD3-style)"}
    L = [
        "# Issue-3 samplers: accuracy vs NFE, distribution distance, adaptive tolerance",
        "",
        f"Produced by `{cmd}` on {machine()}, {time.strftime('%Y-%m-%d')}, in {seconds:.0f} s.",
        "Data: `samplers_extra_deterministic.csv`, `samplers_extra_stochastic.csv`, "
        "`samplers_extra_adaptive.csv`; plot: `samplers_extra.png`.",
        "",
        "Exact Gaussian mixture (`GaussianMixture.default`, 8 modes). Every peer gets the same exact denoiser "
        "as its network: diffusers through its scheduler loop (`scale_model_input`, `step`, as a pipeline), "
        "k-diffusion through its variance-exploding denoiser on Karras sigmas over the schedule's range. "
        "`[default]` is the schedule's default spacing (SD: trailing; flow: linspace from t = 1). "
        "A number in parentheses is the NFE actually spent where a two-evaluation sampler could not spend the "
        "column's budget exactly (or took first-order steps).",
        "",
        f"## Deterministic samplers: median error vs the exact ODE (dim {args.dim}, {args.n} samples, same noise)",
        "",
    ]
    for st in ("sd-vp", "flow"):
        L += [f"### {desc[st]}", "", "Best of each family per NFE:", ""] + _best(det, st, "median_error", nfes)
        L += ["", "<details><summary>All configurations</summary>", ""] + _table(det, st, "median_error", nfes)
        L += ["", "</details>", ""]
    L += [f"## Stochastic samplers: sliced Wasserstein distance to exact data samples (dim {args.sto_dim}, "
          f"{args.sto_n} samples)", ""]
    for st in ("sd-vp", "flow"):
        floor = [r for r in sto if r["setting"] == st and r["family"] == "exact"]
        L += [f"### {desc[st]}", "",
              f"Floor (two independent exact sample sets of this size): {floor[0]['sliced_wasserstein']:.4f}." if floor
              else "", "", "Best of each family per NFE:", ""] + _best(sto, st, "sliced_wasserstein", nfes_sto)
        L += ["", "<details><summary>All configurations</summary>", ""]
        L += _table(sto, st, "sliced_wasserstein", nfes_sto)
        L += ["", "</details>", ""]
    L += ["## dpm_adaptive: NFE spent and error reached per rtol", "",
          f"Same data and noise as the deterministic table (dim {args.dim}, {args.n} samples); atol = rtol / 10. "
          "Each cell: NFE spent / median error at the last noisy level (what the tolerance controls) / median "
          "error after the final denoise to sigma = 0. Ours: the schedule's default grid gives start and end "
          "(flow: from t = 1, alpha = 0, through the first step in u = alpha/sigma), final denoise included in "
          "the NFE; k-diffusion: sigma_max..sigma_min of the same range (flow: from t = 0.999) plus one counted "
          "denoise.", "",
          "| setting | config | " + " | ".join(f"rtol {r:g}" for r in args.rtols) + " |",
          "|---|---|" + "---|" * len(args.rtols)]
    for st in ("sd-vp", "flow"):
        for name in dict.fromkeys(r["config"] for r in ada if r["setting"] == st):
            cells = []
            for rt in args.rtols:
                c = [r for r in ada if r["setting"] == st and r["config"] == name and r["rtol"] == rt]
                cells.append(f"{c[0]['nfe']} / {c[0]['error_end']:.1e} / {c[0]['median_error']:.1e}" if c else "—")
            L.append(f"| {st} | {name} | " + " | ".join(cells) + " |")
    L += [""]
    with open(os.path.join(OUT, "samplers_extra.md"), "w") as f:
        f.write("\n".join(L))
    plot(det, sto, ada)


def plot(det: list[dict], sto: list[dict], ada: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(14, 10))
    for col, st in enumerate(("sd-vp", "flow")):
        for row, (rows, metric, ylabel) in enumerate(((det, "median_error", "median error vs exact ODE"),
                                                       (sto, "sliced_wasserstein", "sliced Wasserstein to data"))):
            ax = axes[row][col]
            sub = [r for r in rows if r["setting"] == st and not r["nan"] and r["family"] != "exact"]
            for fam, style in (("noisewise", "-"), ("diffusers", "--"), ("k-diffusion", ":")):
                names = list(dict.fromkeys(r["config"] for r in sub if r["family"] == fam))
                at10 = {n: min([r[metric] for r in sub if r["config"] == n and r["nfe"] == 10] or [math.inf])
                        for n in names}
                for n in sorted(at10, key=at10.get)[:4]:
                    pts = sorted((r["nfe_spent"], r[metric]) for r in sub if r["config"] == n)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", ms=3, label=n)
            if row == 0:
                for name, mk in (("dpm_adaptive", "s"), ("k-diffusion sample_dpm_adaptive", "^")):
                    pts = sorted((r["nfe"], r["median_error"]) for r in ada
                                 if r["setting"] == st and r["config"] == name)
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], "k" + mk + "-.", ms=6,
                            label=f"{name} (rtol sweep)")
            else:
                fl = [r for r in sto if r["setting"] == st and r["family"] == "exact"]
                if fl:
                    ax.axhline(fl[0]["sliced_wasserstein"], color="grey", lw=1, label="exact-sample floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE")
            ax.set_ylabel(ylabel)
            ax.set_title(f"{st}: {'deterministic' if row == 0 else 'stochastic'} (best 4 of each family at NFE 10)")
            ax.legend(fontsize=6)
            ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "samplers_extra.png"), dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer samples, NFEs and configs (smoke run)")
    ap.add_argument("--n", type=int, default=None, help="noise samples for the ODE error (default 512, quick 64)")
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--sto-n", type=int, default=None, help="samples for the distribution distance (default 4000)")
    ap.add_argument("--sto-dim", type=int, default=2)
    args = ap.parse_args()
    args.n = args.n or (64 if args.quick else 512)
    args.sto_n = args.sto_n or (500 if args.quick else 4000)
    args.rtols = RTOLS[:2] if args.quick else RTOLS
    nfes = NFES[:3] if args.quick else NFES
    nfes_sto = NFES_STOCHASTIC[:3] if args.quick else NFES_STOCHASTIC
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # diffusers' and torchsde's chatter about float32 sigma rounding
    t0 = time.time()
    print("deterministic")
    det = deterministic_rows(args.n, args.dim, nfes, args.quick)
    print("stochastic")
    sto = stochastic_rows(args.sto_n, args.sto_dim, nfes_sto, args.quick)
    print("adaptive")
    ada = adaptive_rows(args.n, args.dim, args.rtols)
    write(det, sto, ada, args, nfes, nfes_sto, time.time() - t0)
    print(f"done in {time.time() - t0:.0f} s -> {OUT}/samplers_extra.md")


if __name__ == "__main__":
    main()
