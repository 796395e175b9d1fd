"""The target names and their aliases, in a module that imports nothing heavy.

``edgecnn.targets`` (which imports onnx, coremltools …) uses these; so do the store and the matrix
defaults, which must stay importable on a machine that only pulls artefacts.
"""
from __future__ import annotations

from enum import Enum


class TargetName(str, Enum):
    """A deployment target. A ``str`` enum: it compares equal to its value, and manifests carry the text."""

    ONNX = "onnx"
    TRT = "trt"
    COREML = "coreml"

    def __str__(self) -> str:
        return self.value


TARGET_NAMES = tuple(t.value for t in TargetName)   # the names the CLI and Makefile accept
TARGET_ALIASES = {"tensorrt": "trt", "coremltools": "coreml", "mlpackage": "coreml", "ort": "onnx",
                  "onnxruntime": "onnx"}


def canonical_target(name: str) -> str:
    key = (name or "").strip().lower()
    return TARGET_ALIASES.get(key, key)
