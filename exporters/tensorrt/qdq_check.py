"""Prove that a Q/DQ ONNX file follows TensorRT's explicit-quantization rules, one named violation each.

TensorRT (8.5 and later) builds INT8 engines from QuantizeLinear/DequantizeLinear pairs, but only for a
narrow dialect of them (NVIDIA's "Working with Quantized Types" and the TensorRT ONNX parser): INT8, not
UINT8; zero points all 0; per-channel scales only for weights and only on axis 0; activations per-tensor;
ONNX opset 13..17 for TensorRT 8.5/8.6 (JetPack 5 / 6.0); Q/DQ on the inputs of Conv/Gemm; on a residual
Add only the skip branch (the Conv branch is fused with the Add); FP32 weights behind a Q->DQ pair (what
TensorRT 8.x folds); no DequantizeLinear output shared by several consumers; no stray opset imports or
non-ONNX operators. onnxruntime's quantizer does not guarantee any of this, so the ``trt`` recipe's output
is checked by this module, and so can any file a user brings (``edgecnn check-qdq model.onnx``).

A layer left in float (the INT8 fallback keeps sensitive layers in higher precision) is legal: TensorRT
runs it in FP16/FP32. A layer *half* quantized (data input but not weight, or the reverse) is not.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

Q, DQ = "QuantizeLinear", "DequantizeLinear"
WEIGHTED = ("Conv", "Gemm")
MIN_OPSET, DEFAULT_MAX_OPSET = 13, 17

RULES: Dict[str, str] = {
    "opset": "default-domain opset between 13 (per-axis Q/DQ) and the target's maximum (17 for TensorRT 8.5/8.6)",
    "opset-imports": "no opset import for a domain that no node uses, and no node outside the ONNX domain",
    "onnx-ops": "quantization only through QuantizeLinear/DequantizeLinear (no QLinear*/ *Integer operators)",
    "int8-only": "zero points present and INT8 (an absent zero point means UINT8; TensorRT takes INT8 only)",
    "zero-point-zero": "every zero point is 0 (symmetric quantization)",
    "scale": "scales are positive, finite float32",
    "activation-per-tensor": "Q/DQ on activations use a single scale (per-tensor)",
    "weight-per-channel-axis0": "per-channel scales only on weights, on axis 0, one scale per output channel",
    "weight-fp32-qdq": "weights are FP32 initializers behind a QuantizeLinear->DequantizeLinear pair (TensorRT 8.x)",
    "qdq-pair": "each QuantizeLinear feeds only DequantizeLinear nodes with the same scale and zero point, "
                "and each DequantizeLinear reads a QuantizeLinear",
    "dedicated-dq": "each DequantizeLinear output has exactly one consumer (no shared DQ outputs)",
    "conv-gemm-inputs": "a quantized Conv/Gemm has Q/DQ on both its data input and its weight; the bias stays FP32",
    "residual-add": "on a residual Add only the skip branch carries Q/DQ (the Conv branch is fused with the Add), "
                    "and it does whenever that Conv is quantized",
    "has-int8": "the model contains at least one quantized Conv/Gemm",
}


@dataclass
class Violation:
    rule: str
    node: str
    tensor: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] node {self.node or '-'} / tensor {self.tensor or '-'}: {self.message}"

    def to_dict(self) -> dict:
        return {"rule": self.rule, "node": self.node, "tensor": self.tensor, "message": self.message}


@dataclass
class QdqReport:
    path: str
    opset: int
    violations: List[Violation] = field(default_factory=list)
    stats: Dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.violations

    def to_dict(self) -> dict:
        return {"path": self.path, "opset": self.opset, "passed": self.ok, "rules_checked": sorted(RULES),
                "violations": [v.to_dict() for v in self.violations], "stats": dict(self.stats)}

    def summary(self) -> str:
        s = self.stats
        head = (f"{self.path}: {'PASS' if self.ok else 'FAIL'} — TensorRT Q/DQ rules ({len(RULES)} checked), opset "
                f"{self.opset}; {s.get('quantized_layers', 0)} INT8 Conv/Gemm, {len(s.get('float_layers', []))} "
                f"kept in float, {s.get('qdq_pairs', 0)} Q/DQ pairs, {s.get('residual_adds', 0)} residual Add(s)")
        if self.ok:
            return head
        lines = [head, f"{len(self.violations)} violation(s):"]
        lines += [f"  {v}" for v in self.violations[:50]]
        if len(self.violations) > 50:
            lines.append(f"  … and {len(self.violations) - 50} more")
        return "\n".join(lines)


class Graph:
    """Producer/consumer maps and constant lookup over one ONNX graph (shared with the ``trt`` recipe)."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        g = model.graph
        self.inits = {i.name: i for i in g.initializer}
        self.producer: Dict[str, onnx.NodeProto] = {}
        self.consumers: Dict[str, List[onnx.NodeProto]] = defaultdict(list)
        self.graph_outputs = {o.name for o in g.output}
        for node in g.node:
            for out in node.output:
                self.producer[out] = node
            for inp in node.input:
                if inp:
                    self.consumers[inp].append(node)
        self.constants = dict(self.inits)
        for node in g.node:
            if node.op_type == "Constant" and node.output:
                for a in node.attribute:
                    if a.name == "value":
                        self.constants[node.output[0]] = a.t

    def is_constant(self, name: str) -> bool:
        return name in self.constants

    def array(self, name: str) -> Optional[np.ndarray]:
        t = self.constants.get(name)
        return None if t is None else numpy_helper.to_array(t)

    def dtype(self, name: str) -> Optional[int]:
        t = self.constants.get(name)
        return None if t is None else t.data_type

    def source(self, tensor: str) -> str:
        """The float tensor behind ``tensor``: through DQ <- Q when ``tensor`` is a DQ output."""
        p = self.producer.get(tensor)
        if p is not None and p.op_type == DQ:
            q = self.producer.get(p.input[0])
            if q is not None and q.op_type == Q:
                return q.input[0]
            return p.input[0]
        return tensor

    def is_dequantized(self, tensor: str) -> bool:
        p = self.producer.get(tensor)
        return p is not None and p.op_type == DQ

    def effective_consumers(self, tensor: str) -> List[onnx.NodeProto]:
        """Nodes that use ``tensor``'s value, looking through the Q->DQ pairs in front of them."""
        out = []
        for c in self.consumers.get(tensor, []):
            if c.op_type == Q:
                for dq in self.consumers.get(c.output[0], []):
                    out.extend(self.consumers.get(dq.output[0], []) if dq.op_type == DQ else [dq])
            else:
                out.append(c)
        return out


