"""Errors of the calibration layer. They carry the offending path so the CLI can name it."""
from __future__ import annotations


class CalibrationError(Exception):
    """A calibration input cannot be used. ``hint`` says what to do about it."""

    def __init__(self, message: str, hint: str = "", path: str | None = None):
        super().__init__(message)
        self.hint = hint
        self.path = path


class BadImageError(CalibrationError):
    """One image file cannot be decoded."""
