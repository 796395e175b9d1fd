"""INT8 (ort recipe) vs FP32 on onnxruntime CPU, measured side by side in one run.

For each focus net: export FP32 ONNX, prepare + weight rounding (GPTQ) + bias correction + calibrate (minmax, calibration split of the
bundled sample photos) + empirical bias correction + quantize with the ort recipe's defaults (no fallback
search: that is the pipeline's job), then
time FP32 and INT8 alternately at batch 1 with 1 and 2 threads, and score INT8 against FP32 on the held-out
photos. Random-init nets get BatchNorm re-estimated first (as the pipeline does); their label agreement is
printed but not meaningful (marked "random").

    python benchmarks/int8.py [--nets a,b,c] [--calib-size 128] [--eval-size 96]
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

NETS = ("efficientnet_lite0", "mobilenet_v2", "squeezenet1_1", "resnet50", "mobilenet_v3_large", "efficientnet_b0")


def bench_one(arch: str, calib_size: int, eval_size: int, work: Path) -> dict:
    from calibration import CalibrationSet
    from calibration.ranges import channel_means, compute_ranges
    from edgecnn import weights, zoo
    from edgecnn.targets.int8 import side_by_side_latency
    from exporters import empirical_bias, quant_fallback, quant_ort, weight_rounding
    from exporters.onnx import export_onnx

    entry = zoo.resolve(arch)
    model, info = weights.build(entry, "auto")
    cs = CalibrationSet.create(None, entry.spec, calib_size=calib_size, eval_size=eval_size)
    if info.source == "random":
        weights.reestimate_batchnorm(model, cs.iter_batches("calib", batch_size=16))
    fp32, prep, int8 = work / f"{arch}.fp32.onnx", work / f"{arch}.prep.onnx", work / f"{arch}.int8.onnx"
    export_onnx(model, entry.spec, fp32)
    t0 = time.perf_counter()
    quant_ort.prepare(fp32, prep)
    base = quant_ort.default_exclusions(prep)
    original = work / f"{arch}.prep-original.onnx"
    shutil.copyfile(prep, original)
    weight_rounding.round_weights(prep, prep, lambda: cs.iter_batches("calib", batch_size=16), skip=base)
    means = channel_means(prep, cs.iter_batches("calib", batch_size=16), quant_ort.bias_correction_inputs(prep))
    quant_ort.bias_correction(prep, prep, means, skip=base, original=original)
    ranges = compute_ranges(prep, lambda: cs.iter_batches("calib", batch_size=16), "minmax", cache_dir=False)
    empirical_bias.correct(str(prep), str(original), quant_ort.quantize, ranges, list(base),
                           cs.array("calib", limit=128))  # INT8 step 7 (keeps the best pass: never worse here)
    quant_ort.quantize(prep, int8, ranges, base)
    calib_s = time.perf_counter() - t0
    ev = cs.array("eval")
    m = quant_fallback.compare(quant_fallback.run_onnx(int8, ev), quant_fallback.run_onnx(fp32, ev))
    ops = quant_ort.op_report(int8)
    lat = {t: side_by_side_latency(fp32, int8, entry.spec.shape, threads=t, rounds=3, seconds=1.0) for t in (1, 2)}
    return {"arch": arch, "weights": "pretrained" if info.pretrained else "random", "agree": m.top1_agreement,
            "in5": m.ref_top1_in_top5, "cos": m.cosine, "sqnr": m.sqnr_db, "calib_s": calib_s,
            "fp32_mb": os.path.getsize(fp32) / 1e6, "int8_mb": os.path.getsize(int8) / 1e6, "lat": lat, "ops": ops,
            "images": (ranges.images, len(ev))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nets", default=",".join(NETS))
    ap.add_argument("--calib-size", type=int, default=128)
    ap.add_argument("--eval-size", type=int, default=96)
    args = ap.parse_args(argv)
    from edgecnn.validate.latency import machine_description

    mach = machine_description()
    print(f"# INT8 vs FP32, onnxruntime CPU, batch 1 — {mach.get('cpu')} ({', '.join(mach.get('isa', []))}), "
          f"{mach.get('logical_cores')} cores, load {mach.get('load_avg_1m')} at start")
    rows = []
    with tempfile.TemporaryDirectory(prefix="edgecnn-bench-int8-") as tmp:
        for arch in [a.strip() for a in args.nets.split(",") if a.strip()]:
            r = bench_one(arch, args.calib_size, args.eval_size, Path(tmp))
            rows.append(r)
            print(f"  done {arch} ({r['calib_s']:.0f} s calibration)", file=sys.stderr, flush=True)
    print("\n| net | weights | FP32 ms (1 thr) | INT8 ms (1 thr) | speed-up 1 thr | speed-up 2 thr | top-1 agree | "
          "FP32 top-1 in INT8 top-5 | cosine | SQNR dB | size MB FP32 → INT8 | calib s | fused INT8 / float ops |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        l1, l2 = r["lat"][1], r["lat"][2]
        agree = f"{r['agree']:.1%}" + (" (random)" if r["weights"] == "random" else "")
        flt = ", ".join(f"{k} {v}" for k, v in r["ops"]["float_ops"].items() if k not in ("ReorderInput", "ReorderOutput"))
        print(f"| {r['arch']} | {r['weights']} | {l1['fp32_p50_ms']:.2f} | {l1['int8_p50_ms']:.2f} | "
              f"{l1['speedup_vs_fp32']:.2f}x | {l2['speedup_vs_fp32']:.2f}x | {agree} | {r['in5']:.1%} | {r['cos']:.4f} | "
              f"{r['sqnr']:.1f} | {r['fp32_mb']:.1f} → {r['int8_mb']:.1f} | {r['calib_s']:.0f} | "
              f"{r['ops']['fused']} / {r['ops']['float']}" + (f" ({flt})" if flt else "") + " |")
    print(f"\nCalibration {rows[0]['images'][0] if rows else 0} images, evaluation {rows[0]['images'][1] if rows else 0} "
          "held-out images (other photos). Latency: FP32 and INT8 timed alternately, 3 rounds, median of p50s. "
          f"Load average at the end: {os.getloadavg()[0]:.2f}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
