"""Peak memory of calibration over many images: does it grow with the number of images?

Generates N real-photo crops (JPEG, 160x120) in a temporary folder, then in a fresh subprocess each:
  iter_batches  CalibrationSet.create(folder, 224-px spec, calib_size=N) and iter_batches over all N
                (the streaming path every calibrator uses), batch 16, cache off;
  pipeline      `edgecnn export squeezenet1_1 --calib folder --calib-size N` (listing and hashing all N,
                the split — half the files are held out, so N/2 calibration images — BatchNorm
                re-estimation, held-out evaluation, export, validation).
and reports peak RSS (ru_maxrss) for N = 200 and 2,000. Holding every preprocessed image at once
would add N x 3x224x224x4 B = 0.6 MB per image (1.2 GB at 2,000); streaming should add next to nothing.

    python benchmarks/calib_memory.py [--counts 200 2000] [--no-pipeline]

Everything it writes (images, cache, artefacts) is under one temporary folder, removed at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_result

REPO = Path(__file__).resolve().parents[1]

_ITER_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from calibration import CalibrationSet, InputSpec
folder, n = sys.argv[2], int(sys.argv[3])
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
cs = CalibrationSet.create(folder, InputSpec(), calib_size=n, eval_size=8, eval_fraction=0.02, cache=False)
t0 = time.perf_counter()
seen = 0
for batch in cs.iter_batches("calib", batch_size=16):
    seen += len(batch)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"images": seen, "base_mb": base / 1024, "peak_mb": peak / 1024, "seconds": time.perf_counter() - t0}))
"""


def make_images(folder: Path, n: int) -> None:
    sys.path.insert(0, str(REPO / "tests"))
    from reliability_util import write_photos

    write_photos(folder, n, size=(160, 120))


def measure_iter(folder: Path, n: int) -> dict:
    out = subprocess.run([sys.executable, "-c", _ITER_CHILD, str(REPO), str(folder), str(n)], capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_pipeline(folder: Path, n: int, work: Path) -> dict:
    """Peak RSS of the whole CLI export (the child's own ru_maxrss, via RUSAGE_CHILDREN in a wrapper)."""
    wrapper = (
        "import resource, runpy, sys, json, time\n"
        "t0 = time.perf_counter()\n"
        "sys.argv = ['edgecnn'] + sys.argv[1:]\n"
        "code = 0\n"
        "try:\n"
        "    runpy.run_module('edgecnn', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    code = e.code or 0\n"
        "print(json.dumps({'peak_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 'rc': code,"
        " 'seconds': time.perf_counter() - t0}), file=sys.stderr)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGECNN_CACHE": str(work / f"cache{n}"), "TMPDIR": str(work)}
    proc = subprocess.run([sys.executable, "-c", wrapper, "export", "squeezenet1_1", "--calib", str(folder),
                           "--calib-size", str(n), "--out", str(work / f"out{n}"), "-q", "--no-latency"],
                          capture_output=True, text=True, env=env)
    last = proc.stderr.strip().splitlines()[-1]
    result = json.loads(last)
    if result["rc"] != 0:
        raise SystemExit(f"export failed: {proc.stderr[-800:]}")
    manifest = json.loads((work / f"out{n}" / "squeezenet1_1" / "onnx-fp32" / "manifest.json").read_text())
    result["calibration_images"] = manifest["calibration"]["calibration_images"]
    return result


def _table(rows: list) -> str:
    """Markdown: peak RSS per image count, and the growth from the first to the last count."""
    lines = ["| images | iter_batches: base MB | peak MB | s | pipeline export: peak MB | s |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        it, pl = r["iter"], r.get("pipeline")
        lines.append(f"| {r['n']} | {it['base_mb']:.1f} | {it['peak_mb']:.1f} | {it['seconds']:.1f} | "
                     + (f"{pl['peak_mb']:.1f} | {pl['seconds']:.1f} |" if pl else "- | - |"))
    if len(rows) >= 2:
        a, b = rows[0], rows[-1]
        linear = (b["n"] - a["n"]) * 3 * 224 * 224 * 4 / 2 ** 20
        lines += ["", f"iter_batches peak growth {a['n']} -> {b['n']} images: "
                      f"{b['iter']['peak_mb'] - a['iter']['peak_mb']:+.1f} MB (holding them all would add {linear:.0f} MB)."]
        if "pipeline" in a:
            lines.append(f"Pipeline peak growth: {b['pipeline']['peak_mb'] - a['pipeline']['peak_mb']:+.1f} MB.")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--no-pipeline", action="store_true")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edgecnn-calibmem-"))
    try:
        rows = []
        for n in args.counts:
            folder = work / f"images{n}"
            t0 = time.perf_counter()
            make_images(folder, n)
            gen = time.perf_counter() - t0
            it = measure_iter(folder, n)
            row = {"n": n, "gen_s": gen, "iter": it}
            if not args.no_pipeline:
                row["pipeline"] = measure_pipeline(folder, n, work)
            rows.append(row)
            shutil.rmtree(folder, ignore_errors=True)
        write_result("calib_memory", "Peak memory of calibration against the number of images", _table(rows),
                     "python benchmarks/calib_memory.py " + " ".join(sys.argv[1:]))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
