"""Small ONNX graph helpers shared by the exporters, the recipes and the INT8 engine."""
from __future__ import annotations

from typing import Dict, List

import onnx
from onnx import helper


def consumers(model: onnx.ModelProto) -> Dict[str, List[onnx.NodeProto]]:
    """{tensor: the nodes that read it}."""
    out: Dict[str, List[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def attr(node: onnx.NodeProto, name: str, default=None):
    """The value of attribute ``name`` of ``node``, or ``default``."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Remove initializers no node and no graph output reads (in place)."""
    used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
    keep = [i for i in model.graph.initializer if i.name in used]
    if len(keep) != len(model.graph.initializer):
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
