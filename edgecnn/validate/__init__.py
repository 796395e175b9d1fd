"""The validator: run an artefact on its runtime, compare with the PyTorch FP32 reference on held-out inputs
(``exporters.parity``: metrics and gate), and time it where it runs (``latency``). Runners come from the
targets; this package takes a runner, never a target."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from exporters import parity
from exporters.parity import Parity
from exporters.runner import run_batched

from .latency import Latency, machine_description, measure_latency, time_runs

REFERENCE_FILE = "reference.npz"


def torch_reference(model, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """PyTorch FP32 outputs (eval mode, no grad): the truth every artefact is compared with."""
    import torch

    model.eval()
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(inputs[i:i + batch]))).numpy()
                               for i in range(0, len(inputs), batch)]).astype(np.float32)


def fp64_outputs(model, inputs: np.ndarray, indices: Sequence[int]) -> np.ndarray:
    """The same model in FP64 on the inputs at ``indices``: PyTorch FP32's own rounding error on an
    ill-conditioned net is measured against it (an FP32 artefact cannot be asked to match the FP32 reference
    more closely than the reference matches the exact result)."""
    import copy

    import torch

    m64 = copy.deepcopy(model).double().eval()
    x = torch.from_numpy(np.ascontiguousarray(inputs[np.asarray(indices, dtype=int)])).double()
    with torch.no_grad():
        return m64(x).numpy()


def check_parity(runner, inputs: np.ndarray, reference: np.ndarray, precision: str, *, trained: bool,
                 labels: Optional[Sequence[int]] = None, gate: Optional[parity.Gate] = None,
                 batch: int = 16, noise_floor=None) -> Parity:
    """Run, compare, gate. ``noise_floor``: a recorded float (bundle validation), or a callable(indices)
    returning FP64 outputs on those samples (export time); used only when an FP32 artefact misses the plain
    1e-4 bar (``exporters.parity.apply_gate``)."""
    outputs = run_batched(runner, inputs, batch)
    p = parity.apply_gate(parity.compare(reference, outputs, labels=labels), precision, trained, gate)
    if str(precision) == "fp32" and not p.passed and not p.nonfinite and noise_floor is not None:
        if callable(noise_floor):
            per_sample = np.abs(outputs.reshape(len(outputs), -1) - reference.reshape(len(reference), -1)).max(1)
            worst = np.argsort(-per_sample)[:8]  # measure the floor where the artefact deviates most
            exact = np.asarray(noise_floor(worst), dtype=np.float64)
            scale = float(np.abs(reference).max()) or 1.0
            p.fp32_noise_floor = float(np.abs(reference[worst] - exact).max() / scale)
            p.fp32_error_vs_fp64 = float(np.abs(outputs[worst] - exact).max() / scale)
        else:
            p.fp32_noise_floor = float(noise_floor)
        p = parity.apply_gate(p, precision, trained, gate)
    return p


__all__ = ["Parity", "Latency", "check_parity", "measure_latency", "torch_reference", "time_runs",
           "machine_description", "fp64_outputs", "REFERENCE_FILE"]
