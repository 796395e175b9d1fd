"""The TensorRT bundle's files: what a Jetson (or any NVIDIA GPU) needs to build and validate its own engine.

An engine is tied to the GPU, the TensorRT version and the platform, so the bundle carries no engine: it
carries the portable inputs of the build and the tool that runs it on the device.

* ``model.onnx``: FP32, opset 17 (TensorRT 8.5/8.6 on JetPack 5 / 6.0 parse <= 17), dynamic batch;
  FP32/FP16 builds on TensorRT <= 10, and implicit-INT8 builds with the calibration cache;
* ``model.fp16.onnx`` (FP16 bundles): typed FP16 weights and compute, FP32 I/O, for TensorRT >= 11, which
  builds strongly typed networks only;
* ``model.int8.qdq.onnx`` (INT8 bundles): the ``trt`` Q/DQ recipe (``exporters.quant_trt``), checked by
  ``exporters.qdq_check``: explicit quantization, the only INT8 path on TensorRT 11;
* ``calibration.cache`` (INT8 bundles): TensorRT's text cache written from the same ranges, for DLA and
  implicit-INT8 builds on TensorRT <= 10, header version chosen for the target TensorRT;
* ``edgecnn_trt.py``: the on-device tool (Python >= 3.8, NumPy, TensorRT only).

No metadata is glued in front of any file: it sits in the ONNX files' own metadata and in manifest.json.
"""
from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence

from calibration import trt_cache

from . import onnx as onnx_exporter
from . import qdq_check, quant_trt, trt_device
from .common import ExportError

MODEL_FP32 = "model.onnx"
MODEL_FP16 = "model.fp16.onnx"
MODEL_INT8 = "model.int8.qdq.onnx"
CALIBRATION_CACHE = "calibration.cache"
DEVICE_TOOL = "edgecnn_trt.py"
OPSET = 17
DEFAULT_TRT_VERSION = trt_cache.DEFAULT_TRT_VERSION

# What the bundle is made for (DESIGN §3): JetPack -> TensorRT, Python.
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


def device_tool_source() -> Path:
    """The on-device tool as shipped in the package (``exporters/trt_device.py``)."""
    return Path(trt_device.__file__)


def copy_device_tool(dest_dir: str | os.PathLike) -> str:
    dst = Path(dest_dir) / DEVICE_TOOL
    shutil.copyfile(device_tool_source(), dst)
    dst.chmod(dst.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return DEVICE_TOOL


def build_recipes(precision: str, files: Sequence[str], spec, *, max_batch: int = 8, workspace_mb: int = 1024) -> dict:
    """How ``edgecnn_trt.py build`` will build this bundle, per TensorRT generation, with the trtexec line."""
    out = {}
    shape = (spec.channels, spec.height, spec.width)
    cases = [("8.5-10.x (GPU)", (8, 5, 2), None), ("11+ (GPU)", (11, 0, 0), None)]
    if precision != "fp32":
        cases.append(("8.5-10.x (DLA core 0, GPU fallback)", (8, 5, 2), 0))
    for label, version, dla in cases:
        try:
            plan = trt_device.build_plan(version, precision, files, dla_core=dla)
        except trt_device.ToolError as exc:
            out[label] = {"unsupported": str(exc)}
            continue
        engine = "model.<gpu>-trt<version>.engine"
        out[label] = {"onnx": plan["onnx"], "strongly_typed": plan["strongly_typed"], "builder_flags": plan["flags"],
                      "cleared_flags": plan["clear_flags"], "calibration_cache": plan["calibration_cache"],
                      "int8_mode": plan["int8_mode"], "notes": plan["notes"],
                      "trtexec": trt_device.trtexec_command(plan, engine, spec.name, shape, max_batch=max_batch,
                                                            workspace_mb=workspace_mb)}
    return out


def write_bundle(module, spec, precision: str, out_dir: str | os.PathLike, *, calib_batches: Optional[Callable[[], Iterable]] = None,
                 opset: int = OPSET, exporter: str = "auto", simplify: bool = True, metadata: Optional[Dict[str, str]] = None,
                 trt_version: str = DEFAULT_TRT_VERSION, range_method: str = "minmax",
                 nodes_to_exclude: Sequence[str] = (), say: Callable[[str], None] = print) -> dict:
    """Write the bundle's model files and device tool into ``out_dir``; returns what was written and how.

    ``calib_batches``: a callable returning an iterable of float32 NCHW calibration batches (INT8 only).
    """
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
    extra: dict = {}
    ranges = None
    if precision == "fp16":
        say("writing model.fp16.onnx (typed FP16, for TensorRT >= 11 strongly typed builds)")
        onnx_exporter.convert_fp16(out / MODEL_FP32, out / MODEL_FP16)
        files.append(MODEL_FP16)
        recipe.update(method="TensorRT FP16 builder flag on model.onnx (TensorRT <= 10); strongly typed "
                             "model.fp16.onnx (TensorRT >= 11)")
    elif precision == "fp32":
        recipe.update(method="FP32 with TF32 disabled (parity gate 1e-4)")
    else:
        if calib_batches is None:
            raise ExportError("INT8 needs calibration images", hint="pass CALIB=<folder of images>")
        say(f"INT8 trt recipe: calibrating ranges ({range_method}) and writing Q/DQ for TensorRT")
        qinfo = quant_trt.quantize_trt(out / MODEL_FP32, out / MODEL_INT8, calib_batches(), nodes_to_exclude,
                                       method=range_method, max_opset=OPSET,
                                       metadata={**(metadata or {}), "edgecnn.recipe": "trt"})
        ranges = qinfo.pop("ranges")
        cache = trt_cache.write_cache(out / CALIBRATION_CACHE, ranges, trt_version=trt_version)
        files += [MODEL_INT8, CALIBRATION_CACHE]
        recipe.update(qinfo)
        extra["calibration_cache"] = {
            "file": CALIBRATION_CACHE, "header": cache.header, "tensors": len(cache.scales),
            "for": "DLA and implicit-INT8 builds on TensorRT <= 10 (edgecnn_trt.py rewrites the header to the "
                   "device's TensorRT version; the scales are portable)",
            "format": "TensorRT text cache: <tensor>: <hex of float32 bits of amax/127>",
            "ranges_from": "the same calibration as model.int8.qdq.onnx, on model.onnx's tensors"}
    files.append(copy_device_tool(out))
    model_files = [f for f in files if f.endswith(".onnx")]
    extra["build_recipe"] = build_recipes(precision, files, spec)
    return {"files": files, "model_files": model_files, "export": info.to_dict(), "recipe": recipe, "tensorrt": extra,
            "ranges": ranges if precision == "int8" else None}   # for the INT8 fallback's re-quantizations


def check_qdq(path: str | os.PathLike) -> qdq_check.QdqReport:
    return qdq_check.check_file(path, max_opset=OPSET)