def residual_adds(graph: Graph) -> List[dict]:
    """Adds of two activations where one side is a Conv/Gemm output used by that Add alone (TensorRT fuses
    the Conv with the Add) and the other is the skip connection. ``{"node", "main", "skip", "conv"}``: the
    input *names* on the Add (may be DQ outputs) and the fused Conv node."""
    found = []
    for node in graph.model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        if any(graph.is_constant(graph.source(i)) for i in node.input):
            continue
        candidates = []
        for idx, inp in enumerate(node.input):
            src = graph.source(inp)
            p = graph.producer.get(src)
            users = graph.effective_consumers(src)
            if p is not None and p.op_type in WEIGHTED and len(users) == 1 and users[0] is node \
                    and src not in graph.graph_outputs:
                candidates.append((idx, p))
        if len(candidates) == 1:
            idx, conv = candidates[0]
            found.append({"node": node, "main": node.input[idx], "skip": node.input[1 - idx], "conv": conv,
                          "ambiguous": False})
        else:
            found.append({"node": node, "main": None, "skip": None, "conv": None, "ambiguous": True})
    return found


def _attr(node: onnx.NodeProto, name: str, default=None):
    for a in node.attribute:
        if a.name == name:
            return onnx.helper.get_attribute_value(a)
    return default


