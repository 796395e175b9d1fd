"""A reference executor for Core ML ML Programs, so Core ML parity can be checked where Core ML cannot run.

``MLModel.predict`` exists only on macOS. This module interprets the MIL program inside an
``.mlpackage`` directly: it reads the program from the package's ``Model.mlmodel`` and every weight
with coremltools' own MIL-proto value loader (``weights/weight.bin``, 64-byte aligned blobs), then
executes the ops in program order, computing in FP32 and rounding every op output to the dtype the
program declares for it (FP16 storage between FP16 ops is mimicked exactly; FP16 *arithmetic inside*
an op is not — Apple's kernels may accumulate differently, which is why FP16 gates are cosine gates).

It covers the ops our exports of the zoo produce (and a few neighbours); an op it does not know is
refused when the program is loaded, with an error naming the op — never skipped. Convolution,
pooling and matrix products use ``torch.nn.functional`` for speed (only as arithmetic kernels: the
MIL semantics — padding modes, groups, quantization, casts — are implemented here); the rest is NumPy.

Not a performance model of Apple hardware: the latency of this executor says nothing about an
iPhone, so the validator reports Core ML latency on Linux as "not measured (needs Apple hardware)".
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import InputError, ToolchainError

RUNTIME_NAME = "coreml-reference-executor"


class UnsupportedOpError(ToolchainError):
    """The program uses a MIL op the reference executor does not implement."""


# ---------------------------------------------------------------------------------------------- dtypes
_FLOAT16, _FLOAT32, _FLOAT64 = 10, 11, 12
_NP_OF = {1: np.bool_, 10: np.float16, 11: np.float32, 12: np.float64, 21: np.int8, 22: np.int16, 23: np.int32,
          24: np.int64, 31: np.uint8, 32: np.uint16, 33: np.uint32, 34: np.uint64}
_NAME_TO_NP = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "int8": np.int8, "uint8": np.uint8,
               "int16": np.int16, "uint16": np.uint16, "int32": np.int32, "int64": np.int64, "bool": np.bool_}


def _round_to(value, code: int):
    """Store ``value`` as the declared MIL dtype ``code``: FP16 values are rounded to FP16 and kept as
    float32 arrays (FP32 compute, FP16 storage); FP32 stays; integer types are kept as they are."""
    if isinstance(value, np.ndarray):
        if code == _FLOAT16:
            if value.dtype != np.float32:
                value = value.astype(np.float32)
            # torch's FP16 rounding (F16C) gives the same bits as NumPy's astype, 15-1000x faster (NumPy
            # converts in software, slowest on tiny values)
            return _torch().from_numpy(np.ascontiguousarray(value)).half().float().numpy()
        if code == _FLOAT32 and value.dtype != np.float32:
            return value.astype(np.float32)
        if code in _NP_OF and code not in (_FLOAT16, _FLOAT32) and value.dtype != _NP_OF[code]:
            return value.astype(_NP_OF[code])
    return value


def _f32(x) -> np.ndarray:
    return np.asarray(x, dtype=np.float32)


def _torch():
    import torch

    return torch


def _t(x: np.ndarray):
    return _torch().from_numpy(np.ascontiguousarray(x, dtype=np.float32))


# ---------------------------------------------------------------------------------------------- ops
def _pads_2d(x_hw: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
             pad_type: str, pad: Optional[Sequence[int]]) -> List[int]:
    """[top, bottom, left, right] for MIL ``pad_type`` valid | custom | same | same_lower."""
    if pad_type == "valid":
        return [0, 0, 0, 0]
    if pad_type == "custom":
        return [int(p) for p in (pad if pad is not None else [0, 0, 0, 0])]
    if pad_type in ("same", "same_lower"):
        out = []
        for size, k, s, d in zip(x_hw, kernel, strides, dilations):
            total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
            before = total // 2 if pad_type == "same" else total - total // 2
            out += [before, total - before]
        return out
    raise UnsupportedOpError(f"pad_type {pad_type!r} is not supported by the reference executor")


def op_conv(x, weight, bias=None, strides=None, pad_type="valid", pad=None, dilations=None, groups=1):
    F = _torch().nn.functional
    nd = weight.ndim - 2
    if nd != 2:
        raise UnsupportedOpError(f"conv with {nd} spatial dims is not supported by the reference executor")
    strides = [int(s) for s in (strides if strides is not None else [1] * nd)]
    dilations = [int(d) for d in (dilations if dilations is not None else [1] * nd)]
    top, bottom, left, right = _pads_2d(x.shape[2:], weight.shape[2:], strides, dilations, str(pad_type), pad)
    xt = _t(x)
    if top == bottom and left == right:
        padding = (top, left)
    else:
        xt = F.pad(xt, (left, right, top, bottom))
        padding = (0, 0)
    y = F.conv2d(xt, _t(weight), None if bias is None else _t(bias), stride=strides, padding=padding,
                 dilation=dilations, groups=int(groups))
    return y.numpy()


def op_linear(x, weight, bias=None):
    F = _torch().nn.functional
    return F.linear(_t(x), _t(weight), None if bias is None else _t(bias)).numpy()


def op_matmul(x, y, transpose_x=False, transpose_y=False):
    x = np.swapaxes(x, -1, -2) if transpose_x else x
    y = np.swapaxes(y, -1, -2) if transpose_y else y
    return _torch().matmul(_t(x), _t(y)).numpy()


def _pool(kind: str, x, kernel_sizes, strides, pad_type, pad=None, ceil_mode=False, exclude_padding_from_average=False):
    F = _torch().nn.functional
    k = [int(v) for v in kernel_sizes]
    if len(k) != 2:
        raise UnsupportedOpError(f"{kind} with {len(k)} spatial dims is not supported by the reference executor")
    s = [int(v) for v in (strides if strides is not None else [1, 1])]
    top, bottom, left, right = _pads_2d(x.shape[2:], k, s, [1, 1], str(pad_type), pad)
    xt = _t(x)
    if top == bottom and left == right and top <= k[0] // 2 and left <= k[1] // 2:
        padding = (top, left)
    else:
        if kind == "avg_pool" and exclude_padding_from_average:
            raise UnsupportedOpError("avg_pool with asymmetric padding that excludes padding is not supported")
        xt = F.pad(xt, (left, right, top, bottom), value=-math.inf if kind == "max_pool" else 0.0)
        padding = (0, 0)
    if kind == "max_pool":
        return F.max_pool2d(xt, k, s, padding, ceil_mode=bool(ceil_mode)).numpy()
    return F.avg_pool2d(xt, k, s, padding, ceil_mode=bool(ceil_mode),
                        count_include_pad=not bool(exclude_padding_from_average)).numpy()


def op_max_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False):
    return _pool("max_pool", x, kernel_sizes, strides, pad_type, pad, ceil_mode)


def op_avg_pool(x, kernel_sizes, strides=None, pad_type="valid", pad=None, ceil_mode=False,
                exclude_padding_from_average=False):
    return _pool("avg_pool", x, kernel_sizes, strides, pad_type, pad, ceil_mode, exclude_padding_from_average)


def op_batch_norm(x, mean, variance, gamma=None, beta=None, epsilon=1e-5):
    shape = (1, -1) + (1,) * (x.ndim - 2)
    y = (x - mean.reshape(shape)) / np.sqrt(variance.reshape(shape) + np.float32(epsilon))
    if gamma is not None:
        y = y * gamma.reshape(shape)
    if beta is not None:
        y = y + beta.reshape(shape)
    return y


def _axes(axes, ndim):
    return None if axes is None else tuple(int(a) % ndim for a in np.atleast_1d(axes))


def op_reduce(fn):
    def run(x, axes=None, keep_dims=False):
        return fn(x, axis=_axes(axes, x.ndim), keepdims=bool(keep_dims))
    return run


def op_softmax(x, axis=-1):
    z = x - x.max(axis=int(axis), keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=int(axis), keepdims=True)


def op_concat(values, axis, interleave=False):
    axis = int(axis) % values[0].ndim
    if not interleave:
        return np.concatenate(values, axis=axis)
    # interleave: out[..., i*n + j, ...] = values[j][..., i, ...] (ShuffleNet's channel shuffle)
    stacked = np.stack(values, axis=axis + 1)
    shape = list(values[0].shape)
    shape[axis] = shape[axis] * len(values)
    return stacked.reshape(shape)


def op_split(x, axis, num_splits=None, split_sizes=None):
    axis = int(axis) % x.ndim
    if split_sizes is not None:
        cuts = np.cumsum([int(s) for s in split_sizes])[:-1]
        return tuple(np.split(x, cuts, axis=axis))
    return tuple(np.split(x, int(num_splits), axis=axis))


def op_reshape(x, shape):
    return x.reshape([int(s) for s in shape])


def op_slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    idx = []
    n = x.ndim
    stride = stride if stride is not None else [1] * n
    for i in range(n):
        b = None if (begin_mask is not None and begin_mask[i]) else int(begin[i])
        e = None if (end_mask is not None and end_mask[i]) else int(end[i])
        if squeeze_mask is not None and squeeze_mask[i]:
            idx.append(int(begin[i]))
        else:
            idx.append(slice(b, e, int(stride[i])))
    return x[tuple(idx)]


def op_slice_by_size(x, begin, size):
    idx = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s)) for b, s in zip(begin, size))
    return x[idx]


def _broadcast_axis(param, x_ndim: int, axis):
    p = np.asarray(param)
    if p.ndim == 0 or axis is None or p.ndim == x_ndim:
        return p
    shape = [1] * x_ndim
    shape[int(axis) % x_ndim] = -1
    return p.reshape(shape)


def op_quantize(input, scale, output_dtype, zero_point=None, axis=None):
    dt = _NAME_TO_NP[str(output_dtype)]
    info = np.iinfo(dt)
    s = _broadcast_axis(scale, input.ndim, axis).astype(np.float32)
    zp = 0 if zero_point is None else _broadcast_axis(zero_point, input.ndim, axis).astype(np.float32)
    q = np.rint(input / s) + zp
    return np.clip(q, info.min, info.max).astype(dt)


def op_dequantize(input, scale, zero_point=None, axis=None):
    s = _broadcast_axis(scale, input.ndim, axis).astype(np.float32)
    zp = 0 if zero_point is None else _broadcast_axis(zero_point, input.ndim, axis).astype(np.float32)
    return (input.astype(np.float32) - zp) * s


def op_constexpr_affine_dequantize(quantized_data, zero_point, scale, axis):
    return op_dequantize(quantized_data, scale, zero_point, axis)


def _expand_blocks(param, shape):
    """Blockwise parameter (same rank as the data, each dim dividing it) -> data's shape."""
    p = np.asarray(param, dtype=np.float32)
    for d, (n, m) in enumerate(zip(shape, p.shape)):
        if m != n:
            p = np.repeat(p, n // m, axis=d)
    return p


def op_constexpr_blockwise_shift_scale(data, scale, offset=None):
    x = np.asarray(data).astype(np.float32)
    if offset is not None:
        x = x - _expand_blocks(offset, x.shape)
    return x * _expand_blocks(scale, x.shape)


def op_cast(x, dtype):
    dt = _NAME_TO_NP[str(dtype)]
    if dt == np.float16:
        return np.asarray(x, dtype=np.float32)  # rounded to FP16 by the declared output dtype (fast path)
    if np.issubdtype(dt, np.integer) and np.issubdtype(np.asarray(x).dtype, np.floating):
        x = np.trunc(x)
    return np.asarray(x).astype(dt)


def op_classify(probabilities, classes):
    p = np.asarray(probabilities, dtype=np.float32).reshape(-1)
    labels = [c.decode() if isinstance(c, bytes) else c for c in classes]
    return labels[int(np.argmax(p))], dict(zip(labels, p.tolist()))


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gelu(x, mode="EXACT"):
    approx = "tanh" if str(mode) == "TANH_APPROXIMATION" else "none"
    if str(mode) == "SIGMOID_APPROXIMATION":
        return x * _sigmoid(np.float32(1.702) * x)
    return _torch().nn.functional.gelu(_t(x), approximate=approx).numpy()


OPS: Dict[str, Callable[..., Any]] = {
    "conv": op_conv,
    "linear": op_linear,
    "matmul": op_matmul,
    "max_pool": op_max_pool,
    "avg_pool": op_avg_pool,
    "batch_norm": op_batch_norm,
    "add": lambda x, y: x + y,
    "sub": lambda x, y: x - y,
    "mul": lambda x, y: x * y,
    "real_div": lambda x, y: x / y,
    "maximum": lambda x, y: np.maximum(x, y),
    "minimum": lambda x, y: np.minimum(x, y),
    "pow": lambda x, y: np.power(x, y),
    "relu": lambda x: np.maximum(x, 0),
    "relu6": lambda x: np.clip(x, 0, 6),
    "clip": lambda x, alpha, beta: np.clip(x, alpha, beta),
    "leaky_relu": lambda x, alpha=0.01: np.where(x >= 0, x, x * np.float32(alpha)),
    "sigmoid": _sigmoid,
    "silu": lambda x: x * _sigmoid(x),
    "sigmoid_hard": lambda x, alpha=0.2, beta=0.5: np.clip(np.float32(alpha) * x + np.float32(beta), 0, 1),
    "thresholded_relu": lambda x, alpha=1.0: np.where(x > alpha, x, 0).astype(x.dtype),
    "tanh": lambda x: np.tanh(x),
    "gelu": _gelu,
    "exp": lambda x: np.exp(x),
    "sqrt": lambda x: np.sqrt(x),
    "rsqrt": lambda x, epsilon=1e-12: 1.0 / np.sqrt(x + np.float32(epsilon)),
    "softmax": op_softmax,
    "reduce_mean": op_reduce(np.mean),
    "reduce_sum": op_reduce(np.sum),
    "reduce_max": op_reduce(np.max),
    "reshape": op_reshape,
    "transpose": lambda x, perm: np.transpose(x, [int(p) for p in perm]),
    "squeeze": lambda x, axes=None: np.squeeze(x, axis=_axes(axes, x.ndim)),
    "expand_dims": lambda x, axes: np.expand_dims(x, axis=tuple(int(a) for a in np.atleast_1d(axes))),
    "concat": op_concat,
    "split": op_split,
    "slice_by_index": op_slice_by_index,
    "slice_by_size": op_slice_by_size,
    "identity": lambda x: x,
    "cast": op_cast,
    "quantize": op_quantize,
    "dequantize": op_dequantize,
    "classify": op_classify,
}
CONSTEXPR_OPS: Dict[str, Callable[..., Any]] = {
    "constexpr_affine_dequantize": op_constexpr_affine_dequantize,
    "constexpr_blockwise_shift_scale": op_constexpr_blockwise_shift_scale,
}


def supported_ops() -> List[str]:
    return sorted(["const", *OPS, *CONSTEXPR_OPS])


# ---------------------------------------------------------------------------------------------- program
@dataclass
class _Step:
    fn: Callable[..., Any]
    op_type: str
    static: Dict[str, Any]                 # arguments bound to constants (resolved once)
    dynamic: List[Tuple[str, Any, bool]]   # (argument, variable name(s), is_tuple)
    outputs: List[Tuple[str, int]]         # (name, declared dtype code)
    free_after: List[str]                  # variables no later op reads


@dataclass
class _Imm:
    value: Any                             # an argument given inline (not a variable)


def _load_spec(path: Path):
    from exporters.coreml import import_coremltools

    ct = import_coremltools()
    return ct.utils.load_spec(os.fspath(path))


class CoreMLProgram:
    """The ``main`` function of an ML Program, loaded and ready to execute."""

    def __init__(self, package: str | os.PathLike):
        from exporters.coreml import import_coremltools

        import_coremltools()
        from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext, _load_value

        self.path = Path(package)
        if not (self.path / "Manifest.json").exists():
            raise InputError(f"{self.path} is not an .mlpackage (no Manifest.json)",
                             hint="pass the .mlpackage folder of an ML Program")
        spec = _load_spec(self.path)
        if spec.WhichOneof("Type") != "mlProgram":
            raise InputError(f"{self.path} is a {spec.WhichOneof('Type')} model, not an ML Program",
                             hint="the reference executor runs ML Programs (convert_to='mlprogram')")
        self.description = spec.description
        self.spec_version = int(spec.specificationVersion)
        fn = spec.mlProgram.functions["main"]
        self.opset = fn.opset
        block = fn.block_specializations[fn.opset]
        weights_dir = self.path / "Data" / "com.apple.CoreML" / "weights"
        ctx = TranscriptionContext(os.fspath(weights_dir))
        self._load_value = lambda v: _load_value(ctx, v)
        self.inputs = {}
        for inp in fn.inputs:
            t = inp.type.tensorType
            self.inputs[inp.name] = (tuple(d.constant.size for d in t.dimensions), int(t.dataType))
        self.output_names = list(block.outputs)
        self.op_counts: Dict[str, int] = {}
        self.consts: Dict[str, Any] = {}
        self.steps: List[_Step] = []
        self._compile(block)

    # -- loading
    def _value(self, value_spec):
        if value_spec.type.WhichOneof("type") == "listType":   # classify's labels: a list of scalars
            return [self._value(v) for v in value_spec.immediateValue.list.values]
        v = self._load_value(value_spec)
        if isinstance(v, np.ndarray) and v.dtype == np.float16:
            return v.astype(np.float32)   # FP16 weights are exact in FP32; computing in FP32 is the point
        if isinstance(v, np.ndarray) and v.dtype == np.float64:
            return v.astype(np.float32)
        return v

    def _compile(self, block) -> None:
        unknown = sorted({op.type for op in block.operations
                          if op.type != "const" and op.type not in OPS and op.type not in CONSTEXPR_OPS})
        if unknown:
            first = next(op for op in block.operations if op.type == unknown[0])
            raise UnsupportedOpError(
                f"{self.path.name}: the Core ML reference executor does not implement op "
                f"{', '.join(repr(u) for u in unknown)} (first: {first.outputs[0].name if first.outputs else '?'})",
                hint="validate this model on macOS with real Core ML, or add the op to edgecnn/runtimes/coreml_ref.py")
        pending: List[Tuple[Any, Dict[str, Any], List[Tuple[str, Any, bool]]]] = []
        for op in block.operations:
            self.op_counts[op.type] = self.op_counts.get(op.type, 0) + 1
            if op.type == "const":
                self.consts[op.outputs[0].name] = self._value(op.attributes["val"])
                continue
            static, dynamic = {}, []
            for arg, argument in op.inputs.items():
                vals, names, all_static = [], [], True
                for b in argument.arguments:
                    if b.WhichOneof("binding") == "name":
                        names.append(b.name)
                        if b.name in self.consts:
                            vals.append(self.consts[b.name])
                        else:
                            all_static = False
                    else:
                        v = self._value(b.value)
                        names.append(_Imm(v))
                        vals.append(v)
                is_tuple = op.type == "concat" and arg == "values"
                if all_static:
                    static[arg] = vals if is_tuple else vals[0]
                else:
                    dynamic.append((arg, names, is_tuple))
            if op.type in CONSTEXPR_OPS:
                for key in op.attributes:            # iOS16/17 constexpr ops keep their data in attributes
                    if key != "name":
                        static[key] = self._value(op.attributes[key])
                out = CONSTEXPR_OPS[op.type](**static)
                self.consts[op.outputs[0].name] = _round_to(_f32(out), int(op.outputs[0].type.tensorType.dataType))
                continue
            outputs = [(o.name, int(o.type.tensorType.dataType) if o.type.WhichOneof("type") == "tensorType" else 0)
                       for o in op.outputs]
            pending.append((op.type, static, dynamic, outputs))
        # liveness: free a variable after its last reader (keeps memory flat, caches warm)
        last_use: Dict[str, int] = {}
        for i, (_, _, dynamic, _) in enumerate(pending):
            for _, names, _ in dynamic:
                for n in names:
                    if isinstance(n, str) and n not in self.consts:
                        last_use[n] = i
        keep = set(self.output_names)
        frees: Dict[int, List[str]] = {}
        for n, i in last_use.items():
            if n not in keep and n not in self.inputs:
                frees.setdefault(i, []).append(n)
        for i, (op_type, static, dynamic, outputs) in enumerate(pending):
            self.steps.append(_Step(OPS[op_type], op_type, static, dynamic, outputs, frees.get(i, [])))
        missing = [n for n in self.output_names if n not in {o for s in self.steps for o, _ in s.outputs}
                   and n not in self.consts and n not in self.inputs]
        if missing:
            raise InputError(f"{self.path.name}: program outputs {missing} are not produced by any op")

    # -- running
    def run(self, feeds: Dict[str, np.ndarray]) -> Dict[str, Any]:
        env: Dict[str, Any] = dict(self.consts)
        for name, (shape, code) in self.inputs.items():
            if name not in feeds:
                raise InputError(f"{self.path.name}: input {name!r} not given (inputs: {', '.join(self.inputs)})")
            x = np.asarray(feeds[name])
            if tuple(x.shape) != shape:
                raise InputError(f"{self.path.name}: input {name!r} has shape {tuple(x.shape)}, the program takes {shape}")
            env[name] = _round_to(x.astype(np.float32) if code in (_FLOAT16, _FLOAT32) else x, code)
        with np.errstate(over="ignore", under="ignore"):  # exp overflow in sigmoid is exact (-> 0/1)
            self._execute(env)
        return {n: env[n] for n in self.output_names}

    def _execute(self, env: Dict[str, Any]) -> None:
        for step in self.steps:
            kwargs = dict(step.static)
            for arg, names, is_tuple in step.dynamic:
                vals = [n.value if isinstance(n, _Imm) else env[n] for n in names]
                kwargs[arg] = vals if is_tuple else vals[0]
            try:
                result = step.fn(**kwargs)
            except UnsupportedOpError:
                raise
            except Exception as exc:
                raise ToolchainError(f"{self.path.name}: reference executor failed on {step.op_type} -> "
                                     f"{step.outputs[0][0]}: {type(exc).__name__}: {exc}") from exc
            if len(step.outputs) == 1:
                result = (result,)
            for (name, code), value in zip(step.outputs, result):
                env[name] = _round_to(value if not isinstance(value, np.ndarray) or value.dtype != np.float64
                                      else value.astype(np.float32), code)
            for n in step.free_after:
                env.pop(n, None)


# ---------------------------------------------------------------------------------------------- runner
class CoreMLReferenceRunner:
    """Validator runner (``run(x)`` on normalised float32 NCHW -> logits) over the reference executor.

    For an image-input program the normalised batch is turned back into 8-bit pixels (what a
    ``CVPixelBuffer`` would hold: exact for inputs that came from 8-bit images) and fed as 0..255 floats.
    """

    measures_latency = False
    latency_reason = "not measured (needs Apple hardware): the Core ML runtime exists only on macOS/iOS"

    def __init__(self, package: str | os.PathLike, *, spec=None, image_input: Optional[str] = None,
                 output: str = "logits", threads: int = 1):
        t0 = time.perf_counter()
        self.program = CoreMLProgram(package)
        self.load_seconds = time.perf_counter() - t0
        self.spec = spec
        self.image_input = image_input
        self.output = output
        self.threads = threads
        if len(self.program.inputs) != 1:
            raise InputError(f"{package}: expected one input, found {list(self.program.inputs)}")
        self.input_name = next(iter(self.program.inputs))
        if image_input and spec is None:
            raise ValueError("an image-input program needs the InputSpec to undo normalisation")

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        if self.image_input:
            x = to_pixels(x, self.spec)
        torch = _torch()
        before = torch.get_num_threads()
        if before != self.threads:
            torch.set_num_threads(self.threads)  # like onnxruntime's intra-op threads; restored below
        try:
            outs = [np.asarray(self.program.run({self.input_name: x[i:i + 1]})[self.output], np.float32)
                    for i in range(len(x))]
        finally:
            if before != self.threads:
                torch.set_num_threads(before)
        return np.concatenate(outs).reshape(len(x), -1)

    def describe(self) -> dict:
        return {"runtime": RUNTIME_NAME, "version": _ct_version(), "executes": "MIL program interpreted in "
                "FP32 with each op output rounded to its declared dtype (FP16 storage mimicked)",
                "model": self.program.path.name, "opset": self.program.opset, "threads": self.threads,
                "compute_units": "n/a (no Core ML runtime on this OS)", "kernels": "torch.nn.functional "
                "(conv/pool/linear), NumPy (the rest)"}


def to_pixels(x: np.ndarray, spec) -> np.ndarray:
    """Normalised NCHW -> the 0..255 pixel values (as float32, rounded to integers) an image input sees."""
    mean = np.asarray(spec.mean, np.float32).reshape(1, -1, 1, 1)
    std = np.asarray(spec.std, np.float32).reshape(1, -1, 1, 1)
    return np.clip(np.rint((x * std + mean) / np.float32(spec.scale)), 0, 255).astype(np.float32)


def _ct_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("coremltools")
    except Exception:
        return "?"
