"""PyTorch module -> Core ML ML Program (``.mlpackage``) in FP32, FP16, W8A8 INT8 or a weight-only precision
(int8-weights, palettized8/6/4, int4-weights: ``exporters.coreml.compression``).

Two variants of one network are written, because app code feeds a model in one of two ways:

* ``image``: an ``ImageType`` input named ``image`` (raw RGB pixels 0..255 from a ``CVPixelBuffer``);
  Core ML scales by 1/255 and the ImageNet-style per-channel normalisation runs *inside* the program,
  because ``ImageType`` has one scalar scale and cannot fold a per-channel std exactly. It is a
  classifier: ``classLabel`` (string), ``classLabel_probs`` (label -> probability; the softmax is in
  the program, ``ClassifierConfig`` adds none) and the raw ``logits``.
* ``tensor``: a float32 ``MultiArray`` named like ``spec.name`` (already normalised, NCHW) -> ``logits``.

Facts that shape this (coremltools 9.0, measured here; docs/coreml.md): conversion from ``torch.jit.trace``
works on Linux; FP16 programs default to FP16 inputs/outputs on iOS16+, so FP32 I/O is set explicitly;
a classifier with a second output trips an index bug in coremltools' backend when output types are
set, so the program is converted to MIL first (output types fixed there) and then to an ML Program
with the classifier; W8A8 goes through ``coremltools.optimize.torch``'s ``LinearQuantizer`` used for
calibration only (iOS17+, trace path; ``StochasticDepth`` stripped before ``prepare`` because
``prepare_qat_fx`` traces the training branch), with the logits kept float as in FP16; the weight-only
precisions are coremltools.optimize.coreml graph passes run on the MIL program. Every package is named for
Xcode, records torch as its source and is read back through coremltools' program loader, which also gives its
Neural Engine report (``packaging``, ``neural_engine``). ``MLModel.predict`` is macOS-only; nothing here calls it.
"""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import numpy as np

from calibration.spec import InputSpec

from ..errors import ExportError, ToolchainMissing
from . import compression, neural_engine, packaging

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "fp16", "int8", *compression.PRECISIONS)
IOS_VERSIONS = (16, 17, 18)
# W8A8 quantize/dequantize ops need iOS17; 4-bit per-block weights need iOS18
MIN_IOS = {"fp32": 16, "fp16": 16, "int8": 17, "int8-weights": 16, "palettized8": 16, "palettized6": 16,
           "palettized4": 16, "int4-weights": 18}
VARIANTS = ("image", "tensor")
IMAGE_INPUT = "image"
LOGITS = "logits"
PROBS = "probs"                       # renamed by the classifier to f"{CLASS_LABEL}_probs"
CLASS_LABEL = "classLabel"
AUTHOR = "edgecnn"
LICENSE = "Model file written by edgecnn (Apache-2.0); the weights' licence is their owner's"


def import_coremltools():
    """coremltools, imported quietly (on Linux it logs that its macOS runtime is missing, which we know)."""
    ct_logger = logging.getLogger("coremltools")
    level = ct_logger.level
    ct_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            import coremltools as ct
    except ImportError as exc:
        raise ToolchainMissing(f"coremltools is not installed ({exc})", hint="pip install 'coremltools>=8.0'") from None
    finally:
        ct_logger.setLevel(level)
    ct_logger.setLevel(max(level, logging.ERROR))  # its per-conversion chatter (untested torch version …)
    return ct


def min_ios(precision: str) -> int:
    return MIN_IOS[precision]


def resolve_ios(precision: str, ios: Optional[int]) -> int:
    """The deployment target for ``precision``: the asked one, or the lowest that supports it."""
    if precision not in PRECISIONS:
        raise ExportError(f"unknown Core ML precision {precision!r}", hint=f"use one of {', '.join(PRECISIONS)}")
    if ios is None:
        return min_ios(precision)
    ios = int(ios)
    if ios not in IOS_VERSIONS:
        raise ExportError(f"unsupported iOS deployment target {ios}", hint=f"use one of {', '.join(map(str, IOS_VERSIONS))}")
    if ios < min_ios(precision):
        raise ExportError(f"Core ML {precision} needs iOS {min_ios(precision)}+ (asked for iOS {ios})",
                          hint=f"pass --ios {min_ios(precision)} or higher, or use int8-weights (iOS 16+)")
    return ios


