"""The onnxruntime runner: the only place an onnxruntime inference session is opened.

CPU here; CUDA/TensorRT execution providers where installed. Besides the logits it can expose named
intermediate tensors (``tensors=``: bias correction and weight rounding read layer inputs and outputs), run
without graph optimisations (``optimize=False``: each Conv's output before requantization stays visible),
and write the graph onnxruntime actually runs (``optimized_graph``).
"""
from __future__ import annotations

import os
import tempfile
import time
from typing import Dict, Iterable, Iterator, Optional, Sequence, Tuple

import numpy as np

from ..errors import ModelFileError
from ..runner import Runner


def with_outputs(src: str | os.PathLike, names: Sequence[str], dst: str | os.PathLike) -> None:
    """Copy the ONNX model ``src`` to ``dst`` with the tensors ``names`` added as graph outputs."""
    import onnx

    model = onnx.load(os.fspath(src))
    have = {o.name for o in model.graph.output}
    for t in names:
        if t not in have:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    onnx.save(model, os.fspath(dst))


class OnnxRuntimeRunner(Runner):
    """``run(x) -> logits`` on one onnxruntime session.

    ``tensors``: intermediate tensors to expose (``run_tensors``); the session then runs a temporary copy of
    the model with those as extra outputs. ``optimize``: onnxruntime's graph optimisations (default on)."""

    def __init__(self, path: str | os.PathLike, *, threads: int = 1, providers: Optional[Sequence[str]] = None,
                 tensors: Sequence[str] = (), optimize: bool = True, optimized_model_path: Optional[str] = None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if not optimize:
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if optimized_model_path:
            opts.optimized_model_filepath = optimized_model_path
        self.path, self.threads = os.fspath(path), threads
        self.providers = list(providers or ["CPUExecutionProvider"])
        t0 = time.perf_counter()
        try:
            if tensors:
                with tempfile.TemporaryDirectory(prefix="edgecnn-tensors-") as tmp:
                    exposed = os.path.join(tmp, "tensors.onnx")
                    with_outputs(self.path, tensors, exposed)
                    self.session = ort.InferenceSession(exposed, opts, providers=self.providers)
            else:
                self.session = ort.InferenceSession(self.path, opts, providers=self.providers)
        except Exception as exc:  # onnxruntime raises its own pybind types (InvalidProtobuf, Fail, ...)
            detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise ModelFileError(f"{self.path}: onnxruntime cannot load it as an ONNX model ({detail})",
                                 hint="the file is not ONNX or is damaged: re-export it") from None
        self.load_seconds = time.perf_counter() - t0
        first = self.session.get_inputs()[0]
        self.input_name, self.input_type = first.name, first.type
        self.output_name = self.session.get_outputs()[0].name
        wanted = set(tensors)
        self.tensor_names = [o.name for o in self.session.get_outputs() if o.name in wanted]
        self._version = ort.__version__

    def _feed(self, x: np.ndarray) -> dict:
        x = np.ascontiguousarray(x, dtype=np.float16 if self.input_type == "tensor(float16)" else np.float32)
        return {self.input_name: x}

    def run(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run([self.output_name], self._feed(x))[0], dtype=np.float32)

    def run_tensors(self, x: np.ndarray) -> Tuple[np.ndarray, Dict[str, np.ndarray]]:
        """(logits, {exposed tensor: value}) for one batch."""
        outs = self.session.run([self.output_name, *self.tensor_names], self._feed(x))
        return np.asarray(outs[0], dtype=np.float32), dict(zip(self.tensor_names, outs[1:]))

    def describe(self) -> dict:
        return {"runtime": "onnxruntime", "version": self._version, "providers": self.session.get_providers(),
                "threads": self.threads}

    def close(self) -> None:
        self.session = None


def run_onnx(path: str | os.PathLike, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    """Logits of the ONNX model at ``path`` on ``inputs`` (one CPU thread), in batches of ``batch``."""
    from ..runner import run_batched

    with OnnxRuntimeRunner(path) as runner:
        return run_batched(runner, inputs, batch)


def iter_tensors(model_path: str | os.PathLike, batches: Iterable[np.ndarray], tensors: Sequence[str], *,
                 max_images: int = 128) -> Iterator[Tuple[int, Dict[str, np.ndarray]]]:
    """``(images, {tensor: value})`` per batch: named intermediate tensors of a float run over at most
    ``max_images`` images, one batch at a time (memory stays at one batch's tensors)."""
    from ..errors import ExportError

    seen = 0
    with OnnxRuntimeRunner(model_path, tensors=tensors) as runner:
        for b in batches:
            if seen >= max_images:
                break
            b = np.asarray(b, dtype=np.float32)[: max_images - seen]
            yield len(b), runner.run_tensors(b)[1]
            seen += len(b)
    if seen == 0:
        raise ExportError("no calibration images to compute tensor statistics from",
                          hint="check the calibration images (every one may have been skipped)")


def optimized_graph(path: str | os.PathLike):
    """The graph onnxruntime CPU actually runs (every optimisation on), as an ``onnx.ModelProto``."""
    import onnx

    with tempfile.TemporaryDirectory(prefix="edgecnn-opt-") as tmp:
        target = os.path.join(tmp, "optimized.onnx")
        OnnxRuntimeRunner(path, optimized_model_path=target).close()
        return onnx.load(target)
