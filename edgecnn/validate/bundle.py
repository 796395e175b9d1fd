"""Validate a finished bundle on this machine from its own ``reference.npz`` (no torch, no images)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from calibration import InputSpec, normalize

from .. import artefact, targets
from ..errors import InputError, IntegrityError
from . import REFERENCE_FILE, check_parity, measure_latency


def validate_bundle(root: str | Path, *, threads: int = 1, latency: bool = True, min_agreement: float = 0.99) -> dict:
    """Verify hashes, run the model on the bundled reference inputs, gate, time. Returns a results dict."""
    root = Path(root)
    manifest = artefact.verify(root)  # refuses a tampered bundle before running anything in it
    tgt = targets.get(manifest["target"])
    ref_path = root / manifest.get("reference_file", REFERENCE_FILE)
    if not ref_path.exists():
        raise IntegrityError(f"{ref_path} is missing", hint="re-export: bundles carry their reference outputs")
    with np.load(ref_path, allow_pickle=False) as ref:
        pixels, reference = ref["pixels"], ref["reference"]
        labels = ref["labels"] if "labels" in ref.files else None  # written when the eval images were labelled
    spec = InputSpec.from_dict(manifest["input"])
    inputs = normalize(pixels, spec)
    runner = tgt.open_runner(root, manifest, threads=threads)
    if runner is None:
        return {"status": "pending", "reason": tgt.runtime_unavailable_reason(manifest)}
    parity = check_parity(runner, inputs, reference, manifest["precision"], trained=manifest["weights"]["pretrained"],
                          labels=labels, min_agreement=min_agreement,
                          noise_floor=(manifest.get("parity") or {}).get("fp32_noise_floor"))
    result = {"status": "validated" if parity.passed else "failed", "parity": parity.to_dict(),
              "runtime": runner.describe()}
    if latency and parity.passed and getattr(runner, "latency_reason", None):
        result["latency"] = {"not_measured": runner.latency_reason}
    elif latency and parity.passed:
        result["latency"] = measure_latency(runner, spec.shape)
    return result
