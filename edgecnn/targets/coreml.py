"""The Core ML target: ``model.mlpackage`` (image input, classifier) and ``model_tensor.mlpackage``
(float32 tensor input, logits) as ML Programs, in fp16 (default), fp32, int8 (W8A8, iOS17+) or
int8-weights (weight-only, iOS16+).

Validation: on macOS the real Core ML runtime (``MLModel.predict`` with the chosen compute units) runs
the model and latency is measured. Elsewhere the reference executor (``edgecnn.runtimes.coreml_ref``)
runs the same program file and gives parity; latency is then "not measured (needs Apple hardware)".
The pipeline validates the image variant (the one apps use); the tensor variant is checked here, at
build time, against the same gate on the same held-out images, and its parity goes in the manifest
(if it fails, the pipeline validates the tensor variant instead, so the bundle fails the usual way).
"""
from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Optional

import numpy as np

from calibration import InputSpec
from exporters import coreml as coreml_exporter

from ..errors import UsageError
from ..runtimes.coreml_ref import RUNTIME_NAME, CoreMLReferenceRunner
from .base import BuildContext, BuildOutput, Target

IMAGE_MODEL = "model.mlpackage"
TENSOR_MODEL = "model_tensor.mlpackage"
SECONDARY_CHECK_IMAGES = 48     # the tensor variant's build-time parity check (the pipeline checks all on the image one)
COMPUTE_UNITS_ENV = "EDGECNN_COREML_COMPUTE_UNITS"


def apple_runtime_available() -> bool:
    """True on macOS with coremltools' native runtime (``MLModel.predict`` works)."""
    if platform.system() != "Darwin":
        return False
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return True


class CoreMLTarget(Target):
    name = "coreml"
    precisions = ("fp16", "fp32", "int8", "int8-weights")
    description = "Core ML ML Program (.mlpackage) for iOS/macOS apps"

    def build(self, ctx: BuildContext, staging: Path) -> BuildOutput:
        extra = ctx.options.extra or {}
        try:
            ios = coreml_exporter.resolve_ios(ctx.precision, extra.get("ios"))
        except coreml_exporter.ExportError as exc:
            raise UsageError(str(exc), hint=exc.hint) from None
        # Module paths (``named_modules`` names of the zoo model) left in float by the W8A8 quantizer: given
        # (``coreml_keep_float``), or chosen by the sensitivity fallback on calibration images
        # (``coreml_int8_fallback``, default on), aimed at the gate the artefact will face: top-1 agreement for
        # trained weights, logit SQNR (plus a margin) for random init — as the ONNX/TensorRT INT8 fallback.
        keep_float = tuple(extra.get("coreml_keep_float", ()))
        scheme = extra.get("coreml_int8_scheme", "affine")
        rounding = None
        if ctx.precision == "int8":
            from .int8 import weight_rounding_method

            rounding = weight_rounding_method(ctx)
        calib = None
        fallback = None
        if ctx.precision == "int8" and not keep_float and extra.get("coreml_int8_fallback", True):
            from exporters.coreml_fallback import w8a8_fallback
            from ..validate import torch_reference
            from .int8 import fallback_bar, search_data

            _, min_agreement, min_sqnr = fallback_bar(ctx)
            # the search calibrates on some calibration groups and probes the others (its probe then sees
            # range clipping as new images do); the artefact below calibrates on the whole split
            data = search_data(ctx, max_probe=ctx.options.number("coreml_fallback_probe", 128, int))
            ctx.say(f"W8A8 sensitivity fallback: probing {len(data.probe)} calibration images "
                    f"({'of photos the search did not calibrate on; ' if data.split else ''}held-out images unseen)")
            fallback = w8a8_fallback(ctx.model, ctx.spec, data.fit.iter_batches("calib", batch_size=16), data.probe,
                                     torch_reference(ctx.model, data.probe), min_agreement=min_agreement,
                                     min_sqnr_db=min_sqnr,
                                     max_float_fraction=ctx.options.number("coreml_fallback_max_float", 0.5),
                                     scheme=scheme, rounding=rounding, say=ctx.say)
            fallback["probe"] = data.describe(rank_images=32)
            fallback["probe_split"] = data.split
            keep_float = tuple(fallback["keep_float"])
        if ctx.precision == "int8":
            ctx.say(f"W8A8: calibrating activation ranges on {len(ctx.calib.calib_items)} calibration images "
                    "(coremltools.optimize.torch LinearQuantizer)")
            calib = ctx.calib.iter_batches("calib", batch_size=16)
        ctx.say(f"converting to Core ML ML Programs ({ctx.precision}, iOS {ios}): image and tensor variants")
        desc = (f"{ctx.arch} image classifier ({len(ctx.labels)} classes), {ctx.precision}; "
                f"exported by edgecnn {ctx.metadata.get('edgecnn.version', '')}")
        infos, recipe = coreml_exporter.export_coreml(
            ctx.model, ctx.spec, staging, precision=ctx.precision, ios=ios, labels=ctx.labels,
            metadata=ctx.metadata, calib_batches=calib, keep_float=keep_float, w8a8_scheme=scheme,
            w8a8_rounding=rounding or "gptq", description=desc,
            file_names={"image": IMAGE_MODEL, "tensor": TENSOR_MODEL})
        variants = {k: v.to_dict() for k, v in infos.items()}
        variants["image"]["validated_by"] = "the pipeline (all held-out images)"

        # The tensor variant: same gate, checked here on the reference executor (or Core ML on macOS).
        from ..validate import check_parity

        n = min(SECONDARY_CHECK_IMAGES, len(ctx.eval_inputs))
        ctx.say(f"checking the tensor variant on {n} held-out images")
        runner = self._runner(staging / TENSOR_MODEL, ctx.spec, image=False, threads=ctx.options.threads)
        parity = check_parity(runner, ctx.eval_inputs[:n], ctx.reference[:n], ctx.precision, trained=ctx.trained,
                              min_agreement=ctx.options.int8_min_agreement)
        variants["tensor"]["parity"] = parity.to_dict()
        variants["tensor"]["validated_by"] = f"edgecnn.targets.coreml at build time ({runner.describe()['runtime']})"
        # If it failed, the pipeline validates the tensor variant instead of the image one, so the failure
        # is judged, reported and kept as a ``.failed`` bundle the usual way.
        validated = "image" if parity.passed else "tensor"
        if not parity.passed:
            variants["image"]["validated_by"] = "not validated: the tensor variant failed first"
            variants["tensor"]["validated_by"] += "; failed, so the pipeline validated this variant"
        image_outputs = infos["image"].outputs
        return BuildOutput(
            model_file=IMAGE_MODEL if validated == "image" else TENSOR_MODEL, files=[IMAGE_MODEL, TENSOR_MODEL],
            export={"exporter": "coremltools", "convert_from": "torch.jit.trace", "format": "mlprogram",
                    "ios": ios, "spec_version": infos["image"].spec_version,
                    "compute_precision": infos["image"].compute_precision,
                    "compute_units": os.environ.get(COMPUTE_UNITS_ENV, "ALL")},
            recipe={**recipe, "keep_float": list(keep_float), "fallback": fallback} if ctx.precision == "int8"
            else recipe,
            extra={
                "output": {"name": "logits", "shape": [1, len(ctx.labels)], "kind": "logits (no softmax)",
                           "image_variant_outputs": image_outputs,
                           "note": f"{IMAGE_MODEL}: classLabel, classLabel_probs (softmax inside the model) "
                                   f"and logits; {TENSOR_MODEL}: logits"},
                "coreml": {
                    "variants": variants,
                    "validated_variant": validated,
                    "metadata": {"author": coreml_exporter.AUTHOR, "license": coreml_exporter.LICENSE,
                                 "description": desc, "version": ctx.metadata.get("edgecnn.version", ""),
                                 "preprocessing": {v: coreml_exporter.preprocessing(ctx.spec, v) for v in infos}},
                    "runtime_here": RUNTIME_NAME if not apple_runtime_available() else "coreml",
                },
            })

    # ------------------------------------------------------------------ runners
    def _runner(self, package: Path, spec: InputSpec, *, image: bool, threads: int = 1):
        if apple_runtime_available():
            return CoreMLPredictRunner(package, spec=spec, image=image,
                                       compute_units=os.environ.get(COMPUTE_UNITS_ENV, "ALL"))
        return CoreMLReferenceRunner(package, spec=spec, image_input=coreml_exporter.IMAGE_INPUT if image else None,
                                     threads=threads)

    def open_runner(self, bundle: Path, manifest: dict, threads: int = 1):
        spec = InputSpec.from_dict(manifest["input"])
        variant = manifest.get("coreml", {}).get("validated_variant", "image")
        model = Path(bundle) / (IMAGE_MODEL if variant == "image" else TENSOR_MODEL)
        return self._runner(model, spec, image=variant == "image", threads=threads)

    def runtime_unavailable_reason(self, manifest: dict) -> str:
        return "no Core ML runtime and no reference executor on this machine"


