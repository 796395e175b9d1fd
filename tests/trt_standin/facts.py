"""What the stand-in knows about each TensorRT version and each device: the names a version's Python
bindings have, the constraints it enforces, and the DLA cores a device reports.

Sources: the TensorRT Python API reference and the 8.x -> 10 -> 11 migration notes (names added, deprecated,
removed), the DLA chapter of the developer guide (static shapes, FP16/INT8 only, GPU fallback), the Jetson
module data sheets (DLA cores) and the JetPack release notes (TensorRT and Python per JetPack). Where the
documents do not settle a name, the table follows TensorRT's stated policy (deprecated in major N, removed in
N+1) and says ``assumed``. Only the part of the API an engine build and an inference touch is modelled: a
name outside these tables is absent here, so a call the tool makes that no table lists fails the test.
"""
from __future__ import annotations

INF = (999,)

# Module-level names: (first version that has it, first version that no longer has it).
MODULE_NAMES = {
    "Logger": ((8,), INF), "ILogger": ((8,), INF), "Builder": ((8,), INF), "Runtime": ((8,), INF),
    "OnnxParser": ((8,), INF), "DataType": ((8,), INF), "BuilderFlag": ((8,), INF),
    "NetworkDefinitionCreationFlag": ((8,), INF), "MemoryPoolType": ((8, 4), INF), "DeviceType": ((8,), INF),
    "TensorIOMode": ((8, 5), INF), "ProfilingVerbosity": ((8, 2), INF), "LayerInformationFormat": ((8, 2), INF),
    "LayerType": ((8,), INF), "nptype": ((8,), INF),
    # implicit quantization: deprecated in 10.1, removed in 11
    "IInt8Calibrator": ((8,), (11,)), "IInt8EntropyCalibrator2": ((8,), (11,)), "CalibrationAlgoType": ((8,), (11,)),
}

# Enum members.
ENUM_MEMBERS = {
    "NetworkDefinitionCreationFlag": {
        "EXPLICIT_BATCH": ((8,), (11,)),          # needed on 8.x; deprecated and ignored in 10; gone in 11
        "EXPLICIT_PRECISION": ((8,), (10,)),
        "STRONGLY_TYPED": ((9, 1), INF),
    },
    "BuilderFlag": {
        "FP16": ((8,), (11,)), "INT8": ((8,), (11,)),   # weak typing: deprecated in 10, removed in 11
        "TF32": ((8,), INF), "GPU_FALLBACK": ((8,), INF), "REFIT": ((8,), INF), "DEBUG": ((8,), INF),
        "STRICT_TYPES": ((8,), (10,)), "OBEY_PRECISION_CONSTRAINTS": ((8, 2), (11,)),
        "PREFER_PRECISION_CONSTRAINTS": ((8, 2), (11,)), "DIRECT_IO": ((8, 2), INF), "FP8": ((8, 6), (11,)),
        "BF16": ((9,), (11,)),
    },
    "DataType": {
        "FLOAT": ((8,), INF), "HALF": ((8,), INF), "INT8": ((8,), INF), "INT32": ((8,), INF),
        "BOOL": ((8,), INF), "UINT8": ((8, 5), INF), "FP8": ((8, 6), INF), "BF16": ((9,), INF),
        "INT64": ((9,), INF), "INT4": ((10,), INF),
    },
    "MemoryPoolType": {"WORKSPACE": ((8, 4), INF), "DLA_MANAGED_SRAM": ((8, 4), INF),
                       "DLA_LOCAL_DRAM": ((8, 4), INF), "DLA_GLOBAL_DRAM": ((8, 4), INF)},
    "DeviceType": {"GPU": ((8,), INF), "DLA": ((8,), INF)},
    "TensorIOMode": {"NONE": ((8, 5), INF), "INPUT": ((8, 5), INF), "OUTPUT": ((8, 5), INF)},
    "ProfilingVerbosity": {"LAYER_NAMES_ONLY": ((8, 2), INF), "NONE": ((8, 2), INF), "DETAILED": ((8, 2), INF),
                           "DEFAULT": ((8, 2), (10,)), "VERBOSE": ((8, 2), (10,))},
    "LayerInformationFormat": {"ONELINE": ((8, 2), INF), "JSON": ((8, 2), INF)},
    "LayerType": {n: ((8,), INF) for n in ("CONVOLUTION", "ACTIVATION", "ELEMENTWISE", "POOLING", "REDUCE",
                                           "SHUFFLE", "MATRIX_MULTIPLY", "CONSTANT", "IDENTITY", "QUANTIZE",
                                           "DEQUANTIZE", "CAST", "UNARY", "SOFTMAX", "CONCATENATION")},
    "CalibrationAlgoType": {"ENTROPY_CALIBRATION_2": ((8,), (11,)), "MINMAX_CALIBRATION": ((8,), (11,))},
}

