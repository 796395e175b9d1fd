"""Bounded resources: calibration streams (peak memory does not grow with the number of images), and
exports leave no temporary files behind, on success and on failure.

Peak RSS is measured in a fresh subprocess (``ru_maxrss``) by ``benchmarks/calib_memory.py``'s own
child, over real-photo JPEGs preprocessed to 3x224x224 float32 (0.6 MB each: holding N images would
add N x 0.6 MB).
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from reliability_util import REPO, cli_env, write_photos  # noqa: E402

sys.path.insert(0, str(REPO / "benchmarks"))
import calib_memory  # noqa: E402

PER_IMAGE_MB = 3 * 224 * 224 * 4 / 2 ** 20


def _peak_growth(tmp_path: Path, small: int, large: int) -> tuple:
    folder = tmp_path / "images"
    write_photos(folder, large, size=(96, 72))
    # the small set: the first `small` files of the same folder, listed in a .txt (same decode work per image)
    listing = tmp_path / "small.txt"
    listing.write_text("\n".join(sorted(str(p) for p in folder.iterdir())[:small]) + "\n")
    a = calib_memory.measure_iter(listing, small)
    b = calib_memory.measure_iter(folder, large)
    assert a["images"] >= 0.95 * small and b["images"] >= 0.95 * large  # (2% held out for evaluation)
    return a, b


def test_iter_batches_memory_does_not_grow_with_images(tmp_path):
    a, b = _peak_growth(tmp_path, 100, 400)
    growth = b["peak_mb"] - a["peak_mb"]
    linear = (400 - 100) * PER_IMAGE_MB
    print(f"peak RSS 100 images {a['peak_mb']:.1f} MB, 400 images {b['peak_mb']:.1f} MB "
          f"(+{growth:.1f} MB; holding them would add {linear:.0f} MB)")
    assert growth < 40, f"peak RSS grew {growth:.1f} MB from 100 to 400 images (linear would be {linear:.0f} MB)"


@pytest.mark.slow
def test_iter_batches_memory_2000_images(tmp_path):
    a, b = _peak_growth(tmp_path, 200, 2000)
    growth = b["peak_mb"] - a["peak_mb"]
    assert growth < 40, f"peak RSS grew {growth:.1f} MB from 200 to 2,000 images (linear: {1800 * PER_IMAGE_MB:.0f} MB)"


@pytest.mark.slow
def test_pipeline_memory_2000_images(tmp_path):
    folder_small, folder_large = tmp_path / "i200", tmp_path / "i2000"
    write_photos(folder_small, 200, size=(96, 72))
    write_photos(folder_large, 2000, size=(96, 72))
    a = calib_memory.measure_pipeline(folder_small, 200, tmp_path)
    b = calib_memory.measure_pipeline(folder_large, 2000, tmp_path)
    assert b["calibration_images"] >= 1000  # half the files (groups) are held out for evaluation
    assert b["peak_mb"] - a["peak_mb"] < 60, (a, b)


# ------------------------------------------------------------------------------------------ temporary files
LIBRARY_TMP = (".ses", "torchinductor_")  # onnxruntime's reused session-id file, torch inductor's cache folder


def _export(tmp_path: Path, out: Path, calib: Path, preexec_fn=None, extra=()):
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "edgecnn", "export", "lenet5", "--calib", str(calib),
                           "--calib-size", "8", "--eval-size", "8", "--out", str(out), "-q", "--no-latency", *extra],
                          env=cli_env(tmp_path / "cache", {"TMPDIR": str(tmpdir)}), capture_output=True, text=True,
                          preexec_fn=preexec_fn, cwd=str(tmpdir), timeout=600)
    leftovers = sorted(p.name for p in tmpdir.iterdir() if not p.name.startswith(LIBRARY_TMP))
    return proc, leftovers


def test_no_temp_files_after_success_or_failure(tmp_path):
    """Success: TMPDIR holds nothing of ours; the output folder only the bundle (the lock file is removed).
    Failure while writing (RLIMIT_FSIZE 100 kB: LeNet-5's 250 kB model cannot be written): nothing at all in
    the output folder (not even the <arch> folder the export created). The calibration cache holds only finished .npy entries (no .tmp files)."""
    calib = tmp_path / "calib"
    write_photos(calib, 16, size=(120, 90))
    out = tmp_path / "out"
    ok, left = _export(tmp_path, out, calib)
    assert ok.returncode == 0, ok.stderr
    assert left == [], f"temporary files left after a successful export: {left}"
    assert sorted(p.name for p in (out / "lenet5").iterdir()) == ["onnx-fp32"]

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out2 = tmp_path / "out2"
    bad, left = _export(tmp_path, out2, calib, preexec_fn=limit)
    assert bad.returncode == 4, bad.stderr
    assert left == [], f"temporary files left after a failed export: {left}"
    assert not (out2 / "lenet5").exists(), sorted(p.name for p in out2.rglob("*"))
    cache = tmp_path / "cache"
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name], "half-written cache entries"
