"""The manifest's declared schema: every top-level field of ``manifest.json``, its type, and whether it must be
there. The pipeline writes a ``Manifest``; ``edgecnn verify`` (``edgecnn.artefact.read_manifest``) checks a
manifest read from disk against the same declaration. ``docs/manifest.md`` documents each field.

Schema 2 (this edgecnn) declares every field, gives the target-specific blocks their own names (``tensorrt``,
``coreml``, ``int8``, ``local_checks``) and one shape to the INT8 recipe record
(``exporters.int8.engine.Int8Record``). Schema 1 manifests still verify: their files and hashes are checked
the same way; fields that moved are read where they were.

A manifest read from disk may have been written by anyone who could write the bundle, so ``problems`` checks
more than types: the nested records the validator and the store read (``weights``, ``input``, ``files``), the
names that become paths (``arch``, ``target``, ``precision``: safe identifiers; ``model_file``,
``labels_file``, ``reference_file`` and every ``files`` key: relative paths inside the bundle, among the
hashed files) and the ranges of the input description (finite, positive std, bounded sizes).
"""
from __future__ import annotations

import dataclasses
import math
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from exporters.parity import Gate

SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
STATUSES = ("validated", "pending", "failed")
# A name that becomes part of a path or an object name: arch, target, precision (and a store's versions).
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
SHA256 = re.compile(r"[0-9a-f]{64}")
MAX_SIDE = 16384          # pixels of a model input side; the zoo's largest is 600 (EfficientNet-B7)
MAX_CLASSES = 1_000_000


def is_identifier(value: Any) -> bool:
    return isinstance(value, str) and IDENTIFIER.fullmatch(value) is not None


def is_bundle_path(value: Any) -> bool:
    """A relative posix path that stays inside its folder: no root, no drive, no ``..``, no control characters."""
    if not isinstance(value, str) or not value or len(value) > 1024 or "\\" in value or not value.isprintable():
        return False
    parts = value.split("/")
    return ":" not in parts[0] and all(p not in ("", ".", "..") and len(p) <= 255 for p in parts)


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


@dataclass
class WeightsRecord:
    """``manifest["weights"]`` (``edgecnn.weights.WeightsInfo.to_dict()``): the validator reads ``pretrained``."""
    source: str
    pretrained: bool
    sha256: Optional[str] = None
    num_classes: Optional[int] = None
    bn_reestimated: bool = False
    notes: List[str] = field(default_factory=list)


@dataclass
class InputRecord:
    """``manifest["input"]`` (``calibration.InputSpec.to_dict()``): what ``InputSpec.from_dict`` reads back."""
    channels: int
    height: int
    width: int
    resize: int
    interpolation: str
    mean: List[float]
    std: List[float]
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    dtype: str = "float32"
    name: str = "input"
    color_order: str = "RGB"
    shape: List[int] = field(default_factory=list)
    crop: List[int] = field(default_factory=list)
    steps: List[str] = field(default_factory=list)


@dataclass
class FileRecord:
    """One value of ``manifest["files"]``."""
    sha256: str
    bytes: int


