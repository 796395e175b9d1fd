"""The TensorRT bundle's files: what a Jetson (or any NVIDIA GPU) needs to build and validate its own engine.

An engine is tied to the GPU, the TensorRT version and the platform, so the bundle carries no engine: it
carries the portable inputs of the build and the tool that runs it on the device.

* ``model.onnx``: FP32, opset 17 (TensorRT 8.5/8.6 on JetPack 5 / 6.0 parse <= 17), dynamic batch;
  FP32/FP16 builds on TensorRT <= 10, and implicit-INT8 builds with the calibration cache;
* ``model.fp16.onnx`` (FP16 bundles): typed FP16 weights and compute, FP32 I/O, for TensorRT >= 11, which
  builds strongly typed networks only;
* ``model.int8.qdq.onnx`` (INT8 bundles): the ``trt`` Q/DQ recipe (``exporters.tensorrt.quant``, run by the
  INT8 engine), checked by ``exporters.tensorrt.qdq_check``: explicit quantization, the only INT8 path on
  TensorRT 11;
* ``calibration.cache`` (INT8 bundles): TensorRT's text cache written from the same ranges, for DLA and
  implicit-INT8 builds on TensorRT <= 10, header version chosen for the target TensorRT;
* ``edgecnn_trt.py``: the on-device tool (Python >= 3.8, NumPy, TensorRT only), and ``edgecnn_parity.py``
  beside it: a byte-identical copy of ``exporters/parity.py``, so the device judges parity with the same code.

No metadata is glued in front of any file: it sits in the ONNX files' own metadata and in manifest.json.
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence

from calibration import trt_cache

from .. import parity
from ..errors import ExportError
from ..onnx import export as onnx_exporter
from . import device as trt_device
from . import qdq_check

MODEL_FP32 = "model.onnx"
MODEL_FP16 = "model.fp16.onnx"
MODEL_INT8 = "model.int8.qdq.onnx"
CALIBRATION_CACHE = "calibration.cache"
DEVICE_TOOL = "edgecnn_trt.py"
PARITY_COPY = trt_device.PARITY_MODULE
OPSET = 17
DEFAULT_TRT_VERSION = trt_cache.DEFAULT_TRT_VERSION

# What the bundle is made for: JetPack -> TensorRT, Python.
INTENDED = {
    "tensorrt": ">= 8.5.2 (API by version: <= 10 builder flags, 11 strongly typed)",
    "jetpack": [
        {"jetpack": "5.1.x", "tensorrt": "8.5.2", "python": "3.8"},
        {"jetpack": "6.0", "tensorrt": "8.6.2", "python": "3.10"},
        {"jetpack": "6.1 / 6.2", "tensorrt": "10.3", "python": "3.10"},
        {"jetpack": "7.x", "tensorrt": "10.13+ / 11", "python": "3.12"},
    ],
    "onnx_opset": OPSET,
    "device_python": ">= 3.8 with NumPy and TensorRT's Python bindings (no torch)",
    "also": "any x86-64/aarch64 machine with an NVIDIA GPU and TensorRT >= 8.5",
}


def copy_device_tool(dest_dir: str | os.PathLike) -> list:
    """Write ``edgecnn_trt.py`` (executable) and ``edgecnn_parity.py`` into ``dest_dir``; returns their names."""
    tool = Path(dest_dir) / DEVICE_TOOL
    shutil.copyfile(trt_device.__file__, tool)
    tool.chmod(tool.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    shutil.copyfile(parity.__file__, Path(dest_dir) / PARITY_COPY)
    return [DEVICE_TOOL, PARITY_COPY]


RECIPE_CASES = (("8.5-10.x (GPU)", (8, 5, 2), None), ("11+ (GPU)", (11, 0, 0), None),
                ("8.5-10.x (DLA core 0, GPU fallback)", (8, 5, 2), 0),
                ("11.4.1+ (DLA core 0, GPU fallback; AGX Orin, JetPack >= 7.2.2)", (11, 4, 1), 0))


def build_recipes(precision: str, files: Sequence[str], spec, *, workspace_mb: int = 1024) -> dict:
    """How ``edgecnn_trt.py build`` will build this bundle, per TensorRT generation, with the trtexec line."""
    out = {}
    shape = (spec.channels, spec.height, spec.width)
    for label, version, dla in RECIPE_CASES:
        if dla is not None and precision == "fp32":
            continue
        try:
            plan = trt_device.build_plan(version, precision, files, trt_device.BuildSettings(dla=dla))
        except trt_device.ToolError as exc:
            out[label] = {"unsupported": str(exc)}
            continue
        out[label] = {"onnx": plan["onnx"], "strongly_typed": plan["strongly_typed"], "builder_flags": plan["flags"],
                      "cleared_flags": plan["clear_flags"], "calibration_cache": plan["calibration_cache"],
                      "int8_mode": plan["int8_mode"], "batch_profile": plan["batch_profile"], "notes": plan["notes"],
                      "trtexec": trt_device.trtexec_command(plan, "model.<gpu>-trt<version>.engine", spec.name, shape,
                                                            workspace_mb=workspace_mb,
                                                            calibration_cache="calibration.trt<version>.cache")}
    return out


def write_bundle(module, spec, precision: str, out_dir: str | os.PathLike, *, opset: int = OPSET,
                 exporter: str = "auto", simplify: bool = True, metadata: Optional[Dict[str, str]] = None,
                 say: Callable[[str], None] = print) -> dict:
    """Write the bundle's float model files and the device tool into ``out_dir``; returns what was written
    and how. INT8 bundles then get ``MODEL_INT8`` from the INT8 engine and ``write_calibration_cache``."""
    precision = str(precision)
    if precision not in ("fp32", "fp16", "int8"):
        raise ExportError(f"TensorRT bundles are fp32, fp16 or int8, not {precision!r}")
    if opset > OPSET:
        raise ExportError(f"opset {opset} is too new for TensorRT 8.5/8.6 (JetPack 5 / 6.0), which parse <= {OPSET}",
                          hint=f"use --opset {OPSET} (the default)")
    out = Path(out_dir)
    files = [MODEL_FP32]
    say(f"exporting FP32 ONNX for TensorRT (opset {opset}, dynamic batch)")
    info = onnx_exporter.export_onnx(module, spec, out / MODEL_FP32, opset=opset, exporter=exporter,
                                     do_simplify=simplify, metadata=metadata)
    if info.opset > OPSET:
        raise ExportError(f"the {info.exporter} exporter produced opset {info.opset}; TensorRT 8.5/8.6 parse <= {OPSET}",
                          hint="use --onnx-exporter torchscript (it honours opset 17)")
    recipe: dict = {"precision": precision}
    if precision == "fp16":
        say("writing model.fp16.onnx (typed FP16, for TensorRT >= 11 strongly typed builds)")
        onnx_exporter.convert_fp16(out / MODEL_FP32, out / MODEL_FP16)
        files.append(MODEL_FP16)
        recipe.update(method="TensorRT FP16 builder flag on model.onnx (TensorRT <= 10); strongly typed "
                             "model.fp16.onnx (TensorRT >= 11)")
    elif precision == "fp32":
        recipe.update(method="FP32 with TF32 disabled (parity gate 1e-4)")
    else:
        files += [MODEL_INT8, CALIBRATION_CACHE]
    files += copy_device_tool(out)
    return {"files": files, "export": info.to_dict(), "recipe": recipe,
            "tensorrt": {"build_recipe": build_recipes(precision, files, spec)}}


def write_calibration_cache(out_dir: str | os.PathLike, ranges, *, trt_version: str = DEFAULT_TRT_VERSION) -> dict:
    """``calibration.cache`` from the INT8 engine's ranges (of model.onnx's tensors); returns its record."""
    cache = trt_cache.write_cache(Path(out_dir) / CALIBRATION_CACHE, getattr(ranges, "ranges", ranges),
                                  trt_version=trt_version)
    return {"file": CALIBRATION_CACHE, "header": cache.header, "tensors": len(cache.scales),
            "for": "DLA and implicit-INT8 builds on TensorRT <= 10 (edgecnn_trt.py rewrites the header to the "
                   "device's TensorRT version; the scales are portable)",
            "format": "TensorRT text cache: <tensor>: <hex of float32 bits of amax/127>",
            "ranges_from": "the INT8 engine's calibration of model.onnx's tensors (the same ranges as "
                           "model.int8.qdq.onnx); per-layer float choices of the fallback do not apply to it"}


def check_qdq(path: str | os.PathLike) -> qdq_check.QdqReport:
    return qdq_check.check_file(path, max_opset=OPSET)
