"""What a deployment target plugs into the pipeline: build files into a staging folder, and open a runner on a
finished bundle (or say honestly that no runtime for it exists on this machine)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from calibration import CalibrationSet, InputSpec
from exporters import Precision

from ..options import ExportOptions


@dataclass
class BuildContext:
    arch: str
    model: Any                           # torch.nn.Module in eval mode, FP32
    spec: InputSpec
    labels: List[str]
    precision: Precision
    calib: CalibrationSet
    eval_inputs: np.ndarray              # held-out inputs (never used for calibration)
    reference: np.ndarray                # PyTorch FP32 outputs on eval_inputs
    trained: bool                        # pretrained/checkpoint weights (accuracy gates are meaningful)
    options: ExportOptions
    metadata: Dict[str, str]             # goes into the model file's own metadata fields
    say: Callable[[str], None] = print   # progress lines for long work
    eval_labels: Optional[np.ndarray] = None   # class indices of eval_inputs when the evaluation set is labelled
    timing_dir: Optional[Path] = None    # latency deferred (the matrix): leave what its timing needs here


# what a deferred timing needs besides the bundle (``BuildContext.timing_dir``)
FP32_FOR_TIMING = "fp32.onnx"                    # the FP32 model an INT8 ONNX model is timed against
INT8_DEFAULTS_FOR_TIMING = "int8-defaults.onnx"  # the INT8 model without the fallback's float layers


@dataclass
class BuildOutput:
    """What a target built; each field has its own place in the manifest (``edgecnn.manifest``)."""

    model_file: str                      # bundle-relative path of the file the validator runs
    files: List[str]                     # every file the target wrote (bundle-relative)
    export: Dict[str, Any] = field(default_factory=dict)   # how it was produced (exporter, opset, nodes …)
    recipe: Dict[str, Any] = field(default_factory=dict)   # precision recipe (``Int8Record`` for INT8)
    pending: Optional[str] = None        # set when validation must happen elsewhere (e.g. on a Jetson)
    failed: Optional[str] = None         # set when a check the target ran itself failed (the bundle is kept
                                         # as <target>-<precision>.failed, like a failed parity gate)
    output: Optional[Dict[str, Any]] = None      # the model's outputs, where a target has more than the logits
    int8: Optional[Dict[str, Any]] = None        # INT8 speed and size against FP32, measured side by side
    tensorrt: Optional[Dict[str, Any]] = None    # the TensorRT section: engine, build recipes, device tool
    coreml: Optional[Dict[str, Any]] = None      # the Core ML section: variants, metadata
    local_checks: List[Dict[str, Any]] = field(default_factory=list)   # checks of a pending bundle run here


class Target:
    name: str = ""
    precisions: Tuple[Precision, ...] = ()
    description: str = ""

    def build(self, ctx: BuildContext, staging: Path) -> BuildOutput:
        raise NotImplementedError

    def open_runner(self, bundle: Path, manifest: dict, threads: int = 1):
        """A runner (``exporters.runner.Runner``) on the bundle's model here, or None when no runtime exists here."""
        raise NotImplementedError

    def runtime_unavailable_reason(self, manifest: dict) -> str:
        return f"no {self.name} runtime on this machine"

    def validate_on_device(self, bundle: Path, manifest: dict, *, latency: bool = True) -> Optional[dict]:
        """A validation of its own on this machine, where the target's device run differs from one runner on the
        reference inputs (Core ML on a Mac: every compute unit); None: validate with ``open_runner``."""
        return None
