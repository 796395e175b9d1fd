"""exporters: PyTorch module -> model files for each runtime, grouped by runtime.

``onnx/``, ``tensorrt/`` and ``coreml/`` each hold an exporter, an INT8 recipe and a runner; ``int8/`` is the
one INT8 engine the recipes plug into; ``parity`` computes every metric and gate; ``runner`` is the call
shape every runner follows. May use ``calibration``; never imports ``edgecnn``.
"""
from .errors import ExportError, ModelFileError, ToolchainMissing, UnsupportedOp
from .precision import Precision

__all__ = ["ExportError", "ModelFileError", "Precision", "ToolchainMissing", "UnsupportedOp"]