NESTED = {"weights": WeightsRecord, "input": InputRecord}
REQUIRED = tuple(f.name for f in dataclasses.fields(Manifest)
                 if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
# what every readable schema version has (schema 1 lacked some of the fields REQUIRED now)
REQUIRED_ALWAYS = ("schema_version", "edgecnn_version", "arch", "target", "precision", "status", "weights", "input",
                   "files")


def _check_type(value, kind) -> bool:
    origin = typing.get_origin(kind)
    if origin is typing.Union:
        return any(_check_type(value, a) for a in typing.get_args(kind))
    if kind is type(None):
        return value is None
    if kind is Any:
        return True
    if origin in (dict, Dict):
        inner = typing.get_args(kind)[1] if typing.get_args(kind) else Any
        return isinstance(value, dict) and (inner is Any or all(_check_type(v, inner) for v in value.values()))
    if origin in (list, List):
        inner = typing.get_args(kind)[0] if typing.get_args(kind) else Any
        return isinstance(value, list) and (inner is Any or all(_check_type(v, inner) for v in value))
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _record_problems(value: Any, record, where: str) -> List[str]:
    """Missing or mistyped fields of a nested record (fields it does not declare are allowed: they are data)."""
    if not isinstance(value, dict):
        return [f"{where} must be an object, not {type(value).__name__}"]
    hints = typing.get_type_hints(record)
    out = [f"{where}.{f.name} is missing" for f in dataclasses.fields(record)
           if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in value]
    for key, kind in hints.items():
        if key in value and not _check_type(value[key], kind):
            out.append(f"{where}.{key} must be {_type_name(kind)}, not {type(value[key]).__name__}")
    return out


def _input_problems(spec: dict) -> List[str]:
    """Ranges of ``input`` a model can be fed with: sizes, one finite mean and one positive std per channel."""
    out = []
    channels = spec["channels"]
    if channels not in (1, 3):
        out.append(f"input.channels must be 1 or 3, not {channels}")
    for key in ("height", "width", "resize"):
        if not 1 <= spec[key] <= MAX_SIDE:
            out.append(f"input.{key} must be 1 to {MAX_SIDE} pixels, not {spec[key]}")
    if spec["interpolation"] not in ("bilinear", "bicubic", "nearest"):
        out.append(f"input.interpolation {spec['interpolation']!r} is not bilinear, bicubic or nearest")
    for key in ("mean", "std"):
        if len(spec[key]) != channels:
            out.append(f"input.{key} needs {channels} value(s), has {len(spec[key])}")
    if spec.get("color_order", "RGB") not in ("RGB", "grey"):
        out.append(f"input.color_order {spec['color_order']!r} is not RGB or grey")
    elif spec.get("color_order", "RGB") == "RGB" and channels != 3:
        out.append(f"input.color_order RGB needs 3 channels, not {channels}")
    if not all(math.isfinite(v) and v > 0 for v in spec["std"]):
        out.append("input.std values must be finite and > 0")
    if not all(math.isfinite(v) for v in spec["mean"]) or not (math.isfinite(spec.get("scale", 1.0)) and
                                                             spec.get("scale", 1.0) > 0):
        out.append("input.mean must be finite and input.scale finite and > 0")
    return out


def _path_problems(manifest: dict) -> List[str]:
    """The names that become paths: identifiers, bundle-relative files among the hashed ones."""
    out = [f"{key} {manifest[key]!r} is not a plain name (letters, digits, . _ + -, at most 64)"
           for key in ("arch", "target", "precision") if key in manifest and not is_identifier(manifest[key])]
    files = manifest.get("files")
    if not isinstance(files, dict):
        return out     # field_problems says so
    if not files:
        return out + ["files must be a non-empty object {path: {sha256, bytes}}"]
    for rel, meta in files.items():
        if rel.startswith("/") or ".." in rel.split("/"):
            out.append(f"files[{rel!r}] points outside the bundle")
        elif not is_bundle_path(rel) or rel == "manifest.json":
            out.append(f"files[{rel!r}] is not a file path inside the bundle")
        elif _record_problems(meta, FileRecord, "") or not SHA256.fullmatch(meta["sha256"]) or meta["bytes"] < 0:
            out.append(f"files[{rel!r}] must be {{sha256: 64 hex digits, bytes: integer >= 0}}")
    for key in ("labels_file", "reference_file", "model_file"):
        value = manifest.get(key)
        if value is None:
            continue
        if not is_bundle_path(value):
            out.append(f"{key} {value!r} is not a file path inside the bundle")
        elif value not in files and (key != "model_file" or not any(rel.startswith(f"{value}/") for rel in files)):
            # model_file is a file (model.onnx) or a folder of hashed files (a Core ML model.mlpackage)
            out.append(f"{key} {value!r} is not among the hashed files")
    return out


def problems(manifest: dict) -> List[str]:
    """Everything wrong with a manifest read from disk, as short phrases (empty: it follows its schema)."""
    out = field_problems(manifest) + _path_problems(manifest)
    for key, record in NESTED.items():
        if key in manifest:
            wrong = _record_problems(manifest[key], record, key)
            out += wrong or (_input_problems(manifest[key]) if key == "input" else [])
    recipe = manifest.get("recipe")
    if isinstance(recipe, dict) and "gate" in recipe:
        try:
            Gate.from_dict(recipe["gate"])
        except ValueError as e:
            out.append(str(e))
    num_classes = manifest.get("num_classes")
    if isinstance(num_classes, int) and not 1 <= num_classes <= MAX_CLASSES:
        out.append(f"num_classes must be 1 to {MAX_CLASSES:,}, not {num_classes}")
    return out


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
