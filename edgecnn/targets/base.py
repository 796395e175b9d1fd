"""What a deployment target plugs into the pipeline: build files into a staging folder, and open a
runner on a finished bundle (or say honestly that no runtime for it exists on this machine)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from calibration import CalibrationSet, InputSpec


@dataclass
class ExportOptions:
    opset: int = 17
    onnx_exporter: str = "auto"          # auto | torchscript | dynamo
    simplify: bool = True
    seed: int = 0
    calib_size: int = 256
    eval_size: int = 96
    threads: int = 1                     # latency threads (1: two never beat one on a shared 2-core box)
    latency: bool = True
    int8_min_agreement: float = 0.99
    extra: Dict[str, Any] = field(default_factory=dict)  # target-specific options (e.g. ios=17, trt_version)

    def number(self, key: str, default: float, kind: type = float):
        """A numeric target option (``--target-option KEY=VALUE``) as ``kind``, or one clear usage error
        naming the option (a typo'd value would otherwise surface as an "unexpected ValueError" mid-export)."""
        value = self.extra.get(key, default)
        try:
            return kind(value)
        except (TypeError, ValueError):
            from ..errors import UsageError

            raise UsageError(f"target option {key}={value!r} is not a {'whole ' if kind is int else ''}number",
                             hint=f"e.g. --target-option {key}={default}") from None


@dataclass
class BuildContext:
    arch: str
    model: Any                           # torch.nn.Module in eval mode, FP32
    spec: InputSpec
    labels: List[str]
    precision: str
    calib: CalibrationSet
    eval_inputs: np.ndarray              # held-out inputs (never used for calibration)
    reference: np.ndarray                # PyTorch FP32 outputs on eval_inputs
    trained: bool                        # pretrained/checkpoint weights (accuracy gates are meaningful)
    options: ExportOptions
    metadata: Dict[str, str]             # goes into the model file's own metadata fields
    say: Callable[[str], None] = print   # progress lines for long work


@dataclass
class BuildOutput:
    model_file: str                      # bundle-relative path of the file the validator runs
    files: List[str]                     # every file the target wrote (bundle-relative)
    export: Dict[str, Any] = field(default_factory=dict)   # how it was produced (exporter, opset, nodes …)
    recipe: Dict[str, Any] = field(default_factory=dict)   # precision recipe (quantization details)
    pending: Optional[str] = None        # set when validation must happen elsewhere (e.g. on a Jetson)
    failed: Optional[str] = None         # set when a check the target ran itself failed (the bundle is kept
                                         # as <target>-<precision>.failed, like a failed parity gate)
    extra: Dict[str, Any] = field(default_factory=dict)    # more manifest fields, target-specific


class Target:
    name: str = ""
    precisions: Tuple[str, ...] = ()
    description: str = ""

    def build(self, ctx: BuildContext, staging: Path) -> BuildOutput:
        raise NotImplementedError

    def open_runner(self, bundle: Path, manifest: dict, threads: int = 1):
        """A runner for the bundle's model on this machine, or None when no runtime exists here."""
        raise NotImplementedError

    def runtime_unavailable_reason(self, manifest: dict) -> str:
        return f"no {self.name} runtime on this machine"
