"""Small types shared by every exporter and by the top layer (which imports them from here)."""
from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    """Numeric precision of an exported artefact.

    ``INT8_WEIGHTS`` is weight-only 8-bit (activations stay float); it is named apart from ``INT8``
    (weights and activations quantized) so a manifest never calls weight compression "int8".
    """

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT8_WEIGHTS = "int8-weights"

    def __str__(self) -> str:  # argparse / f-strings show "fp32", not "Precision.FP32"
        return self.value


class ExportError(Exception):
    """An exporter could not produce its file. ``hint`` says what the user can do."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class ToolchainMissing(ExportError):
    """A runtime/toolchain this step needs is not installed on this machine."""
