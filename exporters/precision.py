"""The numeric precisions an artefact can have, as one enum used by every layer above ``calibration``."""
from __future__ import annotations

from enum import Enum


class Precision(str, Enum):
    """``INT8_WEIGHTS`` is weight-only 8-bit (activations stay float), named apart from ``INT8`` (weights and
    activations quantized) so that a manifest never calls weight compression "int8". The other weight-only
    precisions say what is stored: ``PALETTIZED8/6/4`` keep each weight tensor as 8/6/4-bit indices into a
    table of 256/64/16 float values (k-means), ``INT4_WEIGHTS`` as 4-bit integers with one scale per block of
    32 input channels (iOS 18); all of them compute in float. A ``str`` enum: it compares equal to its value,
    so manifests and JSON carry the plain text."""

    FP32 = "fp32"
    FP16 = "fp16"
    INT8 = "int8"
    INT8_WEIGHTS = "int8-weights"
    PALETTIZED8 = "palettized8"
    PALETTIZED6 = "palettized6"
    PALETTIZED4 = "palettized4"
    INT4_WEIGHTS = "int4-weights"

    def __str__(self) -> str:
        return self.value

    @property
    def quantized(self) -> bool:
        """Judged by the INT8 gate: every precision below 16-bit float (the list ``exporters.parity.QUANTIZED``)."""
        return self not in (Precision.FP32, Precision.FP16)

    @property
    def is_int8(self) -> bool:
        return self in (Precision.INT8, Precision.INT8_WEIGHTS)
