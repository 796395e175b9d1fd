"""The engine's recipe for ONNX Q/DQ quantizers (onnxruntime's ``ort`` recipe, TensorRT's ``trt`` recipe).

What the two share lives here: the prepared model and its untouched copy, weight rounding and bias correction
on ONNX graphs, ranges from ``calibration.ranges`` (cached), the search space of re-quantizations, and the
rule that a layer kept float gets its original weights and bias back. What differs (graph preparation,
default float layers, the quantize call, the report) is the ``QdqQuantizer`` a runtime group provides
(``exporters.onnx.quant.OrtQuantizer``, ``exporters.tensorrt.quant.TrtQuantizer``).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import onnx

from calibration.ranges import compute_ranges

from ..onnx.graph import drop_unused_initializers
from ..onnx.runner import run_onnx
from . import bias, rounding
from .engine import Recipe
from .fallback import Space


class QdqQuantizer:
    """What a Q/DQ runtime says about its quantizer (a protocol: the runtime groups implement it).

    ``name``; ``timed_here`` (see ``Recipe``); ``bias_correction``: whether its weights are quantized on the
    grid ``bias.quantize_weight_like_ort`` models, so analytic and empirical bias correction apply."""

    name = ""
    timed_here = False
    bias_correction = False

    def prepare(self, src: str, dst: str) -> dict:
        shutil.copyfile(src, dst)
        return {}

    def default_float(self, prepared: str) -> Dict[str, str]:
        return {}

    def candidates(self, prepared: str) -> List[str]:
        raise NotImplementedError

    def quantize(self, src: str, dst: str, ranges, exclude: Sequence[str]) -> dict:
        raise NotImplementedError

    def report(self, path: str) -> dict:
        return {}


def restore_originals(modified: str, original: str, nodes: Iterable[str], dst: str) -> int:
    """Write ``modified`` to ``dst`` with the inputs (weights, bias) of ``nodes`` taken back from ``original``:
    a layer kept float is not quantized, so grid-rounded weights or a corrected bias would be errors of their own."""
    model = onnx.load(os.fspath(modified))
    orig = onnx.load(os.fspath(original))
    orig_nodes = {n.name: n for n in orig.graph.node}
    orig_inits = {i.name: i for i in orig.graph.initializer}
    have = {i.name for i in model.graph.initializer}
    nodes = set(nodes)
    count = 0
    for node in model.graph.node:
        if node.name in nodes and node.name in orig_nodes and node.op_type in ("Conv", "Gemm", "MatMul"):
            src = orig_nodes[node.name]
            if list(src.input) != list(node.input):
                del node.input[:]
                node.input.extend(src.input)
                for name in src.input:
                    if name in orig_inits and name not in have:
                        model.graph.initializer.append(orig_inits[name])
                        have.add(name)
                count += 1
    drop_unused_initializers(model)
    onnx.save(model, os.fspath(dst))
    return count


class QdqRecipe(Recipe):
    """The engine's ``Recipe`` for the FP32 ONNX model ``fp32`` quantized by ``quantizer`` into ``out``;
    intermediate files go to ``work`` (a folder the caller removes)."""

    def __init__(self, quantizer: QdqQuantizer, fp32: str | os.PathLike, out: str | os.PathLike,
                 work: str | os.PathLike):
        self.quantizer = quantizer
        self.name, self.timed_here = quantizer.name, quantizer.timed_here
        self.fp32, self.out, self.work = os.fspath(fp32), os.fspath(out), Path(work)
        self.prepared = os.fspath(self.work / ".prepared.onnx")
        self.original = os.fspath(self.work / ".prepared-original.onnx")   # before rounding and correction
        self.modified = False
        self.base: Dict[str, str] = {}

    # ---------------------------------------------------------------- the steps
    def prepare(self, say) -> dict:
        rewrites = self.quantizer.prepare(self.fp32, self.prepared)
        shutil.copyfile(self.prepared, self.original)
        return rewrites

    def default_float(self) -> Dict[str, str]:
        self.base = dict(self.quantizer.default_float(self.prepared))
        return dict(self.base)

    def candidates(self) -> List[str]:
        return self.quantizer.candidates(self.prepared)

    def round_weights(self, calib, skip, say):
        report = rounding.round_weights(self.prepared, self.prepared, lambda: calib.iter_batches("calib", batch_size=16),
                                        skip=skip, say=say)
        say(f"weight rounding: {report.layers} layers rounded with error compensation in {report.seconds:.0f} s")
        self.modified = True
        return report

    def correct_bias(self, calib, skip, say) -> int:
        if not self.quantizer.bias_correction:
            return 0
        say("bias correction: channel means on the calibration split")
        means = bias.channel_means(self.prepared, calib.iter_batches("calib", batch_size=16),
                                   bias.correction_inputs(self.prepared))
        count = bias.correct_analytic(self.prepared, self.prepared, means, skip=skip, original=self.original)
        self.modified = self.modified or count > 0
        return count

    def calibrate(self, calib, method: str, say):
        ranges = compute_ranges(self.prepared, lambda: calib.iter_batches("calib", batch_size=16), method,
                                fingerprint=calib.fingerprint())
        if ranges.cache_hit:
            say(f"ranges read from the cache ({ranges.key[:12]})")
        return ranges

    def space(self, ranges, base: Dict[str, str], speedup: Optional[Callable]) -> Space:
        return OnnxSpace(self, ranges, base, speedup)

    def reference(self, inputs: np.ndarray) -> np.ndarray:
        return run_onnx(self.fp32, inputs)   # the FP32 model itself, not the rounded or corrected one

    def correct_bias_empirically(self, space, ranges, float_layers, inputs, say):
        report = bias.correct_empirical(self.prepared, self.original, self.quantize, ranges, list(float_layers),
                                        inputs, say=say)
        say(f"empirical bias correction: {report.convs} Convs, calibration SQNR {report.sqnr_db_before:.1f} -> "
            f"{report.sqnr_db_after:.1f} dB (pass {report.best_pass} of {report.passes}) in {report.seconds:.0f} s")
        return report

    def write_defaults(self, ranges, base, path) -> None:
        self.quantize(self.prepared, os.fspath(path), ranges, list(base))

    def report(self) -> dict:
        return self.quantizer.report(self.out)

    # ---------------------------------------------------------------- quantize, originals restored
    def quantize(self, src: str, dst: str, ranges, exclude: Sequence[str]) -> dict:
        """The quantizer on ``src``; layers kept float beyond the defaults get their original weights back
        first when rounding or bias correction changed them."""
        extra = [n for n in exclude if n not in self.base]
        if not (self.modified and extra):
            return self.quantizer.quantize(src, dst, ranges, exclude)
        variant = os.fspath(self.work / ".prepared-variant.onnx")
        restore_originals(src, self.original, extra, variant)
        try:
            return self.quantizer.quantize(variant, dst, ranges, exclude)
        finally:
            os.remove(variant)

    def cleanup(self) -> None:
        for path in (self.prepared, self.original, os.fspath(self.work / ".trial.onnx")):
            try:
                os.remove(path)
            except OSError:
                pass


class OnnxSpace(Space):
    """Re-quantizations of the prepared model with ``ranges``: ``logits`` quantizes a trial file (kept while
    the same layers are asked for again), ``write`` the artefact."""

    def __init__(self, recipe: QdqRecipe, ranges, base: Dict[str, str], speedup: Optional[Callable]):
        self.recipe, self.ranges, self.speed = recipe, ranges, speedup
        self.default_float = dict(base)
        self.candidates = recipe.candidates()
        self.trial = os.fspath(recipe.work / ".trial.onnx")
        self._have: Optional[tuple] = None       # (layers, path) of the last model quantized

    def _model(self, layers: Sequence[str]) -> str:
        key = tuple(layers)
        if self._have is None or self._have[0] != key:
            self.recipe.quantize(self.recipe.prepared, self.trial, self.ranges, list(layers))
            self._have = (key, self.trial)
        return self._have[1]

    def logits(self, float_layers, inputs):
        return run_onnx(self._model(float_layers), inputs)

    def speedup(self, float_layers):
        return None if self.speed is None else self.speed(self._model(float_layers))

    def write(self, float_layers) -> dict:
        info = self.recipe.quantize(self.recipe.prepared, self.recipe.out, self.ranges, list(float_layers))
        self._have = (tuple(float_layers), self.recipe.out)
        return info
