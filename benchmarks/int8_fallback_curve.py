"""What the INT8 fallback can buy: held-out agreement and speed-up vs FP32 as a function of how many layers
stay float (ort recipe, onnxruntime CPU, batch 1, one thread).

Layers are ranked on the calibration split only (quantize-all-but-one, logit SQNR on the first 48
calibration images, as the pipeline's fallback does); the k most sensitive are kept float (weights and
activations in and out, ``exporters.quant_ort.float_layer_tensors``); each model is scored on the held-out
photos and timed alternately with FP32 in one run. The held-out split never influences the ranking.

    python benchmarks/int8_fallback_curve.py [--arch efficientnet_lite0] [--k 0,1,2,4,8,12,20,30,40,all]
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--k", default="0,1,2,4,8,12,20,30,40,all")
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--rounding", default="gptq", choices=("gptq", "nearest"), help="INT8 weight rounding (the pipeline's default: gptq)")
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=96)
    args = ap.parse_args(argv)

    from calibration import CalibrationSet
    from calibration.ranges import channel_means, compute_ranges
    from edgecnn import weights, zoo
    from edgecnn.targets.int8 import side_by_side_latency
    from edgecnn.validate.latency import machine_description
    from exporters import quant_fallback, quant_ort, weight_rounding
    from exporters.onnx import export_onnx

    entry = zoo.resolve(args.arch)
    model, info = weights.build(entry, "auto")
    cs = CalibrationSet.create(None, entry.spec, calib_size=args.calib_size, eval_size=args.eval_size)
    if info.source == "random":
        weights.reestimate_batchnorm(model, cs.iter_batches("calib", batch_size=16))
    mach = machine_description()
    print(f"# {args.arch} ({'pretrained' if info.pretrained else 'random init'}), ort recipe, {args.method} ranges, "
          f"{args.rounding} weight rounding, bias correction; {mach.get('cpu')}, {mach.get('logical_cores')} cores, load {mach.get('load_avg_1m')} at start")
    with tempfile.TemporaryDirectory(prefix="edgecnn-curve-") as tmp:
        w = Path(tmp)
        fp32, unc, prep = w / "fp32.onnx", w / "unc.onnx", w / "prep.onnx"
        export_onnx(model, entry.spec, fp32)
        quant_ort.prepare(fp32, unc)
        base = quant_ort.default_exclusions(unc)
        if args.rounding == "gptq":
            weight_rounding.round_weights(unc, prep, lambda: cs.iter_batches("calib", batch_size=16), skip=base)
        else:
            shutil.copyfile(unc, prep)
        means = channel_means(prep, cs.iter_batches("calib", batch_size=16), quant_ort.bias_correction_inputs(prep))
        quant_ort.bias_correction(prep, prep, means, skip=base, original=unc)
        ranges = compute_ranges(prep, lambda: cs.iter_batches("calib", batch_size=16), args.method, cache_dir=False)

        recipe = quant_ort.quantize_with_biases_restored(unc, base, w)

        probe = cs.array("calib", limit=48)
        t0 = time.perf_counter()
        rows = quant_fallback.sensitivity(recipe, str(prep), ranges, probe, quant_fallback.run_onnx(fp32, probe),
                                          [c for c in quant_ort.quantizable_nodes(prep) if c not in base], base, tmp)
        ranked = [r["node"] for r in rows]
        print(f"ranking: {len(ranked)} layers on {len(probe)} calibration images, {time.perf_counter() - t0:.0f} s")
        ev = cs.array("eval")
        ref = quant_fallback.run_onnx(fp32, ev)
        ks = [len(ranked) if k.strip() == "all" else int(k) for k in args.k.split(",") if k.strip()]
        print("\n| layers float | of | held-out top-1 agree | FP32 top-1 in INT8 top-5 | cosine | SQNR dB | flips (low margin) "
              "| INT8 ms | FP32 ms | speed-up vs FP32 | fused INT8 ops |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for k in ks:
            out = w / f"k{k}.onnx"
            recipe(str(prep), str(out), ranges, list(base) + ranked[:k])
            m = quant_fallback.compare(quant_fallback.run_onnx(out, ev), ref)
            lat = side_by_side_latency(fp32, out, entry.spec.shape, threads=1, rounds=3, seconds=1.0)
            flips = round((1 - m.top1_agreement) * m.samples)
            print(f"| {k} | {len(ranked)} | {m.top1_agreement:.1%} | {m.ref_top1_in_top5:.1%} | {m.cosine:.4f} | "
                  f"{m.sqnr_db:.1f} | {flips} ({m.flips_low_margin}) | {lat['int8_p50_ms']:.2f} | {lat['fp32_p50_ms']:.2f} | "
                  f"{lat['speedup_vs_fp32']:.2f}x | {quant_ort.op_report(out)['fused']} |", flush=True)
        s = np.sort(ref, axis=1)
        margin = s[:, -1] - s[:, -2]
        print(f"\nHeld-out: {len(ev)} crops of other photos than calibration; FP32 top-1/top-2 logit margin: median "
              f"{np.median(margin):.2f}, {int((margin < 0.1).sum())} crops under 0.1, {int((margin < 0.25).sum())} under 0.25. "
              f"Load average at the end: {os.getloadavg()[0]:.2f}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