class CoreMLPredictRunner:
    """Real Core ML (macOS only): ``MLModel.predict`` with the chosen compute units.

    NOT exercised on Linux (no runtime there); kept small so it is easy to check on a Mac:
    ``edgecnn validate <bundle>`` there uses it and measures latency.
    """

    measures_latency = True

    def __init__(self, package: Path, *, spec: InputSpec, image: bool, compute_units: str = "ALL"):
        import time

        ct = coreml_exporter.import_coremltools()
        units = getattr(ct.ComputeUnit, compute_units.upper(), None)
        if units is None:
            raise UsageError(f"unknown Core ML compute units {compute_units!r}",
                             hint="ALL, CPU_ONLY, CPU_AND_GPU or CPU_AND_NE")
        t0 = time.perf_counter()
        self.model = ct.models.MLModel(os.fspath(package), compute_units=units)
        self.load_seconds = time.perf_counter() - t0
        self.spec, self.image, self.compute_units = spec, image, compute_units.upper()
        self._version = ct.__version__

    def run(self, x: np.ndarray) -> np.ndarray:
        from PIL import Image

        from ..runtimes.coreml_ref import to_pixels

        x = np.asarray(x, np.float32)
        outs = []
        if self.image:
            pixels = to_pixels(x, self.spec).astype(np.uint8).transpose(0, 2, 3, 1)
            for p in pixels:
                img = Image.fromarray(p if p.shape[-1] == 3 else p[..., 0], "RGB" if p.shape[-1] == 3 else "L")
                outs.append(np.asarray(self.model.predict({coreml_exporter.IMAGE_INPUT: img})["logits"]))
        else:
            for i in range(len(x)):
                outs.append(np.asarray(self.model.predict({self.spec.name: x[i:i + 1]})["logits"]))
        return np.concatenate(outs).astype(np.float32).reshape(len(x), -1)

    def describe(self) -> dict:
        return {"runtime": "coreml", "version": self._version, "compute_units": self.compute_units,
                "os": platform.platform(), "threads": "n/a"}
