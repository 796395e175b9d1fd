"""Toolchain versions recorded in every manifest (what produced the artefact)."""
from __future__ import annotations

import importlib.metadata as md

_PACKAGES = ("torch", "torchvision", "onnx", "onnxruntime", "onnxslim", "coremltools", "numpy", "pillow")


def toolchain() -> dict:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def edgecnn_version() -> str:
    try:
        return md.version("edgecnn")
    except md.PackageNotFoundError:
        return "0.1.0+local"
