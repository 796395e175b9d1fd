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


ACCUMULATION_MODES = {"fp32": "FP32 accumulation (CPU-like): each op computed in FP32, its output rounded to its "
                              "declared dtype",
                      "fp16": "FP16 accumulation (Neural-Engine-like): conv/linear/matmul/reduce sums of FP16-typed "
                              "ops accumulated in FP16 in chunks, the rest as in FP32 accumulation"}


class CoreMLReferenceRunner(Runner):
    """The reference executor (``exporters.coreml.mil_reference``) as a runner. Its speed says nothing about
    Apple hardware, so it declares its latency unmeasurable (``latency_reason``). ``accumulation``: "fp32"
    (CPU-like, the default) or "fp16" (Neural-Engine-like), the two ends of the bracket a device lies in."""

    latency_reason = "not measured (needs Apple hardware): the Core ML runtime exists only on macOS/iOS"

    def __init__(self, package: str | os.PathLike, *, spec=None, image: bool = False, threads: int = 1,
                 accumulation: str = "fp32"):
        t0 = time.perf_counter()
        self.program = mil_reference.CoreMLProgram(package, accumulation=accumulation)
        self.load_seconds = time.perf_counter() - t0
        self.spec, self.image, self.threads, self.accumulation = spec, image, threads, accumulation
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
        d = {"runtime": mil_reference.RUNTIME_NAME, "version": mil_reference._ct_version(),
             "executes": "MIL program interpreted; " + ACCUMULATION_MODES[self.accumulation],
             "accumulation": self.accumulation, "model": self.program.path.name, "opset": self.program.opset,
             "threads": self.threads, "compute_units": "n/a (no Core ML runtime on this OS)",
             "kernels": "torch (conv, pool, linear, elementwise, reductions, quantize/dequantize), NumPy (the rest)",
             "malloc": mil_reference.MALLOC_SETTING}
        if self.accumulation == "fp16":
            d["chunks"] = self.program.chunks.describe()
        return d

    def close(self) -> None:
        self.program = None


def compute_unit(ct, name: str):
    """``coremltools.ComputeUnit`` called ``name`` (ALL, CPU_ONLY, CPU_AND_GPU, CPU_AND_NE)."""
    units = getattr(ct.ComputeUnit, str(name).upper(), None)
    if units is None:
        raise ExportError(f"unknown Core ML compute units {name!r}", hint=", ".join(COMPUTE_UNITS))
    return units


class CoreMLPredictRunner(Runner):
    """Real Core ML (macOS only): ``MLModel.predict`` with the chosen compute units.

    NOT RUN BY US YET: no Mac was available where this was written. The calls follow coremltools' documented
    API (``MLModel(path, compute_units=...)``, ``predict(dict)`` with a PIL image for an image input) and are
    checked against the installed coremltools' own signatures by a contract test
    (``tests/test_coreml_mac_contract.py``), which is no validation of the runtime itself."""

    def __init__(self, package: str | os.PathLike, *, spec, image: bool, compute_units: str = "ALL"):
        ct = import_coremltools()
        units = compute_unit(ct, compute_units)
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
            for p in pixels:   # uint8 H x W x 3 reads as RGB, H x W as L (grey)
                img = Image.fromarray(np.ascontiguousarray(p if p.shape[-1] == 3 else p[..., 0]))
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


def compute_plan(model, compute_units: str, max_listed: int = 20) -> dict:
    """Where Core ML places each op of ``model`` (a loaded ``MLModel``) under ``compute_units``, from
    ``coremltools.models.compute_plan.MLComputePlan`` (macOS 14.4+): op counts and estimated cost share per
    preferred device, and the ops not placed on the Neural Engine. NOT RUN BY US YET (see
    ``CoreMLPredictRunner``); where the API is missing the reason is returned instead."""
    ct = import_coremltools()
    from coremltools.models import compute_device

    kinds = ((compute_device.MLNeuralEngineComputeDevice, "NeuralEngine"), (compute_device.MLGPUComputeDevice, "GPU"),
             (compute_device.MLCPUComputeDevice, "CPU"))

    def kind(device) -> str:
        return next((name for cls, name in kinds if isinstance(device, cls)), type(device).__name__)

    try:
        from coremltools.models.compute_plan import MLComputePlan

        plan = MLComputePlan.load_from_path(path=model.get_compiled_model_path(),
                                            compute_units=compute_unit(ct, compute_units))
        operations = plan.model_structure.program.functions["main"].block.operations
    except Exception as exc:  # older macOS / coremltools: no compute plan
        return {"compute_units": compute_units, "not_available": f"{type(exc).__name__}: {exc}"}
    counts: dict = {}
    cost: dict = {}
    off_ne = []
    for op in operations:
        usage = plan.get_compute_device_usage_for_mlprogram_operation(op)
        if usage is None:   # constants and the like have no placement
            continue
        device = kind(usage.preferred_compute_device)
        counts[device] = counts.get(device, 0) + 1
        estimate = plan.get_estimated_cost_for_mlprogram_operation(op)
        cost[device] = cost.get(device, 0.0) + (estimate.weight if estimate is not None else 0.0)
        if device != "NeuralEngine" and len(off_ne) < max_listed:
            off_ne.append({"op": op.operator_name, "outputs": [o.name for o in op.outputs], "preferred": device,
                           "supported": [kind(d) for d in usage.supported_compute_devices]})
    return {"compute_units": compute_units, "source": "MLComputePlan", "ops_by_preferred_device": counts,
            "estimated_cost_share": {k: round(v, 4) for k, v in cost.items()}, "not_on_neural_engine": off_ne}


def open_runner(package: str | os.PathLike, spec, *, image: bool, threads: int = 1,
                compute_units: Optional[str] = None) -> Runner:
    """Core ML itself on macOS, the reference executor elsewhere."""
    if apple_runtime_available():
        return CoreMLPredictRunner(package, spec=spec, image=image, compute_units=compute_units or "ALL")
    return CoreMLReferenceRunner(package, spec=spec, image=image, threads=threads)
