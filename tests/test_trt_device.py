"""The on-device tool (``exporters/tensorrt/device.py``, shipped in bundles as ``edgecnn_trt.py``).

Here (no TensorRT, no GPU) everything up to TensorRT is tested for real: Python 3.8 compatibility (vermin
and ``ast`` with a 3.8 grammar, and a real Python 3.8 interpreter when one is installed), that it imports
and runs with torch/edgecnn/onnx blocked, argument parsing, TensorRT version detection and the build plan
per version, the trtexec line, JetPack detection, engine compatibility refusal, and that its preprocessing
and parity (the shipped ``edgecnn_parity.py``) equal edgecnn's. The TensorRT path itself runs only where ``import tensorrt`` works; the
tests for it skip with the import error as the reason.
"""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from exporters import parity
from exporters.tensorrt import device as td

TOOL = Path(td.__file__)
BLOCKED = ("torch", "torchvision", "edgecnn", "exporters", "calibration", "onnx", "onnxruntime", "polygraphy",
           "pycuda", "cuda")


# ---------------------------------------------------------------------------------------------- Python 3.8
def test_vermin_says_python_3_8_is_enough(tmp_path):
    pytest.importorskip("vermin", reason="vermin (dev extra) is not installed")
    cmd = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())",
           "-t=3.8-", "--violations", "--no-tips", "--no-parse-comments"]
    ok = subprocess.run(cmd + [str(TOOL), parity.__file__], capture_output=True, text=True)   # both ship
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # the same check fails on 3.9+ code, so it is a real check
    bad = tmp_path / "bad.py"
    bad.write_text("def f(s: str) -> dict:\n    return {'a': s.removeprefix('x')} | {'b': 1}\n")
    res = subprocess.run(cmd + [str(bad)], capture_output=True, text=True)
    assert res.returncode != 0 and "3.9" in res.stdout


def test_grammar_is_python_3_8():
    for shipped in (TOOL, Path(parity.__file__)):
        ast.parse(shipped.read_text(), feature_version=(3, 8))
    with pytest.raises(SyntaxError):  # the 3.8 grammar really rejects newer syntax
        ast.parse("match x:\n    case 1:\n        pass\n", feature_version=(3, 8))


