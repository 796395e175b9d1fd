"""Contract test of the on-device tool against a TensorRT stand-in of each supported version.

The bundle's own ``edgecnn_trt.py`` runs as a subprocess, as on a Jetson, with ``tests/trt_standin``'s
``tensorrt`` package of one version on its path (8.5.2 = JetPack 5.1, 8.6.2 = JetPack 6.0, 10.3 =
JetPack 6.1/6.2, 11.1 and 11.4.1 = JetPack 7.x) and its libcudart stand-in found through CUDA_HOME or
LD_LIBRARY_PATH. What this proves: every TensorRT and CUDA call the tool makes exists in that version and
is made as that version requires (the stand-in refuses any other), DLA, calibration-cache, TF32 and
results logic hold on each version, and the results merge back on the host. What it does not prove: anything
about TensorRT's numbers or speed (engines "run" as onnxruntime on the CPU) or a real device; nothing here
is a TensorRT validation.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from exporters.tensorrt import device as td
from trt_bundles import session_bundles
from trt_standin import VERSIONS, calls, report, run_tool, tool_env
from trt_standin import module as standin

DEVICE_OF = {"8.5": "agx-orin", "8.6": "orin-nx", "10.3": "agx-orin", "11.1": "thor", "11.4": "agx-orin"}
MAIN_VERSIONS = ("8.5", "8.6", "10.3", "11.1")
FAST = ["--runs", "3", "--warmup", "1", "--throughput-batch", "2"]


@pytest.fixture(scope="module")
def bundles(tmp_path_factory):
    return session_bundles(tmp_path_factory, ("fp32", "fp16", "int8"))


def copy_bundle(bundle: Path, dest: Path) -> Path:
    """What a user copies to the device (hard links: the tool only adds files, never rewrites the bundle's)."""
    shutil.copytree(bundle, dest, copy_function=os.link)
    return dest


@pytest.fixture(scope="module")
def on_device(bundles, tmp_path_factory):
    """One device copy per precision, shared by the versions (engines and results are named per version)."""
    root = tmp_path_factory.mktemp("device")
    return {p: copy_bundle(b, root / b.name) for p, b in bundles.items()}


def _json(path: Path) -> dict:
    def refuse(token):
        raise ValueError(f"{path} holds {token}: not strict JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def _all(bundle, version, work, *extra, device=None):
    res = run_tool(bundle, ["all", *FAST, *extra], version, work, device=device or DEVICE_OF[version])
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    rep = report(work)
    assert rep["cuda_leftovers"] == {"allocations": 0, "streams": 0, "events": 0}, rep["cuda_leftovers"]
    assert rep["cuda_failed_calls"] == [] and not calls(rep, "trt.nptype")
    return res, rep


def _results(bundle, version) -> dict:
    found = sorted(bundle.glob(f"results.*-trt{td.version_str(td.parse_version(VERSIONS[version]))}.json"))
    assert len(found) == 1, found
    return _json(found[0]), found[0]


def _merge(bundles, precision, results_file, tmp_path):
    from edgecnn.device_results import merge_results

    host = copy_bundle(bundles[precision], tmp_path / "host" / f"trt-{precision}")
    return merge_results(host, results_file)


# ---------------------------------------------------------------------------------------------- check
@pytest.mark.parametrize("version", MAIN_VERSIONS + ("11.4",))
def test_check_on_every_version(bundles, version, tmp_path):
    res = run_tool(bundles["fp32"], ["check"], version, tmp_path, device=DEVICE_OF[version])
    assert res.returncode == 0 and "READY: TensorRT %s" % VERSIONS[version] in res.stdout, res.stdout + res.stderr
    info = json.loads(res.stdout[:res.stdout.rindex("}") + 1])
    expect = {"8.5": "2 core(s)", "8.6": "1 core(s)", "10.3": "2 core(s)", "11.4": "2 core(s)",
              "11.1": "TensorRT 11.1.0 has no DLA support (none in 11.0-11.3)"}[version]
    assert info["dla"] == expect and info["gpu"]["name"] == ("NVIDIA Thor" if version == "11.1" else "Orin")


@pytest.mark.parametrize("where", ["ld_library_path", "none"])
def test_libcudart_found_through_ld_library_path_or_said_missing(bundles, where, tmp_path):
    res = run_tool(bundles["fp32"], ["check"], "10.3", tmp_path, cudart=where)
    if where == "none":
        assert res.returncode == td.EXIT_ENV and "NOT READY" in res.stdout and "libcudart" in res.stdout
    else:
        assert res.returncode == 0 and "READY" in res.stdout


# ---------------------------------------------------------------------------------------------- build+validate
@pytest.mark.parametrize("precision", ["fp32", "fp16", "int8"])
@pytest.mark.parametrize("version", MAIN_VERSIONS)
def test_all_builds_validates_and_benchmarks(bundles, on_device, version, precision, tmp_path):
    """`all` (check, build, validate, benchmark) on random-init mobilenet_v3, and the results merged on the host."""
    res, rep = _all(on_device[precision], version, tmp_path)
    major = int(version.split(".")[0])
    flags = calls(rep, "builder.create_network")[0]
    assert flags == (["EXPLICIT_BATCH"] if major == 8 else [] if major == 10 else ["STRONGLY_TYPED"])
    set_flags, cleared = calls(rep, "config.set_flag"), calls(rep, "config.clear_flag")
    assert cleared == (["TF32"] if precision == "fp32" else [])              # TF32 off for FP32, on 11 too
    assert ("--noTF32" in res.stdout) == (precision == "fp32")
    if major == 11:
        assert set_flags == [] and "--stronglyTyped" in res.stdout
    else:
        assert set_flags == {"fp32": [], "fp16": ["FP16"], "int8": ["INT8", "FP16"]}[precision]
    results, path = _results(on_device[precision], version)
    v = results["validation"]
    assert results["status"] == "validated" and v["parity"]["passed"] is True
    assert v["latency"]["batch1"]["runs"] == 3 and v["latency"]["throughput"]["batch"] == 2
    assert results["build"]["onnx"] == {"fp32": "model.onnx", "fp16": "model.fp16.onnx" if major == 11 else
                                        "model.onnx", "int8": "model.int8.qdq.onnx"}[precision]
    engine = on_device[precision] / results["build"]["engine"]
    assert engine.is_file() and _json(Path(str(engine) + ".json"))["engine_sha256"] == results["build"]["engine_sha256"]
    merged = _merge(bundles, precision, path, tmp_path)
    assert merged["status"] == "validated" and merged["parity"]["passed"]
    assert merged["device_results"][-1]["tensorrt"] == VERSIONS[version]


# ---------------------------------------------------------------------------------------------- DLA
DLA_CASES = [("8.5", "int8", ["--dla", "1"], 1), ("8.6", "fp16", ["--dla", "0", "--batch", "2"], 2),
             ("10.3", "int8", ["--dla", "0", "--batch", "2", "--int8-mode", "explicit"], 2),
             ("11.4", "int8", ["--dla", "0"], 1)]


@pytest.mark.parametrize("version,precision,args,batch", DLA_CASES, ids=[c[0] for c in DLA_CASES])
def test_dla_engine_is_static_shape_and_validated_at_that_shape(bundles, version, precision, args, batch, tmp_path):
    device = copy_bundle(bundles[precision], tmp_path / "device")
    core = int(args[1])
    res, rep = _all(device, version, tmp_path / "work", *args)
    shape = [batch, 3, 224, 224]
    assert calls(rep, "profile.set_shape")[0] == ["input", shape, shape, shape]
    assert {tuple(s) for s, ok in calls(rep, "context.set_input_shape")} <= {tuple(shape)}
    assert calls(rep, "config.default_device_type") == ["DLA"] and calls(rep, "config.DLA_core") == [core]
    assert calls(rep, "runtime.DLA_core") and set(calls(rep, "runtime.DLA_core")) == {core}
    assert f"--shapes=input:{batch}x3x224x224" in res.stdout and f"--useDLACore={core}" in res.stdout
    results, path = _results(device, version)
    placement = results["build"]["placement"]
    assert placement["dla_layers"] > 0 and placement["gpu_layers"] > 0 and "IEngineInspector" in placement["reported_by"]
    latency = results["validation"]["latency"]
    assert latency["runtime"]["static_batch"] == batch and latency["throughput"]["batch"] == batch
    assert ("batch1" in latency) == (batch == 1)
    if version == "11.4":
        assert any("run in FP32 on the GPU" in n for n in results["build"]["plan"]["notes"])
    merged = _merge(bundles, precision, path, tmp_path)
    assert merged["status"] == "validated"


@pytest.mark.parametrize("version,device,precision,args,code,words", [
    ("11.1", "agx-orin", "int8", ["--dla", "0"], td.EXIT_ENV, "has no DLA support (none in 11.0-11.3)"),
    ("10.3", "orin-nano", "int8", ["--dla", "0"], td.EXIT_ENV, "TensorRT 10.3.0.30 reports no DLA core on this device"),
    ("11.4", "thor", "int8", ["--dla", "0"], td.EXIT_ENV, "TensorRT 11.4.1 reports no DLA core on this device"),
    ("8.6", "orin-nx", "int8", ["--dla", "1"], td.EXIT_USAGE, "this device has 1 (cores 0..0)"),
    ("8.5", "agx-orin", "fp32", ["--dla", "0"], td.EXIT_USAGE, "DLA runs FP16 or INT8 only"),
    ("11.1", "thor", "int8", ["--int8-mode", "implicit"], td.EXIT_USAGE, "removed implicit INT8 calibration"),
])
def test_refused_builds_say_why_and_write_nothing(bundles, version, device, precision, args, code, words, tmp_path):
    copy = copy_bundle(bundles[precision], tmp_path / "device")
    before = set(os.listdir(copy))
    res = run_tool(copy, ["build", *args], version, tmp_path / "work", device=device)
    assert res.returncode == code and words in res.stderr and "Traceback" not in res.stderr, res.stderr
    if "DLA core on" in words or "DLA support" in words:
        assert "AGX Orin" in res.stderr and "Orin Nano" in res.stderr      # where DLA does exist
    assert set(os.listdir(copy)) == before


# ---------------------------------------------------------------------------------------------- INT8 with cache
@pytest.mark.parametrize("version", ["8.5", "8.6", "10.3"])
def test_int8_from_the_calibration_cache(bundles, version, tmp_path):
    from calibration import trt_cache

    device = copy_bundle(bundles["int8"], tmp_path / "device")
    res, rep = _all(device, version, tmp_path / "work", "--int8-mode", "implicit")
    v = td.parse_version(VERSIONS[version])
    copy = device / f"calibration.trt{td.version_str(v)}.cache"
    original, rewritten = trt_cache.read_cache(device / "calibration.cache"), trt_cache.read_cache(copy)
    assert rewritten.version == td.cache_header_version(v) and rewritten.scales == original.scales
    assert f"--calib={copy.name}" in res.stdout                      # trtexec reads the copy the build used
    shape = [1, 3, 224, 224]
    assert calls(rep, "config.set_calibration_profile") == [{"input": [shape, shape, shape]}]
    results, _ = _results(device, version)
    log = (device / results["build"]["build_log"]).read_text()
    assert "Calibration Profile is not defined" not in log and "cache ignored" not in log
    missing = results["build"]["calibration"]["tensors_without_scale"]
    assert missing and all(m.endswith(("_matmul_out", "_hardsigmoid_out")) for m in missing)  # the parser's own
    assert results["status"] == "validated"


# ---------------------------------------------------------------------------------------------- engines
def test_an_engine_of_another_tensorrt_is_refused(bundles, tmp_path):
    device = copy_bundle(bundles["fp32"], tmp_path / "device")
    res = run_tool(device, ["build"], "8.6", tmp_path / "w1", device="agx-orin")
    assert res.returncode == 0, res.stderr
    engine = "model.orin-sm87-trt8.6.2.engine"
    res = run_tool(device, ["validate", "--engine", engine], "10.3", tmp_path / "w2")
    assert res.returncode == td.EXIT_ENGINE and "built for orin-sm87 with TensorRT 8.6.2" in res.stderr
    (device / (engine + ".json")).unlink()          # without the sidecar, TensorRT itself refuses it
    os.rename(device / engine, device / "my.engine")
    res = run_tool(device, ["validate", "--engine", "my.engine"], "10.3", tmp_path / "w3")
    assert res.returncode == td.EXIT_ENGINE and "not compatible with this version of TensorRT" in res.stderr


def _host_env(version, work):
    env = tool_env(version, work, device=DEVICE_OF[version])
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), env["PYTHONPATH"]])
    return env


