"""The manifest's declared schema: every top-level field of ``manifest.json``, its type, and whether it must be
there. The pipeline writes a ``Manifest``; ``edgecnn verify`` (``edgecnn.artefact.read_manifest``) checks a
manifest read from disk against the same declaration. ``docs/manifest.md`` documents each field.

Schema 2 (this edgecnn) declares every field, gives the target-specific blocks their own names (``tensorrt``,
``coreml``, ``int8``, ``local_checks``) and one shape to the INT8 recipe record
(``exporters.int8.engine.Int8Record``). Schema 1 manifests still verify: their files and hashes are checked
the same way; fields that moved are read where they were.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATUSES = ("validated", "pending", "failed")


@dataclass
class Manifest:
    arch: str
    family: str
    target: str
    precision: str
    status: str                                   # validated | pending | failed
    model_file: str                               # bundle-relative file (or .mlpackage folder) the validator runs
    weights: Dict[str, Any]                       # source, pretrained, sha256, num_classes, bn_reestimated, notes
    input: Dict[str, Any]                         # calibration.InputSpec.to_dict(): how to feed the model
    input_from: str                               # "zoo" or "override (custom-trained checkpoint)"
    output: Dict[str, Any]                        # name, shape, kind (logits without softmax)
    num_classes: int
    labels_file: str
    reference_file: str
    export: Dict[str, Any]                        # exporter, opset, nodes (target-specific details)
    recipe: Dict[str, Any]                        # precision recipe; INT8: the engine's record
    calibration: Dict[str, Any]                   # source, image counts, groups, seed, fingerprint, used_for
    seed: int
    toolchain: Dict[str, Any]                     # versions of torch, onnx, onnxruntime, coremltools, ...
    edgecnn_version: str = ""
    schema_version: int = SCHEMA_VERSION
    parity: Optional[Dict[str, Any]] = None       # exporters.parity.Parity.to_dict() + runtime
    latency: Optional[Dict[str, Any]] = None      # batch1, throughput, load_seconds, runtime, machine; or not_measured
    pending: Optional[str] = None                 # status pending: what must still run, and where
    int8: Optional[Dict[str, Any]] = None         # INT8 vs FP32 speed and size, measured side by side
    tensorrt: Optional[Dict[str, Any]] = None     # TensorRT bundles: engine, build recipes, calibration cache, tool
    coreml: Optional[Dict[str, Any]] = None       # Core ML bundles: variants, metadata
    local_checks: List[Dict[str, Any]] = field(default_factory=list)    # checks of a pending bundle run here
    device_results: List[Dict[str, Any]] = field(default_factory=list)  # results merged from devices
    export_seconds: Optional[float] = None
    files: Dict[str, Dict[str, Any]] = field(default_factory=dict)      # {path: {sha256, bytes}}, not the manifest

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


REQUIRED = tuple(f.name for f in dataclasses.fields(Manifest)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
# what every readable schema version has (schema 1 lacked some of the fields REQUIRED now)
REQUIRED_ALWAYS = ("schema_version", "edgecnn_version", "arch", "target", "precision", "status", "input", "files")


def _check_type(value, kind) -> bool:
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        return any(_check_type(value, a) for a in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is Any:
        return True
    if origin in (dict, Dict):
        return isinstance(value, dict)
    if origin in (list, List):
        return isinstance(value, list)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def field_problems(manifest: dict) -> List[str]:
    """Declared fields of the wrong type, missing required ones, and fields the schema does not declare."""
    hints = typing.get_type_hints(Manifest)
    version = manifest.get("schema_version")
    required = REQUIRED if version == SCHEMA_VERSION else REQUIRED_ALWAYS
    problems = [f"{key} is missing" for key in required if key not in manifest]
    for key, value in manifest.items():
        if key not in hints:
            if version == SCHEMA_VERSION:
                problems.append(f"{key} is not a field of schema {SCHEMA_VERSION}")
            continue
        if not _check_type(value, hints[key]):
            problems.append(f"{key} must be {_type_name(hints[key])}, not {type(value).__name__}")
    if manifest.get("status") not in STATUSES:
        problems.append(f"status {manifest.get('status')!r} is not one of {', '.join(STATUSES)}")
    return problems


def _type_name(kind) -> str:
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(kind))
    if kind is type(None):
        return "null"
    if origin in (dict, Dict):
        return "an object"
    if origin in (list, List):
        return "a list"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false"}.get(kind, str(kind))
