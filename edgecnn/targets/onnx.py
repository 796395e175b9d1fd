"""The ONNX target: ``model.onnx`` (FP32 or FP16) run with onnxruntime; INT8 via the ``ort`` recipe."""
from __future__ import annotations

import os
from pathlib import Path

from exporters import onnx as onnx_exporter

from ..runtimes.onnxruntime import OnnxRuntimeRunner
from .base import BuildContext, BuildOutput, Target

MODEL_FILE = "model.onnx"


class OnnxTarget(Target):
    name = "onnx"
    precisions = ("fp32", "fp16", "int8")
    description = "ONNX for onnxruntime (CPU/GPU/mobile)"

    def build(self, ctx: BuildContext, staging: Path) -> BuildOutput:
        out = staging / MODEL_FILE
        fp32_path = out if ctx.precision == "fp32" else staging / ".fp32.onnx"
        ctx.say(f"exporting ONNX (opset {ctx.options.opset}, exporter {ctx.options.onnx_exporter})")
        info = onnx_exporter.export_onnx(ctx.model, ctx.spec, fp32_path, opset=ctx.options.opset,
                                         exporter=ctx.options.onnx_exporter, do_simplify=ctx.options.simplify,
                                         metadata=ctx.metadata)
        recipe = {"precision": ctx.precision}
        if ctx.precision == "fp16":
            ctx.say("converting to FP16 (weights and compute; float32 inputs/outputs kept)")
            onnx_exporter.convert_fp16(fp32_path, out)
            os.remove(fp32_path)
            recipe.update(method="onnxruntime float16 converter", io_types="float32",
                          note="FP16 is for GPU/mobile runtimes: onnxruntime on x86 CPU has no FP16 conv kernels, "
                               "so CPU latency here is not expected to improve")
        extra = {}
        if ctx.precision == "int8":
            from exporters import quant_ort

            from .int8 import quantize_for_target, side_by_side_latency

            defaults = staging / ".int8-defaults.onnx"
            recipe = quantize_for_target(ctx, fp32_path, out, recipe_module=quant_ort, work=staging,
                                         defaults_out=defaults if ctx.options.latency else None)
            onnx_exporter.set_metadata_file(out, {**ctx.metadata, "edgecnn.int8_recipe": quant_ort.NAME})
            if ctx.options.latency:
                ctx.say("timing FP32 and INT8 side by side (batch 1)")
                extra["int8"] = side_by_side_latency(fp32_path, out, ctx.spec.shape, threads=ctx.options.threads,
                                                     seed=ctx.options.seed,
                                                     defaults_path=defaults if defaults.exists() else None)
            else:
                extra["int8"] = {"fp32_bytes": os.path.getsize(fp32_path), "int8_bytes": os.path.getsize(out)}
            os.remove(fp32_path)
            if defaults.exists():
                os.remove(defaults)
        return BuildOutput(model_file=MODEL_FILE, files=[MODEL_FILE], export=info.to_dict(), recipe=recipe, extra=extra)

    def open_runner(self, bundle: Path, manifest: dict, threads: int = 1):
        return OnnxRuntimeRunner(Path(bundle) / manifest["model_file"], threads=threads)