def test_edgecnn_trt_on_a_host_with_tensorrt(bundles, tmp_path, cli):
    """`edgecnn trt all BUNDLE -- ...` runs the same code on a machine with edgecnn and TensorRT; a refusal of
    the tool is an edgecnn error of the right family."""
    from edgecnn.errors import EXIT_TOOLCHAIN

    device = copy_bundle(bundles["int8"], tmp_path / "device")
    res = cli("trt", "all", str(device), "--", *FAST, env=_host_env("10.3", tmp_path / "w1"))
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-1500:]
    results, _ = _results(device, "10.3")
    assert results["status"] == "validated"
    res = cli("trt", "build", str(device), "--", "--dla", "0", env=_host_env("11.1", tmp_path / "w2"))
    assert res.returncode == EXIT_TOOLCHAIN and "has no DLA support" in res.stderr, res.stderr


def test_export_builds_and_validates_the_engine_where_tensorrt_is(tmp_path, monkeypatch):
    """On a machine with TensorRT and a GPU, `edgecnn export --target trt` builds the engine with the tool's
    code and validates it through TrtRunner like any other runner (the smallest net: lenet5)."""
    from edgecnn.options import ExportOptions
    from edgecnn.pipeline import export
    from trt_standin import cudart

    monkeypatch.setitem(sys.modules, "tensorrt", standin.load("10.3.0.30", "agx-orin", cudart_loader=False))
    monkeypatch.setattr(td, "load_cudart", lambda environ=None: cudart.Library("agx-orin"))
    res = export("lenet5", "trt", "fp32", out=tmp_path, quiet=True,
                 options=ExportOptions(calib_size=32, eval_size=16, latency=False))
    m = res.manifest
    engine = m["tensorrt"]["engine"]
    assert res.status == "validated" and m["parity"]["passed"] and "tensorrt" in m["parity"]["runtime"]
    assert engine == "model.orin-sm87-trt10.3.0.engine" and engine in m["files"] and not m["pending"]
    assert m["tensorrt"]["engine_build"]["plan"]["clear_flags"] == ["TF32"]
    assert cudart.STATE.leftovers() == {"allocations": 0, "streams": 0, "events": 0}


