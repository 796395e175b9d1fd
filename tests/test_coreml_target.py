"""The coreml target through the one pipeline: bundle contents and Xcode names, manifest, parity from the
reference executor in both of its modes, the Neural Engine report in the manifest and the summary, latency
honestly "not measured" on Linux, and validation of a finished bundle."""
from __future__ import annotations

import json
import platform
import re

import numpy as np
import pytest

from calibration import derive_spec
from edgecnn import pipeline, targets, zoo
from edgecnn.cli import main as cli_main
from edgecnn.errors import UsageError
from edgecnn.options import CoreMLOptions
from edgecnn.targets import ExportOptions
from exporters.coreml.export import classifier_labels
from exporters.coreml.mil_reference import CoreMLProgram

LINUX = platform.system() != "Darwin"


def _opts(**coreml):
    return ExportOptions(calib_size=32, eval_size=16, coreml=CoreMLOptions(**coreml))


def test_target_registered_with_precisions():
    t = targets.get("coreml")
    assert t.name == "coreml" and set(t.precisions) == {"fp32", "fp16", "int8", "int8-weights", "palettized8",
                                                        "palettized6", "palettized4", "int4-weights"}
    assert targets.get("mlpackage") is t


def _neural_engine_report_is_complete(report: dict) -> None:
    for key in ("fp32_ops", "segments", "long_fp16_reductions", "quantization", "reported_to_leave_neural_engine",
                "advice", "sources"):
        assert key in report, key
    assert report["advice"] and report["segments"][-1]["where"].startswith("CPU")   # the FP32 logits


@pytest.mark.skipif(not LINUX, reason="on macOS the real Core ML runtime validates and latency is measured")
def test_export_fp16_bundle_on_linux(tmp_path):
    spec = derive_spec(zoo.resolve("mobilenet_v3_small").spec, size=64)   # 64 px keeps the executor cheap
    res = pipeline.export("mobilenet_v3_small", "coreml", "fp16", "none", None, tmp_path, options=_opts(), quiet=True,
                          input_spec=spec)
    m = res.manifest
    assert res.status == "validated"
    image, tensor = "MobileNetV3Small_FP16.mlpackage", "MobileNetV3Small_FP16_Tensor.mlpackage"
    assert m["model_file"] == image
    files = m["files"]
    assert any(k.startswith(image + "/") for k in files) and any(k.startswith(tensor + "/") for k in files)
    assert any(k.endswith("weights/weight.bin") for k in files)
    assert m["parity"]["passed"] and m["parity"]["min_cosine"] >= 0.999
    assert m["parity"]["runtime"] == "coreml-reference-executor"
    assert m["latency"]["not_measured"].startswith("not measured (needs Apple hardware)")
    assert m["latency"]["runtime"]["runtime"] == "coreml-reference-executor"
    assert "batch1" not in m["latency"]
    cm = m["coreml"]
    assert cm["packages"] == {"image": image, "tensor": tensor}
    assert cm["swift_classes"] == {"image": "MobileNetV3Small_FP16", "tensor": "MobileNetV3Small_FP16_Tensor"}
    assert cm["variants"]["tensor"]["parity"]["passed"] and cm["variants"]["image"]["ios"] == 16
    assert cm["metadata"]["author"] == "edgecnn" and "image" in cm["metadata"]["preprocessing"]
    assert cm["metadata"]["license"].startswith("Weights: random initialisation") and "Apache-2.0" in cm["metadata"]["license"]
    modes = cm["executor_modes"]
    assert modes["fp32_accumulation"]["passed"] and modes["fp16_accumulation"]["chunks"]["products_per_fp16_partial"] == 32
    assert modes["passed_in"] in ("both", "fp32 accumulation only") and modes["verdict"].startswith("gate cosine")
    for variant in ("image", "tensor"):
        _neural_engine_report_is_complete(cm["variants"][variant]["neural_engine"])
    report = cm["variants"]["image"]["neural_engine"]
    assert report["segments"][0]["where"].startswith("CPU")          # the image variant's FP32 normalisation
    assert report["reported_to_leave_neural_engine"]["count"] > 0   # MobileNetV3's squeeze-excite broadcasts
    assert m["export"]["ios"] == 16 and m["recipe"]["io_types"].startswith("float32")
    assert [o["name"] for o in m["output"]["image_variant_outputs"]] == ["classLabel", "classLabel_probs", "logits"]
    summary = res.summary()
    assert "parity measured with coreml-reference-executor" in summary
    assert f"xcode    {image} (class MobileNetV3Small_FP16)" in summary
    assert re.search(r"modes    FP32 accumulation PASS .* \| FP16 accumulation (PASS|FAIL)", summary), summary
    assert "  ne       " in summary and "  advice   " in summary
    # the finished bundle validates from its own reference.npz
    v = pipeline.validate(res.path)
    assert v["status"] == "validated" and v["runtime"]["runtime"] == "coreml-reference-executor"
    assert "not_measured" in v["latency"]
    # the classifier outputs of the image model: label and softmax probabilities agree with torch
    with np.load(res.path / "reference.npz") as ref:
        pixels, logits = ref["pixels"], ref["reference"]
    labels = classifier_labels((res.path / "labels.txt").read_text().splitlines())
    assert len(set(labels)) == len(labels) == 1000
    out = CoreMLProgram(res.path / image).run({"image": pixels[:1].transpose(0, 3, 1, 2).astype(np.float32)})
    assert out["classLabel"] == labels[int(logits[0].argmax())]
    e = np.exp(logits[0] - logits[0].max())
    got = np.array([out["classLabel_probs"][lab] for lab in labels])
    assert abs(got.sum() - 1) < 1e-2 and np.abs(got - e / e.sum()).max() < 1e-2


