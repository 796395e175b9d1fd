"""Check a Q/DQ ONNX file against TensorRT's explicit-quantization rules, one named finding each.

TensorRT (8.5 and later) builds INT8 engines from QuantizeLinear/DequantizeLinear pairs. Its ONNX parser
refuses some Q/DQ models outright and builds others slower than they could run, so each finding has a
severity:

* **error**: TensorRT's ONNX parser refuses the model; the rule cites the importer requirement (INT8 not
  UINT8, zero points 0, positive constant scales, one scale per element of the quantized axis, activations
  per tensor, ONNX opset <= 17 for TensorRT 8.5/8.6, no operator it has no importer for);
* **warning**: TensorRT builds it, but slower than it could be (a residual Add quantized on its fused Conv
  branch, a DequantizeLinear shared by several consumers, per-channel weights not on the output-channel
  axis, an INT8 weight initializer instead of an FP32 weight behind Q->DQ, a half-quantized layer, ...).

onnxruntime's quantizer does not guarantee any of this, so the ``trt`` recipe's output is checked by this
module, and so can any file a user brings (``edgecnn check-qdq model.onnx``). A layer left in float (the
INT8 fallback keeps sensitive layers in higher precision) is legal: TensorRT runs it in FP16/FP32.
"""
from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import onnx
from onnx import numpy_helper

Q, DQ = "QuantizeLinear", "DequantizeLinear"
WEIGHTED = ("Conv", "Gemm")
MIN_OPSET, DEFAULT_MAX_OPSET = 13, 17
ERROR, WARNING = "error", "warning"
SEVERITY_MEANS = {ERROR: "refused by TensorRT's ONNX parser", WARNING: "builds, but slower than it could be"}


@dataclass(frozen=True)
class Rule:
    severity: str        # ERROR or WARNING
    text: str            # what a conforming model does
    cite: str = ""       # errors: the TensorRT requirement the model breaks


_IMPORTER = "TensorRT ONNX parser, QuantizeLinear/DequantizeLinear importer: "
RULES: Dict[str, Rule] = {
    "opset": Rule(ERROR, "default-domain opset between 13 (per-axis Q/DQ) and the target's maximum (17 for "
                         "TensorRT 8.5/8.6)", "TensorRT 8.5/8.6's ONNX parser imports opsets up to 17; per-axis "
                         "QuantizeLinear/DequantizeLinear need opset 13"),
    "foreign-op": Rule(ERROR, "every node is an ONNX-domain operator",
                       "TensorRT ONNX parser: no importer for operators outside the ONNX domain"),
    "onnx-ops": Rule(ERROR, "quantization only through QuantizeLinear/DequantizeLinear (no QLinear*/ *Integer "
                            "operators)", "TensorRT ONNX parser: explicit quantization is Q/DQ only; no importer "
                            "for QLinear*, *Integer or DynamicQuantizeLinear"),
    "int8-only": Rule(ERROR, "zero points present and INT8 (an absent zero point means UINT8)",
                      _IMPORTER + "INT8 quantization only (UINT8 and INT32 are refused)"),
    "zero-point-zero": Rule(ERROR, "every zero point is 0 (symmetric quantization)",
                            _IMPORTER + "the zero point must be 0"),
    "scale": Rule(ERROR, "scales are positive, finite float32 constants",
                  _IMPORTER + "the scale must be a constant with positive values"),
    "activation-per-tensor": Rule(ERROR, "Q/DQ on activations use a single scale (per-tensor)",
                                  _IMPORTER + "per-channel scales only for constant weights"),
    "scale-count": Rule(ERROR, "a per-channel scale has one value per element of the quantized axis",
                        _IMPORTER + "the scale's size must equal the size of the quantization axis"),
    "qdq-pair": Rule(ERROR, "each QuantizeLinear feeds DequantizeLinear nodes only, and is not a graph output",
                     "TensorRT explicit quantization: a QuantizeLinear output is consumed by DequantizeLinear"),
    "opset-imports": Rule(WARNING, "no opset import for a domain that no node uses"),
    "weight-axis0": Rule(WARNING, "per-channel weight scales on axis 0, the output channels (the axis TensorRT "
                                  "fuses into its INT8 convolution kernels; Gemm with transB=1)"),
    "weight-fp32-qdq": Rule(WARNING, "weights are FP32 initializers behind a QuantizeLinear->DequantizeLinear pair "
                                     "(what TensorRT 8.x constant-folds into INT8 weights)"),
    "qdq-same-params": Rule(WARNING, "a DequantizeLinear has the scale and zero point of the QuantizeLinear it reads "
                                     "(otherwise TensorRT requantizes between them)"),
    "dedicated-dq": Rule(WARNING, "each DequantizeLinear output has exactly one consumer (TensorRT fuses a DQ into "
                                  "one consumer)"),
    "half-quantized": Rule(WARNING, "a quantized Conv/Gemm has Q/DQ on both its data input and its weight (a layer "
                                    "with one of them quantized runs in float)"),
    "bias-fp32": Rule(ERROR, "a Conv/Gemm bias stays FP32 (no INT32 bias behind DequantizeLinear)",
                      _IMPORTER + "DequantizeLinear takes INT8 input, not an INT32 bias"),
    "residual-add": Rule(WARNING, "on a residual Add only the skip branch carries Q/DQ (TensorRT fuses the Conv "
                                  "branch into the Add), and it does whenever that Conv is quantized"),
    "has-int8": Rule(WARNING, "the model contains at least one quantized Conv/Gemm (otherwise the engine is float)"),
}