# ---------------------------------------------------------------------------------------------- the stand-in fails
def test_the_standin_refuses_what_each_version_refuses():
    """Negative controls: the stand-in is strict where TensorRT is, so the tests above could fail."""
    t85 = standin.load("8.5.2.2", "agx-orin", cudart_loader=False)
    assert not hasattr(t85.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    with pytest.raises(AttributeError, match="no attribute 'bool'"):
        t85.nptype(t85.DataType.FLOAT)
    logger = t85.Logger(t85.Logger.ERROR)
    net = t85.Builder(logger).create_network(0)                        # no EXPLICIT_BATCH on 8.x
    parser = t85.OnnxParser(net, logger)
    assert not parser.parse(b"", "x.onnx")
    t10 = standin.load("10.3.0.30", "agx-orin", cudart_loader=False)
    with pytest.raises(AttributeError):
        t10.Builder(t10.Logger()).create_builder_config().max_workspace_size = 1 << 20
    t11 = standin.load("11.1.0", "thor", cudart_loader=False)
    for name in ("IInt8EntropyCalibrator2",):
        assert not hasattr(t11, name)
    assert not hasattr(t11.BuilderFlag, "FP16") and not hasattr(t11.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH")
    config = t11.Builder(t11.Logger()).create_builder_config()
    with pytest.raises(AttributeError):
        config.int8_calibrator = None
    assert t11.Builder(t11.Logger()).num_DLA_cores == 0


def test_tf32_left_on_fails_the_fp32_gate_in_the_standin(bundles, tmp_path, monkeypatch):
    """Negative control for the TF32 fix: an FP32 build on TensorRT 11 that keeps TF32 (the stand-in rounds
    FP32 inputs to TF32) misses the 1e-4 gate; cleared, it passes."""
    from trt_standin import cudart

    trt = standin.load("11.1.0", "thor", cudart_loader=False)
    cuda = td.Cuda(lib=cudart.Library("thor"))
    bundle = td.Bundle.open(copy_bundle(bundles["fp32"], tmp_path / "device"))
    info = td.detect(trt, cuda)
    errors = {}
    real_plan = td.build_plan
    for keep_tf32 in (True, False):
        settings = td.BuildSettings(engine="tf32-%s.engine" % keep_tf32)
        monkeypatch.setattr(td, "build_plan", lambda *a, **k: dict(real_plan(*a, **k),
                                                                   clear_flags=[] if keep_tf32 else ["TF32"]))
        meta = td.build_engine(bundle, trt, info, settings, lambda s: None)
        result = td.validate_engine(bundle, trt, cuda, info, bundle.path(meta["engine"]),
                                    td.ValidateSettings(latency=False), lambda s: None)
        errors[keep_tf32] = (result["parity"]["passed"], result["parity"]["max_rel_error"])
    assert errors[False][0] and not errors[True][0] and errors[True][1] > 1e-4 > errors[False][1]


def test_dynamic_shapes_on_dla_fall_back_to_the_gpu_in_the_standin(bundles, tmp_path, monkeypatch):
    """Negative control for the DLA fix: a DLA build with the dynamic batch profile (what the tool did) gives an
    engine with every layer on the GPU; the tool now refuses to call such an engine a DLA build."""
    from trt_standin import cudart

    trt = standin.load("8.6.2.3", "agx-orin", cudart_loader=False)
    cuda = td.Cuda(lib=cudart.Library("agx-orin"))
    bundle = td.Bundle.open(copy_bundle(bundles["fp16"], tmp_path / "device"))
    info = td.detect(trt, cuda)
    real_plan = td.build_plan
    monkeypatch.setattr(td, "build_plan", lambda *a, **k: dict(real_plan(*a, **k), batch_profile=[1, 1, 8],
                                                               static_shape=False))
    with pytest.raises(td.ToolError, match="placed no layer on DLA core 0"):
        td.build_engine(bundle, trt, info, td.BuildSettings(dla=0), lambda s: None)


# ---------------------------------------------------------------------------------------------- Python 3.8
def _python38():
    """A Python 3.8 with NumPy, onnx and onnxruntime (JetPack 5.1's Python; see docs/tensorrt.md), or None."""
    cache = Path(os.environ.get("EDGECNN_CACHE", Path.home() / ".cache" / "edgecnn"))
    for exe in (os.environ.get("EDGECNN_PYTHON38"), str(cache / "py38" / "bin" / "python")):
        if exe and Path(exe).exists():
            ok = subprocess.run([exe, "-c", "import sys, numpy, onnx, onnxruntime; assert sys.version_info[:2] == (3, 8)"],
                                capture_output=True)
            if ok.returncode == 0:
                return exe
    return None


def test_jetpack_5_1_python_3_8_and_numpy_1_24(bundles, tmp_path):
    """TensorRT 8.5 on a real Python 3.8 with NumPy 1.24 (where np.bool is gone, as on JetPack 5.1)."""
    py38 = _python38()
    if py38 is None:
        pytest.skip("no Python 3.8 with numpy/onnx/onnxruntime (set EDGECNN_PYTHON38; docs/tensorrt.md says how): "
                    "the vermin and 3.8-grammar checks in test_trt_device.py still ran")
    numpy_version = subprocess.run([py38, "-c", "import numpy; print(numpy.__version__)"], capture_output=True,
                                   text=True).stdout.strip()
    device = copy_bundle(bundles["int8"], tmp_path / "device")
    res = run_tool(device, ["all", *FAST], "8.5", tmp_path / "work", python=py38)
    assert res.returncode == 0, res.stdout[-1500:] + res.stderr[-2000:]
    results, _ = _results(device, "8.5")
    assert results["device"]["python"].startswith("3.8.") and results["device"]["numpy"] == numpy_version
    assert results["status"] == "validated"


# ---------------------------------------------------------------------------------------------- slow
@pytest.mark.slow
def test_default_int8_export_of_mobilenet_v3_runs_all_on_every_version(tmp_path_factory, tmp_path):
    """The bundle `make export ARCH=mobilenet_v3 TARGET=trt PRECISION=int8` gives offline (default options,
    random-init weights: the SQNR gate), then `edgecnn_trt.py all` on every version writes its results."""
    from trt_bundles import export_bundle

    bundle = export_bundle(tmp_path_factory.mktemp("default"), "int8", cheap=False)
    assert json.loads((bundle / "manifest.json").read_text())["recipe"]["fallback"]["enabled"]
    for version in VERSIONS:
        device = copy_bundle(bundle, tmp_path / version)
        _all(device, version, tmp_path / ("w" + version))
        results, _ = _results(device, version)
        assert results["status"] in ("validated", "failed") and isinstance(results["validation"]["parity"]["passed"], bool)
    assert np.isfinite(results["validation"]["parity"]["sqnr_db"])
