"""A stand-in for TensorRT and libcudart, for a contract test of edgecnn's on-device tool.

Not TensorRT and not a validation of anything TensorRT computes: it checks that every TensorRT and CUDA call
``edgecnn_trt.py`` makes is one that version's API has, made in the order and with the arguments that version
requires, and that the tool's own logic (plans, shapes, DLA, calibration cache, results) holds on each version.
One ``tensorrt`` package per supported version lives under ``site/`` (8.5.2 = JetPack 5.1, 8.6.2 = JetPack 6.0,
10.3 = JetPack 6.1/6.2, 11.1 and 11.4.1 = JetPack 7.x); ``facts.py`` lists what each version has. Engines "run"
by executing the bundle's ONNX with onnxruntime on the CPU; libcudart is replaced by ``cudart.py``.

A test fixture only: it lives under ``tests/``, no package of the product imports it, nothing ships it; a
test puts one version's folder on a subprocess's ``PYTHONPATH`` (``tool_env``) and runs the bundle's own
``edgecnn_trt.py`` there, as a Jetson would.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITE = HERE / "site"
VERSIONS = {"8.5": "8.5.2.2", "8.6": "8.6.2.3", "10.3": "10.3.0.30", "11.1": "11.1.0", "11.4": "11.4.1"}
JETPACK = {"8.5": "5.1", "8.6": "6.0", "10.3": "6.1 / 6.2", "11.1": "7.x", "11.4": "7.2.2+"}


def site_dir(version: str) -> Path:
    return SITE / ("trt" + version.replace(".", "_"))


def tool_env(version: str, work: Path, *, device: str = "agx-orin", cudart: str = "cuda_home") -> dict:
    """Environment for running ``edgecnn_trt.py`` against the stand-in of ``version`` on ``device``.

    ``cudart``: where the stand-in libcudart is found: ``cuda_home`` (``$CUDA_HOME/lib64/libcudart.so.12``,
    a container without the dev symlink), ``ld_library_path`` (a folder on ``LD_LIBRARY_PATH``) or ``none``;
    the emulated device's file system is ``work`` (a real libcudart of this machine does not count).
    The stand-in writes its record of calls to ``work/standin-report.json`` at exit (``report``)."""
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("CUDA_HOME", "CUDA_PATH", "LD_LIBRARY_PATH")}
    env.update(PYTHONPATH=os.pathsep.join([str(site_dir(version)), str(HERE.parent)]),
               EDGECNN_TRT_STANDIN_DEVICE=device, EDGECNN_TRT_STANDIN_REPORT=str(work / "standin-report.json"),
               EDGECNN_TRT_STANDIN_LIBROOT=str(work),
               PYTHONDONTWRITEBYTECODE="1")
    lib = work / "cuda" / "lib64"
    if cudart != "none":
        lib.mkdir(parents=True, exist_ok=True)
        (lib / "libcudart.so.12").write_bytes(b"")      # what the stand-in loader resolves
        env["CUDA_HOME" if cudart == "cuda_home" else "LD_LIBRARY_PATH"] = str(work / "cuda") \
            if cudart == "cuda_home" else str(lib)
    return env


def run_tool(bundle: Path, args, version: str, work: Path, *, python: str = sys.executable, timeout: float = 300,
             **env_kw) -> subprocess.CompletedProcess:
    """``python edgecnn_trt.py ARGS`` inside ``bundle`` (the bundle's own copy of the tool), as on a device."""
    env = tool_env(version, work, **env_kw)
    return subprocess.run([python, "edgecnn_trt.py"] + list(args), cwd=bundle, env=env, capture_output=True,
                          text=True, timeout=timeout)


def report(work: Path) -> dict:
    """The stand-in's record of the last run in ``work``: version, device, trace of calls, CUDA leftovers."""
    return json.loads((work / "standin-report.json").read_text())


def calls(rep: dict, what: str) -> list:
    """The details of every traced call named ``what``."""
    return [detail for name, detail in rep["trace"] if name == what]