def test_palettized_bundle_reports_and_validates(tmp_path, capsys):
    rc = cli_main(["export", "lenet5", "-t", "coreml", "-p", "palettized6", "--weights", "none", "--out", str(tmp_path),
                   "--calib-size", "16", "--eval-size", "8", "--json", "-q"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["status"] == "validated" and m["model_file"] == "LeNet5_Pal6.mlpackage"
    assert m["coreml"]["variants"]["image"]["ops"].get("constexpr_lut_to_dense", 0) > 0
    assert "64-entry" in m["recipe"]["weights"] and m["parity"]["gate"].startswith("SQNR")
    _neural_engine_report_is_complete(m["coreml"]["variants"]["image"]["neural_engine"])
    assert m["coreml"]["executor_modes"]["fp16_accumulation"]["samples"] == 8


def test_int8_on_ios16_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="needs iOS 17"):
        pipeline.export("lenet5", "coreml", "int8", "none", None, tmp_path, options=_opts(ios=16), quiet=True)


def test_cli_ios_flag_and_default_precision(tmp_path, capsys):
    rc = cli_main(["export", "lenet5", "-t", "coreml", "--ios", "18", "--weights", "none", "--out", str(tmp_path),
                   "--calib-size", "16", "--eval-size", "8", "--json", "-q"])
    assert rc == 0
    m = json.loads(capsys.readouterr().out)
    assert m["precision"] == "fp16" and m["export"]["ios"] == 18 and m["status"] == "validated"
    assert m["coreml"]["variants"]["image"]["spec_version"] >= 9  # iOS18 = Core ML spec 9
    assert m["model_file"] == "LeNet5_FP16.mlpackage"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp16", "int8"])
def test_pretrained_lite0_passes_its_gate_on_held_out_photos(tmp_path, precision):
    """Acceptance: pretrained EfficientNet-Lite0 Core ML artefacts, judged by the pipeline on the reference
    executor on the held-out sample photos: FP16 by its cosine gate, W8A8 by the accuracy drop estimated from
    FP32's confidence (measured: 0.03 pt, 95% 0.00-0.06, with 93.75% top-1 agreement: the flips are near-ties)."""
    res = pipeline.export("efficientnet_lite0", "coreml", precision, "auto", None, tmp_path, quiet=True,
                          options=ExportOptions(latency=False))
    p = res.manifest["parity"]
    print(res.summary())
    assert res.status == "validated" and p["passed"] and p["samples"] >= 90, p
    if precision == "int8":
        assert p["criterion"].startswith("estimated accuracy drop") and p["estimated_drop"] <= 0.01, p
        assert p["ref_top1_in_top5"] >= 0.99, p


@pytest.mark.slow
def test_random_b0_fp16_shows_the_neural_engine_gap(tmp_path):
    """Random-init EfficientNet-B0 to FP16 through the pipeline: the squeeze-excite means over 112 x 112 and
    56 x 56 values are flagged, and FP16 accumulation (Neural-Engine-like) keeps far less SQNR than FP32
    accumulation (CPU-like) on the same program and images; the manifest says in which mode the gate passed."""
    res = pipeline.export("efficientnet_b0", "coreml", "fp16", "none", None, tmp_path, quiet=True,
                          options=ExportOptions(latency=False))
    cm = res.manifest["coreml"]
    report = cm["variants"]["image"]["neural_engine"]
    assert report["long_fp16_reductions"]["longest"][0]["elements"] == 112 * 112
    modes = cm["executor_modes"]
    f32, f16 = modes["fp32_accumulation"], modes["fp16_accumulation"]
    print(f"B0 FP16: FP32 accumulation SQNR {f32['sqnr_db']:.1f} dB, min cos {f32['min_cosine']:.5f}; FP16 accumulation "
          f"SQNR {f16['sqnr_db']:.1f} dB, min cos {f16['min_cosine']:.5f}; {modes['verdict']}")
    assert f32["passed"] and f32["sqnr_db"] - f16["sqnr_db"] > 10.0
    assert modes["passed_in"] in ("both", "fp32 accumulation only") and modes["verdict"].startswith("gate cosine")


def test_int8_summary_reports_the_w8a8_fallback(tmp_path, capsys):
    """The export summary reads Core ML's fallback block (before/after/keep_float), not only the Q/DQ one; a W8A8
    export reports both executor modes, float logits, and the Neural Engine advice on when W8A8 is worth it."""
    rc = cli_main(["export", "lenet5", "-t", "coreml", "-p", "int8", "--weights", "none", "--out", str(tmp_path),
                   "--calib-size", "64", "--eval-size", "24"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert re.search(r"int8 +coreml-w8a8 recipe, minmax ranges, \d+ layer\(s\) float; probe (estimated drop|SQNR)", out), out
    assert re.search(r"modes    FP32 accumulation PASS .* \| FP16 accumulation PASS", out), out
    assert "A17 Pro / M4" in out and "coreml.w8a8_scheme=symmetric" in out
    m = json.loads((tmp_path / "lenet5" / "coreml-int8" / "manifest.json").read_text())
    assert m["model_file"] == "LeNet5_W8A8.mlpackage" and m["recipe"]["quantizer"]["logits"].startswith("float")
    assert m["coreml"]["variants"]["image"]["logits_from"][-1] != "dequantize"
    assert m["coreml"]["variants"]["image"]["neural_engine"]["quantization"]["quantize"] > 0
    assert set(m["coreml"]["executor_modes"]) >= {"fp32_accumulation", "fp16_accumulation", "verdict"}
