"""onnxruntime runner (CPU here; CUDA/TensorRT execution providers where installed)."""
from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import numpy as np


class OnnxRuntimeRunner:
    def __init__(self, path: str | os.PathLike, *, threads: int = 1, providers: Optional[Sequence[str]] = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        self.threads = threads
        self.providers = list(providers or ["CPUExecutionProvider"])
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(os.fspath(path), opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
            from ..errors import InputError

            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise InputError(f"{path}: onnxruntime cannot load it as an ONNX model ({detail})",
                             hint="the file is not ONNX or is damaged: re-export it") from None
        self.load_seconds = time.perf_counter() - t0
        self.input_name = self.session.get_inputs()[0].name
        self.input_type = self.session.get_inputs()[0].type
        self._version = ort.__version__

    def run(self, x: np.ndarray) -> np.ndarray:
        if self.input_type == "tensor(float16)":
            x = x.astype(np.float16)
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x)})[0]
        return np.asarray(out, dtype=np.float32)

    def describe(self) -> dict:
        return {"runtime": "onnxruntime", "version": self._version, "providers": self.session.get_providers(),
                "threads": self.threads}
