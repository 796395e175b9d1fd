"""The ``tensorrt`` module of one TensorRT version: ``load(version, device)`` returns it.

Only the names that version's bindings have are attributes (``facts.MODULE_NAMES`` / ``ENUM_MEMBERS``); a
removed name raises AttributeError like the real module. ``nptype`` behaves per version: TensorRT 8.5.2's
builds its table with ``np.bool``, so it fails as it does under NumPy >= 1.24 (JetPack 5.1's Python 3.8
has NumPy 1.24.4), whatever NumPy runs the stand-in.
"""
from __future__ import annotations

import os
import sys
import types

import numpy as np

from . import cudart, facts
from .api import Current, EnumValue, make_enum, trace
from .build import Builder
from .engine import Runtime
from .network import OnnxParser

SEVERITIES = ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE")


def _severity_enum():
    cls = type("Severity", (), {n: EnumValue("ILogger.Severity", n, i) for i, n in enumerate(SEVERITIES)})
    cls.__members__ = {n: getattr(cls, n) for n in SEVERITIES}
    return cls


def _logger_classes():
    severity = _severity_enum()

    class ILogger:
        Severity = severity

        def __init__(self):
            self._standin_init = True

        def log(self, severity, msg):
            raise NotImplementedError("ILogger.log must be overridden")

    class Logger(ILogger):
        def __init__(self, min_severity=severity.WARNING):
            ILogger.__init__(self)
            self.min_severity = min_severity

        def log(self, severity, msg):
            if severity.value <= self.min_severity.value:
                sys.stderr.write("[TRT] %s\n" % msg)

    for n in SEVERITIES:
        setattr(Logger, n, getattr(severity, n))
    return ILogger, Logger


def _calibrator_classes():
    class IInt8Calibrator:
        def __init__(self):
            self._standin_init = True

        def get_batch_size(self):
            raise NotImplementedError

        def get_batch(self, names):
            raise NotImplementedError

        def read_calibration_cache(self):
            return None

        def write_calibration_cache(self, cache):
            return None

    class IInt8EntropyCalibrator2(IInt8Calibrator):
        def get_algorithm(self):
            return Current.trt.CalibrationAlgoType.ENTROPY_CALIBRATION_2

    return IInt8Calibrator, IInt8EntropyCalibrator2


def _nptype(trt_type):
    trace("trt.nptype", str(trt_type))
    dt = Current.trt.DataType
    if Current.version < (8, 6):
        # tensorrt 8.5.2's nptype builds {..., DataType.BOOL: np.bool}: NumPy 1.24-1.26 have no np.bool
        # (JetPack 5.1's Python 3.8 gets 1.24.4); NumPy 2 brought the name back, so there the 1.24 error is raised
        if np.lib.NumpyVersion(np.__version__) < "2.0.0":
            np.bool  # noqa: B018  AttributeError, as on the device
        raise AttributeError("module 'numpy' has no attribute 'bool'.\n`np.bool` was a deprecated alias for the "
                             "builtin `bool`. ... The aliases was originally deprecated in NumPy 1.20")
    table = {dt.FLOAT: np.float32, dt.HALF: np.float16, dt.INT8: np.int8, dt.INT32: np.int32, dt.BOOL: np.bool_}
    if trt_type not in table:
        raise TypeError("Could not resolve TensorRT datatype to an equivalent numpy datatype.")
    return table[trt_type]


def load(version_text: str, device: str, name: str = "tensorrt", cudart_loader: bool = True) -> types.ModuleType:
    """The ``tensorrt`` module of ``version_text`` on ``device`` (a key of ``facts.DEVICES``). With
    ``cudart_loader``, ``ctypes.CDLL`` then loads the libcudart stand-in (what a tool subprocess needs; a test
    process hands ``cudart.Library`` to the tool's ``Cuda(lib=...)`` instead)."""
    version = tuple(int(p) for p in version_text.split("."))
    mod = types.ModuleType(name, "TensorRT %s stand-in (contract test, not TensorRT)" % version_text)
    Current.version, Current.version_text, Current.device, Current.trt = version, version_text, device, mod
    ILogger, Logger = _logger_classes()
    IInt8Calibrator, IInt8EntropyCalibrator2 = _calibrator_classes()
    names = {"Logger": Logger, "ILogger": ILogger, "Builder": Builder, "Runtime": Runtime, "OnnxParser": OnnxParser,
             "nptype": _nptype, "IInt8Calibrator": IInt8Calibrator,
             "IInt8EntropyCalibrator2": IInt8EntropyCalibrator2}
    for enum in facts.ENUM_MEMBERS:
        names[enum] = make_enum(enum, version)
    for n, span in facts.MODULE_NAMES.items():
        if facts.has(span, version):
            setattr(mod, n, names[n])
    mod.__version__ = version_text
    if cudart_loader:
        cudart.install(device)
    return mod


def install_from_environment(package_name: str, version_text: str) -> types.ModuleType:
    """What a version's ``tensorrt/__init__.py`` calls: replace itself in ``sys.modules`` with the stand-in of
    that version, on the device named by ``EDGECNN_TRT_STANDIN_DEVICE`` (default agx-orin)."""
    device = os.environ.get("EDGECNN_TRT_STANDIN_DEVICE", "agx-orin")
    if device not in facts.DEVICES:
        raise ImportError("EDGECNN_TRT_STANDIN_DEVICE=%s: not one of %s" % (device, ", ".join(facts.DEVICES)))
    mod = load(version_text, device, package_name)
    sys.modules[package_name] = mod
    return mod