def default_opset(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def check_model(model: onnx.ModelProto, *, path: str = "<model>", max_opset: int = DEFAULT_MAX_OPSET) -> QdqReport:
    """Check ``model`` against every rule in ``RULES``; the report names each violation."""
    g = Graph(model)
    opset = default_opset(model)
    rep = QdqReport(path=path, opset=opset)
    bad = rep.violations.append

    # opset and domains
    if not (MIN_OPSET <= opset <= max_opset):
        bad(Violation("opset", "", "", f"default-domain opset is {opset}; this target parses {MIN_OPSET}..{max_opset}"))
    used = {n.domain or "" for n in model.graph.node}
    for imp in model.opset_import:
        d = imp.domain or ""
        if d in ("", "ai.onnx"):
            continue
        if d not in used:
            bad(Violation("opset-imports", "", "", f"stray opset import {d!r} v{imp.version}: no node uses it"))
    for n in model.graph.node:
        if (n.domain or "") not in ("", "ai.onnx"):
            bad(Violation("opset-imports", n.name, n.output[0] if n.output else "",
                          f"{n.domain}::{n.op_type} is not an ONNX operator TensorRT's parser knows"))
        if n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") or n.op_type in ("DynamicQuantizeLinear",):
            bad(Violation("onnx-ops", n.name, n.output[0] if n.output else "",
                          f"{n.op_type}: quantized operator; TensorRT needs QuantizeLinear/DequantizeLinear pairs"))

    qdq_nodes = [n for n in model.graph.node if n.op_type in (Q, DQ)]
    # per Q/DQ node: types, zero points, scales, axes
    for n in qdq_nodes:
        data = n.input[0]
        scale_name = n.input[1] if len(n.input) > 1 else ""
        zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else ""
        behind = data
        if n.op_type == DQ and data in g.producer and g.producer[data].op_type == Q:
            behind = g.producer[data].input[0]   # the float tensor a Q->DQ pair wraps
        weight = g.is_constant(behind)
        if not zp_name:
            bad(Violation("int8-only", n.name, data, "no zero point: the quantized type defaults to UINT8"))
            zp = None
        else:
            zp_t = g.dtype(zp_name)
            zp = g.array(zp_name)
            if zp_t is None:
                bad(Violation("int8-only", n.name, zp_name, "zero point is not a constant"))
            elif zp_t != onnx.TensorProto.INT8:
                bad(Violation("int8-only", n.name, zp_name,
                              f"zero point type {onnx.TensorProto.DataType.Name(zp_t)}, TensorRT takes INT8 only"))
            if zp is not None and np.any(zp != 0):
                bad(Violation("zero-point-zero", n.name, zp_name, f"zero point(s) {np.unique(zp)[:4].tolist()} != 0"))
        scale = g.array(scale_name) if scale_name else None
        if scale is None:
            bad(Violation("scale", n.name, scale_name, "scale is not a constant"))
            continue
        if g.dtype(scale_name) != onnx.TensorProto.FLOAT:
            bad(Violation("scale", n.name, scale_name, "scale is not float32"))
        if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
            bad(Violation("scale", n.name, scale_name, "scale has zero, negative or non-finite values"))
        if scale.size > 1:
            if not weight:
                bad(Violation("activation-per-tensor", n.name, data,
                              f"activation quantized per-channel ({scale.size} scales); TensorRT needs one"))
            else:
                axis = _attr(n, "axis", 1)
                w = g.array(behind)
                if axis != 0:
                    bad(Violation("weight-per-channel-axis0", n.name, data,
                                  f"per-channel axis {axis}; TensorRT accepts axis 0 (output channels) only"))
                elif w is not None and w.ndim and scale.size != w.shape[0]:
                    bad(Violation("weight-per-channel-axis0", n.name, data,
                                  f"{scale.size} scales for {w.shape[0]} output channels"))
        if zp is not None and scale is not None and zp.size != scale.size:
            bad(Violation("scale", n.name, zp_name, f"{zp.size} zero points for {scale.size} scales"))

    # weights: FP32 behind Q->DQ; pairing; dedicated DQ outputs
    for n in qdq_nodes:
        if n.op_type == DQ:
            src = n.input[0]
            p = g.producer.get(src)
            if g.is_constant(src):
                bad(Violation("weight-fp32-qdq", n.name, src,
                              f"weight stored as {onnx.TensorProto.DataType.Name(g.dtype(src))} initializer straight "
                              "into DequantizeLinear; TensorRT 8.x wants the FP32 weight behind QuantizeLinear"))
            elif p is None or p.op_type != Q:
                bad(Violation("qdq-pair", n.name, src, "DequantizeLinear does not read a QuantizeLinear output"))
            elif not _same_qparams(g, p, n):
                bad(Violation("qdq-pair", n.name, src, f"scale/zero point differ from its QuantizeLinear {p.name}"))
            users = g.consumers.get(n.output[0], [])
            count = len(users) + (1 if n.output[0] in g.graph_outputs else 0)
            if count != 1:
                bad(Violation("dedicated-dq", n.name, n.output[0],
                              f"DequantizeLinear output used by {count} consumers "
                              f"({', '.join(u.name for u in users[:4])}); each consumer needs its own DQ"))
        else:
            if g.is_constant(n.input[0]) and g.dtype(n.input[0]) != onnx.TensorProto.FLOAT:
                bad(Violation("weight-fp32-qdq", n.name, n.input[0], "quantized weight is not FP32"))
            for u in g.consumers.get(n.output[0], []):
                if u.op_type != DQ:
                    bad(Violation("qdq-pair", n.name, n.output[0],
                                  f"QuantizeLinear feeds {u.op_type} {u.name}, not a DequantizeLinear"))
            if n.output[0] in g.graph_outputs:
                bad(Violation("qdq-pair", n.name, n.output[0], "QuantizeLinear output is a graph output"))

    # Conv/Gemm inputs
    quantized, float_layers = [], []
    for n in model.graph.node:
        if n.op_type not in WEIGHTED:
            continue
        data_q = g.is_dequantized(n.input[0])
        w_name = n.input[1]
        w_q = g.is_dequantized(w_name)
        if data_q and w_q:
            quantized.append(n.name)
        elif not data_q and not w_q:
            float_layers.append(n.name)
        else:
            which = "weight" if data_q else "data input"
            bad(Violation("conv-gemm-inputs", n.name, w_name if data_q else n.input[0],
                          f"{n.op_type} half quantized: its {which} has no Q/DQ"))
        if len(n.input) > 2 and n.input[2] and g.is_dequantized(n.input[2]):
            bad(Violation("conv-gemm-inputs", n.name, n.input[2],
                          "bias behind DequantizeLinear (INT32 bias); TensorRT wants an FP32 bias"))
        if n.op_type == "Gemm" and w_q and _attr(n, "transB", 0) != 1:
            bad(Violation("weight-per-channel-axis0", n.name, w_name,
                          "Gemm with transB=0: weight axis 0 is not the output channel"))
    if not quantized:
        bad(Violation("has-int8", "", "", "no quantized Conv/Gemm: this is not an INT8 Q/DQ model"))

    # residual Adds
    n_res = 0
    for r in residual_adds(g):
        node = r["node"]
        if r["ambiguous"]:
            if all(g.is_dequantized(i) for i in node.input):
                bad(Violation("residual-add", node.name, node.input[0],
                              "both inputs of an Add of two activations are quantized; quantize only the skip branch"))
            continue
        n_res += 1
        if g.is_dequantized(r["main"]):
            bad(Violation("residual-add", node.name, r["main"],
                          f"the branch from {r['conv'].name} (fused into the Add by TensorRT) is quantized; "
                          "only the skip branch may be"))
        conv_q = r["conv"].name in quantized
        if conv_q and not g.is_dequantized(r["skip"]):
            bad(Violation("residual-add", node.name, r["skip"],
                          f"skip branch not quantized although {r['conv'].name} is INT8: TensorRT cannot fuse the "
                          "Add into the INT8 convolution"))
    rep.stats = {"quantized_layers": len(quantized), "float_layers": float_layers,
                 "qdq_pairs": sum(1 for n in qdq_nodes if n.op_type == DQ), "residual_adds": n_res}
    return rep


def _same_qparams(g: Graph, q: onnx.NodeProto, dq: onnx.NodeProto) -> bool:
    def params(n):
        s = g.array(n.input[1]) if len(n.input) > 1 else None
        z = g.array(n.input[2]) if len(n.input) > 2 and n.input[2] else None
        return s, z, _attr(n, "axis", 1)

    (s1, z1, a1), (s2, z2, a2) = params(q), params(dq)
    if s1 is None or s2 is None or s1.shape != s2.shape or not np.array_equal(s1, s2):
        return False
    if (z1 is None) != (z2 is None) or (z1 is not None and not np.array_equal(z1, z2)):
        return False
    return s1.size == 1 or a1 == a2


def check_file(path: str | os.PathLike, *, max_opset: int = DEFAULT_MAX_OPSET) -> QdqReport:
    model = onnx.load(os.fspath(path), load_external_data=True)
    return check_model(model, path=os.fspath(path), max_opset=max_opset)


def rules_text(rules: Optional[Sequence[str]] = None) -> str:
    return "\n".join(f"  {k:26s} {v}" for k, v in RULES.items() if rules is None or k in rules)
