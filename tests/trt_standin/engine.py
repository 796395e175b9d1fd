"""Runtime, engine, execution context and engine inspector of the stand-in.

An engine "runs" by executing the ONNX model it was built from with onnxruntime on the CPU: the input is
read from the device address set with ``set_tensor_address`` (a stand-in libcudart allocation), the output
written to its address, on a live stream. The numbers are onnxruntime's, not TensorRT's: the only TensorRT
numerics modelled are TF32 (left on, FP32 inputs are rounded to TF32's 10-bit mantissa, as Ampere tensor
cores do), which is what makes an FP32 build that forgets to clear TF32 fail its 1e-4 gate here too.
"""
from __future__ import annotations

import ctypes
import json

import numpy as np

from . import facts
from .api import Current, Logged, Versioned, trace
from .build import MAGIC


class Runtime(Versioned):
    API_NAME = "Runtime"

    def __init__(self, logger):
        self._log = Logged(logger, Current.trt.ILogger.Severity)
        self._dla_core = 0

    def _set_dla_core(self, value):
        self._dla_core = int(value)
        trace("runtime.DLA_core", self._dla_core)

    DLA_core = property(lambda self: self._dla_core, _set_dla_core)

    def deserialize_cuda_engine(self, serialized):
        data = bytes(serialized)
        if not data.startswith(MAGIC):
            self._log("ERROR", "the engine plan file is not a TensorRT engine (magic tag mismatch)")
            return None
        head, _, model = data[len(MAGIC):].partition(b"\n")
        header = json.loads(head)
        problem = _load_problem(header, self._dla_core)
        if problem:
            self._log("ERROR", problem)
            return None
        trace("runtime.deserialize", {"dla_core": header["dla_core"], "runtime_dla_core": self._dla_core})
        return ICudaEngine(header, model)


def _load_problem(header, runtime_core):
    if header["version"] != Current.version_text:
        return ("The engine plan file is not compatible with this version of TensorRT, expecting library version "
                "%s got %s, please rebuild." % (Current.version_text, header["version"]))
    if facts.DEVICES[header["device"]]["cc"] != facts.DEVICES[Current.device]["cc"]:
        return "The engine plan file is generated on an incompatible device, please rebuild."
    if header["dla_core"] is not None and header["dla_core"] != runtime_core:
        return ("engine built for DLA core %d cannot run on DLA core %d: set IRuntime.DLA_core before "
                "deserializing" % (header["dla_core"], runtime_core))
    return None


class ICudaEngine(Versioned):
    API_NAME = "ICudaEngine"

    def __init__(self, header, model):
        self._h, self._model = header, model
        self._names = [header["input"]] + list(header["outputs"])

    num_io_tensors = property(lambda self: len(self._names))
    num_optimization_profiles = property(lambda self: len(self._h["profiles"]))
    device_memory_size = property(lambda self: 8 << 20)
    device_memory_size_v2 = property(lambda self: 8 << 20)
    num_bindings = property(lambda self: len(self._names))

    def get_tensor_name(self, i):
        return self._names[i]

    def get_tensor_mode(self, name):
        modes = Current.trt.TensorIOMode
        return modes.INPUT if name == self._h["input"] else modes.OUTPUT if name in self._names else modes.NONE

    def get_tensor_shape(self, name):
        if name == self._h["input"]:
            return tuple(self._h["dims"])
        return (-1 if -1 in self._h["dims"] else self._h["profiles"][0][0][0], -1)

    def get_tensor_dtype(self, name):
        return Current.trt.DataType.FLOAT   # the bundle's models all have FP32 inputs and outputs

    def get_tensor_profile_shape(self, name, profile_index):
        if name != self._h["input"]:
            raise RuntimeError("get_tensor_profile_shape: %s is not an input" % name)
        return [tuple(s) for s in self._h["profiles"][profile_index]]

    def create_execution_context(self):
        return IExecutionContext(self)

    def create_engine_inspector(self):
        return IEngineInspector(self)

    def serialize(self):
        return MAGIC + json.dumps(self._h).encode() + b"\n" + self._model


