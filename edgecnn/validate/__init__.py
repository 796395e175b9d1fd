"""The validator: run an artefact on its runtime, compare with the PyTorch FP32 reference on held-out
inputs (parity + gate), and time it where it runs (latency). Polygraphy-style split: runners (in
``edgecnn.runtimes``) are separate from the comparison (``metrics``) and timing (``latency``)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .latency import Latency, exclusive_timing, machine_description, set_timing_guard, time_runs
from .metrics import Parity, apply_gate, compare

REFERENCE_FILE = "reference.npz"


def run_batched(fn, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    return np.concatenate([np.asarray(fn(inputs[i:i + batch]), dtype=np.float32)
                           for i in range(0, len(inputs), batch)])


def torch_reference(model, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """PyTorch FP32 outputs (eval mode, no grad) — the truth every artefact is compared with."""
    import torch

    model.eval()
    with torch.no_grad():
        return run_batched(lambda x: model(torch.from_numpy(np.ascontiguousarray(x))).numpy(), inputs, batch)


def fp64_outputs(model, inputs: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """The exact-ish result: the same model in FP64 on the inputs at ``indices``.

    Used to measure PyTorch FP32's own rounding error on an ill-conditioned net: an FP32 artefact cannot be
    asked to match the FP32 reference more closely than the reference matches the exact result.
    """
    import copy

    import torch

    m64 = copy.deepcopy(model).double().eval()
    x = torch.from_numpy(np.ascontiguousarray(inputs[np.asarray(indices, dtype=int)])).double()
    with torch.no_grad():
        return m64(x).numpy()


def check_parity(runner, inputs: np.ndarray, reference: np.ndarray, precision: str, *, trained: bool,
                 labels: Optional[Sequence[int]] = None, min_agreement: float = 0.99, batch: int = 16,
                 noise_floor=None) -> Parity:
    """Run, compare, gate. ``noise_floor``: a recorded float (bundle validation), or a callable(indices)
    returning FP64 outputs on those samples (export time); used only when an FP32 artefact misses the plain
    1e-4 bar (see ``metrics.apply_gate``)."""
    outputs = run_batched(runner.run, inputs, batch)
    parity = apply_gate(compare(reference, outputs, labels=labels), precision, trained=trained,
                        min_agreement=min_agreement)
    if precision == "fp32" and not parity.passed and not parity.nonfinite and noise_floor is not None:
        if callable(noise_floor):
            per_sample = np.abs(outputs.reshape(len(outputs), -1) - reference.reshape(len(reference), -1)).max(1)
            worst = np.argsort(-per_sample)[:8]  # measure the floor where the artefact deviates most
            exact = np.asarray(noise_floor(worst), dtype=np.float64)
            scale = float(np.abs(reference).max()) or 1.0
            parity.fp32_noise_floor = float(np.abs(reference[worst] - exact).max() / scale)
            parity.fp32_error_vs_fp64 = float(np.abs(outputs[worst] - exact).max() / scale)
        else:
            parity.fp32_noise_floor = float(noise_floor)
        parity = apply_gate(parity, precision, trained=trained, min_agreement=min_agreement)
    return parity


def measure_latency(runner, input_shape: Sequence[int], *, throughput_batch: int = 8, seed: int = 0,
                    max_seconds: float = 6.0) -> dict:
    """Batch-1 latency and a throughput batch, on random inputs of the model's shape."""
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((1, *input_shape)).astype(np.float32)
    xb = rng.standard_normal((throughput_batch, *input_shape)).astype(np.float32)
    with exclusive_timing():
        one = time_runs(lambda: runner.run(x1), 1, max_seconds=max_seconds)
        many = time_runs(lambda: runner.run(xb), throughput_batch, min_runs=10, max_seconds=max_seconds)
    return {"batch1": one.to_dict(), "throughput": many.to_dict(),
            "load_seconds": round(float(getattr(runner, "load_seconds", 0.0)), 4),
            "runtime": runner.describe(), "machine": machine_description()}


__all__ = ["Parity", "Latency", "apply_gate", "compare", "check_parity", "measure_latency", "torch_reference",
           "run_batched", "machine_description", "fp64_outputs", "REFERENCE_FILE"]
