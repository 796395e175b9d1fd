"""Errors of the exporters layer. ``edgecnn`` maps each to its exit-code family (``edgecnn.errors``)."""
from __future__ import annotations


class ExportError(Exception):
    """An exporter, quantizer or runtime could not do its job. ``hint`` says what the user can do."""

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.hint = hint


class ToolchainMissing(ExportError):
    """A runtime or toolchain this step needs is not installed on this machine."""


class ModelFileError(ExportError):
    """A model file handed to a runner cannot be loaded (not that format, or damaged)."""


class UnsupportedOp(ExportError):
    """A model uses an operation this runtime (e.g. the Core ML reference executor) does not implement."""
