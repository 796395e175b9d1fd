"""The ``trt`` Q/DQ recipe: an INT8 ONNX model that TensorRT (8.5 .. 11) builds as an explicitly
quantized engine.

onnxruntime's ``quantize_static`` does the heavy lifting (calibration, scales, Q/DQ insertion), asked for
what TensorRT wants: QDQ format, symmetric INT8 activations and weights, per-channel weights, no output
quantization of Conv/Gemm/Add, FP32 weights behind a Q->DQ pair (``AddQDQPairToWeight``), a dedicated Q/DQ
pair per consumer, FP32 bias. What it still leaves is fixed here, after the fact:

* residual Adds: onnxruntime quantizes both inputs of an Add; TensorRT fuses the Conv branch into the Add
  and wants Q/DQ on the skip branch only, so the Conv branch's pair is removed;
* shared DequantizeLinear outputs (any left) are split, one DQ per consumer;
* opset imports no node uses (``com.microsoft`` and friends) are dropped.

The result is checked by ``exporters.tensorrt.qdq_check`` before it is returned; an error (a model
TensorRT's parser would refuse) is a bug and raises.
Calibration never writes into the current directory: the augmented model lives in a temporary folder.

``quantize_trt`` is what the INT8 fallback loop calls repeatedly with growing ``nodes_to_exclude``; it takes
the activation ranges precomputed once by the engine (``calibration.ranges``), so a re-quantization takes seconds.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from . import qdq_check
from ..errors import ExportError

log = logging.getLogger(__name__)

RECIPE = "trt"
OPSET = 17
QUANTIZED_OPS = ("Conv", "Gemm")


# ------------------------------------------------------------------------------------------ ranges
def _as_ranges(obj) -> Dict[str, Tuple[float, float]]:
    """{tensor: (min, max)} from a ``calibration.ranges.Ranges``, an onnxruntime ``TensorsData``, or a mapping
    of ``TensorData`` / {"min", "max"} / pairs."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    if hasattr(obj, "ranges") and isinstance(obj.ranges, Mapping):   # calibration.ranges.Ranges
        obj = obj.ranges
    if isinstance(obj, TensorsData):
        obj = obj.data
    if not isinstance(obj, Mapping):
        raise ExportError(f"the trt recipe needs precomputed ranges, not {type(obj).__name__}",
                          hint="compute them with calibration.ranges.compute_ranges")
    out = {}
    for name, v in obj.items():
        if isinstance(v, TensorData):
            lo, hi = v.range_value
        elif isinstance(v, Mapping):
            lo, hi = v["min"], v["max"]
        else:
            lo, hi = v[0], v[1]
        out[str(name)] = (float(np.min(lo)), float(np.max(hi)))
    return out


