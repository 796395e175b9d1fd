"""The deployment targets (ONNX, TensorRT, Core ML): look one up by name, check a precision against it."""
from __future__ import annotations

import difflib
from typing import Dict

from exporters import Precision

from ..errors import UsageError
from ..target_names import TARGET_ALIASES, TARGET_NAMES, TargetName, canonical_target
from .base import FP32_FOR_TIMING, INT8_DEFAULTS_FOR_TIMING, BuildContext, BuildOutput, Target
from .coreml import CoreMLTarget
from .onnx import OnnxTarget
from ..options import CoreMLOptions, ExportOptions, TrtOptions
from .trt import TrtTarget

_TARGETS: Dict[str, Target] = {t.name: t for t in (OnnxTarget(), TrtTarget(), CoreMLTarget())}


def get(name: str) -> Target:
    """The target called ``name`` (or an alias such as ``tensorrt``); a wrong name suggests the closest."""
    key = canonical_target(name)
    if key in _TARGETS:
        return _TARGETS[key]
    close = difflib.get_close_matches(key, list(TARGET_NAMES) + list(TARGET_ALIASES), n=2, cutoff=0.5)
    raise UsageError(f"unknown target {name!r}" + (f" — did you mean {' or '.join(close)}?" if close else ""),
                     hint=f"targets: {', '.join(TARGET_NAMES)}")


def check_precision(target: Target, precision: str) -> Precision:
    """``precision`` as a ``Precision`` the target supports, or one usage error listing what it does."""
    text = (precision or "").strip().lower()
    try:
        p = Precision(text)
    except ValueError:
        raise UsageError(f"unknown precision {precision!r}",
                         hint=f"{target.name} supports: {', '.join(map(str, target.precisions))}") from None
    if p not in target.precisions:
        raise UsageError(f"precision {p.value!r} is not supported for target {target.name!r}",
                         hint=f"{target.name} supports: {', '.join(map(str, target.precisions))}")
    return p


__all__ = ["BuildContext", "BuildOutput", "CoreMLOptions", "ExportOptions", "Target", "TargetName", "TrtOptions",
           "TARGET_NAMES", "check_precision", "get"]
