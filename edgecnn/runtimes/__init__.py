"""Runtime adapters: load an artefact's model file and run float32 NCHW batches through it.

Each runner exposes ``run(x) -> np.ndarray`` (logits), ``load_seconds`` and ``describe()`` (which
runtime, version, providers/compute units, threads), so the validator treats them alike.
"""
