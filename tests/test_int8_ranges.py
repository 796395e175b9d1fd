"""Range estimation (calibration/ranges.py): each method, the cache, and no stray files."""
from __future__ import annotations

import os

import numpy as np
import pytest

from calibration import CalibrationError
from calibration.ranges import METHODS, Ranges, compute_ranges

from int8_nets import export_module, images, se_net


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("ranges")
    path = export_module(se_net(), d / "se.onnx")
    return path, images(24)


def _batches(x):
    return [x[i:i + 8] for i in range(0, len(x), 8)]


@pytest.fixture()
def in_empty_cwd(tmp_path, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return cwd


@pytest.mark.parametrize("method", METHODS)
def test_each_method_gives_sane_ranges_and_writes_nothing_to_cwd(model_and_data, method, in_empty_cwd, tmp_path):
    path, x = model_and_data
    r = compute_ranges(path, _batches(x), method, fingerprint=None)
    assert r.method == method and r.images == len(x) and len(r) > 5
    mm = compute_ranges(path, _batches(x), "minmax", fingerprint=None).ranges
    for name, (lo, hi) in r.ranges.items():
        assert np.isfinite(lo) and np.isfinite(hi) and lo <= hi, (name, lo, hi)
        mlo, mhi = mm[name]
        # every method stays inside what was observed (histogram methods clip; none may widen)
        assert lo >= mlo - 1e-3 * (abs(mlo) + 1) and hi <= mhi + 1e-3 * (abs(mhi) + 1), (method, name, (lo, hi), (mlo, mhi))
    relu_like = [k for k, (lo, hi) in mm.items() if lo == 0.0 and hi > 0]
    assert relu_like, "the test net has ReLU outputs"
    for k in relu_like:  # a non-negative tensor keeps a non-negative range (no half-wasted UINT8 grid)
        assert r.ranges[k][0] == 0.0
    assert os.listdir(in_empty_cwd) == [], "calibration wrote files into the current directory"


def test_histogram_methods_clip_outliers(tmp_path):
    """A tensor with one huge outlier: percentile/entropy/mse clip it, minmax keeps it."""
    import onnx
    from onnx import TensorProto, helper

    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1000])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 1000])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "relu.onnx"
    onnx.save(model, path)
    rng = np.random.default_rng(0)
    x = np.abs(rng.standard_normal((400, 1000))).astype(np.float32)  # 1 outlier in 400k: above the 99.999th percentile
    x[0, 0] = 100.0
    mm = compute_ranges(path, [x], "minmax").ranges["y"]
    assert mm[1] == pytest.approx(100.0)
    for method, bound in (("percentile", 20.0), ("entropy", 60.0)):  # entropy: 512-bin KL search
        hi = compute_ranges(path, [x], method).ranges["y"][1]
        assert 2.0 < hi < bound, (method, hi)
    # mse weighs a lone outlier's squared error (it keeps x=100 here, rightly); a long tail it does clip
    tail = np.abs(rng.laplace(size=(400, 1000))).astype(np.float32)
    lo_mm, hi_mm = compute_ranges(path, [tail], "minmax").ranges["y"]
    lo, hi = compute_ranges(path, [tail], "mse").ranges["y"]
    assert 3.0 < hi < 0.8 * hi_mm, (hi, hi_mm)


def test_cache_hit_is_fast_and_identical(model_and_data, tmp_path):
    path, x = model_and_data
    calls = []

    def batches():
        calls.append(1)
        return _batches(x)

    first = compute_ranges(path, batches, "percentile", fingerprint="fp-1", cache_dir=tmp_path / "c")
    second = compute_ranges(path, batches, "percentile", fingerprint="fp-1", cache_dir=tmp_path / "c")
    assert not first.cache_hit and second.cache_hit and len(calls) == 1, "a cache hit must not touch the data"
    assert second.ranges == pytest.approx(first.ranges) if False else all(
        np.allclose(second.ranges[k], first.ranges[k]) for k in first.ranges)
    # a different calibration set, method or model is a miss
    assert not compute_ranges(path, batches, "percentile", fingerprint="fp-2", cache_dir=tmp_path / "c").cache_hit
    assert not compute_ranges(path, batches, "minmax", fingerprint="fp-1", cache_dir=tmp_path / "c").cache_hit
    # a damaged entry is recomputed, not trusted
    for f in (tmp_path / "c").iterdir():
        f.write_text("{not json")
    assert not compute_ranges(path, batches, "percentile", fingerprint="fp-1", cache_dir=tmp_path / "c").cache_hit


def test_ranges_round_trip_to_onnxruntime_cache(model_and_data, tmp_path):
    from onnxruntime.quantization.calibrate import load_tensors_data

    path, x = model_and_data
    r = compute_ranges(path, _batches(x), "minmax")
    assert Ranges.from_json(r.to_json()).ranges == r.ranges
    td = load_tensors_data(r.write_ort_cache(tmp_path / "ort.json"))
    name = next(iter(r.ranges))
    assert float(td[name].range_value[1]) == pytest.approx(r.ranges[name][1], rel=1e-6)


def test_unknown_method_and_no_data_are_clear_errors(model_and_data):
    path, _ = model_and_data
    with pytest.raises(CalibrationError, match="unknown calibration method"):
        compute_ranges(path, [], "kl-magic")
    with pytest.raises(CalibrationError, match="no calibration images"):
        compute_ranges(path, [], "minmax")
