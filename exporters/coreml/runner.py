"""Core ML runners: the reference executor (anywhere) and ``MLModel.predict`` (macOS only).

Both take normalised float32 NCHW batches and return logits. For an image-input program the batch is
turned back into 8-bit pixels first (what a ``CVPixelBuffer`` holds: exact for inputs that came from 8-bit
images). ``open_runner`` picks the real Core ML runtime where it exists and the reference executor elsewhere.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Optional

import numpy as np

from ..errors import ModelFileError, ExportError
from ..runner import Runner
from . import mil_reference
from .export import IMAGE_INPUT, LOGITS, import_coremltools

COMPUTE_UNITS = ("ALL", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")


def to_pixels(x: np.ndarray, spec) -> np.ndarray:
    """Normalised NCHW -> the 0..255 pixel values (as float32, rounded to integers) an image input sees."""
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    return np.clip(np.rint((x * std + mean) / np.float32(spec.scale)), 0, 255).astype(np.float32)


def apple_runtime_available() -> bool:
    """True on macOS with coremltools' native runtime (``MLModel.predict`` works)."""
    if platform.system() != "Darwin":
        return False
    try:
        import coremltools.libcoremlpython  # noqa: F401
    except ImportError:
        return False
    return True


class CoreMLReferenceRunner(Runner):
    """The reference executor (``exporters.coreml.mil_reference``) as a runner. Its speed says nothing about
    Apple hardware, so it declares its latency unmeasurable (``latency_reason``)."""

    latency_reason = "not measured (needs Apple hardware): the Core ML runtime exists only on macOS/iOS"

    def __init__(self, package: str | os.PathLike, *, spec=None, image: bool = False, threads: int = 1):
        t0 = time.perf_counter()
        self.program = mil_reference.CoreMLProgram(package)
        self.load_seconds = time.perf_counter() - t0
        self.spec, self.image, self.threads = spec, image, threads
        if len(self.program.inputs) != 1:
            raise ModelFileError(f"{package}: expected one input, found {list(self.program.inputs)}")
        self.input_name = next(iter(self.program.inputs))
        if image and spec is None:
            raise ValueError("an image-input program needs the InputSpec to undo normalisation")

    def run(self, x: np.ndarray) -> np.ndarray:
        import torch

        x = np.asarray(x, dtype=np.float32)
        if self.image:
            x = to_pixels(x, self.spec)
        before = torch.get_num_threads()
        if before != self.threads:
            torch.set_num_threads(self.threads)  # like onnxruntime's intra-op threads; restored below
        try:
            outs = [np.asarray(self.program.run({self.input_name: x[i:i + 1]})[LOGITS], np.float32)
                    for i in range(len(x))]
        finally:
            if before != self.threads:
                torch.set_num_threads(before)
        return np.concatenate(outs).reshape(len(x), -1)

    def describe(self) -> dict:
        return {"runtime": mil_reference.RUNTIME_NAME, "version": mil_reference._ct_version(),
                "executes": "MIL program interpreted in FP32 with each op output rounded to its declared dtype "
                            "(FP16 storage mimicked)", "model": self.program.path.name, "opset": self.program.opset,
                "threads": self.threads, "compute_units": "n/a (no Core ML runtime on this OS)",
                "kernels": "torch (conv, pool, linear, elementwise, reductions, quantize/dequantize), NumPy (the rest)",
                "malloc": mil_reference.MALLOC_SETTING}

    def close(self) -> None:
        self.program = None


class CoreMLPredictRunner(Runner):
    """Real Core ML (macOS only): ``MLModel.predict`` with the chosen compute units. Not exercised on Linux
    (no runtime there); kept small so it is easy to check on a Mac."""

    def __init__(self, package: str | os.PathLike, *, spec, image: bool, compute_units: str = "ALL"):
        ct = import_coremltools()
        units = getattr(ct.ComputeUnit, compute_units.upper(), None)
        if units is None:
            raise ExportError(f"unknown Core ML compute units {compute_units!r}", hint=", ".join(COMPUTE_UNITS))
        t0 = time.perf_counter()
        self.model = ct.models.MLModel(os.fspath(package), compute_units=units)
        self.load_seconds = time.perf_counter() - t0
        self.spec, self.image, self.compute_units = spec, image, compute_units.upper()
        self._version = ct.__version__

    def run(self, x: np.ndarray) -> np.ndarray:
        from PIL import Image

        x = np.asarray(x, np.float32)
        outs = []
        if self.image:
            pixels = to_pixels(x, self.spec).astype(np.uint8).transpose(0, 2, 3, 1)
            for p in pixels:
                img = Image.fromarray(p if p.shape[-1] == 3 else p[..., 0], "RGB" if p.shape[-1] == 3 else "L")
                outs.append(np.asarray(self.model.predict({IMAGE_INPUT: img})[LOGITS]))
        else:
            for i in range(len(x)):
                outs.append(np.asarray(self.model.predict({self.spec.name: x[i:i + 1]})[LOGITS]))
        return np.concatenate(outs).astype(np.float32).reshape(len(x), -1)

    def describe(self) -> dict:
        return {"runtime": "coreml", "version": self._version, "compute_units": self.compute_units,
                "os": platform.platform(), "threads": "n/a"}

    def close(self) -> None:
        self.model = None


def open_runner(package: str | os.PathLike, spec, *, image: bool, threads: int = 1,
                compute_units: Optional[str] = None) -> Runner:
    """Core ML itself on macOS, the reference executor elsewhere."""
    if apple_runtime_available():
        return CoreMLPredictRunner(package, spec=spec, image=image, compute_units=compute_units or "ALL")
    return CoreMLReferenceRunner(package, spec=spec, image=image, threads=threads)
