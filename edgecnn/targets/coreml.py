"""The Core ML target: ``model.mlpackage`` (image input, classifier) and ``model_tensor.mlpackage`` (float32
tensor input, logits) as ML Programs, in fp16 (default), fp32, int8 (W8A8, iOS17+) or int8-weights
(weight-only, iOS16+).

Validation: on macOS the real Core ML runtime (``MLModel.predict`` with the chosen compute units) runs the
model and latency is measured. Elsewhere the reference executor (``exporters.coreml.mil_reference``) runs the
same program file and gives parity; latency is then "not measured (needs Apple hardware)". The pipeline
validates the image variant (the one apps use); the tensor variant is checked here, at build time, against the
same gate on the same held-out images, and its parity goes in the manifest (if it fails, the pipeline validates
the tensor variant instead, so the bundle fails the usual way).
"""
from __future__ import annotations

import os
from pathlib import Path

from calibration import InputSpec
from exporters import ExportError, Precision
from exporters.coreml import export as coreml_exporter
from exporters.coreml import runner as coreml_runner
from exporters.coreml.mil_reference import RUNTIME_NAME
from exporters.coreml.w8a8 import W8A8Recipe
from exporters.int8 import engine

from ..errors import UsageError
from ..validate import check_parity
from .base import BuildContext, BuildOutput, Target

IMAGE_MODEL = "model.mlpackage"
TENSOR_MODEL = "model_tensor.mlpackage"
SECONDARY_CHECK_IMAGES = 48     # the tensor variant's build-time parity check (the pipeline checks all on the image one)
COMPUTE_UNITS_ENV = "EDGECNN_COREML_COMPUTE_UNITS"


class CoreMLTarget(Target):
    name = "coreml"
    precisions = (Precision.FP16, Precision.FP32, Precision.INT8, Precision.INT8_WEIGHTS)
    description = "Core ML ML Program (.mlpackage) for iOS/macOS apps"

    def build(self, ctx: BuildContext, staging: Path) -> BuildOutput:
        try:
            ios = coreml_exporter.resolve_ios(str(ctx.precision), ctx.options.coreml.ios)
        except ExportError as exc:
            raise UsageError(str(exc), hint=exc.hint) from None
        quantized, qinfo, record = None, None, None
        if ctx.precision == Precision.INT8:
            quantized, qinfo, record = self._w8a8(ctx)
        ctx.say(f"converting to Core ML ML Programs ({ctx.precision}, iOS {ios}): image and tensor variants")
        desc = (f"{ctx.arch} image classifier ({len(ctx.labels)} classes), {ctx.precision}; "
                f"exported by edgecnn {ctx.metadata.get('edgecnn.version', '')}")
        infos, recipe = coreml_exporter.export_coreml(
            ctx.model, ctx.spec, staging, precision=str(ctx.precision), ios=ios, labels=ctx.labels,
            metadata=ctx.metadata, quantized=quantized, quantized_info=qinfo, description=desc,
            file_names={"image": IMAGE_MODEL, "tensor": TENSOR_MODEL})
        if record is not None:
            record["quantizer"] = recipe
            recipe = record
        variants = {k: v.to_dict() for k, v in infos.items()}
        variants["image"]["validated_by"] = "the pipeline (all held-out images)"
        validated = self._check_tensor_variant(ctx, staging, variants)
        return BuildOutput(
            model_file=IMAGE_MODEL if validated == "image" else TENSOR_MODEL, files=[IMAGE_MODEL, TENSOR_MODEL],
            export={"exporter": "coremltools", "convert_from": "torch.jit.trace", "format": "mlprogram",
                    "ios": ios, "spec_version": infos["image"].spec_version,
                    "compute_precision": infos["image"].compute_precision,
                    "compute_units": os.environ.get(COMPUTE_UNITS_ENV, "ALL")},
            recipe=recipe,
            output={"name": "logits", "shape": [1, len(ctx.labels)], "kind": "logits (no softmax)",
                    "image_variant_outputs": infos["image"].outputs,
                    "note": f"{IMAGE_MODEL}: classLabel, classLabel_probs (softmax inside the model) and logits; "
                            f"{TENSOR_MODEL}: logits"},
            coreml={"variants": variants, "validated_variant": validated,
                    "metadata": {"author": coreml_exporter.AUTHOR, "license": coreml_exporter.LICENSE,
                                 "description": desc, "version": ctx.metadata.get("edgecnn.version", ""),
                                 "preprocessing": {v: coreml_exporter.preprocessing(ctx.spec, v) for v in infos}},
                    "runtime_here": "coreml" if coreml_runner.apple_runtime_available() else RUNTIME_NAME})

    def _w8a8(self, ctx: BuildContext):
        """The W8A8 recipe through the INT8 engine: (finalized module, quantizer info, the engine's record)."""
        o = ctx.options
        recipe = W8A8Recipe(ctx.model, ctx.spec, scheme=o.coreml.w8a8_scheme, rounding=o.int8.weight_rounding)
        result = engine.quantize(recipe, ctx.calib, options=o.int8, trained=ctx.trained, say=ctx.say)
        ctx.say(f"W8A8: quantizing with {len(result.float_layers)} unit(s) float, ranges of the "
                f"{len(ctx.calib.calib_items)} calibration images (coremltools.optimize.torch LinearQuantizer)")
        quantized, qinfo = recipe.finalize(result.float_layers)
        return quantized, qinfo, result.record.to_dict()

    def _check_tensor_variant(self, ctx: BuildContext, staging: Path, variants: dict) -> str:
        """The tensor variant against the same gate on the first held-out images; returns the variant the
        pipeline validates ("tensor" when this check failed, so the bundle fails the usual way)."""
        n = min(SECONDARY_CHECK_IMAGES, len(ctx.eval_inputs))
        ctx.say(f"checking the tensor variant on {n} held-out images")
        with self._runner(staging / TENSOR_MODEL, ctx.spec, image=False, threads=ctx.options.threads) as runner:
            parity = check_parity(runner, ctx.eval_inputs[:n], ctx.reference[:n], ctx.precision, trained=ctx.trained,
                                  gate=ctx.options.int8.gate())
            variants["tensor"]["parity"] = parity.to_dict()
            variants["tensor"]["validated_by"] = f"edgecnn.targets.coreml at build time ({runner.describe()['runtime']})"
        if parity.passed:
            return "image"
        variants["image"]["validated_by"] = "not validated: the tensor variant failed first"
        variants["tensor"]["validated_by"] += "; failed, so the pipeline validated this variant"
        return "tensor"

    def _runner(self, package: Path, spec: InputSpec, *, image: bool, threads: int = 1):
        return coreml_runner.open_runner(package, spec, image=image, threads=threads,
                                         compute_units=os.environ.get(COMPUTE_UNITS_ENV))

    def open_runner(self, bundle: Path, manifest: dict, threads: int = 1):
        spec = InputSpec.from_dict(manifest["input"])
        variant = (manifest.get("coreml") or {}).get("validated_variant", "image")
        model = Path(bundle) / (IMAGE_MODEL if variant == "image" else TENSOR_MODEL)
        return self._runner(model, spec, image=variant == "image", threads=threads)

    def runtime_unavailable_reason(self, manifest: dict) -> str:
        return "no Core ML runtime and no reference executor on this machine"