@dataclass
class CoreMLExportInfo:
    path: str
    variant: str                          # "image" or "tensor"
    ios: int
    precision: str
    compute_precision: str                # "float16" or "float32": what the program computes in
    spec_version: int = 0
    neural_engine: Dict[str, object] = field(default_factory=dict)   # exporters.coreml.neural_engine.report
    logits_from: List[str] = field(default_factory=list)             # op types from logits back to their producer
    inputs: List[dict] = field(default_factory=list)
    outputs: List[dict] = field(default_factory=list)
    ops: Dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": os.path.basename(self.path), "variant": self.variant, "ios": self.ios,
                "precision": self.precision, "compute_precision": self.compute_precision,
                "spec_version": self.spec_version, "inputs": self.inputs, "outputs": self.outputs,
                "ops": dict(sorted(self.ops.items())), "seconds": round(self.seconds, 2), "notes": list(self.notes),
                "logits_from": list(self.logits_from), "neural_engine": self.neural_engine}


# ---------------------------------------------------------------------------------------------- wrappers
def _wrappers():
    import torch
    from torch import nn

    class ImageClassifier(nn.Module):
        """pixels/255 (Core ML applies the 1/255) -> per-channel normalisation -> net -> (logits, softmax)."""

        def __init__(self, net, spec: InputSpec):
            super().__init__()
            self.net = net
            self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
            self.register_buffer("inv_std", 1.0 / torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

        def forward(self, x):
            logits = self.net((x - self.mean) * self.inv_std)
            return logits, torch.softmax(logits, dim=1)

    return ImageClassifier


def strip_for_quantization(module):
    """A copy with ``StochasticDepth`` replaced by Identity (a no-op at inference; ``prepare_qat_fx``
    traces modules in training mode, where it would put random ops into the graph)."""
    from torch import nn

    try:
        from torchvision.ops import StochasticDepth
    except ImportError:  # no torchvision: nothing of that kind to strip
        StochasticDepth = ()
    model = copy.deepcopy(module).eval()
    stripped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if StochasticDepth and isinstance(child, StochasticDepth):
                setattr(parent, name, nn.Identity())
                stripped += 1
    return model, stripped


# ---------------------------------------------------------------------------------------------- convert
def _trace(module, example):
    import torch

    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        return torch.jit.trace(module.eval(), example, check_trace=False)


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread inside. Why: oneDNN picks its blocking by thread count, so a convolution's
    last bits, and hence an observed activation min/max, can differ between 1 and 2 threads (seen here on
    EfficientNet-Lite0: 3 of 110 ranges, 1e-7 relative). A range that moves by one bit moves a scale and
    a zero point, and the W8A8 fallback's greedy search then ranks near-equal blocks differently: the
    same export chose other float blocks (held-out SQNR 23.5 vs 26.7 dB) under ``OMP_NUM_THREADS=1``.
    Calibration is a few forward passes, so one thread costs little (Lite0, 100 images: 4.9 s instead of 3.4 s at 2 threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet():
    """coremltools prints tqdm progress bars and warnings for every conversion: keep them off the terminal."""
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def classifier_labels(labels: Sequence[str]) -> List[str]:
    """Labels made unique for the classifier's probability dictionary (a user's labels file may repeat a
    name, which would collapse two classes into one key); later duplicates get their index appended."""
    seen, out = set(), []
    for i, lab in enumerate(labels):
        name = str(lab)
        if name in seen:
            name = f"{name} ({i})"
        seen.add(name)
        out.append(name)
    return out


def convert_variant(module, spec: InputSpec, variant: str, *, precision: str, ios: int, labels: Sequence[str]):
    """Trace and convert one variant; returns an ``MLModel`` (not saved). ``module`` is FP32 or finalized W8A8.

    Two steps for both variants: torch -> MIL program (all passes; float32 output types fixed), then
    the optional weight-only INT8 pass on that program, then MIL -> ML Program (backend passes only, and
    for the image variant the classifier). Why: coremltools 9.0's backend indexes past the user's output
    types when a classifier adds its outputs to a program with more than one output (IndexError in
    ``get_func_output``), and ``linear_quantize_weights`` on a saved classifier fails re-serialising its
    label list; both are avoided by working on the MIL program before the classifier is added.
    """
    import torch

    ct = import_coremltools()
    target = {16: ct.target.iOS16, 17: ct.target.iOS17, 18: ct.target.iOS18}[ios]
    compute = ct.precision.FLOAT32
    if precision != "fp32":
        # FP16 everywhere except (a) the image variant's in-model normalisation (FP16 there loses input
        # precision near the mean, where x/255 - mean cancels) and (b) the op that produces the logits
        # (FP16 storage of logits ~10 has a step of 0.008, enough to flip near-tie top-1 on its own)
        compute = ct.transform.FP16ComputePrecision(op_selector=_fp16_selector(
            IMAGE_INPUT if variant == "image" else None))
    shape = spec.batch_shape(1)
    classifier = None
    if variant == "image":
        traced = _trace(_wrappers()(module, spec).eval(), torch.full(shape, 0.5))
        color = ct.colorlayout.RGB if spec.channels == 3 else ct.colorlayout.GRAYSCALE
        inputs = [ct.ImageType(name=IMAGE_INPUT, shape=shape, scale=float(spec.scale), color_layout=color,
                               channel_first=True)]
        outputs = [ct.TensorType(name=LOGITS, dtype=np.float32), ct.TensorType(name=PROBS, dtype=np.float32)]
        classifier = ct.ClassifierConfig(classifier_labels(labels), predicted_probabilities_output=PROBS,
                                         predicted_feature_name=CLASS_LABEL)
    elif variant == "tensor":
        traced = _trace(module, torch.zeros(shape))
        inputs = [ct.TensorType(name=spec.name, shape=shape, dtype=np.float32)]
        outputs = [ct.TensorType(name=LOGITS, dtype=np.float32)]
    else:
        raise ExportError(f"unknown Core ML variant {variant!r}", hint="image or tensor")
    with _quiet():
        prog = ct.convert(traced, inputs=inputs, outputs=outputs, convert_to="milinternal",
                          minimum_deployment_target=target, compute_precision=compute)
        if precision in compression.PRECISIONS:
            for fn in prog.functions.values():  # ops the pass adds carry no TorchScript scope; don't demand one
                fn._essential_scope_sources = []
            compression.graph_pass(precision, ios, prog).apply(prog)
        if classifier is not None:
            prog.functions["main"].set_output_types(None)  # already float32 (cast in the MIL program)
        return ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                          classifier_config=classifier, pass_pipeline=ct.PassPipeline.EMPTY,
                          compute_precision=ct.precision.FLOAT32)


_PREPROCESS_OPS = ("mul", "sub", "add", "real_div")


def _fp16_selector(image_input: Optional[str]):
    """FP16 op selector (True = FP16): False for the elementwise chain that starts at the image input
    (scale, -mean, /std), for the op producing the logits (a program output) and for the softmax on them."""
    def from_input(var, depth: int = 0) -> bool:
        op = var.op
        if op is None:
            return image_input is not None and var.name == image_input
        if depth > 4 or op.op_type not in _PREPROCESS_OPS or "x" not in op.inputs:
            return False
        return from_input(op.inputs["x"], depth + 1)

    def select(op) -> bool:
        if op.op_type in _PREPROCESS_OPS and "x" in op.inputs and from_input(op.inputs["x"]):
            return False
        if op.op_type in ("linear", "matmul", "add", "reshape", "softmax", "squeeze") and op.outputs and any(
                out in op.enclosing_block.outputs or out.name in (LOGITS, PROBS) for out in op.outputs):
            return False
        return True

    return select


def set_metadata(ml, spec: InputSpec, variant: str, metadata: Dict[str, str], *, description: str,
                 license: str = LICENSE, author: str = AUTHOR) -> None:
    """The model's own fields (author, licence, description, version) plus ``user_defined_metadata``
    (every edgecnn key, and the preprocessing as JSON) and per-feature descriptions Xcode shows."""
    ml.author = author
    ml.license = license
    ml.short_description = description
    ml.version = str(metadata.get("edgecnn.version", ""))
    user = ml.user_defined_metadata
    for k, v in sorted(metadata.items()):
        user[k] = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
    user["edgecnn.variant"] = variant
    user["edgecnn.preprocessing"] = json.dumps(preprocessing(spec, variant), sort_keys=True)
    if variant == "image":
        ml.input_description[IMAGE_INPUT] = (
            f"RGB image {spec.width}x{spec.height} (raw 0..255 pixels; resize the shorter side to {spec.resize} px "
            f"and centre-crop first). Scaling by 1/255 and mean/std normalisation happen inside the model.")
        ml.output_description[LOGITS] = "raw class scores (float32, before softmax)"
        ml.output_description[CLASS_LABEL] = "most likely class label"
        ml.output_description[f"{CLASS_LABEL}_probs"] = "probability of every class label (softmax of logits)"
    else:
        ml.input_description[spec.name] = (
            f"float32 {list(spec.batch_shape(1))} NCHW, already normalised: (pixel/255 - mean) / std with "
            f"mean {list(spec.mean)}, std {list(spec.std)}")
        ml.output_description[LOGITS] = "raw class scores (float32, before softmax)"


def preprocessing(spec: InputSpec, variant: str) -> dict:
    steps = spec.to_dict()["steps"]
    if variant == "image":
        return {"feed": "CVPixelBuffer / CGImage, 8-bit RGB, NOT normalised", "resize": spec.resize,
                "crop": [spec.height, spec.width], "interpolation": spec.interpolation,
                "inside_model": f"x * {spec.scale:.8g}, then (x - mean) / std", "mean": list(spec.mean),
                "std": list(spec.std), "steps_before_model": steps[:3]}
    return {"feed": "MLMultiArray float32 NCHW, normalised", "resize": spec.resize, "crop": [spec.height, spec.width],
            "interpolation": spec.interpolation, "mean": list(spec.mean), "std": list(spec.std), "steps": steps}


def describe_io(ml) -> tuple:
    """(inputs, outputs) as small dicts read back from the saved spec — what the app will see."""
    spec = ml.get_spec()

    def one(feature):
        kind = feature.type.WhichOneof("Type")
        d = {"name": feature.name, "type": kind}
        if kind == "multiArrayType":
            t = feature.type.multiArrayType
            d["shape"] = list(t.shape)
            d["dtype"] = {65568: "float32", 65552: "float16", 131104: "int32", 65600: "float64"}.get(t.dataType,
                                                                                                   str(t.dataType))
        elif kind == "imageType":
            t = feature.type.imageType
            d.update(width=t.width, height=t.height, color_space={10: "GRAYSCALE", 20: "RGB", 30: "BGR"}.get(
                t.colorSpace, str(t.colorSpace)))
        elif kind == "dictionaryType":
            d["keys"] = feature.type.dictionaryType.WhichOneof("KeyType")
        return d

    return [one(f) for f in spec.description.input], [one(f) for f in spec.description.output]


def op_counts(ml) -> Dict[str, int]:
    spec = ml.get_spec()
    fn = spec.mlProgram.functions["main"]
    block = fn.block_specializations[fn.opset]
    return dict(Counter(op.type for op in block.operations))


def export_coreml(module, spec: InputSpec, out_dir: str | os.PathLike, *, precision: str = "fp16",
                  ios: Optional[int] = None, labels: Sequence[str], metadata: Optional[Dict[str, str]] = None,
                  quantized=None, quantized_info: Optional[dict] = None, variants: Sequence[str] = VARIANTS,
                  description: str = "", file_names: Optional[Dict[str, str]] = None,
                  license: str = LICENSE) -> tuple:
    """Write one ``.mlpackage`` per variant into ``out_dir``, named for Xcode (``packaging.xcode_names`` of
    ``metadata["edgecnn.arch"]`` unless ``file_names`` says otherwise).

    Returns ({variant: CoreMLExportInfo}, recipe dict). ``int8`` (W8A8) converts ``quantized``, the module
    the INT8 engine finalized (``exporters.coreml.w8a8.W8A8Recipe.finalize``), described by ``quantized_info``.
    Every package is read back through coremltools' program loader, which also gives its Neural Engine report.
    """
    ios = resolve_ios(precision, ios)
    metadata = dict(metadata or {})
    names = {**packaging.xcode_names(metadata.get("edgecnn.arch", "model"), precision), **(file_names or {})}
    out_dir = Path(out_dir)
    recipe = _recipe(precision, ios, quantized, quantized_info)
    net = quantized if precision == "int8" else module.eval()
    infos = {}
    for variant in variants:
        t0 = time.perf_counter()
        try:
            ml = convert_variant(net, spec, variant, precision=precision, ios=ios, labels=labels)
        except ExportError:
            raise
        except Exception as exc:  # coremltools raises many types for unsupported graphs
            raise ExportError(f"Core ML conversion ({variant} variant, {precision}, iOS {ios}) failed: "
                              f"{_first_line(exc)}", hint="rerun with --debug for the traceback") from exc
        set_metadata(ml, spec, variant, {**metadata, "edgecnn.recipe": json.dumps(recipe, sort_keys=True)},
                     description=description or f"{metadata.get('edgecnn.arch', 'CNN')} classifier ({precision})",
                     license=license)
        packaging.record_provenance(ml, image_classifier=variant == "image")
        path = out_dir / names[variant]
        if path.exists():
            shutil.rmtree(path)
        with _quiet():
            ml.save(os.fspath(path))
            program = packaging.reload_program(path)
        chain = packaging.check_float_logits(program, path) if precision == "int8" else \
            packaging.logits_producer(program)
        ins, outs = describe_io(ml)
        _check_float32_io(ins, outs, variant, path)
        infos[variant] = CoreMLExportInfo(
            path=os.fspath(path), variant=variant, ios=ios, precision=precision,
            compute_precision="float32" if precision == "fp32" else "float16",
            spec_version=int(ml.get_spec().specificationVersion), inputs=ins, outputs=outs, ops=op_counts(ml),
            seconds=time.perf_counter() - t0, logits_from=chain,
            neural_engine=neural_engine.report(program, precision, scheme=recipe.get("scheme")))
    return infos, recipe


def _recipe(precision: str, ios: int, quantized, quantized_info: Optional[dict]) -> dict:
    """The manifest's (and the model metadata's) account of how ``precision`` was produced."""
    recipe: dict = {"precision": precision, "ios": ios}
    if precision == "int8":
        if quantized is None:
            raise ExportError("Core ML int8 (W8A8) converts a module the INT8 engine quantized; none was given")
        recipe.update(quantized_info or {}, compute="float16 between quantize/dequantize pairs",
                      note="W8A8: weights and activations 8-bit (Core ML quantize/dequantize, iOS17+)")
    elif precision in compression.PRECISIONS:
        recipe.update(compression.describe(precision, ios))
    elif precision == "fp16":
        recipe.update(method="coremltools compute_precision=FLOAT16", io_types="float32 inputs/outputs (explicit)")
    else:
        recipe.update(method="coremltools compute_precision=FLOAT32")
    return recipe


def _check_float32_io(inputs: List[dict], outputs: List[dict], variant: str, path: Path) -> None:
    """FP16 programs must still take and give float32 (apps and our validator feed float32)."""
    for d in inputs + outputs:
        if d["type"] == "multiArrayType" and d.get("dtype") != "float32":
            raise ExportError(f"{path.name}: {d['name']} is {d.get('dtype')}, expected float32 I/O ({variant})")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
