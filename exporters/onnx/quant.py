"""The ``ort`` INT8 recipe: the Q/DQ model that runs fastest on onnxruntime CPU with its accuracy kept.

UINT8 asymmetric activations, INT8 symmetric per-channel weights, QDQ format (onnxruntime's CPU kernels
fuse DQ -> op -> Q into QLinearConv/QLinearAdd/... only for U8 activations: measured here, S8 activations
left two thirds of the convolutions in float). Before quantizing, the FP32 graph is prepared so that the
expensive ops really run as fused INT8 kernels (see ``prepare``); after, ``op_report`` counts what
onnxruntime's optimized graph actually runs in INT8 and what stays float, so the claim is checked.

The INT8 engine runs it through ``OrtQuantizer`` (``exporters.int8.qdq``): ``prepare`` first, then
``calibration.ranges.compute_ranges`` on the *prepared* model, then ``quantize(prepared, out, ranges,
nodes_to_exclude)``.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..errors import ExportError
from .graph import attr as _attr, consumers as _consumers, drop_unused_initializers

log = logging.getLogger(__name__)

NAME = "ort"
# Ops the ort recipe quantizes. Left out on purpose: Sigmoid/Mul/HardSigmoid/HardSwish (elementwise
# gates): onnxruntime's QLinearSigmoid/QLinearMul are slower on this CPU than the float ops they replace
# (measured: EfficientNet-B0 with SiLU quantized spent 60% of its time in them), and float gates keep
# accuracy where INT8 loses most (SE / SiLU outputs).
OP_TYPES = ("Conv", "Gemm", "MatMul", "Add", "GlobalAveragePool", "AveragePool", "MaxPool", "Concat",
            "Relu", "Clip", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Resize")
FUSED_INT8_OPS = ("QLinearConv", "QLinearAdd", "QLinearMul", "QLinearGlobalAveragePool", "QLinearAveragePool",
                  "QLinearSigmoid", "QLinearLeakyRelu", "QLinearConcat", "QLinearSoftmax", "QGemm", "QLinearMatMul",
                  "MatMulIntegerToFloat", "ConvInteger", "MatMulInteger", "DynamicQuantizeMatMul", "QAttention",
                  "QLinearReduceMean", "QLinearWhere")
# Ops that move or select uint8 data without arithmetic (also fine in INT8)
INT8_PASSTHROUGH = ("MaxPool", "NhwcMaxPool", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Resize",
                    "Slice", "Gather", "Split")
# Plumbing that is neither compute nor float work
PLUMBING = ("QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Identity")


# ------------------------------------------------------------------------------------------ preparation
def prepare(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> dict:
    """Rewrite the FP32 graph into an equivalent one that onnxruntime quantizes into fused kernels.

    - ReduceMean over H,W (keepdims) -> GlobalAveragePool (QLinearGlobalAveragePool exists; a quantized
      ReduceMean does not; the dynamo exporter emits ReduceMean for pooling and squeeze-excite);
    - Conv -> HardSigmoid (MobileNetV3's squeeze-excite gate) -> Conv with weights and bias scaled by alpha
      and shifted by beta, then Clip(0, 1): exact in FP32, and the Clip folds into the quantized Conv's
      output range, so the gate costs nothing in INT8;
    - then onnxruntime's own quantization pre-processing (symbolic shape inference, graph optimisation).
    Returns a dict of the rewrites done (counts), for the manifest.
    """
    model = onnx.load(os.fspath(src))
    done = Counter()
    done["reducemean_to_gap"] = _reducemean_to_gap(model)
    done["hardsigmoid_folded_into_conv"] = _fold_hardsigmoid(model)
    drop_unused_initializers(model)
    onnx.checker.check_model(model)
    with tempfile.TemporaryDirectory(prefix="edgecnn-prep-") as tmp:
        mid = os.path.join(tmp, "rewritten.onnx")
        onnx.save(model, mid)
        try:
            from onnxruntime.quantization.shape_inference import quant_pre_process

            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                quant_pre_process(mid, os.fspath(dst), skip_symbolic_shape=False, skip_optimization=False)
            done["ort_pre_process"] = 1
        except Exception as exc:  # pre-processing is an optimisation; the rewritten model is still valid
            log.warning("onnxruntime quantization pre-processing failed (%s); quantizing without it", exc)
            onnx.save(model, os.fspath(dst))
            done["ort_pre_process"] = 0
    model = onnx.load(os.fspath(dst))
    done["silu_to_quickgelu"] = _silu_to_quickgelu(model)
    if done["silu_to_quickgelu"]:
        onnx.save(model, os.fspath(dst))
    return {k: int(v) for k, v in done.items()}


def _silu_to_quickgelu(model: onnx.ModelProto) -> int:
    """x * Sigmoid(x) (SiLU/Swish, EfficientNet) -> com.microsoft QuickGelu(alpha=1): one float pass.

    onnxruntime fuses SiLU into QuickGelu itself in an FP32 graph, but not once Q/DQ nodes surround it, and
    its QLinearSigmoid + QLinearMul are slower than that float op (measured on EfficientNet-B0: 60% of the
    INT8 time). As one node the quantizer leaves it float between a DequantizeLinear and a QuantizeLinear.
    """
    consumers = _consumers(model)
    count = 0
    for sig in list(model.graph.node):
        if sig.op_type != "Sigmoid":
            continue
        x = sig.input[0]
        users = consumers.get(sig.output[0], [])
        if len(users) != 1 or users[0].op_type != "Mul" or x not in users[0].input or sig.output[0] not in users[0].input:
            continue
        mul = users[0]
        gelu = helper.make_node("QuickGelu", [x], list(mul.output), name=(mul.name or "Mul") + "_silu",
                                domain="com.microsoft", alpha=1.0)
        pos = list(model.graph.node).index(mul)
        model.graph.node.insert(pos, gelu)
        model.graph.node.remove(mul)
        model.graph.node.remove(sig)
        count += 1
    if count and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return count


def _reducemean_to_gap(model: onnx.ModelProto) -> int:
    inits = {i.name: i for i in model.graph.initializer}
    count = 0
    for idx, node in enumerate(list(model.graph.node)):
        if node.op_type != "ReduceMean":
            continue
        axes = _attr(node, "axes")
        if axes is None and len(node.input) > 1 and node.input[1] in inits:
            axes = numpy_helper.to_array(inits[node.input[1]]).tolist()
        keep = _attr(node, "keepdims", 1)
        if axes is None or sorted(int(a) for a in axes) not in ([2, 3], [-2, -1]):
            continue
        gap_out = node.output[0] if keep else node.output[0] + "_gap"
        gap = helper.make_node("GlobalAveragePool", [node.input[0]], [gap_out], name=(node.name or "ReduceMean") + "_gap")
        pos = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(pos, gap)
        if not keep:
            shape_name = gap_out + "_shape"
            model.graph.initializer.append(numpy_helper.from_array(np.asarray([0, -1], np.int64), shape_name))
            model.graph.node.insert(pos + 1, helper.make_node("Reshape", [gap_out, shape_name], [node.output[0]],
                                                              name=gap.name + "_flatten"))
        count += 1
    return count


def _fold_hardsigmoid(model: onnx.ModelProto) -> int:
    """Conv -> HardSigmoid(alpha, beta) becomes Conv(alpha*W, alpha*b + beta) -> Clip(0, 1)."""
    inits = {i.name: i for i in model.graph.initializer}
    consumers = _consumers(model)
    producers = {o: n for n in model.graph.node for o in n.output}
    graph_outputs = {o.name for o in model.graph.output}
    count = 0
    for node in list(model.graph.node):
        if node.op_type != "HardSigmoid":
            continue
        conv = producers.get(node.input[0])
        if conv is None or conv.op_type != "Conv" or conv.input[1] not in inits:
            continue
        if len(consumers.get(conv.output[0], [])) != 1 or conv.output[0] in graph_outputs:
            continue
        alpha = float(_attr(node, "alpha", 0.2))
        beta = float(_attr(node, "beta", 0.5))
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float32)
        has_bias = len(conv.input) > 2 and bool(conv.input[2])
        if has_bias and conv.input[2] not in inits:
            continue
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float32) if has_bias else np.zeros(w.shape[0], np.float32)
        # new initializers (never edit in place: the simplifier may share identical tensors between nodes)
        w_name, b_name = conv.output[0] + "_hsig_w", conv.output[0] + "_hsig_b"
        model.graph.initializer.extend([numpy_helper.from_array((w * alpha).astype(np.float32), w_name),
                                        numpy_helper.from_array((b * alpha + beta).astype(np.float32), b_name)])
        del conv.input[1:]
        conv.input.extend([w_name, b_name])
        lo, hi = node.output[0] + "_clip_lo", node.output[0] + "_clip_hi"
        model.graph.initializer.extend([numpy_helper.from_array(np.asarray(0.0, np.float32), lo),
                                        numpy_helper.from_array(np.asarray(1.0, np.float32), hi)])
        clip = helper.make_node("Clip", [node.input[0], lo, hi], list(node.output), name=(node.name or "HardSigmoid") + "_clip")
        pos = list(model.graph.node).index(node)
        model.graph.node.remove(node)
        model.graph.node.insert(pos, clip)
        count += 1
    return count


# ------------------------------------------------------------------------------------------ quantization
def default_exclusions(model_path: Union[str, os.PathLike], op_types: Sequence[str] = OP_TYPES) -> Dict[str, str]:
    """Nodes the ort recipe keeps float by default, with the reason (for the manifest).

    The first Conv when it reads the image and feeds only ops that stay float (MobileNetV3's HardSwish,
    EfficientNet's SiLU): over 3 input channels an INT8 convolution gains little, and its output would be
    dequantized at once. Measured side by side (busy 2-core box, batch 1): MobileNetV3-L 1.36x faster than
    FP32 with it float vs 1.07x with it INT8. When the first Conv feeds quantized ops (ReLU, Clip, MaxPool)
    it stays INT8: SqueezeNet ran 4.2x faster than FP32 that way and 0.56x with it float (layout
    conversions around the float conv).
    """
    model = onnx.load(os.fspath(model_path), load_external_data=False)
    graph_input = model.graph.input[0].name
    consumers = _consumers(model)
    out: Dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.input[0] == graph_input:
            users = consumers.get(node.output[0], [])
            if users and all(u.op_type not in op_types for u in users):
                out[node.name] = ("first convolution, feeding float-only ops (" + ", ".join(sorted({u.op_type for u in users}))
                                  + "): INT8 would gain nothing over 3 input channels and be dequantized at once")
    return out


def quantize(fp32_onnx_path: Union[str, os.PathLike], out_path: Union[str, os.PathLike], ranges,
             nodes_to_exclude: Iterable[str] = (), *, per_channel: bool = True,
             op_types: Sequence[str] = OP_TYPES, float_tensors: bool = True) -> dict:
    """Quantize the (prepared) FP32 model with the ``ort`` recipe, using precomputed ``ranges``.

    ``ranges``: ``calibration.ranges.Ranges`` (or an onnxruntime ``CalibrationDataReader``, calibrated
    with MinMax on the spot). ``nodes_to_exclude`` are layers kept float; with ``float_tensors`` (default)
    their activation inputs and outputs lose their Q/DQ pairs too (``float_layer_tensors``), so the layer
    really computes in float. Returns what was done (for the manifest).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    excluded = sorted(set(nodes_to_exclude))
    extra = {"ActivationSymmetric": False, "WeightSymmetric": True, "ForceQuantizeNoInputCheck": False}
    with tempfile.TemporaryDirectory(prefix="edgecnn-quant-") as tmp:
        kwargs = {}
        if hasattr(ranges, "write_ort_cache"):
            kwargs["calibration_cache_path"] = ranges.write_ort_cache(os.path.join(tmp, "ranges.json"))
            reader = None
        else:
            reader = ranges
        try:
            with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(), _quiet_root_logger():
                warnings.simplefilter("ignore")
                quantize_static(os.fspath(fp32_onnx_path), os.fspath(out_path), reader, quant_format=QuantFormat.QDQ,
                                op_types_to_quantize=list(op_types), per_channel=per_channel, reduce_range=False,
                                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                nodes_to_exclude=excluded, calibrate_method=CalibrationMethod.MinMax,
                                extra_options=extra, **kwargs)
        except Exception as exc:
            raise ExportError(f"onnxruntime quantization failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                              hint="try --calib-method minmax, or export FP32") from exc
    float_outputs = float_graph_outputs(out_path)
    floated = float_layer_tensors(fp32_onnx_path, out_path, excluded) if float_tensors and excluded else []
    return {"recipe": NAME, "float_tensors": floated, "format": "QDQ", "float_outputs": float_outputs, "activations": "uint8 asymmetric, per-tensor",
            "weights": "int8 symmetric, " + ("per-channel" if per_channel else "per-tensor"),
            "op_types": list(op_types), "nodes_excluded": excluded,
            "ranges": getattr(ranges, "method", "minmax")}


# single-input ops between a float layer and the compute op feeding it, floated along with the layer
_FLOAT_WITH_LAYER = ("Flatten", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "GlobalAveragePool", "AveragePool",
                     "MaxPool")


def float_layer_tensors(prepared_path: Union[str, os.PathLike], path: Union[str, os.PathLike],
                        layers: Iterable[str]) -> List[str]:
    """Make the layers kept float really float: drop the Q -> DQ pairs on their activation inputs and outputs.

    onnxruntime's ``nodes_to_exclude`` only leaves the node itself unquantized: its input tensor is still
    quantized by the producer, its output by the consumers, so an excluded Conv keeps the activation
    rounding on both sides and only its weights become float (measured on EfficientNet-Lite0: excluding
    layers did not lower the logit error). Here a float layer means float weights *and* float activations
    in and out. Where the quantizer had removed a Clip/Relu after the layer (their range is enforced by the
    QuantizeLinear's saturation), the activation is put back, or dropping the pair would lose the ReLU6.
    Neighbouring INT8 layers then read or write float at that boundary (a DQ/Q of their own, or they run
    in float with INT8-rounded weights): the speed cost is measured, not assumed.
    Returns the tensors made float (names in the prepared graph).
    """
    layers = set(layers)
    prep = onnx.load(os.fspath(prepared_path), load_external_data=False)
    p_inits = {i.name: i for i in prep.graph.initializer}
    p_cons = _consumers(prep)
    p_prod = {o: n for n in prep.graph.node for o in n.output}
    wanted: List[str] = []
    for node in prep.graph.node:
        if node.name not in layers:
            continue
        for t in node.input:
            # back through data movement and pooling to the last compute op (GAP -> Flatten -> Gemm: the
            # quantizer puts the pair on the pooled tensor, not on the Gemm's own input)
            while t and t not in p_inits:
                wanted.append(t)
                src = p_prod.get(t)
                if src is None or src.op_type not in _FLOAT_WITH_LAYER or len(p_cons.get(t, [])) != 1:
                    break
                t = src.input[0]
        for t in node.output:
            users = p_cons.get(t, [])
            wanted.append(t)
            if len(users) == 1 and users[0].op_type in ("Clip", "Relu"):
                wanted.append(users[0].output[0])
    model = onnx.load(os.fspath(path))
    g = model.graph
    inits = {i.name for i in g.initializer}
    cons = _consumers(model)
    prod = {o: n for n in g.node for o in n.output}
    done: List[str] = []
    for t in dict.fromkeys(wanted):
        q = next((n for n in cons.get(t, []) if n.op_type == "QuantizeLinear"), None)
        if q is None:
            continue
        dqs = [n for n in cons.get(q.output[0], []) if n.op_type == "DequantizeLinear"]
        if len(dqs) != len(cons.get(q.output[0], [])):
            continue  # the quantized tensor also feeds fused INT8 ops directly: leave it
        for dq in dqs:
            for user in cons.get(dq.output[0], []):
                for k, i in enumerate(user.input):
                    if i == dq.output[0]:
                        user.input[k] = t
            for o in g.output:
                if o.name == dq.output[0]:
                    o.name = t
            g.node.remove(dq)
        g.node.remove(q)
        cons = _consumers(model)
        # put back a Clip/Relu the quantizer folded into this tensor's QuantizeLinear
        act = p_prod.get(t)
        producer = prod.get(t)
        if act is not None and act.op_type in ("Clip", "Relu") and producer is not None and producer.op_type != act.op_type:
            pre = act.input[0]
            idx = list(producer.output).index(t)
            producer.output[idx] = pre
            for name in act.input[1:]:
                if name and name in p_inits and name not in inits:
                    g.initializer.append(p_inits[name])
                    inits.add(name)
            new = onnx.NodeProto()
            new.CopyFrom(act)
            g.node.insert(list(g.node).index(producer) + 1, new)
            prod = {o: n for n in g.node for o in n.output}
            cons = _consumers(model)
        done.append(t)
    if done:
        onnx.save(model, os.fspath(path))
    return done


def float_graph_outputs(path: Union[str, os.PathLike]) -> List[str]:
    """Drop the Q -> DQ pair in front of each graph output, so the logits leave the last layer in float.

    A quantized output is clipped to the range seen in calibration: an image with larger logits (measured:
    a random-init MobileNetV3-small on held-out photos) comes out flattened at the clip, and the logits'
    8-bit grid alone flips top-1 on near ties. Float logits cost nothing (QGemm writes float directly).
    """
    model = onnx.load(os.fspath(path))
    g = model.graph
    outputs = {o.name for o in g.output}
    producers = {o: n for n in g.node for o in n.output}
    done = []
    for dq in [n for n in g.node if n.op_type == "DequantizeLinear" and n.output[0] in outputs]:
        q = producers.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        src = producers.get(q.input[0])
        users = [n for n in g.node if q.input[0] in n.input and n is not q]
        if src is None or users or any(q.input[0] == o for o in outputs):
            continue
        idx = list(src.output).index(q.input[0])
        src.output[idx] = dq.output[0]
        g.node.remove(dq)
        g.node.remove(q)
        done.append(dq.output[0])
    if done:
        onnx.save(model, os.fspath(path))
    return done


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs 'Please consider pre-processing' warnings on the root logger."""
    root = logging.getLogger()
    old = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(old)


# ------------------------------------------------------------------------------------------ inspection
def op_report(path: Union[str, os.PathLike]) -> dict:
    """Count what onnxruntime's optimized graph runs as fused INT8 kernels and what stays float.

    ``fused``: QLinear*/QGemm kernels; ``float``: compute ops left in float (each costs its own pass plus
    a DequantizeLinear/QuantizeLinear around it); ``qdq``: remaining QuantizeLinear/DequantizeLinear nodes.
    """
    from .runner import optimized_graph

    ops = Counter(n.op_type for n in optimized_graph(path).graph.node)
    fused = {k: v for k, v in ops.items() if k in FUSED_INT8_OPS}
    plumbing = {k: v for k, v in ops.items() if k in PLUMBING}
    flt = {k: v for k, v in ops.items() if k not in FUSED_INT8_OPS and k not in PLUMBING
           and k not in INT8_PASSTHROUGH}
    return {"fused": sum(fused.values()), "float": sum(flt.values()), "qdq": sum(plumbing.values()),
            "fused_ops": dict(sorted(fused.items())), "float_ops": dict(sorted(flt.items())),
            "passthrough_ops": {k: v for k, v in sorted(ops.items()) if k in INT8_PASSTHROUGH}}


def quantizable_nodes(path: Union[str, os.PathLike], op_types: Sequence[str] = ("Conv", "Gemm", "MatMul", "Add")) -> List[str]:
    """Names of the nodes whose precision the fallback may change (the compute-heavy quantized ops)."""
    model = onnx.load(os.fspath(path), load_external_data=False)
    return [n.name for n in model.graph.node if n.op_type in op_types and n.name]


class OrtQuantizer:
    """The ``ort`` recipe as the INT8 engine's Q/DQ quantizer (``exporters.int8.qdq.QdqQuantizer``)."""

    name = NAME
    timed_here = True        # the artefact runs on onnxruntime, here: the speed floor and timing mean something
    bias_correction = True   # onnxruntime's weight grid: symmetric per-channel amax/127

    def prepare(self, src: str, dst: str) -> dict:
        return prepare(src, dst)

    def default_float(self, prepared: str) -> Dict[str, str]:
        return default_exclusions(prepared)

    def candidates(self, prepared: str) -> List[str]:
        return quantizable_nodes(prepared)

    def quantize(self, src: str, dst: str, ranges, exclude: Sequence[str]) -> dict:
        return quantize(src, dst, ranges, exclude)

    def report(self, path: str) -> dict:
        return op_report(path)
