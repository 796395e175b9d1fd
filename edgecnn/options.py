"""Typed export options: one dataclass per concern, each option with its type, default and help stated once.

``ExportOptions`` holds what every target uses (the ONNX export, the image counts, latency) and one section
per target concern: ``int8`` (``exporters.int8.options.Int8Options``, read by the INT8 engine), ``trt``
(``TrtOptions``) and ``coreml`` (``CoreMLOptions``). A section option is set with ``--target-option
SECTION.NAME=VALUE`` on ``edgecnn export`` and ``edgecnn matrix``; the CLI's own flags set the same fields.
The help text, the parsing and the checks are all derived from the fields, so a misspelt key is refused with
the closest names and a value is a value of its declared type. Imports nothing heavy.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional, Tuple

from exporters.int8.options import Int8Options, option

from .errors import UsageError

ONNX_EXPORTERS = ("auto", "torchscript", "dynamo")
W8A8_SCHEMES = ("affine", "symmetric")
IOS_VERSIONS = (16, 17, 18)
MAX_THREADS_PER_CORE = 4     # more latency threads than this per core only measures contention


def max_threads() -> int:
    """The most latency threads worth asking for on this machine."""
    return MAX_THREADS_PER_CORE * (os.cpu_count() or 1)


@dataclass
class TrtOptions:
    version: str = option("8.5.2", "TensorRT version written in the calibration-cache header (the device tool "
                                   "rewrites it to the device's own)")
    build_here: bool = option(True, "build the engine during export where TensorRT and a GPU exist")


@dataclass
class CoreMLOptions:
    ios: Optional[int] = option(None, "deployment target: 16, 17 or 18 (default 16; 17 for int8 W8A8, 18 for "
                                      "int4-weights)")
    w8a8_scheme: str = option("affine", "W8A8 activation scheme: affine (a zero point per tensor) or symmetric "
                                        "(coremltools' default; for the Neural Engine see docs/coreml.md)",
                              W8A8_SCHEMES)


@dataclass
class ExportOptions:
    opset: int = 17
    onnx_exporter: str = "auto"          # auto | torchscript | dynamo
    simplify: bool = True
    seed: int = 0
    calib_size: int = 256
    eval_size: int = 96
    threads: int = 1                     # latency threads (1: two never beat one on a shared 2-core box)
    latency: bool = True
    int8: Int8Options = field(default_factory=Int8Options)
    trt: TrtOptions = field(default_factory=TrtOptions)
    coreml: CoreMLOptions = field(default_factory=CoreMLOptions)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExportOptions":
        """The inverse of ``to_dict`` (a matrix job, a saved run); unknown keys are a usage error."""
        return _build(cls, d, "")

    def check(self) -> "ExportOptions":
        """Refuse values no code path accepts, as one usage error naming the option."""
        wrong = _type_problems(self, "")
        if wrong:
            raise UsageError(wrong[0], hint="`edgecnn export --help` lists the options and their types")
        if self.onnx_exporter not in ONNX_EXPORTERS:
            raise UsageError(f"unknown ONNX exporter {self.onnx_exporter!r}", hint="use auto, torchscript or dynamo")
        if self.coreml.w8a8_scheme not in W8A8_SCHEMES:
            raise UsageError(f"coreml.w8a8_scheme={self.coreml.w8a8_scheme!r}", hint="use affine or symmetric")
        if self.coreml.ios is not None and self.coreml.ios not in IOS_VERSIONS:
            raise UsageError(f"coreml.ios={self.coreml.ios!r} is not a Core ML deployment target this edgecnn writes",
                             hint="use 16, 17 or 18")
        for name in ("calib_size", "eval_size"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name}={getattr(self, name)} must be >= 0")
        if not 1 <= self.threads <= max_threads():
            raise UsageError(f"threads={self.threads} must be 1 to {max_threads()} ({MAX_THREADS_PER_CORE} per core "
                             f"here)")
        for key, value in _numbers(self):
            if isinstance(value, float) and not math.isfinite(value):
                raise UsageError(f"{key}={value!r} is not a finite number")
            if key.endswith(("_seconds", "_images", "_batch", "min_speedup")) and value < 0:
                raise UsageError(f"{key}={value!r} must be >= 0")
        try:
            self.int8.check()
        except ValueError as exc:
            raise UsageError(str(exc), hint="`edgecnn export --help` lists the target options") from None
        return self


def _numbers(options) -> Iterable[Tuple[str, Any]]:
    """("section.name", value) for every number in ``options`` and its sections (bools are not numbers)."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if dataclasses.is_dataclass(value):
            yield from ((f"{f.name}.{k}", v) for k, v in _numbers(value))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield f.name, value


SECTIONS = {"int8": Int8Options, "trt": TrtOptions, "coreml": CoreMLOptions}
_KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text", tuple: "a list of names"}


