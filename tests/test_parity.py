"""exporters/parity.py: the one place metrics and gates are computed, shipped byte-identical into every
TensorRT bundle as edgecnn_parity.py (the device judges with the same code), Python 3.8 + NumPy only."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporters import parity
from exporters.tensorrt import bundle as trt_bundle

ROOT = Path(__file__).resolve().parents[1]


def test_the_bundle_ships_a_byte_identical_copy(tmp_path):
    names = trt_bundle.copy_device_tool(tmp_path)
    assert trt_bundle.PARITY_COPY in names
    assert (tmp_path / trt_bundle.PARITY_COPY).read_bytes() == Path(parity.__file__).read_bytes()


def test_the_shipped_copy_judges_alone_as_the_package_does(tmp_path):
    """Imported from the bundle folder without edgecnn on the path, the copy gives the same verdict and JSON."""
    trt_bundle.copy_device_tool(tmp_path)
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((32, 10))
    out = ref + rng.standard_normal(ref.shape) * 0.3
    np.savez(tmp_path / "io.npz", ref=ref, out=out)
    code = ("import json, sys, numpy as np; sys.path.insert(0, sys.argv[1]); import edgecnn_parity as p; "
            "z = np.load(sys.argv[1] + '/io.npz'); "
            "print(json.dumps(p.judge(z['ref'], z['out'], 'int8', True).to_dict(), allow_nan=False))")
    env = {"PATH": "/usr/bin:/bin"}   # no PYTHONPATH: edgecnn itself is not importable there
    got = json.loads(subprocess.run([sys.executable, "-I", "-c", code, str(tmp_path)], capture_output=True,
                                    text=True, check=True, env=env).stdout)
    assert got == json.loads(json.dumps(parity.judge(ref, out, "int8", True).to_dict()))


def test_parity_stays_python_38_compatible():
    vermin = shutil.which("vermin") or str(Path(sys.executable).with_name("vermin"))
    if not Path(vermin).exists():
        pytest.fail("vermin (dev extra) is not installed: pip install -e '.[dev]'")
    res = subprocess.run([vermin, "-t=3.8-", "--no-tips", "--violations", str(Path(parity.__file__))],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout + res.stderr


def test_metrics_on_constructed_outputs():
    ref = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0]])
    p = parity.compare(ref, ref)
    assert p.sqnr_db == parity.SQNR_CAP_DB and p.top1_agreement == 1.0 and p.max_rel_error == 0.0
    noisy = ref + np.array([[0.0, 0.1, 0.0], [0.0, 0.0, 0.3]])
    q = parity.compare(ref, noisy)
    assert q.sqnr_db == pytest.approx(10 * np.log10((ref ** 2).sum() / 0.1), rel=1e-9)
    assert q.max_abs_error == pytest.approx(0.3) and q.max_rel_error == pytest.approx(0.1)
    assert parity.compare(ref, -ref).top1_agreement == 0.0
    assert parity.compare(ref, np.where(ref > 2, np.nan, ref)).nonfinite == 1


def test_gates_by_precision():
    ref = np.random.default_rng(1).standard_normal((16, 10))
    close = ref * (1 + 1e-6)
    assert parity.judge(ref, close, "fp32", True).passed
    assert not parity.judge(ref, ref * 1.01, "fp32", True).passed
    fp32 = parity.judge(ref, ref * (1 + 5e-4), "fp32", True, noise_floor=3e-4)
    assert fp32.passed and "3x PyTorch's own FP32 error" in fp32.gate   # a worse-conditioned reference
    assert parity.judge(ref, ref + 1e-3, "fp16", True).passed
    assert not parity.judge(ref, -ref, "fp16", True).passed
    rand = parity.judge(ref, ref + 0.5, "int8", False)
    assert "random-init" in rand.gate and rand.passed == (rand.sqnr_db >= parity.INT8_RANDOM_MIN_SQNR_DB)
    nan = parity.judge(ref, np.full_like(ref, np.nan), "int8", True)
    assert not nan.passed and nan.gate == "outputs finite"
    with pytest.raises(ValueError, match="no parity gate"):
        parity.judge(ref, ref, "int4", True)
    json.dumps(parity.judge(ref, ref, "fp32", True).to_dict(), allow_nan=False)   # strict JSON, plain types
