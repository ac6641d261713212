#!/usr/bin/env python
"""Feasibility probe: static INT8 of the whole shipped UNet (convolutions included) with PT2E and the
x86 inductor quantizer (needs the optional ``torchao`` package; PyTorch 2.13 moved PT2E there).

Exports the UNet at one guided batch shape, calibrates on real sampling states (inputs the UNet sees
while generating), converts, compiles with inductor (freezing on, so int8 oneDNN kernels are used),
and times one denoiser call against plain FP32 and compiled FP32, interleaved; reports the relative
error of the output against FP32. Writes docs/benchmarks/inference_int8_pt2e.json.

    python bench/bench_int8_pt2e.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

from noisewise.pipeline import Pipeline
from noisewise.shapes.evaluator import benchmark_prompts

OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks"


class Net(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=c).sample


def main() -> None:
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    try:
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq
    except ImportError:
        sys.exit("this probe needs torchao (PyTorch 2.13's PT2E quantization lives there): "
                 "pip install --no-deps torchao")

    t0 = time.time()
    load0 = os.getloadavg()
    pipe = Pipeline.from_pretrained("shapes-vp")
    B = 8  # images per call -> 16 rows with guidance
    prompts = benchmark_prompts(B)
    cond = pipe.encode_prompt(prompts)
    uncond = pipe.encode_prompt([pipe.defaults["negative_prompt"]] * B)
    c = torch.cat([cond, uncond])
    calib: list[tuple[torch.Tensor, torch.Tensor]] = []

    def record(x: torch.Tensor, t: torch.Tensor, cc: torch.Tensor) -> torch.Tensor:
        calib.append((x.clone(), t.clone()))
        return pipe.model_fn(x, t, cc)

    pipe(prompts, seed=0, steps=10, model=record)  # real inputs of a 10-step guided solve
    net = Net(pipe.unet).eval()
    x0, tt0 = calib[len(calib) // 2]
    with torch.no_grad():
        ref = net(x0, tt0, c)
        exported = torch.export.export(net, (x0, tt0, c)).module()
        quantizer = xiq.X86InductorQuantizer()
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
        prepared = prepare_pt2e(exported, quantizer)
        for x, tt in calib:
            prepared(x, tt, c)
        converted = convert_pt2e(prepared)
        import torch._inductor.config as icfg

        icfg.freezing = True
        ts = time.time()
        q = torch.compile(converted)
        q(x0, tt0, c)
        compile_int8_s = time.time() - ts
        ts = time.time()
        f = torch.compile(Net(pipe.unet).eval())
        f(x0, tt0, c)
        compile_fp32_s = time.time() - ts
        runs = {"fp32": net, "compiled fp32": f, "pt2e int8 (compiled)": q}
        times: dict[str, list[float]] = {k: [] for k in runs}
        for _ in range(7):
            for k, m in runs.items():
                s = time.perf_counter()
                m(x0, tt0, c)
                times[k].append(time.perf_counter() - s)
        errs = {k: float((m(x0, tt0, c) - ref).norm() / ref.norm()) for k, m in runs.items()}
        # end to end: the first 64 benchmark prompts in chunks of B (the compiled graphs' batch), 20 steps
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_inference import Quality
        from noisewise.shapes.evaluator import Evaluator

        prompts64 = benchmark_prompts(64)
        quality = Quality(Evaluator.from_pretrained(), prompts64)
        imgs: dict[str, list] = {"fp32": [], "pt2e int8 (compiled)": []}
        for i in range(0, 64, B):
            for k in imgs:
                m = runs[k]
                imgs[k].append(pipe(prompts64[i : i + B], seed=i, model=lambda x, t, cc, m=m: m(x, t, cc)).images)
        import numpy as np

        ref_imgs = np.concatenate(imgs["fp32"])
        qual = {k: quality(np.concatenate(v), ref_imgs) for k, v in imgs.items()}
    med = {k: statistics.median(v) for k, v in times.items()}
    rows = [{"config": k, "denoiser_call_s": round(med[k], 4), "speedup_vs_fp32": round(med["fp32"] / med[k], 3),
             "rel_err_vs_fp32": round(errs[k], 5),
             **({q: (round(v, 4) if isinstance(v, float) else v) for q, v in qual[k].items()} if k in qual else {})}
            for k in runs]
    load1 = os.getloadavg()
    info = {"command": "python " + " ".join(["bench/bench_int8_pt2e.py", *sys.argv[1:]]),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, no GPU, torch {torch.__version__}, "
                       f"torchao {__import__('torchao').__version__}, 1 thread; load average {load0[0]:.1f} at "
                       f"start, {load1[0]:.1f} at end (other agents' jobs share the machine)",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "rows_per_call": 2 * B,
            "calibration_batches": len(calib), "compile_int8_s": round(compile_int8_s, 1),
            "compile_fp32_s": round(compile_fp32_s, 1), "minutes": round((time.time() - t0) / 60, 1), "rows": rows}
    (OUT / "inference_int8_pt2e.json").write_text(json.dumps(info, indent=1) + "\n")
    print(json.dumps(info, indent=1))


if __name__ == "__main__":
    main()
