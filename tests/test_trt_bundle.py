"""The TensorRT bundle end to end through the pipeline (random-init mobilenet_v3, FP32 and INT8), and merging
device results into it. No TensorRT here: the engine must be reported pending, never built or validated."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from calibration import trt_cache
from edgecnn import artefact
from edgecnn.errors import GateFailed, InputError, IntegrityError
from exporters import parity
from exporters.tensorrt import device as td
from exporters.tensorrt import qdq_check
from trt_bundles import session_bundles


def _no_tensorrt():
    return td.import_tensorrt()[0] is None


pytestmark = pytest.mark.skipif(not _no_tensorrt(), reason="TensorRT is installed here: these tests check the "
                                "pending path (the device path is tested in test_trt_device.py)")


class _Exported:
    """What the tests read of an exported bundle: its folder, manifest and summary."""

    def __init__(self, path: Path):
        self.path, self.manifest = path, artefact.read_manifest(path)

    def summary(self) -> str:
        from edgecnn.summary import summary_text

        return summary_text(self.manifest, self.manifest["status"], self.path, 0.0)


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return {p: _Exported(path) for p, path in session_bundles(tmp_path_factory, ("fp32", "int8")).items()}


def test_bundle_files_and_pending_manifest(bundles):
    for precision, res in bundles.items():
        m = res.manifest
        expect = {"model.onnx", "edgecnn_trt.py", "edgecnn_parity.py", "labels.txt", "reference.npz"}
        if precision == "int8":
            expect |= {"model.int8.qdq.onnx", "calibration.cache"}
        assert set(m["files"]) == expect and res.path.name == f"trt-{precision}"
        assert m["status"] == "pending" and m["tensorrt"]["engine"] == "pending"
        assert m["parity"] is None and m["latency"] is None          # nothing claims a TensorRT result
        assert "no TensorRT on this machine" in m["pending"] and "edgecnn_trt.py all" in m["pending"]
        assert not any(Path(res.path, f).suffix == ".engine" for f in m["files"])
        assert m["tensorrt"]["intended"]["onnx_opset"] == 17 and m["tensorrt"]["intended"]["jetpack"]
        recipes = m["tensorrt"]["build_recipe"]
        assert recipes["8.5-10.x (GPU)"]["trtexec"].startswith("trtexec --onnx=")
        assert recipes["11+ (GPU)"]["strongly_typed"] is True
        checks = {c["name"]: c for c in m["local_checks"]}
        assert checks["onnxruntime check of model.onnx"]["passed"]
        assert all("not a TensorRT result" in c["note"] for c in m["local_checks"] if "onnxruntime" in c["name"])
        assert onnx.load(res.path / "model.onnx").opset_import[0].version == 17
        artefact.verify(res.path)
        assert (res.path / "edgecnn_trt.py").read_bytes() == Path(td.__file__).read_bytes()
        assert (res.path / "edgecnn_parity.py").read_bytes() == Path(parity.__file__).read_bytes()
        assert "PENDING" in res.summary() and "check    onnxruntime check" in res.summary()


def test_int8_bundle_qdq_model_and_cache(bundles):
    res = bundles["int8"]
    m = res.manifest
    qdq = res.path / "model.int8.qdq.onnx"
    assert qdq_check.check_file(qdq).ok
    checks = {c["name"]: c for c in m["local_checks"]}
    rules = checks["TensorRT Q/DQ rules on model.int8.qdq.onnx"]
    assert rules["passed"] and rules["report"]["errors"] == [] and rules["report"]["warnings"] == []
    assert rules["detail"].startswith("0 error(s) (refused by TensorRT's ONNX parser), 0 warning(s) (builds, but "
                                      "slower than it could be)")
    assert "check    TensorRT Q/DQ rules on model.int8.qdq.onnx: PASS | 0 error(s)" in res.summary()
    ort_check = checks["onnxruntime check of model.int8.qdq.onnx (the Q/DQ model)"]
    assert ort_check["passed"] and ort_check["parity"]["gate"].startswith("SQNR")   # random init: SQNR gate
    quantizer = m["recipe"]["quantizer"]
    assert m["recipe"]["recipe"] == "trt" and quantizer["opset"] == 17 and quantizer["float_layers"]
    # what the recipe keeps float (SE gates, classifier) is what the Q/DQ model keeps float
    stats = checks["TensorRT Q/DQ rules on model.int8.qdq.onnx"]["report"]["stats"]
    assert set(quantizer["float_layers"]) == set(stats["float_layers"])
    # the cache: TensorRT header for the default target, one entry per float tensor of model.onnx
    cache = trt_cache.read_cache(res.path / "calibration.cache")
    assert cache.header == "TRT-8502-EntropyCalibration2" == m["tensorrt"]["calibration_cache"]["header"]
    fp32 = onnx.load(res.path / "model.onnx")
    tensors = {i.name for i in fp32.graph.input} | {o for n in fp32.graph.node for o in n.output}
    assert "input" in cache.scales and set(cache.scales) <= tensors and len(cache.scales) > 100
    # the same ranges drove the Q/DQ model: its input scale is the cache's input scale
    q = onnx.load(qdq)
    inits = {i.name: i for i in q.graph.initializer}
    qin = next(n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "input")
    scale = onnx.numpy_helper.to_array(inits[qin.input[1]])
    assert float(scale) == pytest.approx(float(cache.scales["input"]), rel=1e-6)


def test_validate_and_the_bundled_tool_say_pending(bundles, tmp_path):
    from edgecnn.pipeline import validate

    res = bundles["fp32"]
    out = validate(res.path, latency=False)
    assert out["status"] == "pending" and "TensorRT engine pending" in out["reason"]
    copy = tmp_path / "jetson" / "trt-fp32"
    shutil.copytree(res.path, copy)                     # what a user copies to the device
    run = subprocess.run([sys.executable, "edgecnn_trt.py", "build"], cwd=copy, capture_output=True, text=True)
    assert run.returncode == td.EXIT_ENV and "TensorRT's Python bindings are not importable" in run.stderr
    inputs, reference = td.Bundle.open(copy).reference()   # what the device validates against
    assert inputs.shape[1:] == (3, 224, 224) and reference.shape == (len(inputs), 1000)


# ---------------------------------------------------------------------------------------------- merge-results
def _stand_in_results(bundle_dir: Path, *, parity_override=None, validation=True, onnx_sha=None):
    """Results in the device tool's own format, with onnxruntime standing in for TensorRT: this exercises the
    merge logic only. They are written and merged in a temporary copy, never into a real artefact."""
    from exporters.onnx.runner import OnnxRuntimeRunner

    b = td.Bundle.open(bundle_dir)
    inputs, reference = b.reference()
    with OnnxRuntimeRunner(bundle_dir / "model.onnx") as runner:
        out = runner.run(inputs)
    verdict = parity.judge(reference, out, b.precision, False).to_dict()
    if parity_override:
        verdict.update(parity_override)
    info = {"gpu": {"name": "stand-in (onnxruntime CPU, not TensorRT)", "compute_capability": "0.0"},
            "tensorrt": "none (stand-in)", "python": sys.version.split()[0]}
    build = {"engine": "model.stand-in-sm00-trt0.0.0.engine", "onnx": "model.onnx",
             "onnx_sha256": onnx_sha or b.sha256("model.onnx")}
    val = {"engine": build["engine"], "parity": verdict, "latency": None} if validation else None
    results = td.results_record(b, info, build, val)
    if onnx_sha:
        results["bundle"]["onnx_sha256"]["model.onnx"] = onnx_sha
    path = bundle_dir.parent / "results.stand-in.json"
    path.write_text(json.dumps(results))
    return path


@pytest.fixture
def fp32_copy(bundles, tmp_path):
    dst = tmp_path / "trt-fp32"
    shutil.copytree(bundles["fp32"].path, dst)
    return dst


def test_merge_results_validates_only_with_passing_device_parity(fp32_copy):
    from edgecnn.device_results import merge_results

    m = merge_results(fp32_copy, _stand_in_results(fp32_copy))
    assert m["status"] == "validated" and m["parity"]["passed"] and not m.get("pending")
    assert "stand-in" in m["parity"]["runtime"] and "validated on" in m["tensorrt"]["engine_status"]
    assert "device-results/results.stand-in.json" in m["files"]
    artefact.verify(fp32_copy)                          # re-hashed: the bundle still verifies


def test_merge_results_rejudges_the_gate(fp32_copy):
    from edgecnn.device_results import merge_results

    lie = {"max_rel_error": 0.5, "passed": True, "reason": ""}   # claims a pass with a failing metric
    with pytest.raises(GateFailed, match="parity failed"):
        merge_results(fp32_copy, _stand_in_results(fp32_copy, parity_override=lie))
    m = artefact.verify(fp32_copy)
    assert m["status"] == "failed" and not m["parity"]["passed"]


def test_merge_results_build_only_stays_pending_and_foreign_results_are_refused(fp32_copy, tmp_path):
    from edgecnn.device_results import merge_results

    m = merge_results(fp32_copy, _stand_in_results(fp32_copy, validation=False))
    assert m["status"] == "pending" and "not validated" in m["tensorrt"]["engine_status"] and m["parity"] is None
    with pytest.raises(IntegrityError, match="different model.onnx"):
        merge_results(fp32_copy, _stand_in_results(fp32_copy, onnx_sha="0" * 64))
    junk = tmp_path / "junk.json"
    junk.write_text(json.dumps({"schema": "something else"}))
    with pytest.raises(InputError, match="not an edgecnn_trt.py results file"):
        merge_results(fp32_copy, junk)


def test_merge_results_cli(fp32_copy, capsys):
    from edgecnn.cli import main

    assert main(["merge-results", str(fp32_copy), str(_stand_in_results(fp32_copy))]) == 0
    assert "VALIDATED" in capsys.readouterr().out


def test_fp16_bundle_files_small_model(tmp_path):
    """FP16 bundles also carry a typed model.fp16.onnx for TensorRT >= 11 (onnxruntime's float16 converter
    leaves its input Casts out of topological order; the exporter sorts them)."""
    import onnxruntime as ort
    import torch

    from calibration import InputSpec
    from exporters.tensorrt import bundle as trt_exporter

    spec = InputSpec(height=32, width=32, resize=32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.BatchNorm2d(8), torch.nn.Hardswish(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    out = trt_exporter.write_bundle(model, spec, "fp16", tmp_path, say=lambda s: None)
    assert out["files"] == ["model.onnx", "model.fp16.onnx", "edgecnn_trt.py", "edgecnn_parity.py"]
    assert out["tensorrt"]["build_recipe"]["11+ (GPU)"]["onnx"] == "model.fp16.onnx"
    assert out["tensorrt"]["build_recipe"]["8.5-10.x (GPU)"]["builder_flags"] == ["FP16"]
    x = np.random.default_rng(0).standard_normal((4, 3, 32, 32)).astype(np.float32)
    a = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"input": x})[0]
    half = ort.InferenceSession(str(tmp_path / "model.fp16.onnx"))
    assert half.get_inputs()[0].type == "tensor(float)"       # FP32 I/O kept
    b = half.run(None, {"input": x})[0]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999
    init_types = {i.data_type for i in onnx.load(tmp_path / "model.fp16.onnx").graph.initializer}
    assert onnx.TensorProto.FLOAT16 in init_types


def test_matrix_shows_the_local_qdq_check_as_labelled_proxy_parity(bundles):
    """A pending TensorRT INT8 cell shows the onnxruntime parity of the shipped Q/DQ model, labelled as such;
    a pending FP16 cell shows none (nothing here runs FP16 TensorRT kernels)."""
    from edgecnn.matrix.results import from_manifest
    from edgecnn.matrix.report import row

    res = bundles["int8"]
    r = from_manifest(res.manifest, res.path, outcome="built", seconds=1.0)
    ort_check = {c["name"]: c for c in res.manifest["local_checks"]}[
        "onnxruntime check of model.int8.qdq.onnx (the Q/DQ model)"]
    assert r.status == "pending" and r.parity["sqnr_db"] == ort_check["parity"]["sqnr_db"]
    assert "the Q/DQ model" in r.parity_source and "not the device runtime" in r.parity_source
    assert not r.latency and "parity §" in row(r)[-1]
    fp16 = dict(res.manifest, precision="fp16")
    assert from_manifest(fp16, res.path, outcome="built", seconds=1.0).parity == {}
