"""Validate a finished bundle on this machine from its own ``reference.npz`` (no torch, no source images)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from calibration import InputSpec, normalize
from exporters.parity import Gate

from ..errors import IntegrityError
from . import REFERENCE_FILE, check_parity
from .latency import measure_latency


def load_reference(root: Path, manifest: dict) -> tuple:
    """(normalised inputs, PyTorch FP32 outputs, labels or None) from the bundle's reference file."""
    ref_path = Path(root) / manifest.get("reference_file", REFERENCE_FILE)
    if not ref_path.exists():
        raise IntegrityError(f"{ref_path} is missing", hint="re-export: bundles carry their reference outputs")
    with np.load(ref_path, allow_pickle=False) as ref:
        pixels, reference = ref["pixels"], ref["reference"]
        labels = ref["labels"] if "labels" in ref.files else None  # written when the eval images were labelled
    return normalize(pixels, InputSpec.from_dict(manifest["input"])), reference, labels


def validate_bundle(root: str | Path, manifest: dict, runner, *, latency: bool = True,
                    gate: Optional[Gate] = None) -> dict:
    """Run ``runner`` (opened on the bundle's model) on the bundled reference inputs, gate, time.
    ``manifest``: the bundle's verified manifest; ``gate``: default the one the export was judged by."""
    inputs, reference, labels = load_reference(Path(root), manifest)
    recorded = manifest.get("parity") or {}
    gate = gate or Gate.from_dict((manifest.get("recipe") or {}).get("gate"))
    parity = check_parity(runner, inputs, reference, manifest["precision"], trained=manifest["weights"]["pretrained"],
                          labels=labels, gate=gate, noise_floor=recorded.get("fp32_noise_floor"))
    result = {"status": "validated" if parity.passed else "failed", "parity": parity.to_dict(),
              "runtime": runner.describe()}
    if latency and parity.passed and runner.latency_reason:
        result["latency"] = {"not_measured": runner.latency_reason}
    elif latency and parity.passed:
        result["latency"] = measure_latency(runner, InputSpec.from_dict(manifest["input"]).shape)
    return result
