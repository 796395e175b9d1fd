"""What the INT8 fallback can buy: held-out agreement and speed-up vs FP32 as a function of how many layers
stay float (ort recipe, onnxruntime CPU, batch 1, one thread).

The pipeline's INT8 engine prepares the model (rounding, bias correction, ranges on the calibration split);
layers are ranked on the calibration split only (quantize-all-but-one, logit SQNR on the first 48 calibration
images, as the fallback does); the k most sensitive are kept float (weights and activations in and out); each
model is scored on the held-out photos and timed alternately with FP32 in one run. The held-out split never
influences the ranking. Writes ``docs/results/int8_fallback_curve_<arch>.md``.

    python benchmarks/int8_fallback_curve.py [--arch efficientnet_lite0] [--k 0,1,2,4,8,12,20,30,40,all]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import model_and_images, write_result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--k", default="0,1,2,4,8,12,20,30,40,all")
    ap.add_argument("--method", default="minmax")
    ap.add_argument("--rounding", default="gptq", choices=("gptq", "nearest"))
    ap.add_argument("--calib-size", type=int, default=256)
    ap.add_argument("--eval-size", type=int, default=96)
    args = ap.parse_args(argv)

    from edgecnn.validate.latency import side_by_side
    from exporters import parity
    from exporters.int8 import engine, fallback
    from exporters.int8.options import Int8Options
    from exporters.int8.qdq import QdqRecipe
    from exporters.onnx.export import export_onnx
    from exporters.onnx.quant import OrtQuantizer, op_report
    from exporters.onnx.runner import run_onnx

    entry, model, info, cs = model_and_images(args.arch, args.calib_size, args.eval_size)
    options = dataclasses.replace(Int8Options(), ranges=args.method, weight_rounding=args.rounding)
    lines = []
    with tempfile.TemporaryDirectory(prefix="edgecnn-curve-") as tmp:
        w = Path(tmp)
        fp32, out = w / "fp32.onnx", w / "int8.onnx"
        export_onnx(model, entry.spec, fp32)
        recipe = QdqRecipe(OrtQuantizer(), fp32, out, w)
        prepared = engine.prepare(recipe, cs, options)
        space = recipe.space(prepared.ranges, prepared.base, None)
        probe = cs.array("calib", limit=engine.RANK_IMAGES)
        t0 = time.perf_counter()
        rows = fallback.sensitivity(space, probe, run_onnx(fp32, probe),
                                    [c for c in space.candidates if c not in prepared.base])
        ranked = [r["node"] for r in rows]
        lines.append(f"Ranking: {len(ranked)} layers on {len(probe)} calibration images, {time.perf_counter() - t0:.0f} s.\n")
        ev = cs.array("eval")
        ref = run_onnx(fp32, ev)
        ks = [len(ranked) if k.strip() == "all" else int(k) for k in args.k.split(",") if k.strip()]
        lines += ["| layers float | of | held-out top-1 agree | FP32 top-1 in INT8 top-5 | cosine | SQNR dB | flips "
                  "(near-ties) | INT8 ms | FP32 ms | speed-up vs FP32 | fused INT8 ops |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for k in ks:
            space.write(list(prepared.base) + ranked[:k])
            m = parity.compare(ref, run_onnx(out, ev))
            lat = side_by_side(fp32, out, entry.spec.shape, threads=1, seconds=1.0)
            lines.append(f"| {k} | {len(ranked)} | {m.top1_agreement:.1%} | {m.ref_top1_in_top5:.1%} | {m.cosine:.4f} | "
                         f"{m.sqnr_db:.1f} | {m.flips} ({m.flips_near_tie}) | {lat['int8_p50_ms']:.2f} | "
                         f"{lat['fp32_p50_ms']:.2f} | {lat['speedup_vs_fp32']:.2f}x | {op_report(out)['fused']} |")
            print(lines[-1], file=sys.stderr, flush=True)
        s = np.sort(ref, axis=1)
        margin = s[:, -1] - s[:, -2]
        lines.append(f"\nHeld-out: {len(ev)} crops of other photos than calibration; FP32 top-1/top-2 logit margin: "
                     f"median {np.median(margin):.2f}, {int((margin < 0.1).sum())} crops under 0.1, "
                     f"{int((margin < 0.25).sum())} under 0.25. Load average at the end: {os.getloadavg()[0]:.2f}.")
    title = (f"INT8 fallback curve: {args.arch} ({'pretrained' if info.pretrained else 'random init'}), ort recipe, "
             f"{args.method} ranges, {args.rounding} weight rounding")
    write_result(f"int8_fallback_curve_{args.arch}", title, "\n".join(lines),
                 "python benchmarks/int8_fallback_curve.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
