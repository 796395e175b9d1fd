"""The network definition and the ONNX parser of the stand-in.

The parser imports the ONNX file into layers and tensors the way TensorRT's does for the operators our nets
use (Gemm becomes a matrix multiply plus a bias add, HardSwish an activation times its input: the parser's own
tensors have generated names that appear in no ONNX file) and refuses what TensorRT's parser refuses: an
implicit-batch network on 8.x, an opset above the version's, Q/DQ nodes outside the documented importer rules
(INT8 only, zero point 0, positive scales, one scale per element of the quantized axis, activations per
tensor), operators outside the ONNX domain.
"""
from __future__ import annotations

import numpy as np

from . import facts
from .api import Current, Logged, Versioned, trace

LAYER_OF_OP = {"Conv": "CONVOLUTION", "Relu": "ACTIVATION", "Clip": "ACTIVATION", "Sigmoid": "ACTIVATION",
               "HardSigmoid": "ACTIVATION", "Add": "ELEMENTWISE", "Mul": "ELEMENTWISE", "GlobalAveragePool": "REDUCE",
               "AveragePool": "POOLING", "MaxPool": "POOLING", "Flatten": "SHUFFLE", "Reshape": "SHUFFLE",
               "Squeeze": "SHUFFLE", "Unsqueeze": "SHUFFLE", "Identity": "IDENTITY", "QuantizeLinear": "QUANTIZE",
               "DequantizeLinear": "DEQUANTIZE", "Cast": "CAST", "Concat": "CONCATENATION", "Softmax": "SOFTMAX",
               "BatchNormalization": "ELEMENTWISE", "Dropout": "IDENTITY"}


class ITensor(Versioned):
    API_NAME = "ITensor"

    def __init__(self, name, shape, dtype):
        self._name, self._shape, self._dtype = name, tuple(shape), dtype

    name = property(lambda self: self._name)
    shape = property(lambda self: self._shape)
    dtype = property(lambda self: self._dtype)
    dynamic_range = property(lambda self: None)


class ILayer(Versioned):
    API_NAME = "ILayer"

    def __init__(self, name, kind, inputs, outputs, op):
        self._name, self._kind, self._inputs, self._outputs, self._op = name, kind, inputs, outputs, op

    name = property(lambda self: self._name)
    type = property(lambda self: self._kind)
    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))

    def get_input(self, i):
        return self._inputs[i]

    def get_output(self, i):
        return self._outputs[i]


class INetworkDefinition(Versioned):
    API_NAME = "INetworkDefinition"

    def __init__(self, explicit_batch, strongly_typed, module):
        self._explicit_batch, self._strongly_typed, self._trt = explicit_batch, strongly_typed, module
        self._layers, self._inputs, self._outputs = [], [], []
        self._producer = {}         # tensor name -> layer
        self._onnx = None           # the ONNX bytes, once parsed

    num_layers = property(lambda self: len(self._layers))
    num_inputs = property(lambda self: len(self._inputs))
    num_outputs = property(lambda self: len(self._outputs))
    has_implicit_batch_dimension = property(lambda self: not self._explicit_batch)

    def get_layer(self, i):
        return self._layers[i]

    def get_input(self, i):
        return self._inputs[i]

    def get_output(self, i):
        return self._outputs[i]


def _tensor_dtype(trt, elem_type):
    import onnx

    table = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF", onnx.TensorProto.INT8: "INT8",
             onnx.TensorProto.INT32: "INT32", onnx.TensorProto.INT64: "INT32", onnx.TensorProto.BOOL: "BOOL",
             onnx.TensorProto.UINT8: "UINT8"}
    return getattr(trt.DataType, table.get(elem_type, "FLOAT"))


def _dims(value_info):
    return tuple(d.dim_value if d.HasField("dim_value") else -1 for d in value_info.type.tensor_type.shape.dim)