@dataclass
class Violation:
    rule: str
    node: str
    tensor: str
    message: str

    @property
    def severity(self) -> str:
        return RULES[self.rule].severity

    def __str__(self) -> str:
        return f"[{self.rule}] node {self.node or '-'} / tensor {self.tensor or '-'}: {self.message}"

    def to_dict(self) -> dict:
        out = {"rule": self.rule, "severity": self.severity, "node": self.node, "tensor": self.tensor,
               "message": self.message}
        if RULES[self.rule].cite:
            out["cite"] = RULES[self.rule].cite
        return out


@dataclass
class QdqReport:
    path: str
    opset: int
    violations: List[Violation] = field(default_factory=list)   # every finding, errors and warnings
    stats: Dict[str, object] = field(default_factory=dict)

    @property
    def errors(self) -> List[Violation]:
        return [v for v in self.violations if v.severity == ERROR]

    @property
    def warnings(self) -> List[Violation]:
        return [v for v in self.violations if v.severity == WARNING]

    @property
    def ok(self) -> bool:
        """No error: TensorRT's parser takes the model (warnings may remain)."""
        return not self.errors

    def to_dict(self) -> dict:
        return {"path": self.path, "opset": self.opset, "passed": self.ok, "rules_checked": sorted(RULES),
                "errors": [v.to_dict() for v in self.errors], "warnings": [v.to_dict() for v in self.warnings],
                "severity": dict(SEVERITY_MEANS), "stats": dict(self.stats)}

    def counts(self) -> str:
        return (f"{len(self.errors)} error(s) ({SEVERITY_MEANS[ERROR]}), {len(self.warnings)} warning(s) "
                f"({SEVERITY_MEANS[WARNING]})")

    def summary(self) -> str:
        s = self.stats
        head = (f"{self.path}: {'PASS' if self.ok else 'FAIL'} — TensorRT Q/DQ rules ({len(RULES)} checked), opset "
                f"{self.opset}; {s.get('quantized_layers', 0)} INT8 Conv/Gemm, {len(s.get('float_layers', []))} "
                f"kept in float, {s.get('qdq_pairs', 0)} Q/DQ pairs, {s.get('residual_adds', 0)} residual Add(s); "
                + self.counts())
        lines = [head]
        for title, found in (("errors", self.errors), ("warnings", self.warnings)):
            if found:
                lines.append(f"{title}:")
                lines += [f"  {v}" + (f"\n      ({RULES[v.rule].cite})" if RULES[v.rule].cite else "")
                          for v in found[:50]]
                if len(found) > 50:
                    lines.append(f"  … and {len(found) - 50} more")
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


Report = Callable[[Violation], None]


def check_model(model: onnx.ModelProto, *, path: str = "<model>", max_opset: int = DEFAULT_MAX_OPSET) -> QdqReport:
    """Check ``model`` against every rule in ``RULES``; the report names each finding with its severity."""
    g = Graph(model)
    rep = QdqReport(path=path, opset=default_opset(model))
    bad = rep.violations.append
    _check_opset_and_domains(model, rep.opset, max_opset, bad)
    qdq_nodes = [n for n in model.graph.node if n.op_type in (Q, DQ)]
    for n in qdq_nodes:
        _check_qparams(g, n, bad)
    for n in qdq_nodes:
        (_check_dq_input if n.op_type == DQ else _check_q_output)(g, n, bad)
    quantized, float_layers = _check_weighted(g, model, bad)
    n_res = _check_residual_adds(g, quantized, bad)
    rep.stats = {"quantized_layers": len(quantized), "float_layers": float_layers,
                 "qdq_pairs": sum(1 for n in qdq_nodes if n.op_type == DQ), "residual_adds": n_res}
    return rep