# Members of the API objects whose presence changes between versions (every other member of the modelled
# objects exists in all of them).
OBJECT_MEMBERS = {
    "IBuilderConfig.max_workspace_size": ((8,), (10,)),
    "IBuilderConfig.int8_calibrator": ((8,), (11,)),
    "IBuilderConfig.set_calibration_profile": ((8,), (11,)),
    "IBuilderConfig.get_calibration_profile": ((8,), (11,)),
    "Builder.build_engine": ((8,), (10,)),
    "Builder.max_batch_size": ((8,), (10,)),
    "ICudaEngine.num_bindings": ((8,), (10,)),
    "ICudaEngine.get_binding_shape": ((8,), (10,)),
    "ICudaEngine.binding_is_input": ((8,), (10,)),
    "ICudaEngine.device_memory_size": ((8,), (11,)),        # deprecated in 10.1 by _v2; removed in 11 (assumed)
    "ICudaEngine.device_memory_size_v2": ((10, 1), INF),
    "IExecutionContext.execute_async_v2": ((8,), (10,)),
    "IExecutionContext.set_binding_shape": ((8,), (10,)),
    "ITensor.dynamic_range": ((8,), (11,)),
}

# The highest ONNX opset each parser imports (8.5/8.6 documented; 10.3 and 11 assumed from onnx-tensorrt).
MAX_OPSET = (((8,), 17), ((10,), 20), ((11,), 22))

# Ops the stand-in lets DLA run (the DLA chapter's supported layers, as far as our nets use them).
DLA_OPS = ("Conv", "Relu", "Clip", "Sigmoid", "HardSigmoid", "Add", "Mul", "GlobalAveragePool", "AveragePool",
           "MaxPool", "Concat", "QuantizeLinear", "DequantizeLinear", "BatchNormalization")

# Enum values the bindings use (``1 << int(flag)`` for network creation flags).
FLAG_VALUES = {"EXPLICIT_BATCH": 0, "EXPLICIT_PRECISION": 1, "STRONGLY_TYPED": 5}


def has(span, version) -> bool:
    """Whether ``version`` lies in ``span`` = (first version with the name, first version without it)."""
    first, gone = span
    v = tuple(version)
    return _ge(v, first) and not _ge(v, gone)


def _ge(v, bound) -> bool:
    n = max(len(v), len(bound))
    return tuple(v) + (0,) * (n - len(v)) >= tuple(bound) + (0,) * (n - len(bound))


def max_opset(version) -> int:
    best = 0
    for first, opset in MAX_OPSET:
        if _ge(tuple(version), first):
            best = opset
    return best


# Devices: what CUDA and TensorRT report on each.
DEVICES = {
    "agx-orin": {"name": "Orin", "cc": (8, 7), "integrated": True, "dla_cores": 2, "memory_mb": 30536,
                 "jetson": "NVIDIA Jetson AGX Orin Developer Kit"},
    "orin-nx": {"name": "Orin", "cc": (8, 7), "integrated": True, "dla_cores": 1, "memory_mb": 7620,
                "jetson": "NVIDIA Jetson Orin NX 8GB"},
    "orin-nano": {"name": "Orin", "cc": (8, 7), "integrated": True, "dla_cores": 0, "memory_mb": 7620,
                  "jetson": "NVIDIA Jetson Orin Nano Developer Kit"},
    "thor": {"name": "NVIDIA Thor", "cc": (11, 0), "integrated": True, "dla_cores": 0, "memory_mb": 125000,
             "jetson": "NVIDIA Jetson AGX Thor Developer Kit"},
}


def dla_cores(version, device: str) -> int:
    """DLA cores TensorRT reports: the device's, except none in TensorRT 11.0-11.3 and, from 11.4.1, only on
    AGX Orin (JetPack >= 7.2.2)."""
    cores = DEVICES[device]["dla_cores"]
    v = tuple(version)
    if v[0] == 11 and not _ge(v, (11, 4, 1)):
        return 0
    if v[0] >= 11 and device != "agx-orin":
        return 0
    return cores


def cache_header_version(version) -> int:
    v = tuple(version) + (0, 0, 0)
    return v[0] * 10000 + v[1] * 100 + v[2] if v[0] >= 10 else v[0] * 1000 + v[1] * 100 + v[2]
