"""PyTorch module -> ONNX file (FP32 or FP16), checked, simplified, with metadata in ``metadata_props``.

Facts that shape this (measured here; docs/onnx.md): the TorchScript exporter (``dynamo=False``)
honours opset 17 in one file and is 4-40x faster, so it is the default; the dynamo exporter is the
fallback (it gives opset 18 when 17 is asked for and writes external data unless told not to) and
also the only one that handles adaptive pooling at non-native sizes (AlexNet at 64 px, VGG at 32 px).
Whatever comes out, the opset and the exporter actually used are reported, never assumed.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import onnx

from calibration.spec import InputSpec

from ..errors import ExportError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 17
OUTPUT_NAME = "logits"


@dataclass
class OnnxExportInfo:
    path: str
    opset: int
    exporter: str                 # "torchscript" or "dynamo": the one that produced the file
    fallback_reason: str = ""     # why the preferred exporter was not used
    nodes_exported: int = 0
    nodes: int = 0                # after simplification
    simplifier: str = ""
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"opset": self.opset, "exporter": self.exporter, "fallback_reason": self.fallback_reason,
                "nodes_exported": self.nodes_exported, "nodes": self.nodes, "simplifier": self.simplifier,
                "notes": list(self.notes)}


def _opset_of(model: onnx.ModelProto) -> int:
    return max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)


def _export_torchscript(module, dummy, path: str, opset: int, input_name: str, dynamic_batch: bool) -> None:
    import torch

    axes = {input_name: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic_batch else None
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice, every call
        torch.onnx.export(module, (dummy,), path, dynamo=False, opset_version=opset, input_names=[input_name],
                          output_names=[OUTPUT_NAME], dynamic_axes=axes, do_constant_folding=True)


def _export_dynamo(module, dummy, path: str, opset: int, input_name: str, dynamic_batch: bool) -> None:
    import torch

    shapes = ({"x": {0: torch.export.Dim("batch", min=1, max=1024)}} if dynamic_batch else None)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (dummy,), dynamo=True, opset_version=opset, input_names=[input_name],
                                    output_names=[OUTPUT_NAME], dynamic_shapes=_dynamic_shapes_for(module, shapes),
                                    external_data=False)
        program.save(path, external_data=False)


def _dynamic_shapes_for(module, shapes):
    """torch.export keys dynamic shapes by the forward argument's name; find it."""
    if shapes is None:
        return None
    import inspect

    params = [p for p in inspect.signature(module.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return {params[0].name: shapes["x"]} if params else None


def simplify(model: onnx.ModelProto) -> tuple:
    """Simplify with onnxslim (pure Python, fuses and folds what the TorchScript exporter leaves)."""
    try:
        import onnxslim
    except ImportError:
        return model, ""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        slim = onnxslim.slim(model)
    return (slim, "onnxslim " + getattr(onnxslim, "__version__", "?")) if slim is not None else (model, "")


def set_metadata(model: onnx.ModelProto, metadata: Dict[str, str]) -> None:
    """Write ``metadata`` into ``metadata_props`` (sorted, replacing keys already there)."""
    existing = {p.key: p.value for p in model.metadata_props}
    existing.update({k: (v if isinstance(v, str) else json.dumps(v, sort_keys=True)) for k, v in metadata.items()})
    del model.metadata_props[:]
    for key in sorted(existing):
        entry = model.metadata_props.add()
        entry.key, entry.value = key, existing[key]


def export_onnx(module, spec: InputSpec, path: str | os.PathLike, *, opset: int = DEFAULT_OPSET,
                exporter: str = "auto", dynamic_batch: bool = True, do_simplify: bool = True,
                metadata: Optional[Dict[str, str]] = None) -> OnnxExportInfo:
    """Export ``module`` (eval mode, FP32) to ``path``; returns what was produced and how.

    ``exporter``: "auto" (TorchScript, falling back to dynamo when it fails), "torchscript" or "dynamo".
    """
    import torch

    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ExportError(f"unknown ONNX exporter {exporter!r}", hint="use auto, torchscript or dynamo")
    path = os.fspath(path)
    module = module.eval()
    dummy = torch.zeros(spec.batch_shape(1), dtype=torch.float32)
    info_exporter, fallback_reason = exporter, ""
    with torch.no_grad():
        if exporter in ("auto", "torchscript"):
            try:
                _export_torchscript(module, dummy, path, opset, spec.name, dynamic_batch)
                info_exporter = "torchscript"
            except OSError:
                raise  # the disk is full or not writable: another exporter would fail the same way
            except Exception as exc:  # the TorchScript exporter raises many types; all mean "try dynamo"
                if exporter == "torchscript":
                    raise ExportError(f"TorchScript ONNX export failed: {_first_line(exc)}",
                                      hint="try --onnx-exporter dynamo") from exc
                fallback_reason = f"TorchScript exporter failed ({_first_line(exc)}); used the dynamo exporter"
                log.warning("%s", fallback_reason)
                info_exporter = "dynamo"
        if info_exporter == "dynamo":
            try:
                _export_dynamo(module, dummy, path, opset, spec.name, dynamic_batch)
            except OSError:
                raise
            except Exception as exc:
                raise ExportError(f"ONNX export failed with the dynamo exporter: {_first_line(exc)}"
                                  + (f" (after: {fallback_reason})" if fallback_reason else "")) from exc
    model = onnx.load(path)
    nodes_exported = len(model.graph.node)
    simplifier = ""
    if do_simplify:
        model, simplifier = simplify(model)
    set_metadata(model, metadata or {})
    got = _opset_of(model)
    notes = []
    if got != opset:
        notes.append(f"asked for opset {opset}, the {info_exporter} exporter produced opset {got}")
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"exported ONNX model fails onnx.checker: {_first_line(exc)}") from exc
    onnx.save(model, path)
    return OnnxExportInfo(path=path, opset=got, exporter=info_exporter, fallback_reason=fallback_reason,
                          nodes_exported=nodes_exported, nodes=len(model.graph.node), simplifier=simplifier,
                          notes=notes)


def convert_fp16(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """FP32 ONNX -> FP16 weights and compute, FP32 inputs/outputs (callers feed float32 as before).

    Uses onnxruntime's float16 converter. FP16 is for GPU/mobile runtimes; on x86 CPUs onnxruntime has
    no FP16 convolution kernels, so expect no speed-up there.
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = onnx.load(os.fspath(src))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(model, keep_io_types=True)
    # The converter appends its input/output Cast nodes at the end of the node list; onnx.checker
    # and TensorRT want nodes in topological order.
    toposort(half.graph)
    try:
        onnx.checker.check_model(half, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"FP16 conversion produced an invalid model: {_first_line(exc)}") from exc
    onnx.save(half, os.fspath(dst))


def toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` topologically, in place (stable: keeps the original order where free)."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        progressed = []
        rest = []
        for node in pending:
            if all(name in available for name in node.input):
                progressed.append(node)
                available.update(node.output)
            else:
                rest.append(node)
        if not progressed:
            raise ExportError(f"graph has a cycle or a dangling input near node {rest[0].name!r}")
        ordered.extend(progressed)
        pending = rest
    copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in ordered]
    del graph.node[:]
    graph.node.extend(copies)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def set_metadata_file(path: str | os.PathLike, metadata: Dict[str, str]) -> None:
    """``set_metadata`` on a model file in place (e.g. after a quantizer rewrote it without our metadata)."""
    model = onnx.load(os.fspath(path))
    set_metadata(model, metadata)
    onnx.save(model, os.fspath(path))


def load_metadata(path: str | os.PathLike) -> Dict[str, str]:
    model = onnx.load(os.fspath(path), load_external_data=False)
    return {p.key: p.value for p in model.metadata_props}


def is_onnx_file(path: str | os.PathLike) -> bool:
    """True when ``path`` parses as an ONNX model (cheap sanity check for user-supplied files)."""
    try:
        model = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:
        return False
    return len(model.graph.node) > 0