def _type_problems(obj, prefix: str) -> list:
    """Fields of ``obj`` (and its sections) whose value is not of the declared type (options built in Python)."""
    problems = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, kind = getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(kind):
            problems += _type_problems(value, f"{prefix}{f.name}.") if isinstance(value, kind) else \
                [f"option {prefix}{f.name} must be {kind.__name__}, not {type(value).__name__}"]
            continue
        base = _base_type(kind)
        optional = _origin(kind) is typing.Union and value is None
        ok = optional or (isinstance(value, base) and not (base in (int, float) and isinstance(value, bool))) or \
            (base is float and isinstance(value, int) and not isinstance(value, bool))
        if base is tuple and ok:
            ok = all(isinstance(v, str) for v in value)
        if not ok:
            problems.append(f"option {prefix}{f.name}={value!r} is not {_KIND_WORDS.get(base, base.__name__)}")
    return problems


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise UsageError(f"options{' ' + prefix.rstrip('.') if prefix else ''} must be an object, not {type(d).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in d.items():
        if key not in names:
            raise _unknown(prefix + key, [prefix + n for n in names])
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, f"{prefix}{key}.")
        elif _origin(kind) is tuple:
            kwargs[key] = tuple(value)
        else:
            kwargs[key] = value
    return cls(**kwargs)


def _origin(kind) -> Any:
    return typing.get_origin(kind)


def _base_type(kind):
    """int for Optional[int], tuple for Tuple[str, ...], else the type itself."""
    if _origin(kind) is typing.Union:
        kind = next(a for a in typing.get_args(kind) if a is not type(None))
    return tuple if _origin(kind) is tuple else kind


def target_options() -> Dict[str, Tuple[Any, Any, str, tuple]]:
    """``{"section.name": (type, default, help, choices)}`` for every section option."""
    out = {}
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        defaults = cls()
        for f in dataclasses.fields(cls):
            out[f"{section}.{f.name}"] = (_base_type(hints[f.name]), getattr(defaults, f.name),
                                          f.metadata.get("help", ""), tuple(f.metadata.get("choices", ())))
    return out


_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def parse_value(key: str, text: str) -> Any:
    """The value of ``--target-option KEY=text`` as the option's declared type, or one usage error."""
    kind, default, _, choices = target_options()[key]
    text = text.strip()
    if kind is bool:
        low = text.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise UsageError(f"target option {key}={text!r} is not true or false", hint=f"e.g. --target-option {key}=false")
    if kind is tuple:
        return tuple(part.strip() for part in text.split(",") if part.strip())
    if kind in (int, float):
        if default is None and text.lower() in ("", "none", "default"):
            return None
        try:
            value = int(text) if kind is int else float(text)
        except ValueError:
            raise UsageError(f"target option {key}={text!r} is not a {'whole ' if kind is int else ''}number",
                             hint=f"e.g. --target-option {key}={default if default is not None else 17}") from None
        if kind is float and not math.isfinite(value):
            raise UsageError(f"target option {key}={text!r} is not a finite number")
        return value
    if choices and text not in choices:
        close = difflib.get_close_matches(text, choices, n=2, cutoff=0.4)
        raise UsageError(f"target option {key}={text!r} is not one of {', '.join(choices)}"
                         + (f"; did you mean {' or '.join(close)}?" if close else ""))
    return text


def _unknown(key: str, known: Iterable[str]) -> UsageError:
    close = difflib.get_close_matches(key, list(known), n=3, cutoff=0.5)
    return UsageError(f"unknown target option {key!r}" + (f"; did you mean {', '.join(close)}?" if close else ""),
                      hint="`edgecnn export --help` lists the target options")


def apply_target_options(options: ExportOptions, items: Iterable[str]) -> ExportOptions:
    """``options`` with ``["int8.ranges=entropy", "coreml.ios=17"]`` applied; a malformed item, an unknown key
    or a value of the wrong type is one usage error that names the option (and the closest known keys)."""
    known = target_options()
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--target-option {item!r} is not KEY=VALUE", hint="e.g. --target-option coreml.ios=17")
        if key not in known:
            raise _unknown(key, known)
        section, name = key.split(".", 1)
        value = parse_value(key, text)
        options = dataclasses.replace(options, **{section: dataclasses.replace(getattr(options, section), **{name: value})})
    return options


def help_text() -> str:
    """The target options for ``edgecnn export --help``: key, type, default, help."""
    names = {bool: "bool", int: "int", float: "float", str: "str", tuple: "list"}
    lines = ["target options (--target-option SECTION.NAME=VALUE; bool: true|false, yes|no, on|off, 1|0; "
             "list: comma separated):"]
    for key, (kind, default, text, choices) in target_options().items():
        shown = ",".join(default) if isinstance(default, tuple) else default
        shown = "none" if shown in (None, "") else str(shown).lower() if isinstance(shown, bool) else shown
        extra = f" ({' | '.join(choices)})" if choices else ""
        lines.append(f"  {key:<31} {names.get(kind, 'str'):<5} {text}{extra}; default {shown}")
    return "\n".join(lines)