def _python38():
    """A real Python 3.8 interpreter (pyenv's, or python3.8 on PATH), or None."""
    cands = []
    pyenv = os.path.expanduser("~/.pyenv/versions")
    if os.path.isdir(pyenv):
        cands += [os.path.join(pyenv, v, "bin", "python3.8") for v in sorted(os.listdir(pyenv)) if v.startswith("3.8")]
    cands.append(shutil.which("python3.8"))
    for exe in cands:
        if not exe or not os.path.exists(exe):
            continue
        res = subprocess.run([exe, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True)
        if res.returncode == 0 and res.stdout.strip() == "(3, 8)":
            return exe
    return None


def test_runs_under_a_real_python_3_8(tmp_path):
    py38 = _python38()
    if not py38:
        pytest.skip("no Python 3.8 interpreter on this machine (vermin/ast checks above still ran)")
    tool = tmp_path / "edgecnn_trt.py"
    shutil.copyfile(TOOL, tool)
    res = subprocess.run([py38, str(tool), "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "check" in res.stdout, res.stderr
    code = ("import sys; sys.path.insert(0, %r); import edgecnn_trt as t; "
            "assert sys.version_info[:2] == (3, 8); "
            "p = t.build_plan(t.parse_version('8.5.2.2'), 'int8', ['model.int8.qdq.onnx', 'calibration.cache'], "
            "t.BuildSettings(dla=0)); print(p['onnx'], p['flags'], p['batch_profile'])" % str(tmp_path))
    res = subprocess.run([py38, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "model.onnx ['INT8', 'FP16', 'GPU_FALLBACK'] [1, 1, 1]"
    res = subprocess.run([py38, str(tool), "--bundle", str(tmp_path), "check"], capture_output=True, text=True)
    assert res.returncode == td.EXIT_ENV and "NOT READY" in res.stdout      # no TensorRT here: says so


# ---------------------------------------------------------------------------------------------- standalone
BLOCKER = textwrap.dedent("""
    import sys, importlib.abc
    BLOCKED = %r
    attempts = []
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ImportError("blocked for the test: " + name)
            return None
    sys.meta_path.insert(0, Block())
    import atexit
    atexit.register(lambda: sys.stderr.write("BLOCKED-ATTEMPTS:" + ",".join(attempts) + "\\n"))
""") % (BLOCKED,)


def _blocked(tmp_path, args):
    tool = tmp_path / "edgecnn_trt.py"
    shutil.copyfile(TOOL, tool)
    code = BLOCKER + "import runpy; sys.argv = %r; runpy.run_path(%r, run_name='__main__')" % (
        ["edgecnn_trt.py"] + args, str(tool))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)


def test_standalone_without_torch_edgecnn_or_onnx(tmp_path):
    res = _blocked(tmp_path, ["check"])
    assert "BLOCKED-ATTEMPTS:\n" in res.stderr, res.stderr          # never tried to import any of them
    assert res.returncode == td.EXIT_ENV and '"tensorrt": null' in res.stdout
    bundle = tmp_path / "b"
    bundle.mkdir()
    (bundle / "manifest.json").write_text(json.dumps({"target": "trt", "precision": "fp16", "input": {}}))
    res = _blocked(tmp_path, ["--bundle", str(bundle), "build", "--dla", "0"])
    assert res.returncode == td.EXIT_ENV and "TensorRT's Python bindings are not importable" in res.stderr
    assert "BLOCKED-ATTEMPTS:\n" in res.stderr and "Traceback" not in res.stderr


def test_argument_parsing():
    p = td.build_parser()
    a = p.parse_args(["--bundle", "/b", "all", "--dla", "1", "--max-batch", "16", "--workspace-mb", "512",
                      "--int8-mode", "implicit", "--runs", "50", "--results", "r.json"])
    assert (a.command, a.bundle, a.dla, a.max_batch, a.workspace_mb, a.int8_mode, a.runs, a.results) == \
        ("all", "/b", 1, 16, 512, "implicit", 50, "r.json")
    a = p.parse_args(["build"])
    assert a.dla is None and a.min_batch == 1 and a.opt_batch == 1 and a.max_batch == 8 and a.int8_mode == "auto"
    assert a.batch is None and td.BuildSettings.from_args(a).batch_profile() == (1, 1, 8)
    a = p.parse_args(["all", "--dla", "0", "--batch", "2", "--warmup", "3"])
    assert td.BuildSettings.from_args(a).batch_profile() == (2, 2, 2) and td.ValidateSettings.from_args(a).warmup == 3
    with pytest.raises(SystemExit):
        p.parse_args(["build", "--int8-mode", "magic"])
    assert td.main([]) == td.EXIT_USAGE


# ---------------------------------------------------------------------------------------------- versions
@pytest.mark.parametrize("text,expect", [("8.5.2.2", (8, 5, 2, 2)), ("8.6.1", (8, 6, 1)), ("10.3.0.26", (10, 3, 0, 26)),
                                         ("11.0.0b1", (11, 0, 0)), ("10.13", (10, 13))])
def test_parse_version(text, expect):
    assert td.parse_version(text) == expect


FILES = {"fp32": ["model.onnx"], "fp16": ["model.onnx", "model.fp16.onnx"],
         "int8": ["model.onnx", "model.int8.qdq.onnx", "calibration.cache"]}


@pytest.mark.parametrize("version,precision,dla,onnx_file,typed,flags,cache", [
    ((8, 5, 2), "fp32", None, "model.onnx", False, [], None),
    ((8, 5, 2), "fp16", None, "model.onnx", False, ["FP16"], None),
    ((8, 5, 2), "int8", None, "model.int8.qdq.onnx", False, ["INT8", "FP16"], None),
    ((8, 5, 2), "int8", 0, "model.onnx", False, ["INT8", "FP16", "GPU_FALLBACK"], "calibration.cache"),
    ((8, 6, 2), "fp16", 1, "model.onnx", False, ["FP16", "GPU_FALLBACK"], None),
    ((10, 3, 0), "int8", None, "model.int8.qdq.onnx", False, ["INT8", "FP16"], None),
    ((10, 3, 0), "int8", 0, "model.onnx", False, ["INT8", "FP16", "GPU_FALLBACK"], "calibration.cache"),
    ((11, 0, 0), "fp32", None, "model.onnx", True, [], None),
    ((11, 0, 0), "fp16", None, "model.fp16.onnx", True, [], None),
    ((11, 0, 0), "int8", None, "model.int8.qdq.onnx", True, [], None),
    ((11, 4, 1), "int8", 0, "model.int8.qdq.onnx", True, ["GPU_FALLBACK"], None),
])
def test_build_plan_by_tensorrt_version(version, precision, dla, onnx_file, typed, flags, cache):
    plan = td.build_plan(version, precision, FILES[precision], td.BuildSettings(dla=dla))
    assert (plan["onnx"], plan["strongly_typed"], plan["flags"], plan["calibration_cache"]) == \
        (onnx_file, typed, flags, cache)
    assert plan["explicit_batch_flag"] == (version[0] < 10)
    assert ("TF32" in plan["clear_flags"]) == (precision == "fp32")        # every version, 11 included
    # DLA: static shape at --batch (default 1); GPU: the dynamic profile
    assert plan["batch_profile"] == ([1, 1, 1] if dla is not None else [1, 1, 8])
    assert plan["static_shape"] == (dla is not None)


def test_dla_batch_is_static_and_gpu_batch_can_be():
    plan = td.build_plan((8, 5, 2), "fp16", FILES["fp16"], td.BuildSettings(dla=0, batch=4))
    assert plan["batch_profile"] == [4, 4, 4] and plan["static_shape"]
    gpu = td.build_plan((10, 3, 0), "fp32", FILES["fp32"], td.BuildSettings(batch=2))
    assert gpu["batch_profile"] == [2, 2, 2] and gpu["dla_core"] is None
    with pytest.raises(td.ToolError, match="static-shape: use --batch"):
        td.build_plan((8, 5, 2), "fp16", FILES["fp16"], td.BuildSettings(dla=0, max_batch=16))
    with pytest.raises(td.ToolError, match="min <= opt <= max"):
        td.build_plan((8, 5, 2), "fp16", FILES["fp16"], td.BuildSettings(min_batch=4, opt_batch=2))


def test_build_plan_refusals():
    with pytest.raises(td.ToolError, match="DLA runs FP16 or INT8"):
        td.build_plan((8, 5, 2), "fp32", FILES["fp32"], td.BuildSettings(dla=0))
    with pytest.raises(td.ToolError, match="removed implicit INT8"):
        td.build_plan((11, 0, 0), "int8", FILES["int8"], td.BuildSettings(int8_mode="implicit"))
    with pytest.raises(td.ToolError, match="no model.fp16.onnx"):
        td.build_plan((11, 0, 0), "fp16", ["model.onnx"])


@pytest.mark.parametrize("version", [(11, 0, 0), (11, 1, 0), (11, 3, 2)])
def test_dla_on_tensorrt_11_0_to_11_3_is_a_clear_error(version):
    with pytest.raises(td.ToolError) as exc:
        td.build_plan(version, "int8", FILES["int8"], td.BuildSettings(dla=0))
    assert exc.value.code == td.EXIT_ENV and "no DLA support" in str(exc.value)
    assert "AGX Orin" in exc.value.hint and "Orin Nano" in exc.value.hint and "JetPack >= 7.2.2" in exc.value.hint
    assert td.dla_version_problem((11, 4, 1)) is None and td.dla_version_problem((10, 3, 0)) is None


def test_trtexec_command():
    plan = td.build_plan((8, 5, 2), "int8", FILES["int8"], td.BuildSettings(dla=0))
    cmd = td.trtexec_command(plan, "model.orin-sm87-trt8.5.2.engine", "input", (3, 224, 224),
                             calibration_cache="calibration.trt8.5.2.cache")
    assert cmd.split() == ["trtexec", "--onnx=model.onnx", "--saveEngine=model.orin-sm87-trt8.5.2.engine",
                           "--shapes=input:1x3x224x224", "--int8", "--fp16", "--calib=calibration.trt8.5.2.cache",
                           "--useDLACore=0", "--allowGPUFallback", "--memPoolSize=workspace:1024",
                           "--profilingVerbosity=detailed", "--timingCacheFile=timing.cache"]
    gpu = td.trtexec_command(td.build_plan((10, 3, 0), "fp16", FILES["fp16"]), "e.engine", "input", (3, 32, 32))
    assert "--minShapes=input:1x3x32x32 --optShapes=input:1x3x32x32 --maxShapes=input:8x3x32x32" in gpu
    typed = td.trtexec_command(td.build_plan((11, 0, 0), "fp16", FILES["fp16"]), "e.engine", "input", (3, 32, 32))
    assert "--stronglyTyped" in typed and "--onnx=model.fp16.onnx" in typed and "--fp16" not in typed
    for version in ((8, 5, 2), (10, 3, 0), (11, 1, 0)):         # FP32 means no TF32, on 11 too
        fp32 = td.trtexec_command(td.build_plan(version, "fp32", FILES["fp32"]), "e.engine", "input", (3, 32, 32))
        assert "--noTF32" in fp32.split()


def test_results_are_plain_json(tmp_path):
    """What the tool writes holds no NumPy scalar or array (json would refuse them), and is written whole."""
    record = {"passed": np.bool_(True), "sqnr_db": np.float32(17.5), "n": np.int64(3), "v": np.arange(2),
              "nested": [{"x": np.float64(1.0)}], "text": "ok"}
    with pytest.raises(TypeError):
        json.dumps(record)
    path = tmp_path / "r.json"
    td.write_json(str(path), record)
    back = json.loads(path.read_text())
    assert back == {"passed": True, "sqnr_db": 17.5, "n": 3, "v": [0, 1], "nested": [{"x": 1.0}], "text": "ok"}
    assert type(back["passed"]) is bool and os.listdir(tmp_path) == ["r.json"]


def test_libcudart_candidates_cover_containers(tmp_path, monkeypatch):
    """libcudart is looked for beyond the loader cache: CUDA_HOME, LD_LIBRARY_PATH, and the versioned name a
    runtime-only container has (no libcudart.so dev symlink)."""
    lib = tmp_path / "cuda" / "lib64"
    lib.mkdir(parents=True)
    (lib / "libcudart.so.12.2.140").write_bytes(b"")
    other = tmp_path / "ld"
    got = td.cudart_candidates({"CUDA_HOME": str(tmp_path / "cuda"), "LD_LIBRARY_PATH": str(other)})
    assert got.index(str(lib / "libcudart.so.12")) < got.index(str(other / "libcudart.so.12")) \
        < got.index("/usr/local/cuda/lib64/libcudart.so")
    assert str(lib / "libcudart.so.12.2.140") in got and "libcudart.so.12" in got
    assert len(got) == len(set(got))
    monkeypatch.setattr(td.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    with pytest.raises(td.ToolError) as exc:
        td.load_cudart({})
    assert exc.value.code == td.EXIT_ENV and "CUDA_HOME or LD_LIBRARY_PATH" in exc.value.hint


def test_jetpack_detection_from_l4t():
    assert td.parse_l4t("# R35 (release), REVISION: 3.1, GCID: 32827747, BOARD: t186ref, EABI: aarch64") == (35, 3, 1)
    assert td.jetpack_for_l4t((35, 3, 1)) == "5.1.1"
    assert td.jetpack_for_l4t((36, 4, 3)) == "6.1/6.2"
    assert td.jetpack_for_l4t((36, 3, 0)) == "6.0"
    assert td.parse_l4t("garbage") is None and td.jetpack_for_l4t(None) is None


def test_engine_for_another_gpu_or_tensorrt_is_refused(tmp_path):
    info = {"gpu": {"name": "Orin", "compute_capability": "8.7"}}
    assert td.gpu_tag(info) == "orin-sm87"
    name = td.engine_name(td.gpu_tag(info), (8, 5, 2, 2))
    assert name == "model.orin-sm87-trt8.5.2.engine"
    engine = tmp_path / name
    engine.write_bytes(b"not really an engine")
    td.check_engine_compatible(str(engine), (8, 5, 2, 2), info)        # same device: accepted
    with pytest.raises(td.ToolError) as exc:
        td.check_engine_compatible(str(engine), (10, 3, 0), info)
    assert exc.value.code == td.EXIT_ENGINE and "TensorRT 8.5.2" in str(exc.value) and "rebuild" in exc.value.hint
    (tmp_path / (name + ".json")).write_text(json.dumps({"tensorrt": "8.5.2.2", "gpu_tag": "nvidia-h200-sm90"}))
    with pytest.raises(td.ToolError, match="built for nvidia-h200-sm90"):
        td.check_engine_compatible(str(engine), (8, 5, 2, 2), info)


# ---------------------------------------------------------------------------------------------- equal to edgecnn
def test_preprocessing_equals_calibration():
    from calibration import InputSpec, normalize

    rng = np.random.default_rng(0)
    for spec in (InputSpec(height=32, width=32, resize=32, mean=(0.498,) * 3, std=(0.502,) * 3),
                 InputSpec(channels=1, height=28, width=28, resize=28, color="L", mean=(0.1307,), std=(0.3081,))):
        pixels = rng.integers(0, 256, (5, spec.height, spec.width, spec.channels), dtype=np.uint8)
        ours = td.normalize(pixels, json.loads(json.dumps(spec.to_dict())))
        assert ours.dtype == np.float32 and np.array_equal(ours, normalize(pixels, spec))


def test_the_shipped_parity_copy_judges_as_edgecnn_standalone(tmp_path):
    """The tool judges with ``edgecnn_parity.py`` (a copy of exporters/parity.py) beside it, with torch, edgecnn
    and onnx unimportable; its verdicts equal edgecnn's, including the reason naming one loud image."""
    from exporters.tensorrt.bundle import copy_device_tool

    copy_device_tool(tmp_path)
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((20, 10))
    loud = ref + 0.01 * rng.standard_normal(ref.shape)          # 40 dB on every image...
    ref[0] *= 30.0
    loud[0] = ref[0] + 30.0 * rng.standard_normal(10)           # ...but one loud image at ~0 dB
    cases = {"loud": loud, "small": ref + 1e-6 * rng.standard_normal(ref.shape), "large": ref + 3.0}
    np.savez(tmp_path / "cases.npz", ref=ref, **cases)
    code = BLOCKER + textwrap.dedent("""
        import json, numpy as np
        sys.path.insert(0, %r)
        import edgecnn_trt
        parity = edgecnn_trt._parity()
        z = np.load(%r)
        out = {}
        for name in %r:
            for precision in ("fp32", "fp16", "int8"):
                for trained in (True, False):
                    out["%%s/%%s/%%s" %% (name, precision, trained)] = parity.judge(z["ref"], z[name], precision,
                                                                                 trained).to_dict()
        print(json.dumps(out))
    """) % (str(tmp_path), str(tmp_path / "cases.npz"), sorted(cases))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0 and "BLOCKED-ATTEMPTS:\n" in res.stderr, res.stderr
    device = json.loads(res.stdout)
    assert len(device) == 18
    for key, verdict in device.items():
        name, precision, trained = key.split("/")
        assert verdict == parity.judge(ref, cases[name], precision, trained == "True").to_dict(), key
    loud_int8 = device["loud/int8/False"]
    assert not loud_int8["passed"] and "median per image" in loud_int8["reason"]


# ---------------------------------------------------------------------------------------------- real TensorRT
def _tensorrt_or_skip():
    trt, why = td.import_tensorrt()
    if trt is None:
        pytest.skip(f"TensorRT is not importable on this machine ({why}); the engine build/validate path runs "
                    "only where TensorRT and an NVIDIA GPU exist")
    info = td.detect(trt)
    if not info.get("gpu"):
        pytest.skip(f"TensorRT {trt.__version__} is installed but no CUDA GPU is usable ({info.get('cuda_error')})")
    return trt, info


def _tiny_bundle(tmp_path, precision="fp32"):
    import onnxruntime as ort
    import torch

    from calibration import InputSpec
    from exporters.onnx.export import export_onnx

    spec = InputSpec(height=32, width=32, resize=32)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                                torch.nn.Flatten(), torch.nn.Linear(8, 10)).eval()
    export_onnx(model, spec, tmp_path / "model.onnx", opset=17)
    pixels = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    x = td.normalize(pixels, spec.to_dict())
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    np.savez(tmp_path / "reference.npz", pixels=pixels, reference=ref,
             input_spec=np.asarray(json.dumps(spec.to_dict())))
    (tmp_path / "manifest.json").write_text(json.dumps({"target": "trt", "precision": precision, "arch": "tiny",
                                                         "input": spec.to_dict(), "files": {},
                                                         "weights": {"pretrained": False}}))
    assert ort  # the reference above is torch's; onnxruntime is not needed on the device
    return tmp_path


def test_build_and_validate_with_real_tensorrt(tmp_path):
    trt, info = _tensorrt_or_skip()
    bundle = _tiny_bundle(tmp_path)
    assert td.main(["--bundle", str(bundle), "all", "--runs", "20", "--max-batch", "4"]) == td.EXIT_OK
    results = list(bundle.glob("results.*.json"))
    assert len(results) == 1
    r = json.loads(results[0].read_text())
    assert r["status"] == "validated" and r["validation"]["parity"]["passed"]
    assert r["validation"]["latency"]["batch1"]["p50_ms"] > 0
    engine = bundle / r["build"]["engine"]
    assert engine.exists() and (bundle / (r["build"]["engine"] + ".json")).exists()
    assert engine.read_bytes()[:4] != b"{\"ed"          # no metadata header glued in front of the engine
