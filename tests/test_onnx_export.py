"""Every zoo architecture -> ONNX FP32 through the one pipeline, passing the FP32 parity gate on real
held-out images; FP16 for the focus nets; the pretrained Lite0 agreeing with torch on every photo.

Heavy architectures (VGG, AlexNet, ResNet-101/152, DenseNet-169/201, Inception v3, EfficientNet-B3..B7)
run in `make test-all` (marked slow).
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from calibration import normalize
from edgecnn import zoo
from edgecnn.artefact import verify
from edgecnn.pipeline import export
from exporters.onnx.runner import OnnxRuntimeRunner
from edgecnn.options import ExportOptions

FOCUS = ["squeezenet1_0", "squeezenet1_1", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small",
         "mobilenet_v3_large", "efficientnet_b0", "efficientnet_lite0"]
QUICK = ExportOptions(eval_size=16, latency=False)


# The default run exports these (about 4 min on 2 quiet cores); every other arch runs in `make test-all`.
DEFAULT_RUN = {"lenet5", "squeezenet1_0", "squeezenet1_1", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small",
               "mobilenet_v3_large", "efficientnet_b0", "efficientnet_lite0", "resnet18", "shufflenet_v2_x0_5",
               "shufflenet_v2_x1_0"}


def _params(names):
    out = []
    for n in names:
        marks = [] if n in DEFAULT_RUN else [pytest.mark.slow]
        out.append(pytest.param(n, marks=marks))
    return out


@pytest.mark.parametrize("arch", _params(zoo.names()))
def test_fp32_export_passes_parity_gate(arch, tmp_path):
    result = export(arch, "onnx", "fp32", weights="auto", out=tmp_path, options=QUICK, quiet=True)
    m = result.manifest
    assert result.status == "validated", m.get("parity")
    p = m["parity"]
    # 1e-4 relative, unless PyTorch's own FP32 result is further than that from FP64: then the artefact
    # must be within 2x that noise of the FP64 result
    assert p["passed"]
    if p["max_rel_error"] > 1e-4:
        assert p["fp32_error_vs_fp64"] <= max(1e-4, 2 * p["fp32_noise_floor"]) and "FP64" in p["gate"]
    assert m["parity"]["samples"] == 16 and m["parity"]["nonfinite"] == 0
    model = onnx.load(str(result.path / "model.onnx"))
    assert m["export"]["opset"] == max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["edgecnn.arch"] == zoo.resolve(arch).name
    assert json.loads(meta["edgecnn.input"])["height"] == zoo.resolve(arch).spec.height


@pytest.mark.parametrize("arch", FOCUS)
def test_fp16_focus_nets_pass_cosine_gate(arch, tmp_path):
    result = export(arch, "onnx", "fp16", weights="auto", out=tmp_path, options=QUICK, quiet=True)
    p = result.manifest["parity"]
    assert result.status == "validated" and p["min_cosine"] >= 0.999, p
    assert "no FP16 conv kernels" in result.manifest["recipe"]["note"]


def test_manifest_is_complete_and_bundle_verifies(tmp_path):
    result = export("mobilenet_v3_small", "onnx", "fp32", out=tmp_path, options=ExportOptions(eval_size=8), quiet=True)
    m = verify(result.path)
    for key in ("schema_version", "arch", "weights", "input", "output", "labels_file", "precision", "recipe",
                "calibration", "toolchain", "parity", "latency", "files", "export", "seed"):
        assert key in m, key
    assert set(m["files"]) == {"model.onnx", "labels.txt", "reference.npz"}
    assert m["weights"]["pretrained"] is False and m["weights"]["bn_reestimated"] is True
    assert m["input"]["mean"] == [0.485, 0.456, 0.406] and m["input"]["color_order"] == "RGB"
    lat = m["latency"]
    assert lat["batch1"]["runs"] >= 30 and lat["batch1"]["p50_ms"] > 0 and lat["throughput"]["batch"] == 8
    assert lat["runtime"]["runtime"] == "onnxruntime" and lat["runtime"]["threads"] == 1
    assert "cpu" in lat["machine"] and lat["load_seconds"] > 0
    assert m["calibration"]["evaluation_images"] == 8
    assert (tmp_path / "mobilenet_v3_small" / "onnx-fp32" / "labels.txt").read_text().count("\n") == 1000


def test_pretrained_lite0_onnx_agrees_with_torch_on_every_sample_photo(tmp_path):
    result = export("efficientnet_lite0", "onnx", "fp32", out=tmp_path, options=ExportOptions(eval_size=200, latency=False),
                    quiet=True)
    p = result.manifest["parity"]
    assert result.manifest["weights"]["pretrained"] and p["judged_on"] == "trained weights"
    assert p["top1_agreement"] == 1.0 and p["samples"] >= 90
    # The bundle's own reference file reproduces the torch outputs with onnxruntime.
    ref = np.load(result.path / "reference.npz")
    spec = zoo.resolve("efficientnet_lite0").spec
    out = OnnxRuntimeRunner(result.path / "model.onnx").run(normalize(ref["pixels"], spec))
    assert np.array_equal(out.argmax(1), ref["reference"].argmax(1))


def test_reexport_replaces_previous_bundle_atomically(tmp_path):
    first = export("lenet5", "onnx", "fp32", out=tmp_path, options=QUICK, quiet=True)
    second = export("lenet5", "onnx", "fp16", out=tmp_path, options=QUICK, quiet=True)
    third = export("lenet5", "onnx", "fp32", out=tmp_path, options=ExportOptions(eval_size=16, latency=False, seed=1),
                   quiet=True)
    assert first.path == third.path and verify(third.path)["seed"] == 1
    leftovers = [p.name for p in (tmp_path / "lenet5").iterdir() if p.name.startswith((".staging", ".previous"))]
    assert leftovers == [] and second.path.name == "onnx-fp16"
