"""Speed of the Core ML reference executor against onnxruntime FP32, side by side in one run.

The executor is a correctness tool (Core ML parity on Linux), not a runtime; the goal is only that
validating a 224x224 MobileNetV3-Large takes a time comparable to onnxruntime FP32 (<= 5x).
Both run batch 1 on one thread, interleaved round by round so machine load hits both alike; the
ratio reported is the median over rounds of each round's p50 ratio (a load spike moves one round).

    python benchmarks/coreml_ref.py [--arch mobilenet_v3_large] [--rounds 5] [--runs 10]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mobilenet_v3_large")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10, help="timed runs per runtime per round")
    args = ap.parse_args()

    import torch

    from edgecnn import weights as weights_mod, zoo
    from edgecnn.runtimes.coreml_ref import CoreMLReferenceRunner
    from edgecnn.runtimes.onnxruntime import OnnxRuntimeRunner
    from edgecnn.validate.latency import machine_description
    from exporters import coreml as ce
    from exporters.onnx import export_onnx

    entry = zoo.resolve(args.arch)
    model, _ = weights_mod.build(entry, "none")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_onnx(model, entry.spec, tmp / "model.onnx")
        runners = {"onnxruntime fp32": OnnxRuntimeRunner(tmp / "model.onnx", threads=1)}
        for precision in ("fp32", "fp16"):
            infos, _ = ce.export_coreml(model, entry.spec, tmp / precision, precision=precision,
                                        labels=zoo.labels_for(entry), variants=("tensor",))
            runners[f"coreml-ref {precision}"] = CoreMLReferenceRunner(infos["tensor"].path, threads=1)
        x = np.random.default_rng(0).standard_normal((1, *entry.spec.shape)).astype(np.float32)
        times = {k: [] for k in runners}
        round_p50 = {k: [] for k in runners}
        for r in runners.values():
            r.run(x)  # warm-up
        for _ in range(args.rounds):
            for name, r in runners.items():
                this = []
                for _ in range(args.runs):
                    t0 = time.perf_counter()
                    r.run(x)
                    this.append((time.perf_counter() - t0) * 1000)
                times[name] += this
                round_p50[name].append(float(np.median(this)))
    ratios = {k: np.asarray(v) / np.asarray(round_p50["onnxruntime fp32"]) for k, v in round_p50.items()}
    print(f"{args.arch} {entry.spec.height}x{entry.spec.width}, batch 1, 1 thread, {args.rounds}x{args.runs} runs each, "
          f"interleaved; machine: {machine_description().get('cpu') or 'cpu'}, load {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} cores (shared, noisy: read the ratio)")
    print(f"{'runtime':<20} {'p50 ms':>9} {'p90 ms':>9} {'x onnxruntime':>14} {'rounds (min-max)':>18}")
    for name, t in times.items():
        p50, p90 = float(np.median(t)), float(np.percentile(t, 90))
        r = ratios[name]
        print(f"{name:<20} {p50:9.2f} {p90:9.2f} {float(np.median(r)):13.2f}x {r.min():8.2f}-{r.max():.2f}x")
    worst = max(float(np.median(r)) for k, r in ratios.items() if k.startswith("coreml"))
    print(f"goal: reference executor <= 5x onnxruntime FP32 -> {'MET' if worst <= 5 else 'NOT MET'} ({worst:.2f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