class IEngineInspector(Versioned):
    API_NAME = "IEngineInspector"

    def __init__(self, engine):
        self._engine = engine

    def get_engine_information(self, fmt):
        """Layers as TensorRT lists them: consecutive DLA layers form one ``{ForeignNode[first...last]}``."""
        if fmt != Current.trt.LayerInformationFormat.JSON:
            raise AssertionError("only the JSON format is modelled")
        detailed = self._engine._h["verbosity"] == "DETAILED"
        rows, run = [], []
        for name, device, precision, op in self._engine._h["placement"] + [[None, "GPU", None, None]]:
            if device == "DLA":
                run.append(name)
                continue
            if run:
                rows.append({"Name": "{ForeignNode[%s...%s]}" % (run[0], run[-1]), "LayerType": "ForeignNode"})
                run = []
            if name is not None:
                rows.append({"Name": name, "LayerType": op, "Precision": precision})
        layers = rows if detailed else [r["Name"] for r in rows]
        return json.dumps({"Layers": layers, "Bindings": self._engine._names})


class IExecutionContext(Versioned):
    API_NAME = "IExecutionContext"

    def __init__(self, engine):
        self._engine, self._shape, self._addresses, self._session = engine, None, {}, None
        dims = engine._h["dims"]
        if -1 not in dims:
            self._shape = tuple(dims)

    def set_input_shape(self, name, shape):
        shape = tuple(int(d) for d in shape)
        lo, _, hi = self._engine._h["profiles"][0]
        ok = name == self._engine._h["input"] and len(shape) == len(lo) and \
            all(a <= d <= b for a, d, b in zip(lo, shape, hi))
        trace("context.set_input_shape", [list(shape), ok])
        if ok:
            self._shape = shape
        return ok

    def get_tensor_shape(self, name):
        if self._shape is None:
            return tuple(self._engine._h["dims"])
        if name == self._engine._h["input"]:
            return self._shape
        return (self._shape[0],) + self._output_sample()

    def _output_sample(self):
        import onnx

        if not hasattr(self, "_out_sample"):
            graph = onnx.load_from_string(self._engine._model).graph
            dims = graph.output[0].type.tensor_type.shape.dim
            self._out_sample = tuple(d.dim_value for d in dims[1:])
        return self._out_sample

    def set_tensor_address(self, name, address):
        self._addresses[name] = int(address)
        return True

    def execute_v2(self, bindings):
        raise AssertionError("execute_v2 is not modelled: the tool uses execute_async_v3")

    def execute_async_v2(self, bindings, stream_handle):
        raise AssertionError("execute_async_v2 is not modelled: the tool uses execute_async_v3")

    def execute_async_v3(self, stream_handle):
        from .cudart import STATE

        h = self._engine._h
        if int(stream_handle) not in STATE.streams:
            return False
        if self._shape is None or set(self._addresses) != set(self._engine._names):
            return False
        x = self._read(self._addresses[h["input"]], self._shape)
        if x is None:
            return False
        if h["tf32"]:
            x = to_tf32(x)
        y = np.ascontiguousarray(self._run(x), dtype=np.float32)
        out = STATE.region(self._addresses[h["outputs"][0]], y.nbytes)
        if out is None:
            return False
        ctypes.memmove(self._addresses[h["outputs"][0]], y.ctypes.data, y.nbytes)
        return True

    def _read(self, address, shape):
        from .cudart import STATE

        nbytes = int(np.prod(shape)) * 4
        if STATE.region(address, nbytes) is None:
            return None
        return np.frombuffer(ctypes.string_at(address, nbytes), dtype=np.float32).reshape(shape)

    def _run(self, x):
        if self._session is None:
            import onnxruntime as ort

            opts = ort.SessionOptions()
            opts.intra_op_num_threads = opts.inter_op_num_threads = 1
            self._session = ort.InferenceSession(self._engine._model, opts, providers=["CPUExecutionProvider"])
        return self._session.run(None, {self._engine._h["input"]: x})[0]


def to_tf32(x):
    """Round FP32 values to TF32 (10 explicit mantissa bits, round to nearest even)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0xFFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
    return rounded.view(np.float32)
