"""The one call shape of every runner (onnxruntime, TensorRT, the Core ML reference executor, Core ML
predict), in the manner of Polygraphy's runners: open (the constructor), ``run(batch) -> outputs``,
``describe()``, ``close()``. Comparison (``exporters.parity``) and timing (``edgecnn.validate.latency``)
stay apart from the runners, so every runtime is judged and timed by the same code.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


class Runner:
    """Base of the runners. Subclasses open their runtime in ``__init__`` and set ``load_seconds``.

    ``latency_reason``: None when timing this runner measures the artefact's real speed; otherwise why its
    timings mean nothing (e.g. the Core ML reference executor on Linux says nothing of an iPhone)."""

    load_seconds: float = 0.0
    latency_reason: Optional[str] = None

    def run(self, batch: np.ndarray) -> np.ndarray:
        """float32 N x C x H x W in, float32 N x classes logits out."""
        raise NotImplementedError

    def describe(self) -> dict:
        """Which runtime, its version, providers or compute units, threads."""
        raise NotImplementedError

    def close(self) -> None:
        """Release the session, engine or buffers (idempotent)."""

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_batched(runner, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """``runner.run`` over ``inputs`` in batches of ``batch``, concatenated as float32."""
    return np.concatenate([np.asarray(runner.run(inputs[i:i + batch]), dtype=np.float32)
                           for i in range(0, len(inputs), batch)])
