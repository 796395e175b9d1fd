"""Empirical bias correction (exporters/int8/bias.py) with real onnxruntime on a trained deep net: the
Fashion-MNIST MobileNetV2 the suite trains (tests/fmnist.py), whose inverted residual blocks pass
activation-rounding shifts down the residual streams. Calibration and held-out images are disjoint."""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from calibration.ranges import compute_ranges
from exporters import parity
from exporters.int8 import bias
from exporters.onnx import quant as quant_ort
from exporters.onnx.runner import run_onnx


@pytest.fixture(scope="module")
def net(tmp_path_factory):
    fm = pytest.importorskip("fmnist", reason="tests/fmnist.py (the Fashion-MNIST harness) is not in this tree")
    fm.require_data()
    from exporters.onnx.export import export_onnx

    d = tmp_path_factory.mktemp("ebc")
    spec = fm.fmnist_spec("mobilenet_v2")
    fp32 = d / "fp32.onnx"
    export_onnx(fm.trained_model("mobilenet_v2"), spec, fp32)
    images, _ = fm.test_split(512)
    x = fm._inputs(fm.pixels(images, spec), spec).astype(np.float32)
    calib, held_out = x[:256], x[256:]
    unc = d / "unc.onnx"
    quant_ort.prepare(fp32, unc)
    ranges = compute_ranges(unc, [calib[i:i + 32] for i in range(0, len(calib), 32)], "minmax", cache_dir=False)
    return d, fp32, unc, ranges, calib, held_out


def _held_out_sqnr(d, fp32, prep, ranges, x):
    out = d / "q.onnx"
    quant_ort.quantize(prep, out, ranges, [])
    return parity.compare(run_onnx(fp32, x), run_onnx(out, x)).sqnr_db


def test_damped_passes_raise_the_sqnr_on_calibration_and_held_out_images(net):
    d, fp32, unc, ranges, calib, held_out = net
    prep = d / "prep.onnx"
    shutil.copyfile(unc, prep)
    before = _held_out_sqnr(d, fp32, prep, ranges, held_out)
    rep = bias.correct_empirical(str(prep), str(unc), quant_ort.quantize, ranges, [], calib, passes=4)
    after = _held_out_sqnr(d, fp32, prep, ranges, held_out)
    print(rep.to_dict(), before, after)
    assert rep.convs > 40 and rep.best_pass > 0
    assert rep.sqnr_db_after > rep.sqnr_db_before + 0.5  # measured 31.1 -> 32.5 dB
    assert after > before + 0.1, (before, after)  # images the means were not measured on (measured +0.33 dB)


def test_an_undamped_correction_diverges_and_the_best_pass_keeps_the_model_from_it(net):
    d, fp32, unc, ranges, calib, held_out = net
    prep = d / "prep_undamped.onnx"
    shutil.copyfile(unc, prep)
    rep = bias.correct_empirical(str(prep), str(unc), quant_ort.quantize, ranges, [], calib, passes=2, damp=1.0)
    print(rep.to_dict())
    # every full-strength pass made the calibration fit worse than no correction (measured here: the
    # best pass is 0, 31.1 dB), so the kept biases are the original ones, bit for bit
    assert rep.best_pass == 0 and rep.sqnr_db_after == rep.sqnr_db_before
    import onnx
    from onnx import numpy_helper

    a = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(prep)).graph.initializer}
    b = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(unc)).graph.initializer}
    assert all(np.array_equal(a[k], b[k]) for k in b)
