"""edgecnn's INT8 against the tools a user would pick instead, on the same FP32 ONNX model, the same calibration
images and the same held-out images: onnxruntime ``quantize_static`` (MinMax, Entropy, Percentile) and NNCF
(``nncf.quantize``; ``quantize_with_accuracy_control`` where labels exist). See ``quantizers.py``.

Models: the ImageNet-trained EfficientNet-Lite0/1/2 on the bundled sample photos (no labels: the drop is
estimated from FP32's confidence, with its bootstrap interval) and the Fashion-MNIST focus nets the tests train
(labelled: the measured drop on the 10,000 test images, with its paired standard error sqrt(fixed + broken)/N;
calibration on 512 training images, NNCF's accuracy control validates on 1,000 others). Speed-up: FP32 and
INT8 timed alternately in one run, one thread, batch 1. The bar for edgecnn on every row: a drop no worse than
the best anchor's beyond one standard error, at a speed-up no lower than that anchor's (5% timing tolerance).
Writes ``docs/results/int8_vs_anchors.md``.

    python benchmarks/int8_vs_anchors.py [--models efficientnet_lite0,fmnist:mobilenet_v2] [--quantizers ...]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import REPO, model_and_images, write_result
from quantizers import ORT_METHODS, run_quantizers, score, speedup

PRETRAINED = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")
FMNIST = ("squeezenet1_1", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "shufflenet_v2_x1_0")
QUANTIZERS = ("edgecnn", *ORT_METHODS, "nncf", "nncf-ac")
SPEED_TOLERANCE = 0.95


def fmnist_case(arch: str, work: Path):
    """(module, spec, calibration set, held-out x, held-out labels, NNCF validation (x, y)) of a Fashion-MNIST net."""
    sys.path.insert(0, str(REPO / "tests"))
    import fmnist
    from calibration import CalibrationSet, normalize

    fmnist.require_data()
    spec = fmnist.fmnist_spec(arch)
    train_x, train_y = fmnist.train_split(1000)  # 600 calibration + 400 NNCF validation
    np.savez(work / "calib.npz", images=train_x[:600], labels=train_y[:600])
    calib = CalibrationSet.create(str(work / "calib.npz"), spec, calib_size=512, eval_size=8, seed=0)
    test_x, test_y = fmnist.test_split()
    val = (normalize(fmnist.pixels(train_x[600:], spec), spec), train_y[600:].astype(np.int64))
    return fmnist.trained_model(arch), spec, calib, normalize(fmnist.pixels(test_x, spec), spec), \
        test_y.astype(np.int64), val


def pretrained_case(arch: str):
    entry, model, info, cs = model_and_images(arch, 256, 96)
    return model, entry.spec, cs, cs.array("eval"), None, None


def bench_model(name: str, quantizers, work: Path) -> list:
    from exporters.onnx.export import export_onnx
    from exporters.onnx.runner import run_onnx

    arch = name.split(":", 1)[-1]
    model, spec, calib, x, y, val = fmnist_case(arch, work) if name.startswith("fmnist:") else pretrained_case(arch)
    fp32 = work / "fp32.onnx"
    export_onnx(model, spec, fp32)
    ref = run_onnx(fp32, x)
    print(f"{name}: {len(calib.calib_items)} calibration images, {len(x)} held-out", file=sys.stderr, flush=True)
    made = run_quantizers(fp32, work, calib, True, spec.shape, quantizers, val=val,
                          say=lambda m: print(m, file=sys.stderr, flush=True))
    rows = []
    for q, (path, seconds) in made.items():
        rows.append({"model": name, "quantizer": q, "seconds": seconds, "speedup": speedup(fp32, path, spec.shape),
                     **score(ref, run_onnx(path, x), y)})
    return rows


def _drop(r: dict) -> tuple:
    """(drop, one standard error) in points: measured with labels, else estimated (SE from the 95% interval)."""
    if r["drop"] is not None:
        return r["drop"] * 100, r["drop_se"] * 100
    lo, hi = r["est_ci"]
    return r["est_drop"] * 100, (hi - lo) / 2 / 1.96 * 100


def verdict(rows: list) -> str:
    edge = next((r for r in rows if r["quantizer"] == "edgecnn"), None)
    anchors = [r for r in rows if r["quantizer"] != "edgecnn"]
    if edge is None or not anchors:
        return ""
    best = min(anchors, key=lambda r: _drop(r)[0])
    drop, se = _drop(edge)
    ok_drop = drop <= _drop(best)[0] + se
    ok_speed = edge["speedup"] >= best["speedup"] * SPEED_TOLERANCE
    return (f"{'meets' if ok_drop and ok_speed else 'MISSES'} the bar against {best['quantizer']} "
            f"(drop {drop:.2f} vs {_drop(best)[0]:.2f} ± {se:.2f} pt: {'ok' if ok_drop else 'worse'}; speed-up "
            f"{edge['speedup']:.2f}x vs {best['speedup']:.2f}x: {'ok' if ok_speed else 'slower'})")


def table(all_rows: list) -> str:
    lines = ["| model | quantizer | drop pt (measured ± SE, or estimated [95%]) | top-1 agreement | SQNR dB | "
             "speed-up vs FP32 | quantize s |", "|---|---|---|---|---|---|---|"]
    verdicts = []
    for model in dict.fromkeys(r["model"] for r in all_rows):
        rows = [r for r in all_rows if r["model"] == model]
        for r in rows:
            if r["drop"] is not None:
                drop = f"{r['drop'] * 100:+.2f} ± {r['drop_se'] * 100:.2f}"
            else:
                drop = f"~{r['est_drop'] * 100:.2f} [{r['est_ci'][0] * 100:.2f}–{r['est_ci'][1] * 100:.2f}]"
            lines.append(f"| {model} | {r['quantizer']} | {drop} | {r['agreement']:.2%} | {r['sqnr']:.1f} | "
                         f"{r['speedup']:.2f}x | {r['seconds']:.0f} |")
        verdicts.append(f"- **{model}**: edgecnn {verdict(rows)}")
    return "\n".join(lines + ["", "The bar (edgecnn vs the best anchor by drop):", ""] + verdicts)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join([*PRETRAINED, *(f"fmnist:{a}" for a in FMNIST)]))
    ap.add_argument("--quantizers", default=",".join(QUANTIZERS))
    args = ap.parse_args(argv)
    quantizers = [q.strip() for q in args.quantizers.split(",") if q.strip()]
    rows = []
    t0 = time.perf_counter()
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        with tempfile.TemporaryDirectory(prefix="bench-anchors-") as tmp:
            rows += bench_model(name, quantizers, Path(tmp))
    body = table(rows) + (f"\n\nDrops are FP32 minus INT8 top-1 accuracy (a negative drop: INT8 scored higher); "
                          f"\"~\" marks the drop estimated from FP32's confidence (no labels). "
                          f"Whole run: {time.perf_counter() - t0:.0f} s.")
    write_result("int8_vs_anchors", "edgecnn INT8 vs onnxruntime quantize_static and NNCF", body,
                 "python benchmarks/int8_vs_anchors.py " + " ".join(argv or sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
