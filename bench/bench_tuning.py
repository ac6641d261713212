"""Tuned step schedules (issue 8) on the exact Gaussian-mixture benchmark, beside the best diffusers
and k-diffusion configurations in the same run.

    python bench/bench_tuning.py            # full run (~10 min on a 2-core CPU)
    python bench/bench_tuning.py --quick    # 2 NFEs, fewer samples (smoke run)

Same setting as ``bench/bench_samplers.py`` (its ``settings()`` and ``peer_configs()`` are imported,
not copied): 8-mode mixture in dim 8, SD-1.x discrete VP and rectified flow with shift 3, error =
median L2 distance to the exact probability-flow ODE solution from the config's own first level.
Evaluation noise: ``torch.Generator().manual_seed(1234)``, as the sampler benchmark. Calibration:
``tune_schedule(seed=0)``, whose noise comes from a derived generator seed; ``evaluation_noise``
refuses the calibration seed, so the two never share noise.

Writes docs/benchmarks/tuning.md, tuning.csv, tuning.png.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import math
import os
import sys
import time
from typing import Any

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import bench_samplers as bs  # noqa: E402  (the sampler benchmark: settings and peer configs)
import noisewise as nw  # noqa: E402
from noisewise.tuning import TunedSchedule, evaluation_noise, tune_schedule  # noqa: E402

OUT = bs.OUT
F64 = torch.float64
NFES = [4, 5, 6, 8, 10, 15, 20]
EVAL_SEED = 1234
CAL_SEED = 0


def tuned_samplers(st: bs.Setting, nfe: int) -> list[tuple[str, dict[str, Any]]]:
    """The recommended sampler for the budget, then the two iPNDM orders (their last step into
    sigma = 0 is a genuine multistep step, which tuning can exploit) and third-order UniPC."""
    rec, opts, _ = nw.recommended(st.schedule, nfe)
    out = [(rec, opts), ("ipndm", {}), ("ipndm", {"order": 3}), ("unipc", {"order": 3})]
    uniq: list[tuple[str, dict[str, Any]]] = []
    seen: list[tuple[str, dict[str, Any]]] = []
    for s, o in out:
        full = (s, {**_defaults(s), **o})
        if full not in seen:
            seen.append(full)
            uniq.append((s, o))
    return uniq


def _defaults(sampler: str) -> dict[str, Any]:
    params = inspect.signature(nw.get_sampler(sampler).fn).parameters.values()
    return {p.name: p.default for p in params if p.kind == p.KEYWORD_ONLY and p.name != "callback"}


def label(sampler: str, opts: dict[str, Any]) -> str:
    return sampler + "".join(f" {k}={v}" for k, v in opts.items())


def run(n_eval: int, batch: int, dim: int, nfes: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    peers = [c for c in bs.peer_configs(False) if c.family in ("diffusers", "k-diffusion")]
    for st in bs.settings(dim):
        rows += run_setting(st, peers, n_eval, batch, dim, nfes)
    return rows


def run_setting(st: bs.Setting, peers: list[bs.Config], n_eval: int, batch: int, dim: int,
                nfes: list[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    D = st.gmm.denoiser()
    exact_cache: dict[Any, torch.Tensor] = {}

    def error(x: torch.Tensor, x_t: torch.Tensor, first: nw.Level) -> float:
        key = (round(first.lam, 10), round(float(x_t[0, 0]), 10))
        if key not in exact_cache:
            exact_cache[key] = st.gmm.ode_solution(x_t, first, nw.Level(1.0, 0.0, math.inf, 0.0))
        err = (x.to(F64) - exact_cache[key]).norm(dim=1)
        return float(err.median()) if bool(torch.isfinite(err).all()) else math.nan

    def ours(noise: torch.Tensor, **kw: Any) -> float:
        r = nw.sample(None, noise, schedule=st.schedule, denoiser=D, return_info=True, **kw)
        first = r.grid[0]
        return error(r.x, noise * math.sqrt(first.alpha**2 + first.sigma**2), first)

    tuned_all: list[TunedSchedule] = []
    for nfe in nfes:
        cands = []
        for sampler, opts in tuned_samplers(st, nfe):
            t = tune_schedule(None, denoiser=D, schedule=st.schedule, sampler=sampler, nfe=nfe, shape=(dim,),
                              batch=batch, seed=CAL_SEED, dtype=F64, cache=False, **opts)
            tuned_all.append(t)
            cands.append((t, opts))
        noise = evaluation_noise(tuned_all, n_eval, (dim,), EVAL_SEED)  # refuses the calibration seed
        rec = cands[0][0]
        best_cal = min(cands, key=lambda c: c[0].loss)[0]  # chosen on calibration loss, not on evaluation
        for t, opts in cands:
            e = ours(noise, spacing=t)
            e_start = ours(noise, sampler=t.sampler, spacing=t.start, nfe=nfe, **opts)
            rows.append(dict(setting=st.name, family="noisewise tuned", config=f"tuned {label(t.sampler, opts)}",
                             nfe=nfe, median_error=e, start=t.start, start_error=e_start,
                             calibration_loss=t.loss, calibration_start_loss=t.start_loss,
                             seconds=round(t.seconds, 2), solves=t.evaluations, model_calls=t.model_calls,
                             recommended=t is rec, best_by_calibration=t is best_cal))
        rows.append(dict(setting=st.name, family="noisewise", config="noisewise default", nfe=nfe,
                         median_error=ours(noise, nfe=nfe)))
        for cfg in peers:
            if st.name not in cfg.settings:
                continue
            try:
                res = cfg.run(st, noise, nfe)
            except ValueError:
                continue
            if res is None:
                continue
            x, x_t, first, spent = res
            if spent != nfe:
                continue
            rows.append(dict(setting=st.name, family=cfg.family, config=cfg.name, nfe=nfe,
                             median_error=error(x, x_t, first)))
        sub = [r for r in rows if r["setting"] == st.name and r["nfe"] == nfe]
        bp = best_peer(sub)
        bt = next(r for r in sub if r.get("best_by_calibration"))
        print(f"{st.name:6s} NFE {nfe:2d}: best peer {bp['median_error']:.4f} ({bp['config']}), tuned "
              f"{bt['median_error']:.4f} ({bt['config']}, {bt['seconds']:.0f} s)", flush=True)
    return rows


def best_peer(sub: list[dict[str, Any]]) -> dict[str, Any]:
    c = [r for r in sub if r["family"] in ("diffusers", "k-diffusion") and not math.isnan(r["median_error"])]
    return min(c, key=lambda r: r["median_error"])


def machine() -> str:
    return bs.machine()


def write(rows: list[dict[str, Any]], args: argparse.Namespace, nfes: list[int], total_s: float) -> None:
    os.makedirs(OUT, exist_ok=True)
    fields: list[str] = []
    for r in rows:
        fields += [k for k in r if k not in fields]
    with open(os.path.join(OUT, "tuning.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    cmd = "python bench/bench_tuning.py" + (" --quick" if args.quick else "")
    L = [
        "# Tuned step schedules vs NFE (issue 8)",
        "",
        f"Produced by `{cmd}` on {machine()}, {time.strftime('%Y-%m-%d')}, in {total_s / 60:.0f} min. "
        "Data: `tuning.csv`; plot: `tuning.png`. Method and usage: [../tuning.md](../tuning.md).",
        "",
        f"Exact Gaussian mixture (8 modes, dim {args.dim}), the setting of [samplers.md](samplers.md) "
        "(`bench_samplers.settings()`; the peers are its `peer_configs()`). Error = median over "
        f"{args.n} evaluation samples of the L2 distance to the exact probability-flow ODE solution from the "
        "config's own first level to sigma = 0. **Evaluation noise** `torch.Generator().manual_seed(1234)`; "
        f"**calibration noise**: {args.batch} samples from `tune_schedule(seed=0)`'s derived generator "
        "(`evaluation_noise` refuses a calibration seed), so no evaluation sample was seen while tuning. "
        "Each schedule is tuned against the model's own fine reference solve (no exact ODE is used in tuning).",
        "",
        "Tuned samplers per NFE: the recommended one (`nw.recommended`), iPNDM (order 4), iPNDM order 3 and "
        "UniPC order 3. **tuned (best)** is the one with the lowest *calibration* loss; it is chosen "
        "without looking at the evaluation noise. Goal: at most half the best peer's error.",
        "",
    ]
    for st in ("sd-vp", "flow"):
        sub = [r for r in rows if r["setting"] == st]
        if not sub:
            continue
        desc = {"sd-vp": "SD 1.x schedule (discrete VP, scaled_linear, epsilon)",
                "flow": "rectified flow, shift 3 (SD3-style)"}[st]
        L += [f"## {desc}", "",
              "| NFE | best peer | goal (half) | noisewise default (hand) | tuned, recommended sampler | "
              "tuned (best) | tuned (best) / best peer | goal met | tuning cost of tuned (best) |",
              "|---|---|---|---|---|---|---|---|---|"]
        for nfe in nfes:
            s = [r for r in sub if r["nfe"] == nfe]
            if not s:
                continue
            bp = best_peer(s)
            d = next(r for r in s if r["config"] == "noisewise default")
            rec = next(r for r in s if r.get("recommended"))
            bt = next(r for r in s if r.get("best_by_calibration"))
            ratio = bt["median_error"] / bp["median_error"]
            L.append(
                f"| {nfe} | {bp['median_error']:.4f} ({bp['config']}) | {bp['median_error'] / 2:.4f} | "
                f"{d['median_error']:.4f} | {rec['median_error']:.4f} ({rec['config'][6:]}) | "
                f"{bt['median_error']:.4f} ({bt['config'][6:]}) | {ratio:.2f} | {'yes' if ratio <= 0.5 else 'no'} | "
                f"{bt['seconds']:.1f} s, {bt['solves']} solves, {bt['model_calls']} calls |")
        L += ["", "Every tuned configuration, against the hand spacing it started from (same sampler, same "
              "evaluation noise); cost = wall time on this machine, cheap solves in the search, and network "
              f"calls (each a batch of {args.batch} calibration samples, including the {200}-step reference):", "",
              "| NFE | tuned config | error tuned | error of its start (hand) | start | calibration loss "
              "(start -> tuned) | seconds | solves | network calls |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sub:
            if r["family"] != "noisewise tuned":
                continue
            L.append(f"| {r['nfe']} | {r['config'][6:]} | {r['median_error']:.4f} | {r['start_error']:.4f} | "
                     f"{r['start']} | {r['calibration_start_loss']:.4f} -> {r['calibration_loss']:.4f} | "
                     f"{r['seconds']:.1f} | {r['solves']} | {r['model_calls']} |")
        L += [""]
    with open(os.path.join(OUT, "tuning.md"), "w") as f:
        f.write("\n".join(L))
    plot(rows, nfes)


def plot(rows: list[dict[str, Any]], nfes: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
    for ax, st in zip(axes, ("sd-vp", "flow")):
        sub = [r for r in rows if r["setting"] == st]
        if not sub:
            continue

        def series(pick: Any, sub: list[dict[str, Any]] = sub) -> tuple[list[int], list[float]]:
            xs, ys = [], []
            for nfe in nfes:
                s = [r for r in sub if r["nfe"] == nfe]
                if s:
                    xs.append(nfe)
                    ys.append(pick(s)["median_error"])
            return xs, ys

        ax.plot(*series(best_peer), "--", marker="s", color="gray", label="best peer (diffusers / k-diffusion)")
        xs, ys = series(best_peer)
        ax.plot(xs, [y / 2 for y in ys], ":", color="gray", label="goal: half the best peer")
        ax.plot(*series(lambda s: next(r for r in s if r["config"] == "noisewise default")), "-", marker="o",
                color="tab:blue", label="noisewise default (hand spacing)")
        ax.plot(*series(lambda s: next(r for r in s if r.get("recommended"))), "-", marker="^",
                color="tab:orange", label="tuned, recommended sampler")
        ax.plot(*series(lambda s: next(r for r in s if r.get("best_by_calibration"))), "-", marker="D",
                color="black", lw=2, label="tuned (best by calibration loss)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xticks(nfes)
        ax.set_xticklabels([str(n) for n in nfes])
        ax.set_xlabel("NFE")
        ax.set_ylabel("median error vs exact ODE")
        ax.set_title(st)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(OUT, "tuning.png"), dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="NFE 5 and 10 only, fewer samples (smoke run)")
    ap.add_argument("--n", type=int, default=None, help="evaluation samples (default 512, quick 128)")
    ap.add_argument("--batch", type=int, default=256, help="calibration samples (default 256)")
    ap.add_argument("--dim", type=int, default=8)
    args = ap.parse_args()
    args.n = args.n or (128 if args.quick else 512)
    nfes = [5, 10] if args.quick else NFES
    torch.set_num_threads(1)
    t0 = time.time()
    rows = run(args.n, args.batch, args.dim, nfes)
    write(rows, args, nfes, time.time() - t0)
    print(f"done in {time.time() - t0:.0f} s -> {OUT}/tuning.md")


if __name__ == "__main__":
    main()
