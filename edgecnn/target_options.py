"""The target options (``ExportOptions.extra``): the knobs of the INT8 search and of the targets that have
no flag of their own, set with ``--target-option KEY=VALUE`` on ``edgecnn export`` and ``edgecnn matrix``.

Why a registry: the targets read these keys with ``extra.get(key, default)``, so a misspelt key was
silently ignored and the export ran with the default -- the user believed they had switched something off.
Here every key is named once, with its kind, so that an unknown key is refused with the closest names, a
boolean is a boolean (``int8_fallback=no`` used to reach the code as the string "no", which is truthy), and
a list is split on commas. ``tests/test_target_options.py`` checks that every key the code reads is listed.
Imports nothing heavy, so the CLI can check options before torch loads.
"""
from __future__ import annotations

import difflib
from typing import Any, Dict, Iterable

# key: (kind, what it does). kind: bool | int | float | str | list (comma separated)
TARGET_OPTIONS: Dict[str, tuple] = {
    # INT8, both Q/DQ recipes (onnx, trt)
    "calib_method": ("str", "activation range estimation: minmax (default) | percentile | entropy | mse"),
    "weight_rounding": ("str", "INT8 weights: gptq (error-compensated, default) | nearest"),
    "bias_correction": ("bool", "analytic bias correction of the weights' rounding (default true)"),
    "empirical_bias_correction": ("bool", "INT8 step 7, ort recipe: damped empirical bias correction (default true)"),
    "int8_fallback": ("bool", "sensitivity analysis and float fallback (default true)"),
    "int8_agreement_phase": ("bool", "fallback: the agreement phase after the SQNR phase (default true)"),
    "int8_fallback_batch": ("int", "fallback: layers floated per agreement-phase step (default 4)"),
    "int8_max_float_fraction": ("float", "fallback: at most this fraction of the layers float (default 0.34)"),
    "int8_min_speedup": ("float", "fallback: float layers may not take INT8 below this speed-up over FP32 (default 1.1)"),
    "int8_probe_images": ("int", "fallback: most probe images (default 256)"),
    "int8_probe_split": ("bool", "fallback: probe on calibration images left out of the ranges (default true)"),
    "int8_sensitivity_seconds": ("float", "fallback: time budget of the per-layer sensitivity analysis (default 240)"),
    "nodes_to_exclude": ("list", "ONNX node names to keep float from the start (comma separated; default none)"),
    # TensorRT bundle
    "trt_version": ("str", "TensorRT version written in the calibration-cache header (default 8.5.2)"),
    "range_method": ("str", "trt int8 activation ranges: minmax (default) | percentile | entropy | mse"),
    "trt_build": ("bool", "build the engine here when TensorRT is importable (default true)"),
    # Core ML
    "ios": ("int", "Core ML deployment target: 16 | 17 | 18 (default 16; 17 for int8 W8A8)"),
    "coreml_int8_scheme": ("str", "Core ML W8A8 activation scheme: affine (default) | symmetric"),
    "coreml_int8_fallback": ("bool", "Core ML int8: float fallback search (default true)"),
    "coreml_keep_float": ("list", "Core ML int8: module names to keep float (comma separated; default none; skips the search)"),
    "coreml_fallback_probe": ("int", "Core ML int8: probe images of the fallback search (default 128)"),
    "coreml_fallback_max_float": ("float", "Core ML int8: at most this fraction of blocks float (default 0.5)"),
}

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")


def _usage_error(message: str, hint: str):
    from .errors import UsageError

    return UsageError(message, hint=hint)


def parse_value(key: str, text: str) -> Any:
    """The value of one option as its kind says, or one usage error naming the option. (Options built in
    Python skip this; ``ExportOptions.number`` refuses a non-number where a target reads it.)"""
    kind = TARGET_OPTIONS[key][0]
    text = text.strip()
    if kind == "bool":
        low = text.lower()
        if low in _TRUE or low in _FALSE:
            return low in _TRUE
        raise _usage_error(f"target option {key}={text!r} is not true or false", f"e.g. --target-option {key}=false")
    if kind == "list":
        return [part.strip() for part in text.split(",") if part.strip()]
    if kind in ("int", "float"):
        try:
            return int(text) if kind == "int" else float(text)
        except ValueError:
            raise _usage_error(f"target option {key}={text!r} is not a {'whole ' if kind == 'int' else ''}number",
                               f"e.g. --target-option {key}={'17' if key == 'ios' else '4' if kind == 'int' else '1.1'}"
                               ) from None
    return text


def _unknown(key: str):
    close = difflib.get_close_matches(key, TARGET_OPTIONS, n=3, cutoff=0.5)
    return _usage_error(f"unknown target option {key!r}" + (f"; did you mean {', '.join(close)}?" if close else ""),
                        "`edgecnn export --help` lists the target options")


def check_known(options: Dict[str, Any]) -> None:
    """Refuse a key no target reads (``ExportOptions.extra`` built in Python, not parsed from the CLI)."""
    for key in options:
        if key not in TARGET_OPTIONS:
            raise _unknown(key)


def parse_target_options(items: Iterable[str]) -> Dict[str, Any]:
    """``["ios=17", "empirical_bias_correction=false"]`` -> ``{"ios": 17, "empirical_bias_correction": False}``;
    a malformed item or an unknown key is one usage error that names the closest known keys."""
    options: Dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _usage_error(f"--target-option {item!r} is not KEY=VALUE", "e.g. --target-option ios=17")
        if key not in TARGET_OPTIONS:
            raise _unknown(key)
        options[key] = parse_value(key, value)
    return options
