"""The INT8 quantizers the benchmarks compare, each run on the same FP32 ONNX model and the same calibration
images, and the figures every one of them is scored by on the same held-out images.

- ``edgecnn``: the pipeline's INT8 engine with the ``ort`` recipe and every default (rounding, bias
  correction, the fallback search aimed at the gate, the speed floor);
- ``ort-minmax`` / ``ort-entropy`` / ``ort-percentile``: onnxruntime's ``quantize_static`` as its docs
  recommend for CPU: ``quant_pre_process`` first, then QDQ, per-channel weights, UINT8 activations and INT8
  weights (U8S8);
- ``nncf``: NNCF's ``nncf.quantize`` on the ONNX model with its defaults;
- ``nncf-ac``: NNCF's ``quantize_with_accuracy_control`` (``max_drop`` 1 point), given labelled validation
  images that are neither the calibration nor the held-out ones.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

ORT_METHODS = {"ort-minmax": "MinMax", "ort-entropy": "Entropy", "ort-percentile": "Percentile"}


@contextlib.contextmanager
def quiet():
    """Keep the libraries' progress bars and warnings off the table."""
    loggers = [logging.getLogger(), logging.getLogger("nncf")]  # nncf logs to its own stdout handler
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


class _Reader:
    """onnxruntime CalibrationDataReader over an N x C x H x W array, 16 images at a time."""

    def __init__(self, name: str, x: np.ndarray):
        self.name, self.x, self.i = name, x, 0

    def get_next(self):
        if self.i >= len(self.x):
            return None
        batch = np.ascontiguousarray(self.x[self.i:self.i + 16], dtype=np.float32)
        self.i += 16
        return {self.name: batch}

    def rewind(self):
        self.i = 0


def _input_name(path: Path) -> str:
    import onnx

    return onnx.load(str(path), load_external_data=False).graph.input[0].name


def ort_static(fp32: Path, out: Path, calib: np.ndarray, method: str) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="bench-ort-") as tmp, quiet():
        pre = os.path.join(tmp, "pre.onnx")
        quant_pre_process(str(fp32), pre)
        quantize_static(pre, str(out), _Reader(_input_name(fp32), calib), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method))


def _nncf_dataset(fp32: Path, x: np.ndarray):
    import nncf

    name = _input_name(fp32)
    return nncf.Dataset([x[i:i + 1] for i in range(len(x))], lambda item: {name: np.ascontiguousarray(item, np.float32)})


def nncf_ptq(fp32: Path, out: Path, calib: np.ndarray) -> None:
    import nncf
    import onnx

    with quiet():
        model = nncf.quantize(onnx.load(str(fp32)), _nncf_dataset(fp32, calib), subset_size=len(calib))
        onnx.save(model, str(out))


def nncf_accuracy_control(fp32: Path, out: Path, calib: np.ndarray, val_x: np.ndarray, val_y: np.ndarray,
                          max_drop: float = 0.01) -> None:
    import nncf
    import onnx

    from exporters.onnx.runner import OnnxRuntimeRunner
    from exporters.runner import run_batched

    name = _input_name(fp32)

    def validate(model, data) -> float:
        with tempfile.TemporaryDirectory(prefix="bench-nncf-") as tmp:
            path = os.path.join(tmp, "m.onnx")
            onnx.save(model, path)
            with OnnxRuntimeRunner(path) as runner:
                pred = run_batched(runner, val_x).argmax(1)
        return float((pred == val_y).mean())

    val = nncf.Dataset(list(range(len(val_x))), lambda i: {name: np.ascontiguousarray(val_x[i:i + 1], np.float32)})
    with quiet():
        model = nncf.quantize_with_accuracy_control(onnx.load(str(fp32)), _nncf_dataset(fp32, calib), val,
                                                    validation_fn=validate, max_drop=max_drop,
                                                    drop_type=nncf.DropType.ABSOLUTE, subset_size=len(calib))
        onnx.save(model, str(out))


def edgecnn_int8(fp32: Path, out: Path, calib_set, trained: bool, shape) -> dict:
    """The pipeline's INT8 engine (ort recipe, every default); returns its record."""
    from edgecnn.options import ExportOptions
    from edgecnn.validate.latency import quick_speedup
    from exporters.int8 import engine
    from exporters.int8.qdq import QdqRecipe
    from exporters.onnx.quant import OrtQuantizer

    options = ExportOptions().int8
    with tempfile.TemporaryDirectory(prefix="bench-edgecnn-", dir=out.parent) as work:
        result = engine.quantize(QdqRecipe(OrtQuantizer(), fp32, out, work), calib_set, options=options,
                                 trained=trained, speedup=quick_speedup(fp32, shape))
    return result.record.to_dict()


def run_quantizers(fp32: Path, work: Path, calib_set, trained: bool, shape, names, *,
                   val: Optional[tuple] = None, say: Callable[[str], None] = print) -> Dict[str, tuple]:
    """{quantizer: (INT8 model path, seconds)} for each of ``names`` (skipping nncf-ac without ``val``)."""
    calib = calib_set.array("calib")
    made = {}
    for name in names:
        if name == "nncf-ac" and val is None:
            continue
        out = work / f"{name}.onnx"
        t0 = time.perf_counter()
        if name == "edgecnn":
            edgecnn_int8(fp32, out, calib_set, trained, shape)
        elif name in ORT_METHODS:
            ort_static(fp32, out, calib, ORT_METHODS[name])
        elif name == "nncf":
            nncf_ptq(fp32, out, calib)
        elif name == "nncf-ac":
            nncf_accuracy_control(fp32, out, calib, *val)
        else:
            raise ValueError(f"unknown quantizer {name!r}")
        made[name] = (out, time.perf_counter() - t0)
        say(f"  {name}: {made[name][1]:.0f} s")
    return made


def score(ref: np.ndarray, out: np.ndarray, labels: Optional[np.ndarray]) -> dict:
    """The figures of one INT8 model against FP32 on the held-out images (``exporters.parity``)."""
    from exporters import parity

    p = parity.compare(ref, out, labels=labels)
    return {"drop": p.accuracy_drop, "drop_se": p.accuracy_drop_se, "est_drop": p.estimated_drop,
            "est_ci": p.estimated_drop_ci95, "agreement": p.top1_agreement, "sqnr": p.sqnr_db, "cosine": p.cosine,
            "top5": p.ref_top1_in_top5, "ref_accuracy": p.ref_accuracy, "accuracy": p.accuracy}


def speedup(fp32: Path, int8: Path, shape) -> float:
    from edgecnn.validate.latency import side_by_side

    return side_by_side(fp32, int8, shape, threads=1)["speedup_vs_fp32"]
