"""Core ML weight-only precisions side by side: what each costs in parity and saves in size, with both executor modes.

Each precision is exported by the one pipeline (the same held-out images, the same gate), validated on the
reference executor (FP32 accumulation, all held-out images) and also run with FP16 accumulation on the first
held-out images (the Neural-Engine-like bracket). Sizes are the image package's weight file. Nothing here runs
on Apple hardware: latency is not measured.

    python benchmarks/coreml_precisions.py [--arch efficientnet_lite0] [--weights auto]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from common import write_result  # noqa: E402  (also puts the repository on sys.path)

# (precision, iOS deployment target or None for the lowest it supports)
ROWS = (("fp16", None), ("int8-weights", None), ("palettized8", None), ("palettized6", None), ("palettized4", None),
        ("palettized4", 18), ("int4-weights", 18))


def _export(arch: str, weights: str, precision: str, ios, out: Path) -> tuple:
    from edgecnn import pipeline
    from edgecnn.errors import GateFailed
    from edgecnn.options import CoreMLOptions
    from edgecnn.targets import ExportOptions

    t0 = time.perf_counter()
    try:
        res = pipeline.export(arch, "coreml", precision, weights, None, out, quiet=True,
                              options=ExportOptions(latency=False, coreml=CoreMLOptions(ios=ios)))
        root, m = res.path, res.manifest
    except GateFailed:
        root = next(out.glob(f"*/coreml-{precision}.failed"))
        m = json.loads((root / "manifest.json").read_text())
    return root, m, time.perf_counter() - t0


def _row(precision: str, ios, root: Path, m: dict, seconds: float) -> str:
    p = m["parity"]
    modes = m["coreml"]["executor_modes"]
    f16 = modes["fp16_accumulation"]
    weights = sum(meta["bytes"] for rel, meta in m["files"].items()
                  if rel.startswith(m["coreml"]["packages"]["image"] + "/") and rel.endswith("weight.bin"))
    return (f"| {precision} | {m['export']['ios']} | {weights / 1e6:.2f} | {p['top1_agreement']:.1%} "
            f"({p['flips']} flips) | {p['sqnr_db']:.1f} | {p['min_cosine']:.5f} | {'pass' if p['passed'] else 'FAIL'} "
            f"({p['gate']}) | {f16['sqnr_db']:.1f} / {f16['min_cosine']:.5f} ({modes['images']} images) | "
            f"{seconds:.0f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="efficientnet_lite0")
    ap.add_argument("--weights", default="auto")
    args = ap.parse_args()
    lines = ["| precision | iOS | weights MB | top-1 agreement | SQNR dB | min cosine | gate (FP32 accumulation, "
             "all held-out images) | FP16 accumulation SQNR dB / min cosine | export s |",
             "|---|---|---|---|---|---|---|---|---|"]
    weights_source = "?"
    with tempfile.TemporaryDirectory() as tmp:
        for i, (precision, ios) in enumerate(ROWS):
            root, m, seconds = _export(args.arch, args.weights, precision, ios, Path(tmp) / str(i))
            weights_source = m["weights"]["source"]
            lines.append(_row(precision, ios, root, m, seconds))
            print(lines[-1], flush=True)
    body = (f"{args.arch}, weights {weights_source}, the bundled sample photos (held-out split); Core ML programs "
            "run on the reference executor (no Apple hardware).\n\n" + "\n".join(lines))
    write_result(f"coreml_precisions_{args.arch}", f"Core ML weight-only precisions: {args.arch}", body,
                 "python benchmarks/coreml_precisions.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
