"""The TensorRT target: a portable bundle whose engine is built and validated on the device.

Where TensorRT and a GPU exist (a Jetson, a GPU workstation) the export builds the engine into the bundle with
the on-device tool's own code (``exporters.tensorrt.device``) and the pipeline validates it like any other
runner. Everywhere else (these build machines: TensorRT cannot be installed, there is no GPU) the export
writes the bundle, checks here what can honestly be checked here, and marks the artefact ``pending``:

* the FP32 ``model.onnx`` runs on onnxruntime against the PyTorch reference (FP32 gate);
* ``model.fp16.onnx`` (FP16 bundles) runs on onnxruntime (FP16 gate);
* ``model.int8.qdq.onnx`` passes the TensorRT Q/DQ rule checker and runs on onnxruntime with the INT8 gate.

These are "onnxruntime checks of the files TensorRT will build from", never TensorRT results: the manifest's
``parity``/``latency`` stay empty until device results are merged (``edgecnn merge-results``).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import List, Optional, Tuple

from exporters import Precision
from exporters.int8 import engine
from exporters.int8.qdq import QdqRecipe
from exporters.onnx.runner import OnnxRuntimeRunner
from exporters.tensorrt import bundle as trt_bundle
from exporters.tensorrt import device as trt_device
from exporters.tensorrt.qdq_check import RULES
from exporters.tensorrt.quant import TrtQuantizer

from ..validate import check_parity
from .base import BuildContext, BuildOutput, Target

ONNXRUNTIME_NOTE = "onnxruntime check of the ONNX files shipped for TensorRT (CPU, here): not a TensorRT result"


def tensorrt_here() -> tuple:
    """(tensorrt module, device info) when an engine can be built on this machine, else (None, reason)."""
    trt, why = trt_device.import_tensorrt()
    if trt is None:
        return None, f"no TensorRT on this machine ({why})"
    info = trt_device.detect(trt)
    if not info.get("gpu"):
        return None, f"TensorRT {trt.__version__} is installed but no CUDA GPU is usable ({info.get('cuda_error', '?')})"
    return trt, info


def _qdq_detail(report) -> str:
    """One line on the Q/DQ checker's findings: errors (refused by TensorRT's parser) apart from warnings."""
    s = report.stats
    text = (f"{report.counts()}; {len(RULES)} rules, {s['quantized_layers']} INT8 Conv/Gemm, "
            f"{len(s['float_layers'])} float, {s['residual_adds']} residual Adds")
    first = (report.errors or report.warnings or [None])[0]
    return text + (f"; first: {first}" if first else "")


class TrtTarget(Target):
    name = "trt"
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    description = "TensorRT bundle for Jetson / NVIDIA GPUs (engine built on the device)"

    def build(self, ctx: BuildContext, staging: Path) -> BuildOutput:
        o = ctx.options
        written = trt_bundle.write_bundle(ctx.model, ctx.spec, ctx.precision, staging, opset=o.opset,
                                          exporter=o.onnx_exporter, simplify=o.simplify, metadata=ctx.metadata,
                                          say=ctx.say)
        section = {"engine": "pending", "intended": trt_bundle.INTENDED, **written["tensorrt"],
                   "device_tool": {"file": trt_bundle.DEVICE_TOOL, "parity_module": trt_bundle.PARITY_COPY,
                                   "needs": "Python >= 3.8, NumPy, TensorRT",
                                   "one_command": f"python3 {trt_bundle.DEVICE_TOOL} all",
                                   "then": "edgecnn merge-results <bundle> <results.json>"}}
        recipe = written["recipe"]
        if ctx.precision == Precision.INT8:
            recipe, section["calibration_cache"] = self._int8(ctx, staging)
        checks, failures = self._check_here(ctx, staging)
        built = BuildOutput(model_file=trt_bundle.MODEL_INT8 if ctx.precision == Precision.INT8 else trt_bundle.MODEL_FP32,
                            files=list(written["files"]), export=written["export"], recipe=recipe, tensorrt=section,
                            local_checks=checks, failed="; ".join(failures) or None)
        trt, info = self._tensorrt_for_build(ctx, failures)
        if trt is None:
            built.pending = (f"TensorRT engine not built and not validated: {info}. On the device: copy this folder, "
                             f"run `python3 {trt_bundle.DEVICE_TOOL} all`, then bring results.*.json back and run "
                             "`edgecnn merge-results <this folder> <results.json>`")
        else:  # a machine with TensorRT and a GPU: build here with the device tool's code; the pipeline validates
            ctx.say(f"TensorRT {trt.__version__} found: building the engine here")
            meta = self._build_engine_here(staging, ctx, trt, info)
            section["engine"] = meta["engine"]
            section["engine_build"] = meta
            built.files += [meta["engine"], meta["engine"] + ".json", meta["build_log"]]
        return built

    def _int8(self, ctx: BuildContext, staging: Path) -> Tuple[dict, dict]:
        """model.int8.qdq.onnx from the ``trt`` recipe through the INT8 engine, and calibration.cache from the
        same ranges. The cache (implicit-INT8 / DLA builds) carries no per-layer precision."""
        quantizer = TrtQuantizer(max_opset=trt_bundle.OPSET, metadata={**ctx.metadata, "edgecnn.recipe": "trt"})
        with tempfile.TemporaryDirectory(prefix=".int8-", dir=staging) as work:
            result = engine.quantize(QdqRecipe(quantizer, staging / trt_bundle.MODEL_FP32,
                                               staging / trt_bundle.MODEL_INT8, work),
                                     ctx.calib, options=ctx.options.int8, trained=ctx.trained, say=ctx.say)
        cache = trt_bundle.write_calibration_cache(staging, result.ranges, trt_version=ctx.options.trt.version)
        return result.record.to_dict(), cache

    def _tensorrt_for_build(self, ctx: BuildContext, failures: List[str]) -> tuple:
        if failures:
            return None, "the checks run here failed, so no engine was built"
        if not ctx.options.trt.build_here:
            return None, "engine build here disabled (trt.build_here=false)"
        return tensorrt_here()

    # -------------------------------------------------------------------------------------------------
    def _check_here(self, ctx: BuildContext, staging: Path) -> tuple:
        """onnxruntime parity of each shipped ONNX file, and the Q/DQ rule checker on the INT8 model."""
        checks, failures = [], []
        todo = [(trt_bundle.MODEL_FP32, Precision.FP32)]
        if ctx.precision == Precision.FP16:
            todo.append((trt_bundle.MODEL_FP16, Precision.FP16))
        if ctx.precision == Precision.INT8:
            report = trt_bundle.check_qdq(staging / trt_bundle.MODEL_INT8)
            checks.append({"name": f"TensorRT Q/DQ rules on {trt_bundle.MODEL_INT8}", "passed": report.ok,
                           "detail": _qdq_detail(report),
                           "report": {**report.to_dict(), "path": trt_bundle.MODEL_INT8}})  # bundle-relative
            if not report.ok:
                failures.append(f"{trt_bundle.MODEL_INT8} would be refused by TensorRT's parser: {report.errors[0]}")
            todo.append((trt_bundle.MODEL_INT8, Precision.INT8))
        for name, precision in todo:
            ctx.say(f"onnxruntime check of {name} on {len(ctx.eval_inputs)} held-out images (not TensorRT)")
            with OnnxRuntimeRunner(staging / name, threads=ctx.options.threads) as runner:
                parity = check_parity(runner, ctx.eval_inputs, ctx.reference, precision, trained=ctx.trained,
                                      labels=ctx.eval_labels, gate=ctx.options.int8.gate()).to_dict()
            checks.append({"name": f"onnxruntime check of {name}" + (" (the Q/DQ model)" if precision == Precision.INT8 else ""),
                           "passed": parity["passed"], "note": ONNXRUNTIME_NOTE,
                           "detail": f"{parity['gate']} | max rel err {parity['max_rel_error']:.2e}, cosine "
                                     f"{parity['cosine']:.6f}, SQNR {parity['sqnr_db']:.1f} dB, top-1 agree "
                                     f"{parity['top1_agreement']:.1%} on {parity['samples']} held-out images",
                           "parity": parity})
            if not parity["passed"]:
                failures.append(f"onnxruntime check of {name}: {parity['reason']}")
        return checks, failures

    def _build_engine_here(self, staging: Path, ctx: BuildContext, trt, info) -> dict:
        """Build with the device tool's own code, from the staging folder's files."""
        files = trt_device.Bundle(staging, ctx.precision, ctx.spec.to_dict())
        return trt_device.build_engine(files, trt, info, trt_device.BuildSettings(), ctx.say)

    def open_runner(self, bundle: Path, manifest: dict, threads: int = 1):
        """A TensorRT runner on the bundle's engine for this device, or None when TensorRT is not here."""
        trt, info = tensorrt_here()
        if trt is None:
            return None
        engine_file = (manifest.get("tensorrt") or {}).get("engine")
        if not engine_file or engine_file == "pending" or not (Path(bundle) / engine_file).exists():
            engine_file = trt_device.engine_name(trt_device.gpu_tag(info), trt_device.parse_version(trt.__version__))
        path = Path(bundle) / engine_file
        if not path.exists():
            return None
        meta = trt_device.check_engine_compatible(str(path), trt_device.parse_version(trt.__version__), info)
        return trt_device.TrtRunner(str(path), trt, trt_device.Cuda(), dla_core=meta.get("dla_core"))

    def runtime_unavailable_reason(self, manifest: dict) -> str:
        trt, info = tensorrt_here()
        if trt is None:
            return (f"TensorRT engine pending: {info}; build and validate on the device with "
                    f"`python3 {trt_bundle.DEVICE_TOOL} all`, then `edgecnn merge-results`")
        return "no engine for this GPU/TensorRT in the bundle: run `edgecnn trt build <bundle>` first"
