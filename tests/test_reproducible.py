"""Reproducible builds: the same arch, weights, calibration images, seed and recipe give byte-identical
model files — in another output folder, in a fresh process, with a cold calibration cache.

What differs between two exports, and why (asserted below, so the list stays true):
- ``manifest.json`` ``export_seconds`` (wall time) and ``latency`` (measured numbers, machine load);
- inside the manifest's recipe, how long steps took (keys ``seconds``/``*_seconds``) and whether a
  cache was hit (``cache_hit``: the INT8 range cache makes the second run skip calibration — with the
  same ranges, hence the same bytes).
Everything else — model.onnx, reference.npz (numpy writes zip entries with a fixed 1980 date),
labels.txt and every other manifest field — is identical. The model's metadata_props hold no time
or path (a checkpoint is recorded as "checkpoint"; its absolute path only in the manifest).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
from reliability_util import run_cli, run_main, write_photos  # noqa: E402

VOLATILE = {"export_seconds", "latency"}


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    old = os.environ.get("EDGECNN_CACHE")
    os.environ["EDGECNN_CACHE"] = str(root / "cache")
    write_photos(root / "calib", 20, size=(160, 120))
    yield root
    if old is None:
        os.environ.pop("EDGECNN_CACHE", None)
    else:
        os.environ["EDGECNN_CACHE"] = old


def bundle_files(bundle: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(bundle.iterdir()) if p.is_file() and p.name != "manifest.json"}


def _drop_volatile(obj):
    if isinstance(obj, dict):
        return {k: _drop_volatile(v) for k, v in obj.items()
                if k not in VOLATILE and k != "cache_hit" and k != "seconds" and not k.endswith("_seconds")}
    if isinstance(obj, list):
        return [_drop_volatile(v) for v in obj]
    return obj


def stable_manifest(bundle: Path) -> dict:
    return _drop_volatile(json.loads((bundle / "manifest.json").read_text()))


def export_in_process(work: Path, name: str, arch: str, *extra: str) -> None:
    rc, stdout, err = run_main(["export", arch, "--out", str(work / name), "--calib", str(work / "calib"), "-q",
                                "--no-latency", "--calib-size", "10", "--eval-size", "8", *extra])
    assert rc == 0, err


def bundle_of(out: Path, arch: str, precision: str = "fp32") -> Path:
    return out / arch / f"onnx-{precision}"


def assert_same(a: Path, b: Path) -> None:
    fa, fb = bundle_files(a), bundle_files(b)
    assert sorted(fa) == sorted(fb)
    differing = [name for name in fa if fa[name] != fb[name]]
    assert differing == [], f"files differ between two identical exports: {differing}"
    assert stable_manifest(a) == stable_manifest(b)


@pytest.mark.parametrize("arch", ["lenet5", "squeezenet1_1"])
def test_fp32_byte_identical_twice(work, arch):
    export_in_process(work, f"{arch}_a", arch)
    export_in_process(work, f"{arch}_b", arch)
    a, b = bundle_of(work / f"{arch}_a", arch), bundle_of(work / f"{arch}_b", arch)
    assert_same(a, b)
    m = json.loads((a / "manifest.json").read_text())
    assert m["seed"] == 0 and m["calibration"]["seed"] == 0
    assert len(m["calibration"]["fingerprint"]) == 64
    assert m["files"]["model.onnx"]["sha256"] == json.loads((b / "manifest.json").read_text())["files"]["model.onnx"]["sha256"]


def test_fp32_identical_in_a_fresh_process_with_cold_cache(work):
    """A second export in a new interpreter with an empty calibration cache (decode path, not cache hits)."""
    arch = "squeezenet1_1"
    if not bundle_of(work / f"{arch}_a", arch).exists():
        export_in_process(work, f"{arch}_a", arch)
    out = work / "fresh"
    rc, stdout, err = run_cli(["export", arch, "--out", str(out), "--calib", str(work / "calib"), "-q", "--no-latency",
                               "--calib-size", "10", "--eval-size", "8"], cache=work / "cold-cache")
    assert rc == 0, err
    assert_same(bundle_of(work / f"{arch}_a", arch), bundle_of(out, arch))


def test_checkpoint_recorded_and_identical(work):
    from edgecnn.zoo.lenet import LeNet5

    torch.manual_seed(7)
    ckpt = work / "lenet.pt"
    torch.save(LeNet5().state_dict(), ckpt)
    export_in_process(work, "ck_a", "lenet5", "--weights", str(ckpt))
    export_in_process(work, "ck_b", "lenet5", "--weights", str(ckpt))
    a, b = bundle_of(work / "ck_a", "lenet5"), bundle_of(work / "ck_b", "lenet5")
    assert_same(a, b)
    import hashlib

    m = json.loads((a / "manifest.json").read_text())
    assert m["weights"]["sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    import onnx

    meta = {p.key: p.value for p in onnx.load(a / "model.onnx").metadata_props}
    assert str(work) not in json.dumps(meta), "a local path leaked into the model's metadata"


def test_seed_changes_the_split_and_is_recorded(work):
    """The fingerprint really depends on the inputs: another seed, another split, another fingerprint."""
    export_in_process(work, "seed0", "lenet5")
    export_in_process(work, "seed1", "lenet5", "--seed", "1")
    m0 = json.loads((bundle_of(work / "seed0", "lenet5") / "manifest.json").read_text())
    m1 = json.loads((bundle_of(work / "seed1", "lenet5") / "manifest.json").read_text())
    assert m1["seed"] == 1 and m1["calibration"]["seed"] == 1
    assert m0["calibration"]["fingerprint"] != m1["calibration"]["fingerprint"]


def _quant_params(path: Path) -> dict:
    """Every scale / zero-point initializer of a Q/DQ model, by name."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(path)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    names = set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            names.update(n for n in node.input[1:] if n in inits)
    return {n: inits[n] for n in sorted(names)}


def test_int8_byte_identical_twice(work):
    arch = "squeezenet1_1"
    export_in_process(work, "i8_a", arch, "--precision", "int8")
    export_in_process(work, "i8_b", arch, "--precision", "int8")
    a, b = bundle_of(work / "i8_a", arch, "int8"), bundle_of(work / "i8_b", arch, "int8")
    assert_same(a, b)
    qa, qb = _quant_params(a / "model.onnx"), _quant_params(b / "model.onnx")
    assert qa, "an INT8 model without Q/DQ scales"
    assert sorted(qa) == sorted(qb)
    for name in qa:
        np.testing.assert_array_equal(qa[name], qb[name], err_msg=name)
    assert stable_manifest(a)["recipe"] == stable_manifest(b)["recipe"]
