"""The ONNX target: ``model.onnx`` (FP32, FP16 or INT8 with the ``ort`` recipe) run with onnxruntime."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from exporters import Precision
from exporters.int8 import engine
from exporters.int8.qdq import QdqRecipe
from exporters.onnx import export as onnx_exporter
from exporters.onnx.quant import NAME as ORT_RECIPE, OrtQuantizer
from exporters.onnx.runner import OnnxRuntimeRunner

from ..validate.latency import quick_speedup, side_by_side
from .base import FP32_FOR_TIMING, INT8_DEFAULTS_FOR_TIMING, BuildContext, BuildOutput, Target

MODEL_FILE = "model.onnx"


class OnnxTarget(Target):
    name = "onnx"
    precisions = (Precision.FP32, Precision.FP16, Precision.INT8)
    description = "ONNX for onnxruntime (CPU/GPU/mobile)"

    def build(self, ctx: BuildContext, staging: Path) -> BuildOutput:
        out = staging / MODEL_FILE
        fp32_path = out if ctx.precision == Precision.FP32 else staging / ".fp32.onnx"
        o = ctx.options
        ctx.say(f"exporting ONNX (opset {o.opset}, exporter {o.onnx_exporter})")
        info = onnx_exporter.export_onnx(ctx.model, ctx.spec, fp32_path, opset=o.opset, exporter=o.onnx_exporter,
                                         do_simplify=o.simplify, metadata=ctx.metadata)
        built = BuildOutput(model_file=MODEL_FILE, files=[MODEL_FILE], export=info.to_dict(),
                            recipe={"precision": str(ctx.precision)})
        if ctx.precision == Precision.FP16:
            ctx.say("converting to FP16 (weights and compute; float32 inputs/outputs kept)")
            onnx_exporter.convert_fp16(fp32_path, out)
            built.recipe.update(method="onnxruntime float16 converter", io_types="float32",
                                note="FP16 is for GPU/mobile runtimes: onnxruntime on x86 CPU has no FP16 conv kernels, "
                                     "so CPU latency here is not expected to improve")
        elif ctx.precision == Precision.INT8:
            self._int8(ctx, fp32_path, out, built)
        if fp32_path != out:
            os.remove(fp32_path)
        return built

    def _int8(self, ctx: BuildContext, fp32_path: Path, out: Path, built: BuildOutput) -> None:
        """The ``ort`` recipe through the INT8 engine, then FP32 and INT8 timed side by side."""
        o = ctx.options
        with tempfile.TemporaryDirectory(prefix=".int8-", dir=out.parent) as work:
            defaults = Path(work) / "int8-defaults.onnx"
            speedup = quick_speedup(fp32_path, ctx.spec.shape, threads=o.threads) if o.latency else None
            result = engine.quantize(QdqRecipe(OrtQuantizer(), fp32_path, out, work), ctx.calib, options=o.int8,
                                     trained=ctx.trained, speedup=speedup, defaults_path=defaults if o.latency else None,
                                     say=ctx.say)
            built.recipe = result.record.to_dict()
            onnx_exporter.set_metadata_file(out, {**ctx.metadata, "edgecnn.int8_recipe": ORT_RECIPE})
            if o.latency and ctx.timing_dir is not None:   # timed later, one cell after another (the matrix)
                ctx.timing_dir.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(fp32_path, ctx.timing_dir / FP32_FOR_TIMING)
                if defaults.exists():
                    shutil.copyfile(defaults, ctx.timing_dir / INT8_DEFAULTS_FOR_TIMING)
                built.int8 = {"fp32_bytes": os.path.getsize(fp32_path), "int8_bytes": os.path.getsize(out)}
            elif o.latency:
                ctx.say("timing FP32 and INT8 side by side (batch 1)")
                built.int8 = side_by_side(fp32_path, out, ctx.spec.shape, threads=o.threads, seed=o.seed,
                                          defaults_path=defaults if defaults.exists() else None)
            else:
                built.int8 = {"fp32_bytes": os.path.getsize(fp32_path), "int8_bytes": os.path.getsize(out)}

    def open_runner(self, bundle: Path, manifest: dict, threads: int = 1):
        return OnnxRuntimeRunner(Path(bundle) / manifest["model_file"], threads=threads)
