"""What an iOS engineer sees of a package in Xcode: its name, provenance, preview type; and the checks every
saved package passes before it ships.

* Names: Xcode generates a Swift class named after the package file, so two models called ``model.mlpackage``
  collide in one app target. ``xcode_names`` derives unique ones from the architecture and the precision,
  e.g. ``MobileNetV3Large_FP16.mlpackage`` and ``MobileNetV3Large_FP16_Tensor.mlpackage``.
* Provenance: the program is converted torch -> MIL -> ML Program in two steps (see ``export.convert_variant``),
  so coremltools records its source as "milinternal"; ``record_provenance`` writes what a direct torch
  conversion records (``torch==<version>``, dialect TorchScript) and the steps edgecnn ran.
* Preview: the image variant declares the ``imageClassifier`` preview type, so Xcode's Preview tab classifies
  dropped images (https://apple.github.io/coremltools/docs-guides/source/xcode-model-preview-types.html).
* Checks: every saved package is re-loaded through coremltools' own MIL program loader (which re-runs each
  op's type inference), and a W8A8 program must not quantize the tensor that becomes its logits.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List

from ..errors import ExportError

PREVIEW_KEY = "com.apple.coreml.model.preview.type"
PREVIEW_IMAGE_CLASSIFIER = "imageClassifier"
CONVERSION = ("torch.jit.trace -> coremltools MIL (torch frontend, default passes) -> edgecnn's precision passes "
              "-> ML Program (edgecnn)")

# how each precision reads in a package name (honest about what is stored: W8A8 is not weight-only INT8)
PRECISION_TAGS = {"fp32": "FP32", "fp16": "FP16", "int8": "W8A8", "int8-weights": "W8", "palettized8": "Pal8",
                  "palettized6": "Pal6", "palettized4": "Pal4", "int4-weights": "W4"}
# the usual spelling of each family's name
_WORDS = {"mobilenet": "MobileNet", "efficientnet": "EfficientNet", "squeezenet": "SqueezeNet",
          "shufflenet": "ShuffleNet", "resnet": "ResNet", "lenet": "LeNet", "densenet": "DenseNet", "vgg": "VGG",
          "alexnet": "AlexNet", "googlenet": "GoogLeNet", "inception": "Inception", "lite": "Lite"}


def swift_name(arch: str) -> str:
    """``mobilenet_v3_large`` -> ``MobileNetV3Large``, ``squeezenet1_1`` -> ``SqueezeNet1_1``: a Swift type
    name (letters, digits, underscores, not starting with a digit); an underscore is kept between two digits."""
    out = ""
    for part in re.split(r"[^A-Za-z0-9]+", arch):
        if not part:
            continue
        m = re.match(r"([A-Za-z]*)(.*)", part)
        word, rest = m.group(1).lower(), m.group(2)
        piece = _WORDS.get(word, word[:1].upper() + word[1:]) + rest
        if out and out[-1].isdigit() and piece[:1].isdigit():
            out += "_"
        out += piece
    if not out or out[0].isdigit():
        out = "Model" + out
    return out


def xcode_names(arch: str, precision: str) -> Dict[str, str]:
    """The package file name of each variant: unique per architecture, precision and variant."""
    tag = PRECISION_TAGS.get(str(precision), re.sub(r"[^A-Za-z0-9]", "", str(precision)).upper())
    base = f"{swift_name(arch)}_{tag}"
    return {"image": f"{base}.mlpackage", "tensor": f"{base}_Tensor.mlpackage"}


def record_provenance(ml, image_classifier: bool) -> None:
    """Provenance as a direct torch conversion records it (source torch==<version>, dialect TorchScript, the
    program's build info), the steps edgecnn ran, and the Xcode preview type of an image classifier."""
    import torch
    from coremltools.converters._converters_entry import _record_build_metadata

    ml._spec.mlProgram.attributes["buildInfo"].Clear()   # it lists "milinternal"; rewritten just below
    _record_build_metadata(ml, "pytorch", source_dialect="TorchScript")
    ml.user_defined_metadata["edgecnn.conversion"] = CONVERSION
    ml.user_defined_metadata["edgecnn.torch"] = torch.__version__
    if image_classifier:
        ml.user_defined_metadata[PREVIEW_KEY] = PREVIEW_IMAGE_CLASSIFIER


def weights_dir(package: str | os.PathLike) -> Path:
    return Path(package) / "Data" / "com.apple.CoreML" / "weights"


def reload_program(package: str | os.PathLike):
    """The saved package's program, re-loaded through coremltools' MIL loader (every op's type inference runs
    again): a package coremltools cannot read back is refused here rather than in Xcode."""
    import coremltools as ct
    from coremltools.converters.mil.frontend.milproto.load import load as load_program

    try:
        spec = ct.utils.load_spec(os.fspath(package))
        return load_program(spec, spec.specificationVersion, os.fspath(weights_dir(package)))
    except Exception as exc:  # the loader raises many types
        raise ExportError(f"{Path(package).name}: coremltools cannot load the saved program back "
                          f"({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})",
                          hint="report it with the model and the coremltools version") from exc


_SHAPE_ONLY = ("cast", "reshape", "squeeze", "identity", "expand_dims")


def logits_producer(program, output: str = "logits") -> List[str]:
    """The op types from ``output`` back to the first op that computes it (through casts and reshapes),
    e.g. ``["cast", "add"]``; its last entry is the op whose result the logits are."""
    fn = program.functions["main"]
    producers = {out.name: op for op in fn.operations for out in op.outputs}
    chain, name = [], output
    while name in producers:
        op = producers[name]
        chain.append(op.op_type)
        if op.op_type not in _SHAPE_ONLY:
            break
        name = op.inputs["x"].name
    return chain


def check_float_logits(program, package: str | os.PathLike, output: str = "logits") -> List[str]:
    """Refuse a program whose logits come out of a ``dequantize`` (the logits were quantized): a logit grid
    step of a few hundredths flips near-tie top-1 predictions on its own. Returns the producer chain."""
    chain = logits_producer(program, output)
    if not chain or chain[-1] == "dequantize":
        raise ExportError(f"{Path(package).name}: the logits are quantized ({' <- '.join(chain) or 'no producer'})",
                          hint="the classifier must keep a float output; report the architecture")
    return chain
