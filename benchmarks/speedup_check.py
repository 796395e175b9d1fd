"""Is the INT8 speed-up the manifest reports reproducible by someone else's timing?

For each net: `edgecnn.pipeline.export` writes the ONNX FP32 and the INT8 bundle (defaults; the INT8
manifest's ``int8.speedup_vs_fp32`` is edgecnn's side-by-side timing). Then, in a *fresh process* that uses
nothing of edgecnn, plain onnxruntime sessions (one thread, sequential, default graph optimizations) run the
two bundles' ``model.onnx`` alternately call by call at batch 1 on one random input; the speed-up is the
ratio of the median call times. That outside timing is repeated ``--repeats`` times: the spread between
repeats is the machine's noise, the distance from the manifest is what we claim to be within 10%.

    python benchmarks/speedup_check.py [--nets fmnist:lenet5 fmnist:squeezenet1_1 efficientnet_lite0]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from common import REPO, write_result

NETS = ("fmnist:lenet5", "fmnist:squeezenet1_1", "fmnist:mobilenet_v2", "efficientnet_lite0")
TOLERANCE = 0.10

# run in a fresh interpreter: onnxruntime and numpy only
_OUTSIDE = r"""
import json, sys, time
import numpy as np
import onnxruntime as ort

fp32_path, int8_path, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3])

def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

sessions = {"fp32": session(fp32_path), "int8": session(int8_path)}
inp = sessions["fp32"].get_inputs()[0]
x = np.random.default_rng(1).standard_normal([1, *inp.shape[1:]]).astype(np.float32)
for s in sessions.values():
    for _ in range(10):
        s.run(None, {inp.name: x})
times = {"fp32": [], "int8": []}
start = time.perf_counter()
while time.perf_counter() - start < seconds:
    for name, s in sessions.items():
        t0 = time.perf_counter()
        s.run(None, {inp.name: x})
        times[name].append(time.perf_counter() - t0)
print(json.dumps({k: float(np.median(v)) for k, v in times.items()}))
"""


def export_pair(name: str, work: Path) -> dict:
    """Export FP32 and INT8 ONNX bundles of ``name``; returns their model paths and the INT8 manifest."""
    from edgecnn import pipeline
    from edgecnn.options import ExportOptions

    kw, arch = {}, name.split(":", 1)[-1]
    if name.startswith("fmnist:"):
        sys.path.insert(0, str(REPO / "tests"))
        import fmnist

        fmnist.require_data()
        kw = fmnist.pipeline_kwargs(arch, work / "data", n=1000)
    out = work / "art"
    opts = ExportOptions(threads=1)
    fp32 = pipeline.export(arch, "onnx", "fp32", out=out, options=opts, quiet=True, **kw)
    int8 = pipeline.export(arch, "onnx", "int8", out=out, options=opts, quiet=True, **kw)
    return {"fp32": fp32.path / "model.onnx", "int8": int8.path / "model.onnx", "manifest": int8.manifest}


def outside_speedup(fp32: Path, int8: Path, seconds: float) -> float:
    proc = subprocess.run([sys.executable, "-c", _OUTSIDE, str(fp32), str(int8), str(seconds)],
                          capture_output=True, text=True, check=True)
    ms = json.loads(proc.stdout.strip().splitlines()[-1])
    return ms["fp32"] / ms["int8"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", nargs="+", default=list(NETS))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    rows = ["| net | manifest speed-up | outside speed-ups (each run) | outside median | manifest vs outside | "
            "within ±10% |", "|---|---:|---|---:|---:|:---:|"]
    with tempfile.TemporaryDirectory(prefix="edgecnn-speedup-") as tmp:
        for name in args.nets:
            print(f"== {name}", flush=True)
            pair = export_pair(name, Path(tmp) / name.replace(":", "_"))
            reported = pair["manifest"]["int8"]["speedup_vs_fp32"]
            outside = sorted(outside_speedup(pair["fp32"], pair["int8"], args.seconds) for _ in range(args.repeats))
            median = outside[len(outside) // 2]
            gap = reported / median - 1.0
            rows.append(f"| {name} | {reported:.2f}x | {', '.join(f'{s:.2f}x' for s in outside)} | {median:.2f}x | "
                        f"{gap:+.1%} | {'yes' if abs(gap) <= TOLERANCE else '**no**'} |")
            print(rows[-1], flush=True)
    body = "\n".join(rows) + (
        "\n\nManifest: edgecnn's side-by-side timing at export (FP32 and INT8 sessions alternated call by call, one "
        "thread, batch 1, 3 s). Outside: a fresh process with plain onnxruntime sessions on the two bundles' "
        f"`model.onnx`, alternated call by call, one thread, batch 1, {args.seconds:g} s per run, "
        f"{args.repeats} runs. The spread between outside runs is this shared machine's noise.")
    write_result("speedup_check", "INT8 speed-up: the manifest's figure against an outside timing", body,
                 "python benchmarks/speedup_check.py " + " ".join(sys.argv[1:]))


if __name__ == "__main__":
    main()
