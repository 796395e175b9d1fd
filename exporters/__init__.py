"""exporters: one module per target (onnx, tensorrt, coreml). Each takes a module or an ONNX file plus
a small spec and writes files. May use ``calibration``; never imports ``edgecnn``."""
from .common import ExportError, Precision, ToolchainMissing

__all__ = ["ExportError", "Precision", "ToolchainMissing"]
