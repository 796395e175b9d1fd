"""TensorRT's INT8 calibration cache, text format: write it from ranges computed here, read it back exactly.

The cache is what an ``IInt8Calibrator`` hands TensorRT instead of running calibration on the device. It
still matters where explicit Q/DQ does not reach: DLA on Jetson AGX Orin / Orin NX, and implicit-INT8
builds on TensorRT <= 10 (deprecated in 10.1, removed in 11). Layout, one entry a line::

    TRT-8601-EntropyCalibration2
    input: 3c8d3b1a
    /features/features.0/features.0.0/Conv_output_0: 3d2b1f0e

The header carries TensorRT's integer version (``NV_TENSORRT_VERSION``: major*1000+minor*100+patch up to
8.x, e.g. 8.5.2 -> 8502, 8.6.1 -> 8601; major*10000+minor*100+patch from 10, e.g. 10.3.0 -> 100300) and
the calibrator algorithm; TensorRT ignores a cache whose header does not match, so the version is chosen
for the device. Each value is the big-endian hex of the float32 bits of the tensor's scale, amax/127
(symmetric INT8). NumPy only: this module also runs on a Jetson.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, field
from typing import Dict, Mapping, Tuple, Union

import numpy as np

from .errors import CalibrationError

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
DEFAULT_ALGORITHM = "EntropyCalibration2"
DEFAULT_TRT_VERSION = "8.5.2"  # JetPack 5.1: the oldest TensorRT the bundle targets
INT8_MAX = 127.0
MIN_AMAX = 1e-7                # a tensor that was all zeros in calibration still needs a positive scale

_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_HEX = re.compile(r"^[0-9a-fA-F]{8}$")


def header_version(version: Union[str, int]) -> int:
    """TensorRT's integer version for the cache header: "8.5.2" -> 8502, "10.3.0" -> 100300, 8601 -> 8601."""
    if isinstance(version, int) or str(version).isdigit():
        return int(version)
    parts = str(version).strip().split(".")
    try:
        major, minor, patch = (int(p) for p in (parts + ["0", "0"])[:3])
    except ValueError:
        raise CalibrationError(f"cannot read TensorRT version {version!r}", hint="write it like 8.6.1 or 10.3.0") from None
    return major * 10000 + minor * 100 + patch if major >= 10 else major * 1000 + minor * 100 + patch


def version_from_header(number: int) -> str:
    """8502 -> "8.5.2", 100300 -> "10.3.0" (the inverse of ``header_version``)."""
    if number >= 100000:
        return f"{number // 10000}.{number // 100 % 100}.{number % 100}"
    return f"{number // 1000}.{number // 100 % 10}.{number % 100}"


def scale_bits(scale: float) -> str:
    """8 hex digits of the float32 bits (big-endian), as TensorRT writes them."""
    return struct.pack(">f", np.float32(scale)).hex()


def bits_scale(hex8: str) -> np.float32:
    return np.frombuffer(bytes.fromhex(hex8), dtype=">f4")[0].astype(np.float32)


def amax_scale(amax: float) -> np.float32:
    """Symmetric INT8 scale of a tensor whose absolute maximum is ``amax``: float32(amax / 127)."""
    return np.float32(max(float(amax), MIN_AMAX) / INT8_MAX)


@dataclass
class CalibrationCache:
    version: int                                   # header integer, e.g. 8502
    algorithm: str = DEFAULT_ALGORITHM
    scales: Dict[str, np.float32] = field(default_factory=dict)  # tensor name -> float32 scale (amax/127)

    @property
    def trt_version(self) -> str:
        return version_from_header(self.version)

    @property
    def header(self) -> str:
        return f"TRT-{self.version}-{self.algorithm}"

    def text(self) -> str:
        lines = [self.header] + [f"{name}: {scale_bits(s)}" for name, s in self.scales.items()]
        return "\n".join(lines) + "\n"

    def amax(self, name: str) -> float:
        return float(self.scales[name]) * INT8_MAX


def from_ranges(ranges: Mapping[str, Union[float, Tuple[float, float]]], *, trt_version: Union[str, int] = DEFAULT_TRT_VERSION,
                algorithm: str = DEFAULT_ALGORITHM) -> CalibrationCache:
    """A cache from {tensor: (min, max)} or {tensor: amax}; amax = max(|min|, |max|) (symmetric INT8)."""
    if algorithm not in ALGORITHMS:
        raise CalibrationError(f"unknown TensorRT calibrator algorithm {algorithm!r}", hint=f"use {', '.join(ALGORITHMS)}")
    scales = {}
    for name, r in ranges.items():
        if "\n" in name:
            raise CalibrationError(f"tensor name {name!r} contains a newline")
        values = np.asarray([np.min(r[0]), np.max(r[1])] if isinstance(r, (tuple, list)) else [r], dtype=np.float64)
        amax = float(np.abs(values).max())
        if not np.isfinite(values).all():
            raise CalibrationError(f"range of tensor {name!r} is not finite ({r})",
                                   hint="the model produced NaN/Inf on calibration images")
        scales[name] = amax_scale(amax)
    return CalibrationCache(version=header_version(trt_version), algorithm=algorithm, scales=scales)


def write_cache(path: Union[str, os.PathLike], ranges, *, trt_version: Union[str, int] = DEFAULT_TRT_VERSION,
                algorithm: str = DEFAULT_ALGORITHM) -> CalibrationCache:
    """Write ``ranges`` (or a ``CalibrationCache``) to ``path`` in TensorRT's text format."""
    cache = ranges if isinstance(ranges, CalibrationCache) else from_ranges(ranges, trt_version=trt_version,
                                                                            algorithm=algorithm)
    with open(path, "w", encoding="ascii", newline="\n") as f:
        f.write(cache.text())
    return cache


def parse_cache(text: str, *, source: str = "<cache>") -> CalibrationCache:
    lines = [ln.rstrip("\r") for ln in text.splitlines() if ln.strip()]
    if not lines:
        raise CalibrationError(f"{source}: empty calibration cache")
    m = _HEADER.match(lines[0].strip())
    if not m:
        raise CalibrationError(f"{source}: first line {lines[0][:60]!r} is not a TensorRT cache header "
                               "(TRT-<version>-<algorithm>)")
    scales: Dict[str, np.float32] = {}
    for no, line in enumerate(lines[1:], start=2):
        name, sep, value = line.rpartition(":")
        value = value.strip()
        if not sep or not name or not _HEX.match(value):
            raise CalibrationError(f"{source}:{no}: expected '<tensor>: <8 hex digits>', got {line[:80]!r}")
        scales[name] = bits_scale(value)
    return CalibrationCache(version=int(m.group(1)), algorithm=m.group(2), scales=scales)


def read_cache(path: Union[str, os.PathLike]) -> CalibrationCache:
    try:
        with open(path, "r", encoding="ascii") as f:
            text = f.read()
    except OSError as exc:
        raise CalibrationError(f"cannot read calibration cache {path} ({exc.strerror})", path=os.fspath(path)) from None
    except UnicodeDecodeError:
        raise CalibrationError(f"{path} is not a text calibration cache", path=os.fspath(path)) from None
    return parse_cache(text, source=os.fspath(path))
