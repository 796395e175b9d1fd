"""Registry of deployment targets. A target not built yet answers with a clear error."""
from __future__ import annotations

import difflib
from typing import Dict

from ..errors import UsageError
from .base import BuildContext, BuildOutput, ExportOptions, Target
from .coreml import CoreMLTarget
from .onnx import OnnxTarget
from .trt import TrtTarget

from ..target_names import TARGET_ALIASES as _ALIASES
from ..target_names import TARGET_NAMES
_TARGETS: Dict[str, Target] = {"onnx": OnnxTarget(), "trt": TrtTarget(), "coreml": CoreMLTarget()}


def register(target: Target) -> None:
    _TARGETS[target.name] = target


def get(name: str) -> Target:
    key = (name or "").strip().lower()
    key = _ALIASES.get(key, key)
    if key in _TARGETS:
        return _TARGETS[key]
    if key in TARGET_NAMES:
        raise UsageError(f"target {key!r} is not yet supported in this version of edgecnn",
                         hint=f"available now: {', '.join(sorted(_TARGETS))}")
    close = difflib.get_close_matches(key, list(TARGET_NAMES) + list(_ALIASES), n=2, cutoff=0.5)
    raise UsageError(f"unknown target {name!r}" + (f" — did you mean {' or '.join(close)}?" if close else ""),
                     hint=f"targets: {', '.join(TARGET_NAMES)}")


def check_precision(target: Target, precision: str) -> str:
    p = (precision or "").strip().lower()
    if p not in target.precisions:
        all_known = ("fp32", "fp16", "int8", "int8-weights")
        what = "unknown precision" if p not in all_known else f"precision {p!r} is not supported for target"
        raise UsageError(f"{what} {precision!r}" if p not in all_known else f"{what} {target.name!r}",
                         hint=f"{target.name} supports: {', '.join(target.precisions)}")
    return p


__all__ = ["BuildContext", "BuildOutput", "ExportOptions", "Target", "TARGET_NAMES", "get", "register",
           "check_precision"]
