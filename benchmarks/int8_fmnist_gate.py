"""Does the INT8 gate mean what it says? On the Fashion-MNIST nets the tests train, over the full 10,000 test
images: the measured top-1 accuracy drop (with its paired standard error), the drop estimated from FP32's
confidence without the labels, and top-1 agreement, for plain onnxruntime ``quantize_static`` (MinMax, QDQ,
per-channel U8S8) and for edgecnn (every default), with the gate's verdict on each: labelled (measured drop)
and unlabelled (estimated drop), both with the floor. Calibration: 512 training images.
Writes ``docs/results/int8_fmnist_gate.md``.

    python benchmarks/int8_fmnist_gate.py [--nets lenet5,squeezenet1_1,...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import write_result
from int8_vs_anchors import fmnist_case
from quantizers import run_quantizers

NETS = ("lenet5", "squeezenet1_1", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0",
        "resnet18")
QUANTIZERS = ("ort-minmax", "edgecnn")


def bench_net(arch: str, work: Path) -> list:
    from exporters import parity
    from exporters.onnx.export import export_onnx
    from exporters.onnx.runner import run_onnx

    model, spec, calib, x, y, _ = fmnist_case(arch, work)
    fp32 = work / "fp32.onnx"
    export_onnx(model, spec, fp32)
    ref = run_onnx(fp32, x)
    made = run_quantizers(fp32, work, calib, True, spec.shape, QUANTIZERS,
                          say=lambda m: print(f"{arch}{m}", file=sys.stderr, flush=True))
    rows = []
    for q, (path, seconds) in made.items():
        out = run_onnx(path, x)
        labelled = parity.judge(ref, out, "int8", True, labels=y)
        unlabelled = parity.judge(ref, out, "int8", True)
        rows.append({"net": arch, "quantizer": q, "seconds": seconds, "labelled": labelled, "unlabelled": unlabelled})
    return rows


def table(rows: list) -> str:
    lines = ["| net | quantizer | FP32 acc | INT8 acc | measured drop pt ± SE | estimated drop pt [95%] | "
             "top-1 agreement | gate, labelled | gate, unlabelled |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, u = r["labelled"], r["unlabelled"]
        lines.append(f"| {r['net']} | {r['quantizer']} | {a.ref_accuracy:.2%} | {a.accuracy:.2%} | "
                     f"{a.accuracy_drop * 100:+.2f} ± {a.accuracy_drop_se * 100:.2f} | {u.estimated_drop * 100:.2f} "
                     f"[{u.estimated_drop_ci95[0] * 100:.2f}–{u.estimated_drop_ci95[1] * 100:.2f}] | "
                     f"{a.top1_agreement:.2%} | {'pass' if a.passed else 'FAIL'} | {'pass' if u.passed else 'FAIL'} |")
    measured = np.array([r["labelled"].accuracy_drop for r in rows]) * 100
    estimated = np.array([r["unlabelled"].estimated_drop for r in rows]) * 100
    agreement = np.array([r["labelled"].top1_agreement for r in rows]) * 100
    se = np.array([r["labelled"].accuracy_drop_se for r in rows]) * 100

    def corr(a, b):
        return float(np.corrcoef(a, b)[0, 1]) if len(a) > 2 and a.std() > 0 and b.std() > 0 else float("nan")

    bad = [f"{r['net']}/{r['quantizer']}" for r in rows if r["labelled"].accuracy_drop > 0.01]
    caught = [b for b, r in zip(bad, [r for r in rows if r["labelled"].accuracy_drop > 0.01])
              if not r["unlabelled"].passed]
    lines += ["", f"- Estimated vs measured drop over the {len(rows)} rows: Pearson r {corr(estimated, measured):.2f}; "
                  f"estimated vs disagreement (100 - agreement): r {corr(estimated, 100 - agreement):.2f}.",
              f"- Sum of the estimated drops {estimated.sum():.2f} pt against {measured.sum():.2f} pt measured "
              f"(mean standard error of a measured drop {se.mean():.2f} pt).",
              f"- Rows losing more than 1 point (measured): {', '.join(bad) or 'none'}; rejected by the unlabelled "
              f"gate: {', '.join(caught) or 'none'}."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS))
    args = ap.parse_args(argv)
    rows = []
    t0 = time.perf_counter()
    for arch in [a.strip() for a in args.nets.split(",") if a.strip()]:
        with tempfile.TemporaryDirectory(prefix="bench-fmnist-gate-") as tmp:
            rows += bench_net(arch, Path(tmp))
    write_result("int8_fmnist_gate", "The INT8 gate on the Fashion-MNIST nets, full test set",
                 table(rows) + f"\n\nWhole run: {time.perf_counter() - t0:.0f} s.",
                 "python benchmarks/int8_fmnist_gate.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
