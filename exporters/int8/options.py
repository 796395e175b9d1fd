"""The INT8 engine's options: each with its type, default and help stated once, here.

``edgecnn`` builds the ``--target-option int8.<name>=VALUE`` parsing and the ``edgecnn export --help`` text
from these fields (``metadata["help"]``, ``metadata["choices"]``), so what the CLI advertises is what the
engine reads. Imports nothing heavy.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

RANGE_METHODS = ("minmax", "percentile", "entropy", "mse")
WEIGHT_ROUNDINGS = ("gptq", "nearest")


def option(default, help: str, choices: Tuple[str, ...] = ()):
    """A dataclass field with its help text (and accepted values) beside its default."""
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    if isinstance(default, tuple):
        return field(default_factory=lambda: tuple(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class Int8Options:
    max_drop: float = option(1.0, "gate on trained weights: the most top-1 accuracy (percentage points) INT8 may "
                                  "lose, measured with labels or estimated from FP32's confidence without")
    min_agreement: Optional[float] = option(None, "opt-in stricter gate: top-1 agreement with FP32 on held-out "
                                                  "images (a fraction, e.g. 0.99)")
    ranges: str = option("minmax", "activation range estimation (ranges are cached per model and calibration set)",
                         RANGE_METHODS)
    weight_rounding: str = option("gptq", "INT8 weights: gptq = error-compensated on the calibration images, "
                                          "nearest = plain rounding", WEIGHT_ROUNDINGS)
    bias_correction: bool = option(True, "analytic bias correction of the weights' rounding (recipes that have it)")
    empirical_bias_correction: bool = option(True, "damped empirical bias correction after the fallback "
                                                   "(recipes that have analytic bias correction)")
    fallback: bool = option(True, "per-layer sensitivity analysis and float fallback")
    keep_float: Tuple[str, ...] = option((), "layers kept float from the start, besides the recipe's own (ONNX node "
                                             "names; Core ML: module names such as features.2.0)")
    batch_phase: bool = option(True, "fallback: after the SQNR phase, add ranked layers a batch at a time while "
                                     "the bar is missed")
    fallback_batch: int = option(4, "fallback: layers floated per batch-phase step")
    max_float_fraction: float = option(0.34, "fallback: at most this fraction of the candidate layers float")
    min_speedup: float = option(1.1, "fallback: float layers may not take INT8 below this speed-up over FP32 "
                                     "(where the recipe is timed on this machine)")
    probe_images: int = option(256, "fallback: most probe images")
    probe_split: bool = option(True, "fallback: probe on calibration photos left out of the search's ranges")
    sensitivity_seconds: float = option(240.0, "fallback: time budget of the sensitivity pass and of each phase")

    def check(self) -> None:
        """Refuse values no code path accepts (raises ValueError naming the option)."""
        if self.ranges not in RANGE_METHODS:
            raise ValueError(f"int8.ranges={self.ranges!r}: use one of {', '.join(RANGE_METHODS)}")
        if self.weight_rounding not in WEIGHT_ROUNDINGS:
            raise ValueError(f"int8.weight_rounding={self.weight_rounding!r}: use one of {', '.join(WEIGHT_ROUNDINGS)}")
        if self.min_agreement is not None and not 0.0 <= self.min_agreement <= 1.0:
            raise ValueError(f"int8.min_agreement={self.min_agreement!r}: a fraction in [0, 1]")
        if not 0.0 <= self.max_drop <= 100.0:   # also refuses NaN
            raise ValueError(f"int8.max_drop={self.max_drop!r}: percentage points in [0, 100]")
        if not 0.0 < self.max_float_fraction <= 1.0:
            raise ValueError(f"int8.max_float_fraction={self.max_float_fraction!r}: a fraction in (0, 1]")
        self._check_counts()

    def gate(self):
        """The parity gate's settings (``exporters.parity.Gate``; the drop as a fraction)."""
        from ..parity import Gate

        return Gate(max_drop=self.max_drop / 100.0, min_agreement=self.min_agreement)

    def _check_counts(self) -> None:
        for name in ("fallback_batch", "probe_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"int8.{name}={getattr(self, name)!r}: at least 1")
        for name in ("min_speedup", "sensitivity_seconds"):
            if not getattr(self, name) >= 0:   # also refuses NaN
                raise ValueError(f"int8.{name}={getattr(self, name)!r}: a number >= 0")