def _check_opset_and_domains(model: onnx.ModelProto, opset: int, max_opset: int, bad: Report) -> None:
    if not (MIN_OPSET <= opset <= max_opset):
        bad(Violation("opset", "", "", f"default-domain opset is {opset}; this target parses {MIN_OPSET}..{max_opset}"))
    used = {n.domain or "" for n in model.graph.node}
    for imp in model.opset_import:
        d = imp.domain or ""
        if d not in ("", "ai.onnx") and d not in used:
            bad(Violation("opset-imports", "", "", f"stray opset import {d!r} v{imp.version}: no node uses it"))
    for n in model.graph.node:
        out = n.output[0] if n.output else ""
        if (n.domain or "") not in ("", "ai.onnx"):
            bad(Violation("foreign-op", n.name, out, f"{n.domain}::{n.op_type} is not an ONNX operator TensorRT's "
                                                     "parser knows"))
        if n.op_type.startswith("QLinear") or n.op_type.endswith("Integer") or n.op_type == "DynamicQuantizeLinear":
            bad(Violation("onnx-ops", n.name, out,
                          f"{n.op_type}: quantized operator; TensorRT needs QuantizeLinear/DequantizeLinear pairs"))


def _wrapped(g: "Graph", n: onnx.NodeProto) -> str:
    """The tensor a Q/DQ node quantizes: through the Q of a Q->DQ pair for a DQ."""
    data = n.input[0]
    if n.op_type == DQ and data in g.producer and g.producer[data].op_type == Q:
        return g.producer[data].input[0]
    return data


def _check_zero_point(g: "Graph", n: onnx.NodeProto, bad: Report):
    """The zero point's array (None when absent or not a constant); names a UINT8/INT32 or non-zero one."""
    zp_name = n.input[2] if len(n.input) > 2 and n.input[2] else ""
    if not zp_name:
        bad(Violation("int8-only", n.name, n.input[0], "no zero point: the quantized type defaults to UINT8"))
        return None
    zp_t, zp = g.dtype(zp_name), g.array(zp_name)
    if zp_t is None:
        bad(Violation("int8-only", n.name, zp_name, "zero point is not a constant"))
    elif zp_t != onnx.TensorProto.INT8:
        bad(Violation("int8-only", n.name, zp_name,
                      f"zero point type {onnx.TensorProto.DataType.Name(zp_t)}, TensorRT takes INT8 only"))
    if zp is not None and np.any(zp != 0):
        bad(Violation("zero-point-zero", n.name, zp_name, f"zero point(s) {np.unique(zp)[:4].tolist()} != 0"))
    return zp


def _check_qparams(g: "Graph", n: onnx.NodeProto, bad: Report) -> None:
    """Types, zero point, scale values and the per-channel axis of one Q/DQ node."""
    zp = _check_zero_point(g, n, bad)
    scale_name = n.input[1] if len(n.input) > 1 else ""
    scale = g.array(scale_name) if scale_name else None
    if scale is None:
        bad(Violation("scale", n.name, scale_name, "scale is not a constant"))
        return
    if g.dtype(scale_name) != onnx.TensorProto.FLOAT:
        bad(Violation("scale", n.name, scale_name, "scale is not float32"))
    if not np.all(np.isfinite(scale)) or np.any(scale <= 0):
        bad(Violation("scale", n.name, scale_name, "scale has zero, negative or non-finite values"))
    if zp is not None and zp.size != scale.size:
        bad(Violation("scale-count", n.name, n.input[2], f"{zp.size} zero points for {scale.size} scales"))
    if scale.size > 1:
        _check_per_channel(g, n, scale, bad)


def _check_per_channel(g: "Graph", n: onnx.NodeProto, scale: np.ndarray, bad: Report) -> None:
    behind = _wrapped(g, n)
    if not g.is_constant(behind):
        bad(Violation("activation-per-tensor", n.name, n.input[0],
                      f"activation quantized per-channel ({scale.size} scales); TensorRT needs one"))
        return
    axis, w = _attr(n, "axis", 1), g.array(behind)
    if w is None or not w.ndim:
        return
    if not -w.ndim <= axis < w.ndim:
        bad(Violation("scale-count", n.name, n.input[0], f"axis {axis} out of range for a {w.ndim}-d weight"))
    elif scale.size != w.shape[axis]:
        bad(Violation("scale-count", n.name, n.input[0], f"{scale.size} scales for axis {axis} of size {w.shape[axis]}"))
    elif axis % w.ndim != 0:
        bad(Violation("weight-axis0", n.name, n.input[0],
                      f"per-channel axis {axis}; TensorRT's INT8 kernels fuse scales on axis 0 (output channels)"))


