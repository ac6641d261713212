"""Load test of ``noisewise serve`` on loopback: 32 concurrent clients send mixed requests (samplers,
steps, guidance, seeds) for ``--duration`` seconds, once with continuous batching and once serving
one request at a time, in the same run (both servers up at once, the load alternating between them in
``--rounds`` windows so that a change in the machine's background load hits both modes alike); then the
fault cases (malformed JSON, oversize body,
disconnects, a flood past the queue) with the server checked healthy afterwards; then Ray batch
throughput with 1 vs 2 workers.

    .venv/bin/python bench/bench_server.py                 # 60 s per mode (docs/benchmarks/server.md)
    .venv/bin/python bench/bench_server.py --duration 15 --no-ray   # quick look
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SAMPLERS = ["dpmpp_2m", "euler", "unipc", "euler_ancestral", "heun", "ddim", "dpmpp_2m_sde"]
PROMPTS = ["a large red circle on the left", "a small blue square", "a green triangle on the right",
           "two yellow stars", "a purple circle at the top", "an orange square at the bottom"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int, batching: bool, max_queue: int = 64) -> subprocess.Popen:
    code = ("from noisewise.server import serve, ServerConfig; "
            f"serve('127.0.0.1', {port}, ServerConfig(models=('shapes-vp',), preload=('shapes-vp',), "
            f"batching={batching}, max_queue={max_queue}, max_active=32, max_batch=128, torch_threads=1), "
            "log_level='warning')")
    return subprocess.Popen([sys.executable, "-c", code], cwd=ROOT)


async def wait_ready(url: str, timeout: float = 300) -> None:
    end = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while time.monotonic() < end:
            try:
                if (await c.get(url + "/readyz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.5)
    raise RuntimeError("server did not become ready")


def make_request(rng: random.Random, seed: int) -> dict:
    return {"prompt": rng.choice(PROMPTS), "sampler": rng.choice(SAMPLERS), "steps": rng.choice([4, 6, 8, 10, 12]),
            "guidance_scale": rng.choice([1.0, 3.0, 5.0, 7.5]), "seed": seed}


async def load(url: str, clients: int, duration: float, seed0: int) -> dict:
    lat, statuses, nfe, images = [], {}, 0, 0
    seen: dict[int, int] = {}
    sent = 0
    t0 = time.monotonic()
    deadline = t0 + duration

    async def client(k: int) -> None:
        nonlocal nfe, images, sent
        rng = random.Random(seed0 + k)
        async with httpx.AsyncClient(base_url=url, timeout=300) as c:
            i = 0
            while time.monotonic() < deadline:
                seed = seed0 * 1_000_000 + k * 10_000 + i
                i += 1
                body = make_request(rng, seed)
                sent += 1
                t = time.monotonic()
                r = await c.post("/v1/generate", json=body)
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    j = r.json()
                    lat.append(time.monotonic() - t)
                    nfe += j["nfe"]
                    images += len(j["images"])
                    got = j["images"][0]["metadata"]["seed"]
                    seen[got] = seen.get(got, 0) + 1
                    assert got == seed, "a response for another request"

    await asyncio.gather(*(client(k) for k in range(clients)))
    wall = time.monotonic() - t0
    # raw counts of one window; merge_windows() summarises (rates, percentiles, duplicates, lost)
    return {"requests_sent": sent, "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "wall_s": wall, "images_per_s": round(images / wall, 3), "images": images, "nfe": nfe,
            "latencies": lat, "seeds": seen}


def merge_windows(ws: list[dict]) -> dict:
    """One result from several load windows of the same mode (sums; percentiles over all requests)."""
    lat = [x for w in ws for x in w["latencies"]]
    seen: dict[int, int] = {}
    for w in ws:
        for k, v in w["seeds"].items():
            seen[k] = seen.get(k, 0) + v
    statuses: dict[str, int] = {}
    for w in ws:
        for k, v in w["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    wall = sum(w["wall_s"] for w in ws)
    images, nfe = sum(w["images"] for w in ws), sum(w["nfe"] for w in ws)
    a = np.array(lat)
    return {"windows": len(ws), "requests_sent": sum(w["requests_sent"] for w in ws), "statuses": statuses,
            "ok": len(lat), "wall_s": round(wall, 2), "images_per_s": round(images / wall, 3),
            "nfe_per_s": round(nfe / wall, 2),
            "p50_s": round(float(np.percentile(a, 50)), 3) if len(a) else None,
            "p99_s": round(float(np.percentile(a, 99)), 3) if len(a) else None,
            "duplicates": sum(v - 1 for v in seen.values() if v > 1),
            "lost": sum(w["requests_sent"] for w in ws) - sum(statuses.values()),
            "server_5xx": sum(v for k, v in statuses.items() if int(k) >= 500),
            "per_window_images_per_s": [w["images_per_s"] for w in ws]}


async def scrape(url: str) -> dict:
    async with httpx.AsyncClient() as c:
        text = (await c.get(url + "/metrics")).text
    out = {}
    for line in text.splitlines():
        for name in ("noisewise_batch_size_sum", "noisewise_batch_size_count", "noisewise_text_cache_hit_ratio"):
            if line.startswith(name):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    if out.get("noisewise_batch_size_count"):
        out["mean_rows_per_forward"] = round(out["noisewise_batch_size_sum"] / out["noisewise_batch_size_count"], 2)
    return out


async def faults(url: str) -> dict:
    res = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        r = await c.post("/v1/generate", content=b"{not json", headers={"content-type": "application/json"})
        res["malformed_json"] = r.status_code
        r = await c.post("/v1/generate", content=b'{"prompt":"' + b"x" * 100_000 + b'"}',
                         headers={"content-type": "application/json"})
        res["oversize_body"] = r.status_code
        r = await c.post("/v1/generate", json={"prompt": "x", "steps": 10_000})
        res["too_many_steps"] = r.status_code
        r = await c.post("/v1/generate", json={"prompt": "x", "model": "../../etc/passwd"})
        res["path_as_model"] = r.status_code
        # disconnects: 8 clients give up after 0.3 s on long requests
        for k in range(8):
            try:
                await c.post("/v1/generate", json={"prompt": "x", "steps": 100, "seed": k}, timeout=0.3)
            except httpx.TimeoutException:
                pass
        for _ in range(120):  # wait until the cancelled requests have left
            m = (await c.get("/metrics")).text
            n = sum(float(line.rsplit(" ", 1)[1]) for line in m.splitlines()
                    if line.startswith("noisewise_requests_total") and 'status="cancelled"' in line)
            if n >= 8:
                break
            await asyncio.sleep(0.5)
        res["cancelled_after_disconnect"] = n
        res["active_after_disconnects"] = [float(line.split()[1]) for line in m.splitlines()
                                           if line.startswith("noisewise_active_requests ")]

        # a flood past max_active + max_queue
        async def one(k: int) -> int:
            try:
                return (await c.post("/v1/generate", json={"prompt": "x", "steps": 4, "seed": k}, timeout=300)
                        ).status_code
            except httpx.TransportError:
                return -1

        codes = await asyncio.gather(*(one(k) for k in range(160)))
        res["flood_statuses"] = {str(k): codes.count(k) for k in sorted(set(codes))}
        res["healthz_after"] = (await c.get("/healthz")).status_code
        res["readyz_after"] = (await c.get("/readyz")).status_code
        res["generate_after"] = (await c.post("/v1/generate", json={"prompt": "ok", "steps": 4})).status_code
    return res


def run_modes(args: argparse.Namespace) -> tuple[dict, dict]:
    """Both servers up; ``args.rounds`` alternating windows of ``duration / rounds`` seconds each."""
    ports = {True: free_port(), False: free_port()}
    procs = {b: start_server(p, b) for b, p in ports.items()}
    urls = {b: f"http://127.0.0.1:{p}" for b, p in ports.items()}
    windows: dict[bool, list[dict]] = {True: [], False: []}
    try:
        for u in urls.values():
            asyncio.run(wait_ready(u))
        for r in range(args.rounds):
            order = (True, False) if r % 2 == 0 else (False, True)
            for batching in order:
                w = asyncio.run(load(urls[batching], args.clients, args.duration / args.rounds, seed0=7 + 100 * r))
                windows[batching].append(w)
                print(f"  round {r + 1}/{args.rounds} {'batching' if batching else 'one at a time'}: "
                      f"{w['images_per_s']} images/s", flush=True)
        out = {b: merge_windows(ws) for b, ws in windows.items()}
        out[True]["metrics"] = asyncio.run(scrape(urls[True]))
        out[False]["metrics"] = asyncio.run(scrape(urls[False]))
        out[True]["faults"] = asyncio.run(faults(urls[True]))
        return out[True], out[False]
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            proc.wait(60)


def ray_bench(items: int, steps: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "prompts.jsonl"
        p.write_text("".join(json.dumps({"prompt": PROMPTS[i % len(PROMPTS)], "steps": steps}) + "\n"
                             for i in range(items)))
        for workers in (1, 2):
            cmd = [sys.executable, "-m", "noisewise.cli", "batch", str(p), "--out", f"{d}/out{workers}",
                   "--engine", "ray", "--workers", str(workers), "--torch-threads", "1", "--quiet"]
            t = time.monotonic()
            r = subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, text=True)
            wall = time.monotonic() - t
            m = re.search(r"first result after ([0-9.]+) s, then ([0-9.]+) items/s", r.stdout)
            out[f"{workers}_workers"] = {"wall_s": round(wall, 1), "items_per_s": round(items / wall, 3),
                                         "first_result_s": float(m.group(1)) if m else None,
                                         "steady_items_per_s": float(m.group(2)) if m else None}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load per mode (all windows)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating load windows per mode")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--no-ray", action="store_true")
    ap.add_argument("--ray-items", type=int, default=32)
    ap.add_argument("--ray-steps", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = ap.parse_args()
    args.duration = min(args.duration, 120.0)  # bounded
    args.clients = min(args.clients, 64)
    res = {"command": "python " + " ".join(sys.argv), "machine": f"{os.cpu_count()}-core CPU, no GPU, "
           f"{platform.platform()}", "clients": args.clients, "duration_s": args.duration}
    args.rounds = max(1, args.rounds)
    res["rounds"] = args.rounds
    res["batched"], res["one_at_a_time"] = run_modes(args)
    b, s = res["batched"], res["one_at_a_time"]
    res["speedup_images_per_s"] = round(b["images_per_s"] / s["images_per_s"], 2) if s["images_per_s"] else None
    if not args.no_ray:
        res["ray_batch"] = ray_bench(args.ray_items, args.ray_steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    (out / "server.json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        "# Server load test", "",
        f"Command: `{res['command']}`  ", f"Machine: {res['machine']}  ",
        f"{args.clients} concurrent loopback clients, mixed requests (samplers {', '.join(SAMPLERS)}; steps 4-12; "
        f"guidance 1-7.5; distinct seeds), {args.duration:g} s per mode in {args.rounds} alternating windows "
        "(both servers up throughout), shapes-vp (32x32), 1 torch thread per server.", "",
        "| mode | ok requests | images/s | NFE/s | p50 latency (s) | p99 latency (s) | 5xx | lost | duplicated | "
        "mean rows/forward |", "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in (("continuous batching", b), ("one request at a time", s)):
        lines.append(f"| {name} | {r['ok']} | {r['images_per_s']} | {r['nfe_per_s']} | {r['p50_s']} | {r['p99_s']} | "
                     f"{r['server_5xx']} | {r['lost']} | {r['duplicates']} | "
                     f"{r['metrics'].get('mean_rows_per_forward')} |")
    lines += ["", f"Throughput ratio (batching / one at a time): **{res['speedup_images_per_s']}x** "
              f"(per window, images/s: batching {b['per_window_images_per_s']}, one at a time "
              f"{s['per_window_images_per_s']})", ""]
    f = b["faults"]
    lines += ["## Fault cases (batching server, after the load)", "",
              f"- malformed JSON -> {f['malformed_json']}; 100 kB body -> {f['oversize_body']}; "
              f"steps=10000 -> {f['too_many_steps']}; model='../../etc/passwd' -> {f['path_as_model']}",
              f"- 8 clients disconnecting after 0.3 s -> {f['cancelled_after_disconnect']:g} requests cancelled "
              "(slots freed)",
              f"- 160 simultaneous requests (capacity 32 active + 64 queued) -> statuses {f['flood_statuses']}",
              f"- afterwards: /healthz {f['healthz_after']}, /readyz {f['readyz_after']}, "
              f"generate {f['generate_after']}", ""]
    if "ray_batch" in res:
        rb = res["ray_batch"]
        lines += ["## Ray batch (`noisewise batch --engine ray`)", "",
                  f"{args.ray_items} items, {args.ray_steps} steps, 1 torch thread per worker. Wall time includes "
                  "Ray start and model loading per worker; 'steady' is the rate after the first result:", "",
                  "| workers | wall (s) | items/s overall | first result (s) | steady items/s |",
                  "|---|---|---|---|---|"]
        for k, v in rb.items():
            lines.append(f"| {k.split('_')[0]} | {v['wall_s']} | {v['items_per_s']} | {v['first_result_s']} | "
                         f"{v['steady_items_per_s']} |")
        lines.append("")
    (out / "server.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
