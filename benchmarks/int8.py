"""INT8 (the ort recipe, all layers at the recipe's defaults) vs FP32 on onnxruntime CPU, side by side in one run.

For each focus net: export FP32 ONNX, run the pipeline's INT8 engine with the fallback search off (prepare,
weight rounding, bias correction, ranges on the calibration split of the bundled sample photos, empirical bias
correction), then time FP32 and INT8 alternately at batch 1 with 1 and 2 threads, and score INT8 against FP32
on the held-out photos. Random-init nets' agreement is printed but not meaningful (marked "random").
Writes ``docs/results/int8_vs_fp32.md``.

    python benchmarks/int8.py [--nets a,b,c] [--calib-size 128] [--eval-size 96]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

from common import model_and_images, write_result

NETS = ("efficientnet_lite0", "mobilenet_v2", "squeezenet1_1", "resnet50", "mobilenet_v3_large", "efficientnet_b0")


def bench_one(arch: str, calib_size: int, eval_size: int, work: Path) -> dict:
    from edgecnn.validate.latency import side_by_side
    from exporters import parity
    from exporters.int8 import engine
    from exporters.int8.options import Int8Options
    from exporters.int8.qdq import QdqRecipe
    from exporters.onnx.export import export_onnx
    from exporters.onnx.quant import OrtQuantizer, op_report
    from exporters.onnx.runner import run_onnx

    entry, model, info, cs = model_and_images(arch, calib_size, eval_size)
    fp32, int8 = work / f"{arch}.fp32.onnx", work / f"{arch}.int8.onnx"
    export_onnx(model, entry.spec, fp32)
    t0 = time.perf_counter()
    options = dataclasses.replace(Int8Options(), fallback=False)
    result = engine.quantize(QdqRecipe(OrtQuantizer(), fp32, int8, work), cs, options=options,
                             trained=info.pretrained)
    calib_s = time.perf_counter() - t0
    ev = cs.array("eval")
    m = parity.compare(run_onnx(fp32, ev), run_onnx(int8, ev))
    lat = {t: side_by_side(fp32, int8, entry.spec.shape, threads=t, seconds=1.0) for t in (1, 2)}
    return {"arch": arch, "weights": "pretrained" if info.pretrained else "random", "agree": m.top1_agreement,
            "in5": m.ref_top1_in_top5, "cos": m.cosine, "sqnr": m.sqnr_db, "calib_s": calib_s,
            "fp32_mb": os.path.getsize(fp32) / 1e6, "int8_mb": os.path.getsize(int8) / 1e6, "lat": lat,
            "ops": op_report(int8), "images": (result.ranges.images, len(ev))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=96)
    args = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgecnn-bench-int8-") as tmp:
        for arch in [a.strip() for a in args.nets.split(",") if a.strip()]:
            r = bench_one(arch, args.calib_size, args.eval_size, Path(tmp))
            rows.append(r)
            print(f"  done {arch} ({r['calib_s']:.0f} s quantization)", file=sys.stderr, flush=True)
    lines = ["| net | weights | FP32 ms (1 thr) | INT8 ms (1 thr) | speed-up 1 thr | speed-up 2 thr | top-1 agree | "
             "FP32 top-1 in INT8 top-5 | cosine | SQNR dB | size MB FP32 → INT8 | quantize s | fused INT8 / float ops |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        l1, l2 = r["lat"][1], r["lat"][2]
        agree = f"{r['agree']:.1%}" + (" (random)" if r["weights"] == "random" else "")
        flt = ", ".join(f"{k} {v}" for k, v in r["ops"]["float_ops"].items() if k not in ("ReorderInput", "ReorderOutput"))
        lines.append(f"| {r['arch']} | {r['weights']} | {l1['fp32_p50_ms']:.2f} | {l1['int8_p50_ms']:.2f} | "
                     f"{l1['speedup_vs_fp32']:.2f}x | {l2['speedup_vs_fp32']:.2f}x | {agree} | {r['in5']:.1%} | "
                     f"{r['cos']:.4f} | {r['sqnr']:.1f} | {r['fp32_mb']:.1f} → {r['int8_mb']:.1f} | {r['calib_s']:.0f} | "
                     f"{r['ops']['fused']} / {r['ops']['float']}" + (f" ({flt})" if flt else "") + " |")
    images = rows[0]["images"] if rows else (0, 0)
    lines.append(f"\nCalibration {images[0]} images, evaluation {images[1]} held-out images (other photos). Latency: "
                 "FP32 and INT8 timed alternately, 3 rounds, median of p50s. Load average at the end: "
                 f"{os.getloadavg()[0]:.2f}.")
    write_result("int8_vs_fp32", "INT8 (ort recipe, no fallback) vs FP32 on onnxruntime CPU", "\n".join(lines),
                 "python benchmarks/int8.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