def _check_dq_input(g: "Graph", n: onnx.NodeProto, bad: Report) -> None:
    src = n.input[0]
    p = g.producer.get(src)
    if g.is_constant(src):
        bad(Violation("weight-fp32-qdq", n.name, src,
                      f"weight stored as {onnx.TensorProto.DataType.Name(g.dtype(src))} initializer straight "
                      "into DequantizeLinear; TensorRT 8.x folds an FP32 weight behind QuantizeLinear"))
    elif p is not None and p.op_type == Q and not _same_qparams(g, p, n):
        bad(Violation("qdq-same-params", n.name, src, f"scale/zero point differ from its QuantizeLinear {p.name}"))
    users = g.consumers.get(n.output[0], [])
    count = len(users) + (1 if n.output[0] in g.graph_outputs else 0)
    if count > 1:
        bad(Violation("dedicated-dq", n.name, n.output[0], f"DequantizeLinear output used by {count} consumers "
                                                           f"({', '.join(u.name for u in users[:4])})"))


def _check_q_output(g: "Graph", n: onnx.NodeProto, bad: Report) -> None:
    if g.is_constant(n.input[0]) and g.dtype(n.input[0]) != onnx.TensorProto.FLOAT:
        bad(Violation("weight-fp32-qdq", n.name, n.input[0], "quantized weight is not FP32"))
    for u in g.consumers.get(n.output[0], []):
        if u.op_type != DQ:
            bad(Violation("qdq-pair", n.name, n.output[0],
                          f"QuantizeLinear feeds {u.op_type} {u.name}, not a DequantizeLinear"))
    if n.output[0] in g.graph_outputs:
        bad(Violation("qdq-pair", n.name, n.output[0], "QuantizeLinear output is a graph output"))


def _check_weighted(g: "Graph", model: onnx.ModelProto, bad: Report) -> tuple:
    """(quantized Conv/Gemm names, float ones); names half-quantized layers and INT32 biases."""
    quantized, float_layers = [], []
    for n in model.graph.node:
        if n.op_type not in WEIGHTED:
            continue
        data_q, w_name = g.is_dequantized(n.input[0]), n.input[1]
        w_q = g.is_dequantized(w_name)
        if data_q and w_q:
            quantized.append(n.name)
        elif not data_q and not w_q:
            float_layers.append(n.name)
        else:
            which = "weight" if data_q else "data input"
            bad(Violation("half-quantized", n.name, w_name if data_q else n.input[0],
                          f"{n.op_type} half quantized: its {which} has no Q/DQ, so it runs in float"))
        if len(n.input) > 2 and n.input[2] and g.is_dequantized(n.input[2]):
            bad(Violation("bias-fp32", n.name, n.input[2],
                          "bias behind DequantizeLinear (INT32 bias); TensorRT wants an FP32 bias"))
        if n.op_type == "Gemm" and w_q and _attr(n, "transB", 0) != 1:
            bad(Violation("weight-axis0", n.name, w_name, "Gemm with transB=0: weight axis 0 is not the output channel"))
    if not quantized:
        bad(Violation("has-int8", "", "", "no quantized Conv/Gemm: TensorRT builds this model in float"))
    return quantized, float_layers


def _check_residual_adds(g: "Graph", quantized: List[str], bad: Report) -> int:
    """Residual-Add placement (fusion); returns how many residual Adds the model has."""
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
        if r["conv"].name in quantized and not g.is_dequantized(r["skip"]):
            bad(Violation("residual-add", node.name, r["skip"],
                          f"skip branch not quantized although {r['conv'].name} is INT8: TensorRT cannot fuse the "
                          "Add into the INT8 convolution"))
    return n_res


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
    """The rules, errors first, each with its severity and (errors) the TensorRT requirement it cites."""
    lines = []
    for severity in (ERROR, WARNING):
        lines.append(f"{severity}s ({SEVERITY_MEANS[severity]}):")
        for k, r in RULES.items():
            if r.severity == severity and (rules is None or k in rules):
                lines.append(f"  {k:24s} {r.text}" + (f"\n  {'':24s} ({r.cite})" if r.cite else ""))
    return "\n".join(lines)