class OnnxParser(Versioned):
    API_NAME = "OnnxParser"

    def __init__(self, network, logger):
        self._network, self._log = network, Logged(logger, network._trt.ILogger.Severity)
        self._errors = []

    num_errors = property(lambda self: len(self._errors))

    def get_error(self, i):
        return self._errors[i]

    def parse(self, model, path=None):
        import onnx

        trace("parser.parse", path)
        try:
            proto = onnx.load_from_string(bytes(model))
        except Exception as exc:
            return self._fail("cannot read the ONNX model (%s)" % exc)
        problems = import_problems(proto, self._network)
        if problems:
            for p in problems:
                self._errors.append(p)
                self._log("ERROR", p)
            return False
        self._import(proto)
        self._network._onnx = bytes(model)
        return True

    def _fail(self, message):
        self._errors.append(message)
        self._log("ERROR", message)
        return False

    def _import(self, proto):
        trt, net = self._network._trt, self._network
        tensors = {}
        inits = {i.name for i in proto.graph.initializer}
        for vi in proto.graph.input:
            if vi.name not in inits:
                t = ITensor(vi.name, _dims(vi), _tensor_dtype(trt, vi.type.tensor_type.elem_type))
                tensors[vi.name] = t
                net._inputs.append(t)
        for node in proto.graph.node:
            ins = [tensors[i] for i in node.input if i in tensors]
            dtype = _output_dtype(trt, node, ins)
            for kind, outs in _layers_of(node):
                made = [ITensor(o, (), dtype) for o in outs]
                layer = ILayer(node.name if kind == LAYER_OF_OP.get(node.op_type, "UNARY") else
                               "%s_%s" % (node.name, kind.lower()), getattr(trt.LayerType, kind), ins, made, node.op_type)
                net._layers.append(layer)
                for t in made:
                    tensors[t.name] = t
                    net._producer[t.name] = layer
                ins = made
        for vi in proto.graph.output:
            net._outputs.append(tensors[vi.name])


def _output_dtype(trt, node, ins):
    """The data type of a node's outputs in TensorRT's typing: INT8 after Q, the Cast's target, HALF where an
    input is HALF (typed FP16 networks), FLOAT otherwise."""
    import onnx

    if node.op_type == "QuantizeLinear":
        return trt.DataType.INT8
    if node.op_type == "Cast":
        to = next(a.i for a in node.attribute if a.name == "to")
        return trt.DataType.HALF if to == onnx.TensorProto.FLOAT16 else trt.DataType.FLOAT
    if node.op_type != "DequantizeLinear" and any(t.dtype == trt.DataType.HALF for t in ins):
        return trt.DataType.HALF
    return trt.DataType.FLOAT


def _layers_of(node):
    """(layer type, output names) of the layers TensorRT's parser makes for one ONNX node."""
    out = list(node.output)
    if node.op_type == "Gemm":
        return [("MATRIX_MULTIPLY", [node.name + "_matmul_out"]), ("ELEMENTWISE", out)]
    if node.op_type == "HardSwish":
        return [("ACTIVATION", [node.name + "_hardsigmoid_out"]), ("ELEMENTWISE", out)]
    return [(LAYER_OF_OP.get(node.op_type, "UNARY"), out)]


def import_problems(proto, network):
    """What TensorRT's ONNX parser of this version refuses in ``proto``, one message each."""
    import onnx
    from onnx import numpy_helper

    problems = []
    if not network._explicit_batch:
        problems.append("the ONNX parser needs an explicit-batch network (create_network with EXPLICIT_BATCH)")
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > facts.max_opset(Current.version):
        problems.append("unsupported ONNX opset %d (TensorRT %s imports <= %d)"
                        % (opset, Current.version_text, facts.max_opset(Current.version)))
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    kinds = {i.name: i.data_type for i in proto.graph.initializer}
    quantized_weight = {n.output[0]: consts[n.input[0]] for n in proto.graph.node
                        if n.op_type == "QuantizeLinear" and n.input[0] in consts}
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx"):
            problems.append("No importer registered for op: %s (domain %s)" % (node.op_type, node.domain))
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            weight = consts.get(node.input[0], quantized_weight.get(node.input[0]))
            problems += _qdq_problems(node, consts, kinds, weight, onnx)
    return problems


def _qdq_problems(node, consts, kinds, weight, onnx):
    out = []
    if len(node.input) < 3 or not node.input[2]:
        return ["%s: no zero point (UINT8): TensorRT supports INT8 quantization only" % node.name]
    zp_kind = kinds.get(node.input[2])
    scale = consts.get(node.input[1])
    zp = consts.get(node.input[2])
    if zp_kind != onnx.TensorProto.INT8:
        out.append("%s: zero point type %s: TensorRT supports INT8 only" % (node.name, zp_kind))
    if zp is not None and np.any(zp != 0):
        out.append("%s: non-zero zero point: TensorRT supports symmetric quantization only" % node.name)
    if scale is None:
        return out + ["%s: scale must be an initializer" % node.name]
    if not np.all(scale > 0) or not np.all(np.isfinite(scale)):
        out.append("%s: scales must be positive and finite" % node.name)
    if scale.size > 1:
        if weight is None:
            out.append("%s: per-channel quantization of an activation: TensorRT quantizes activations per tensor"
                       % node.name)
        else:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            if scale.size != weight.shape[axis]:
                out.append("%s: %d scales for axis %d of size %d" % (node.name, scale.size, axis, weight.shape[axis]))
    return out
