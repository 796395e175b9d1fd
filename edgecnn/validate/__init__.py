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


def check_parity(runner, inputs: np.ndarray, reference: np.ndarray, precision: str, *, trained: bool,
                 labels: Optional[Sequence[int]] = None, min_agreement: float = 0.99, batch: int = 16) -> Parity:
    outputs = run_batched(runner.run, inputs, batch)
    return apply_gate(compare(reference, outputs, labels=labels), precision, trained=trained,
                      min_agreement=min_agreement)


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
           "run_batched", "machine_description", "REFERENCE_FILE"]