# ------------------------------------------------------------------------------------------ graph fixes
def _remove_unused(model: onnx.ModelProto) -> None:
    """Drop nodes whose outputs nobody reads (orphaned Q/DQ) and initializers nobody reads."""
    g = model.graph
    outputs = {o.name for o in g.output}
    while True:
        used = {i for n in g.node for i in n.input} | outputs
        dead = [n for n in g.node if n.op_type in (qdq_check.Q, qdq_check.DQ) and not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            g.node.remove(n)
    used = {i for n in g.node for i in n.input} | outputs
    keep = [t for t in g.initializer if t.name in used]
    if len(keep) != len(g.initializer):
        del g.initializer[:]
        g.initializer.extend(keep)


def _fix_residual_adds(model: onnx.ModelProto) -> int:
    """On every residual Add whose Conv branch carries Q/DQ, feed that branch in float (TensorRT fuses it)."""
    g = qdq_check.Graph(model)
    fixed = 0
    for r in qdq_check.residual_adds(g):
        if r["ambiguous"] or not g.is_dequantized(r["main"]):
            continue
        node = r["node"]
        idx = list(node.input).index(r["main"])
        node.input[idx] = g.source(r["main"])
        fixed += 1
    _remove_unused(model)
    return fixed


def _fix_float_layers(model: onnx.ModelProto, float_layers: Sequence[str]) -> int:
    """Feed the Conv/Gemm layers kept in float from float tensors. onnxruntime routes a layer excluded from
    quantization through the Q/DQ pair it made for another consumer of the same tensor (e.g. a block input
    that is also a quantized residual skip), which leaves that layer half quantized."""
    g = qdq_check.Graph(model)
    keep = set(float_layers)
    fixed = 0
    for node in model.graph.node:
        if node.name in keep:
            for i, inp in enumerate(node.input):
                if inp and g.is_dequantized(inp):
                    node.input[i] = g.source(inp)
                    fixed += 1
    _remove_unused(model)
    return fixed


def _dedicate_dq(model: onnx.ModelProto) -> int:
    """Give each consumer of a shared DequantizeLinear output its own copy of the DQ node."""
    g = qdq_check.Graph(model)
    split = 0
    new_nodes = []
    for n in list(model.graph.node):
        if n.op_type != qdq_check.DQ:
            continue
        users = g.consumers.get(n.output[0], [])
        for k, user in enumerate(users[1:], start=1):
            clone = onnx.NodeProto()
            clone.CopyFrom(n)
            clone.name = f"{n.name}_dedicated_{k}"
            clone.output[0] = f"{n.output[0]}_dedicated_{k}"
            for i, inp in enumerate(user.input):
                if inp == n.output[0]:
                    user.input[i] = clone.output[0]
            new_nodes.append((n, clone))
            split += 1
    for original, clone in new_nodes:  # keep topological order: right after the original
        pos = list(model.graph.node).index(original)
        model.graph.node.insert(pos + 1, clone)
    return split


def _strip_opset_imports(model: onnx.ModelProto) -> list:
    used = {n.domain or "" for n in model.graph.node}
    keep, dropped = [], []
    for imp in model.opset_import:
        d = imp.domain or ""
        (keep if d in ("", "ai.onnx") or d in used else dropped).append(imp)
    if dropped:
        del model.opset_import[:]
        model.opset_import.extend(keep)
    return [f"{i.domain} v{i.version}" for i in dropped]


_ACTIVATIONS = {"Relu", "Clip", "HardSigmoid", "Sigmoid", "HardSwish", "LeakyRelu", "Elu", "Tanh"}
_GATES = {"HardSigmoid", "Sigmoid"}
_POOLS = {"GlobalAveragePool", "ReduceMean"}


def se_gate_layers(model: onnx.ModelProto) -> List[str]:
    """Conv layers of squeeze-and-excitation gates: GlobalAveragePool/ReduceMean -> Conv -> act -> Conv ->
    (Hard)Sigmoid -> Mul. Their inputs are pooled vectors whose range is set by a few channels, and their
    outputs scale whole feature maps, so their quantization error spreads everywhere (measured on random-init
    MobileNetV3-Large, trt recipe, 96 held-out images: 9.7 dB SQNR with them INT8, 12.0 dB kept float). On a
    GPU they are 1x1 convolutions on 1x1 maps: keeping them FP16 costs next to nothing."""
    g = qdq_check.Graph(model)
    found: List[str] = []
    for mul in model.graph.node:
        if mul.op_type != "Mul" or len(mul.input) != 2:
            continue
        for gate_idx in (0, 1):
            gate = g.producer.get(mul.input[gate_idx])
            if gate is None or gate.op_type not in _GATES or gate.input[0] == mul.input[1 - gate_idx]:
                continue  # not a gate, or x * sigmoid(x) (SiLU)
            convs, frontier, pooled = [], [gate.input[0]], False
            for _ in range(12):
                if not frontier:
                    break
                tensor = frontier.pop()
                node = g.producer.get(tensor)
                if node is None:
                    break
                if node.op_type in _POOLS:
                    pooled = True
                    break
                if node.op_type in QUANTIZED_OPS:
                    convs.append(node.name)
                    frontier.append(node.input[0])
                elif node.op_type in _ACTIVATIONS:
                    frontier.append(node.input[0])
                elif node.op_type == "Mul" and len(node.input) == 2:  # SiLU inside the gate: t * sigmoid(t)
                    sig = [g.producer.get(i) for i in node.input]
                    silu = [i for i, p in zip(node.input, sig[::-1]) if p is not None and p.op_type == "Sigmoid"
                            and p.input[0] == i]
                    if not silu:
                        break
                    frontier.append(silu[0])
                else:
                    break
            if pooled and convs:
                found += [c for c in convs if c not in found]
    return found


def classifier_layers(model: onnx.ModelProto) -> List[str]:
    """The fully-connected classifier (Gemm) layers. Their INT8 error lands directly on the logits (measured on
    random-init MobileNetV3-Small, trt recipe, 96 held-out images: 7.4 dB SQNR with them INT8, 12.8 dB kept
    float, SE gates float in both); on a GPU they are a few percent of the work."""
    return [n.name for n in model.graph.node if n.op_type == "Gemm"]


def default_float_layers(model: onnx.ModelProto) -> Dict[str, str]:
    """The trt recipe's known-hard layers kept in float unless the caller says otherwise: {name: reason}."""
    out = {name: "squeeze-and-excitation gate (kept float by default)" for name in se_gate_layers(model)}
    out.update({name: "fully-connected classifier (kept float by default)" for name in classifier_layers(model)})
    return out


def _plan(fp32: onnx.ModelProto, exclude: Sequence[str]) -> Tuple[list, list, list]:
    """(nodes to quantize, Conv/Gemm kept float, residual Adds whose skip branch gets Q/DQ)."""
    g = qdq_check.Graph(fp32)
    excluded = set(exclude)
    weighted = [n for n in fp32.graph.node if n.op_type in QUANTIZED_OPS]
    quant = [n.name for n in weighted if n.name not in excluded]
    floats = [n.name for n in weighted if n.name in excluded]
    adds = [r["node"].name for r in qdq_check.residual_adds(g)
            if not r["ambiguous"] and r["conv"].name in quant and r["node"].name not in excluded]
    return quant + adds, floats, adds


# ------------------------------------------------------------------------------------------ the recipe
class _DropPreprocessNag(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "pre-process" not in record.getMessage() and "pre-processing" not in record.getMessage()


def quantize_trt(fp32_onnx_path: str | os.PathLike, out_path: str | os.PathLike, ranges,
                 nodes_to_exclude: Sequence[str] = (), *, keep_float: Union[str, Sequence[str]] = "auto",
                 max_opset: int = OPSET, metadata: Optional[Dict[str, str]] = None) -> dict:
    """FP32 ONNX -> TensorRT-valid INT8 Q/DQ ONNX at ``out_path``; returns an info dict for the manifest.

    ``ranges``: precomputed activation ranges (``calibration.ranges.Ranges``, {tensor: (min, max)}, or an
    onnxruntime ``TensorsData``). ``nodes_to_exclude``: node names kept in float (Conv/Gemm, or a residual Add
    to keep its skip in float). ``keep_float``: "auto" also keeps the known-hard layers in float
    (``default_float_layers``: squeeze-and-excitation gates, the fully-connected classifier); () quantizes
    every Conv/Gemm not excluded; or a list.
    """
    from onnxruntime import __version__ as ort_version

    fp32_onnx_path, out_path = os.fspath(fp32_onnx_path), os.fspath(out_path)
    fp32 = onnx.load(fp32_onnx_path)
    opset_in = _check_input(fp32, fp32_onnx_path, nodes_to_exclude, max_opset)
    ranges = _as_ranges(ranges)
    reasons = default_float_layers(fp32) if keep_float == "auto" else \
        {name: "kept float (keep_float)" for name in (keep_float or ())}
    for name in nodes_to_exclude:
        reasons[name] = "excluded by the caller (e.g. the INT8 fallback)"
    to_quantize, kept_float, skip_adds = _plan(fp32, list(reasons))
    t1 = time.perf_counter()
    if not any(n for n in to_quantize if n not in skip_adds):
        raise ExportError("every Conv/Gemm was excluded: nothing left to quantize",
                          hint="an FP16 build keeps every layer in floating point")
    model = _ort_qdq(fp32_onnx_path, ranges, to_quantize)
    fixes = {"residual_add_conv_branch_unquantized": _fix_residual_adds(model),
             "float_layer_inputs_unquantized": _fix_float_layers(model, kept_float),
             "shared_dq_outputs_split": _dedicate_dq(model),
             "stray_opset_imports_removed": _strip_opset_imports(model)}
    _remove_unused(model)
    report = _finish(model, opset_in, out_path, max_opset, metadata)
    return {
        "recipe": RECIPE,
        "tool": f"onnxruntime.quantization.quantize_static {ort_version} (QDQ) + edgecnn TensorRT fixes",
        "format": "QDQ (QuantizeLinear/DequantizeLinear), explicit quantization",
        "activations": "INT8 symmetric (zero point 0), per-tensor, on Conv/Gemm inputs and residual skip branches",
        "weights": "INT8 symmetric, per-channel on axis 0, FP32 initializers behind Q->DQ",
        "bias": "FP32",
        "opset": opset_in,
        "quantize_seconds": round(time.perf_counter() - t1, 2),
        "quantized_layers": report.stats["quantized_layers"],
        "float_layers": {name: reasons[name] for name in kept_float},
        "residual_adds_skip_quantized": len(skip_adds),
        "qdq_pairs": report.stats["qdq_pairs"],
        "fixes": fixes,
        "checker": {"passed": report.ok, "rules": sorted(qdq_check.RULES), "errors": 0,
                    "warnings": [str(v) for v in report.warnings]},
    }


def _check_input(fp32: onnx.ModelProto, path: str, nodes_to_exclude: Sequence[str], max_opset: int) -> int:
    """The input's opset (TensorRT 8.5/8.6 parse <= 17); refuse exclusions that name no node."""
    opset_in = qdq_check.default_opset(fp32)
    if not (qdq_check.MIN_OPSET <= opset_in <= max_opset):
        raise ExportError(f"{path} has opset {opset_in}; the trt recipe needs {qdq_check.MIN_OPSET}..{max_opset}",
                          hint=f"re-export with --opset {max_opset}")
    unknown = sorted(set(nodes_to_exclude) - {n.name for n in fp32.graph.node})
    if unknown:
        raise ExportError(f"layers to keep float name nodes not in the model: {', '.join(unknown[:5])}",
                          hint="use the ONNX node names of model.onnx (e.g. from Netron)")
    return opset_in


# What TensorRT wants from onnxruntime's quantizer
_TRT_EXTRA_OPTIONS = {
    "ActivationSymmetric": True,           # zero point 0, INT8 activations
    "WeightSymmetric": True,
    "AddQDQPairToWeight": True,            # FP32 weights behind Q->DQ (TensorRT 8.x folds them)
    "DedicatedQDQPair": True,              # one Q/DQ pair per consumer: no shared DQ outputs
    "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm", "Add"],  # Q/DQ on inputs of weighted ops only
    "QuantizeBias": False,                 # TensorRT wants FP32 bias (no INT32 DQ)
    "QDQKeepRemovableActivations": True,   # keep Relu/Clip: TensorRT fuses them itself
}


def _ort_qdq(fp32_path: str, ranges: Dict[str, Tuple[float, float]], to_quantize: List[str]) -> onnx.ModelProto:
    """onnxruntime's ``quantize_static`` with TensorRT's options and the given ranges; the raw Q/DQ model."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.calibrate import TensorsData, save_tensors_data

    with tempfile.TemporaryDirectory(prefix="edgecnn-trtq-") as tmp:
        cache = os.path.join(tmp, "ranges.json")
        data = {k: (np.float32(lo), np.float32(hi)) for k, (lo, hi) in ranges.items()}
        save_tensors_data(TensorsData(CalibrationMethod.MinMax, data), cache)
        raw = os.path.join(tmp, "ort_qdq.onnx")
        nag = _DropPreprocessNag()
        logging.getLogger().addFilter(nag)   # onnxruntime nags about its optional shape pre-processing
        try:
            quantize_static(fp32_path, raw, None, quant_format=QuantFormat.QDQ,
                            op_types_to_quantize=list(QUANTIZED_OPS) + ["Add"], per_channel=True, reduce_range=False,
                            activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                            nodes_to_quantize=to_quantize, calibrate_method=CalibrationMethod.MinMax,
                            extra_options=dict(_TRT_EXTRA_OPTIONS), calibration_cache_path=cache)
        except Exception as exc:
            raise ExportError(f"onnxruntime quantize_static failed: {str(exc).splitlines()[0][:300]}") from exc
        finally:
            logging.getLogger().removeFilter(nag)
        return onnx.load(raw)


def _finish(model: onnx.ModelProto, opset_in: int, out_path: str, max_opset: int,
            metadata: Optional[Dict[str, str]]) -> "qdq_check.QdqReport":
    """Metadata, onnx.checker, the Q/DQ rule checker, then save; a checker error is a bug here (its warnings,
    if any, go into the record)."""
    opset_out = qdq_check.default_opset(model)
    if opset_out != opset_in:
        raise ExportError(f"onnxruntime changed the opset from {opset_in} to {opset_out}; TensorRT 8.5/8.6 parse <= 17")
    if metadata:
        existing = {p.key: p.value for p in model.metadata_props}
        existing.update(metadata)
        del model.metadata_props[:]
        for k in sorted(existing):
            model.metadata_props.add(key=k, value=existing[k])
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the trt Q/DQ model fails onnx.checker: {str(exc).splitlines()[0][:300]}") from exc
    report = qdq_check.check_model(model, path=out_path, max_opset=max_opset)
    if not report.ok:
        raise ExportError(f"the trt recipe produced a model TensorRT's parser refuses "
                          f"({len(report.errors)} error(s)): {report.errors[0]}",
                          hint="this is a bug in edgecnn's trt recipe; please report it with the architecture name")
    Path(out_path).parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, out_path)
    return report


class TrtQuantizer:
    """The ``trt`` recipe as the INT8 engine's Q/DQ quantizer (``exporters.int8.qdq.QdqQuantizer``): no graph
    preparation (TensorRT builds from model.onnx's own graph), no bias correction, not timed here (the
    engine runs on the device's GPU, not on this CPU)."""

    name = RECIPE
    timed_here = False
    bias_correction = False

    def __init__(self, *, max_opset: int = OPSET, metadata: Optional[Dict[str, str]] = None):
        self.max_opset, self.metadata = max_opset, metadata

    def prepare(self, src: str, dst: str) -> dict:
        import shutil

        shutil.copyfile(src, dst)
        return {}

    def default_float(self, prepared: str) -> Dict[str, str]:
        return default_float_layers(onnx.load(prepared, load_external_data=False))

    def candidates(self, prepared: str) -> List[str]:
        return [n.name for n in onnx.load(prepared, load_external_data=False).graph.node if n.op_type in QUANTIZED_OPS]

    def quantize(self, src: str, dst: str, ranges, exclude: Sequence[str]) -> dict:
        return quantize_trt(src, dst, ranges, list(exclude), max_opset=self.max_opset, metadata=self.metadata)

    def report(self, path: str) -> dict:
        report = qdq_check.check_file(path, max_opset=self.max_opset)
        return {"quantized_layers": report.stats["quantized_layers"], "float_layers": len(report.stats["float_layers"]),
                "residual_adds": report.stats["residual_adds"], "checker_passed": report.ok,
                "checker_warnings": len(report.warnings)}
