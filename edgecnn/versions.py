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


def provenance() -> str:
    """What a measured table was measured at: commit (with a mark for uncommitted changes), date, machine,
    cores and load. The commit is read with git where the package is a git checkout, else "unknown"."""
    import datetime as _dt
    import os
    import subprocess
    from pathlib import Path

    from .validate.latency import machine_description

    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                                timeout=10).stdout.strip() or "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "unknown", ""
    m = machine_description()
    load = f"{os.getloadavg()[0]:.2f}" if hasattr(os, "getloadavg") else "?"
    return (f"commit {commit}{' (with uncommitted changes)' if dirty else ''}, "
            f"{_dt.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}, {m.get('cpu')} "
            f"({', '.join(m.get('isa', []))}), {m.get('logical_cores')} logical cores, load {load}")
