"""The TensorRT target: a portable bundle whose engine is built and validated on the device.

Where TensorRT and a GPU exist (a Jetson, a GPU workstation) the export builds the engine into the bundle
with the on-device tool's own code (``exporters/trt_device.py``) and the pipeline validates it like any
other runner. Everywhere else (these build machines: TensorRT cannot be installed, there is no GPU) the
export writes the bundle, checks here what can honestly be checked here, and marks the artefact
``pending`` with ``engine: pending``:

* the FP32 ``model.onnx`` runs on onnxruntime against the PyTorch reference (FP32 gate);
* ``model.fp16.onnx`` (FP16 bundles) runs on onnxruntime (FP16 gate);
* ``model.int8.qdq.onnx`` passes the TensorRT Q/DQ rule checker and runs on onnxruntime with the INT8 gate.

These are "onnxruntime checks of the files TensorRT will build from", never TensorRT results: the manifest's
``parity``/``latency`` stay empty until device results are merged (``edgecnn merge-results``).

``ExportOptions.extra`` keys: ``trt_version`` (calibration-cache header, default 8.5.2), ``range_method``
(minmax | percentile | entropy), ``nodes_to_exclude`` (layers the INT8 fallback keeps float), ``trt_build``
(False: never build an engine during export, even where TensorRT exists).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from exporters import tensorrt as trt_exporter
from exporters.qdq_check import RULES
from exporters import trt_device

from ..runtimes.onnxruntime import OnnxRuntimeRunner
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


class TrtTarget(Target):
    name = "trt"
    precisions = ("fp32", "fp16", "int8")
    description = "TensorRT bundle for Jetson / NVIDIA GPUs (engine built on the device)"

    def build(self, ctx: BuildContext, staging: Path) -> BuildOutput:
        extra_opts = ctx.options.extra
        calib = (lambda: ctx.calib.iter_batches("calib", batch_size=8)) if ctx.precision == "int8" else None
        written = trt_exporter.write_bundle(
            ctx.model, ctx.spec, ctx.precision, staging, calib_batches=calib, opset=ctx.options.opset,
            exporter=ctx.options.onnx_exporter, simplify=ctx.options.simplify, metadata=ctx.metadata,
            trt_version=str(extra_opts.get("trt_version", trt_exporter.DEFAULT_TRT_VERSION)),
            range_method=extra_opts.get("range_method", "minmax"),
            nodes_to_exclude=tuple(extra_opts.get("nodes_to_exclude", ())), say=ctx.say)
        if ctx.precision == "int8":
            self._fallback(ctx, staging, written)
        checks, failures = self._check_here(ctx, staging)
        model_file = trt_exporter.MODEL_INT8 if ctx.precision == "int8" else trt_exporter.MODEL_FP32
        tensorrt = {"engine": "pending", "intended": trt_exporter.INTENDED, **written["tensorrt"],
                    "device_tool": {"file": trt_exporter.DEVICE_TOOL, "needs": "Python >= 3.8, NumPy, TensorRT",
                                    "one_command": f"python3 {trt_exporter.DEVICE_TOOL} all",
                                    "then": "edgecnn merge-results <bundle> <results.json>"}}
        extra = {"engine": "pending", "tensorrt": tensorrt, "local_checks": checks}
        pending: Optional[str] = None
        files = list(written["files"])
        if failures:
            trt, info = None, "the checks run here failed, so no engine was built"
        elif not extra_opts.get("trt_build", True):
            trt, info = None, "engine build here disabled (ExportOptions.extra trt_build=False)"
        else:
            trt, info = tensorrt_here()
        if trt is None:
            pending = (f"TensorRT engine not built and not validated: {info}. On the device: copy this folder, run "
                       f"`python3 {trt_exporter.DEVICE_TOOL} all`, then bring results.*.json back and run "
                       "`edgecnn merge-results <this folder> <results.json>`")
        else:  # a machine with TensorRT and a GPU: build here with the device tool's code; the pipeline validates
            ctx.say(f"TensorRT {trt.__version__} found: building the engine here")
            meta = self._build_engine_here(staging, ctx, trt, info)
            extra["engine"] = tensorrt["engine"] = meta["engine"]
            tensorrt["engine_build"] = meta
            files += [meta["engine"], meta["engine"] + ".json", meta["build_log"]]
        return BuildOutput(model_file=model_file, files=files, export=written["export"], recipe=written["recipe"],
                           pending=pending, extra=extra, failed="; ".join(failures) or None)

    def _fallback(self, ctx: BuildContext, staging: Path, written: dict) -> None:
        """The INT8 sensitivity fallback on the trt recipe (``edgecnn.targets.int8.trt_fallback``): rewrites
        model.int8.qdq.onnx with the layers it keeps float and records them in the recipe. The calibration
        cache (implicit-INT8 / DLA builds) carries no per-layer precision and is left as written."""
        import onnx

        from .int8 import trt_fallback

        int8 = staging / trt_exporter.MODEL_INT8
        meta = {p.key: p.value for p in onnx.load(str(int8), load_external_data=False).metadata_props}
        info, block = trt_fallback(ctx, staging / trt_exporter.MODEL_FP32, int8, written["ranges"],
                                   nodes_to_exclude=tuple(ctx.options.extra.get("nodes_to_exclude", ())),
                                   metadata=meta, max_opset=trt_exporter.OPSET,
                                   range_method=ctx.options.extra.get("range_method", "minmax"))
        for key in ("quantized_layers", "float_layers", "residual_adds_skip_quantized", "qdq_pairs", "fixes", "checker",
                    "weight_rounding"):
            written["recipe"][key] = info[key]
        written["recipe"]["fallback"] = {**block, "calibration_cache": "unchanged: implicit-INT8/DLA builds do not "
                                                                       "honour per-layer float"}

    # -------------------------------------------------------------------------------------------------
    def _check_here(self, ctx: BuildContext, staging: Path) -> tuple:
        """onnxruntime parity of each shipped ONNX file, and the Q/DQ rule checker on the INT8 model."""
        checks, failures = [], []
        todo = [(trt_exporter.MODEL_FP32, "fp32")]
        if ctx.precision == "fp16":
            todo.append((trt_exporter.MODEL_FP16, "fp16"))
        if ctx.precision == "int8":
            report = trt_exporter.check_qdq(staging / trt_exporter.MODEL_INT8)
            checks.append({"name": f"TensorRT Q/DQ rules on {trt_exporter.MODEL_INT8}", "passed": report.ok,
                           "detail": (f"{len(report.violations)} violation(s): {report.violations[0]}" if not report.ok else
                                      f"{len(RULES)} rules, {report.stats['quantized_layers']} INT8 Conv/Gemm, "
                                      f"{len(report.stats['float_layers'])} float, {report.stats['residual_adds']} "
                                      "residual Adds"),
                           "report": report.to_dict()})
            if not report.ok:
                failures.append(f"{trt_exporter.MODEL_INT8} breaks TensorRT Q/DQ rules: {report.violations[0]}")
            todo.append((trt_exporter.MODEL_INT8, "int8"))
        for name, precision in todo:
            ctx.say(f"onnxruntime check of {name} on {len(ctx.eval_inputs)} held-out images (not TensorRT)")
            runner = OnnxRuntimeRunner(staging / name, threads=ctx.options.threads)
            parity = check_parity(runner, ctx.eval_inputs, ctx.reference, precision, trained=ctx.trained,
                                  min_agreement=ctx.options.int8_min_agreement).to_dict()
            del runner
            checks.append({"name": f"onnxruntime check of {name}" + (" (the Q/DQ model)" if precision == "int8" else ""),
                           "passed": parity["passed"], "note": ONNXRUNTIME_NOTE,
                           "detail": f"{parity['gate']} | max rel err {parity['max_rel_error']:.2e}, cosine "
                                     f"{parity['cosine']:.6f}, SQNR {parity['sqnr_db']:.1f} dB, top-1 agree "
                                     f"{parity['top1_agreement']:.1%} on {parity['samples']} held-out images",
                           "parity": parity})
            if not parity["passed"]:
                failures.append(f"onnxruntime check of {name}: {parity['reason']}")
        return checks, failures

    def _build_engine_here(self, staging: Path, ctx: BuildContext, trt, info) -> dict:
        """Build with the device tool's code path, reading the manifest the tool expects from the staging folder."""
        import json

        manifest = {"target": "trt", "precision": ctx.precision, "input": ctx.spec.to_dict(), "files": {}}
        (staging / "manifest.json").write_text(json.dumps(manifest))
        try:
            bundle = trt_device.Bundle(staging)
            args = trt_device.build_parser().parse_args(["build"])
            return trt_device.build_engine(bundle, trt, info, args, ctx.say)
        finally:
            (staging / "manifest.json").unlink()

    def open_runner(self, bundle: Path, manifest: dict, threads: int = 1):
        """A TensorRT runner on the bundle's engine for this device, or None when TensorRT is not here."""
        trt, info = tensorrt_here()
        if trt is None:
            return None
        engine = manifest.get("tensorrt", {}).get("engine")
        if not engine or engine == "pending" or not (Path(bundle) / engine).exists():
            engine = trt_device.engine_name(trt_device.gpu_tag(info), trt_device.parse_version(trt.__version__))
        path = Path(bundle) / engine
        if not path.exists():
            return None
        trt_device.check_engine_compatible(str(path), trt_device.parse_version(trt.__version__), info)
        return trt_device.TrtRunner(str(path), trt, trt_device.Cuda())

    def runtime_unavailable_reason(self, manifest: dict) -> str:
        trt, info = tensorrt_here()
        if trt is None:
            return (f"TensorRT engine pending: {info}; build and validate on the device with "
                    f"`python3 {trt_exporter.DEVICE_TOOL} all`, then `edgecnn merge-results`")
        return "no engine for this GPU/TensorRT in the bundle: run `edgecnn trt build <bundle>` first"

