"""INT8 through the one pipeline (ONNX target): manifest recipe, summary, CLI options, calibration-split only."""
from __future__ import annotations

import json
import os

import pytest

from edgecnn import pipeline
from edgecnn.cli import main
from edgecnn.options import ExportOptions
from exporters.int8.options import Int8Options


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGECNN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_lenet5_int8_export_records_the_recipe(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    res = pipeline.export("lenet5", "onnx", "int8", "none", None, tmp_path / "art", quiet=True,
                          options=ExportOptions(calib_size=64, eval_size=32, int8=Int8Options(ranges="percentile")))
    m = res.manifest
    assert res.status == "validated", m.get("parity")
    r = m["recipe"]
    assert r["recipe"] == "ort" and r["ranges"]["method"] == "percentile" and r["quantizer"]["format"] == "QDQ"
    assert r["report"]["fused_ops"].get("QLinearConv", 0) >= 1
    fb = r["fallback"]
    assert fb["before"]["samples"] > 0 and "layers_float" in fb
    assert "calibration-split" in fb["probe"]["text"]
    rounding = r["weight_rounding"]   # error-compensated rounding ran on the calibration split's layer inputs
    assert rounding["method"] == "gptq" and rounding["layers"] >= 2 and 0 < rounding["images"] <= 64, rounding
    assert fb["probe"]["split"] is True and "not fitted on" in fb["probe"]["text"]   # the search probes unseen images
    # ranges came from the calibration split only (the held-out images are never calibrated on)
    assert r["ranges"]["images"] == m["calibration"]["calibration_images"] - len(m["calibration"]["skipped"])
    assert m["int8"]["speedup_vs_fp32"] > 0 and m["int8"]["int8_bytes"] < m["int8"]["fp32_bytes"]
    assert m["latency"]["speedup_vs_fp32"] == m["int8"]["speedup_vs_fp32"]
    assert "INT8 range calibration" in m["calibration"]["used_for"]
    text = res.summary()
    assert "speed-up vs FP32" in text and "of FP32" in text and "SQNR" in text and "top-1 agree" in text
    # nothing but the artefact folder (and the cache) was written
    assert sorted(os.listdir(tmp_path)) == ["art", "cache"]
    assert sorted(os.listdir(res.path)) == ["labels.txt", "manifest.json", "model.onnx", "reference.npz"]
    # a re-export reuses the cached ranges
    res2 = pipeline.export("lenet5", "onnx", "int8", "none", None, tmp_path / "art", quiet=True,
                           options=ExportOptions(calib_size=64, eval_size=32, latency=False,
                                                 int8=Int8Options(ranges="percentile")))
    assert res2.manifest["recipe"]["ranges"]["cache_hit"] is True


def test_cli_calib_method_and_bad_method(tmp_path, cache, capsys):
    rc = main(["export", "lenet5", "-p", "int8", "-w", "none", "-o", str(tmp_path / "a"), "--calib-size", "48",
               "--eval-size", "24", "--calib-method", "mse", "--weight-rounding", "nearest", "--no-latency", "--json",
               "-q"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["recipe"]["ranges"]["method"] == "mse" and m["calibration"]["calibration_images"] <= 48
    assert m["recipe"]["weight_rounding"] == {"method": "nearest"}
    with pytest.raises(SystemExit):
        main(["export", "lenet5", "-p", "int8", "--calib-method", "bogus"])


def test_an_option_of_the_wrong_type_is_one_clear_usage_error(tmp_path, cache):
    """Options built in Python are checked against their declared types before any work."""
    from edgecnn.errors import UsageError

    opts = ExportOptions(calib_size=48, eval_size=24, int8=Int8Options(min_speedup="fast"))
    with pytest.raises(UsageError, match=r"option int8.min_speedup='fast' is not a number"):
        pipeline.export("lenet5", "onnx", "int8", "none", None, tmp_path, options=opts, quiet=True)
    assert not (tmp_path / "lenet5").exists()


def test_an_unknown_weight_rounding_is_one_clear_usage_error(tmp_path, cache):
    from edgecnn.errors import UsageError

    opts = ExportOptions(calib_size=48, eval_size=24, latency=False, int8=Int8Options(weight_rounding="stochastic"))
    with pytest.raises(UsageError, match="int8.weight_rounding='stochastic'") as err:
        pipeline.export("lenet5", "onnx", "int8", "none", None, tmp_path, options=opts, quiet=True)
    assert "gptq" in str(err.value) and "nearest" in str(err.value)
