"""Speed of the Core ML reference executor against onnxruntime FP32, side by side in one run.

The executor is a correctness tool (Core ML parity on Linux), not a runtime; the goal is only that
validating a 224x224 MobileNetV3-Large takes a time comparable to onnxruntime FP32 (<= 5x). The FP16
program is also timed in the executor's FP16-accumulation mode (Neural-Engine-like, chunked FP16 sums), which
the Core ML target runs on the first held-out images of every export; that row is information, not the goal.
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

from common import write_result  # noqa: E402  (also puts the repository on sys.path)

FP16_ACCUMULATION = "coreml-ref fp16, FP16 accumulation"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="mobilenet_v3_large")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=10, help="timed runs per runtime per round")
    args = ap.parse_args()

    import torch

    from edgecnn import weights as weights_mod, zoo
    from exporters.coreml import export as ce
    from exporters.coreml.runner import CoreMLReferenceRunner
    from exporters.onnx.export import export_onnx
    from exporters.onnx.runner import OnnxRuntimeRunner

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
        runners[FP16_ACCUMULATION] = CoreMLReferenceRunner(infos["tensor"].path, threads=1, accumulation="fp16")
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
    lines = [f"{args.arch} {entry.spec.height}x{entry.spec.width}, batch 1, 1 thread, {args.rounds}x{args.runs} runs "
             "each, interleaved (shared, noisy machine: read the ratio).", "",
             "| runtime | p50 ms | p90 ms | x onnxruntime FP32 | rounds (min-max) |", "|---|---|---|---|---|"]
    for name, t in times.items():
        r = ratios[name]
        lines.append(f"| {name} | {float(np.median(t)):.2f} | {float(np.percentile(t, 90)):.2f} | "
                     f"{float(np.median(r)):.2f}x | {r.min():.2f}-{r.max():.2f}x |")
    worst = max(float(np.median(r)) for k, r in ratios.items() if k.startswith("coreml") and k != FP16_ACCUMULATION)
    lines.append(f"\nGoal: the reference executor within 5x onnxruntime FP32: {'met' if worst <= 5 else 'NOT met'} "
                 f"({worst:.2f}x).")
    write_result("coreml_reference_executor_speed", "Core ML reference executor vs onnxruntime FP32", "\n".join(lines),
                 "python benchmarks/coreml_ref.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
