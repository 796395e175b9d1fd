"""A reference executor for Core ML ML Programs, so Core ML parity can be checked where Core ML cannot run.

``MLModel.predict`` exists only on macOS. This module interprets the MIL program inside an
``.mlpackage`` directly: it reads the program from the package's ``Model.mlmodel`` and every weight
with coremltools' own MIL-proto value loader (``weights/weight.bin``, 64-byte aligned blobs), then
executes the ops in program order, computing in FP32 and rounding every op output to the dtype the
program declares for it (FP16 storage between FP16 ops is mimicked exactly): one legal, CPU-like execution.
Its second mode, ``accumulation="fp16"``, sums the long reductions of FP16-typed ops in FP16 in chunks
(``exporters.coreml.fp16_accumulation``): the pessimistic, Neural-Engine-like end of the bracket a device
lies in. Palettized weights are decompressed with coremltools' own functions.

It covers the ops our exports of the zoo produce (and a few neighbours); an op it does not know is
refused when the program is loaded, with an error naming the op — never skipped. Each op's MIL
semantics is written out once in NumPy (``OPS``); the ops CNN programs spend their time in also have a
torch kernel (``KERNELS``: torch only as arithmetic — padding modes, groups, quantization and casts are
implemented here) whose constant arguments (weights, padding, axes) are bound when the program is
loaded, so a run passes torch tensors from op to op. Ops whose inputs are all constants are computed
once at load. Outputs of ops that only select input values (relu, max_pool, reshape, concat, ...) are
already representable in their dtype and are not re-rounded.

Not a performance model of Apple hardware: the latency of this executor says nothing about an iPhone, so
its runner (``exporters.coreml.runner``) reports Core ML latency on Linux as "not measured (needs Apple
hardware)".
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ..errors import ExportError, ModelFileError, UnsupportedOp
from . import fp16_accumulation

RUNTIME_NAME = "coreml-reference-executor"


class UnsupportedOpError(UnsupportedOp):
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


def op_constexpr_lut_to_dense(lut, indices, shape=None, vector_axis=None):
    """Palettized weights: coremltools' own decompression (iOS16 form: packed indices + ``shape``; iOS18 form:
    sub-byte index tensor, LUT per group of channels, optional vector axis)."""
    from coremltools.converters.mil.mil.ops.defs.iOS16.constexpr_ops import constexpr_lut_to_dense as ios16
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_lut_to_dense as ios18

    if shape is not None:
        return ios16.decompress(np.asarray(lut), np.asarray(indices), np.asarray(shape))
    return ios18.decompress(np.asarray(indices), np.asarray(lut), vector_axis)


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
    "thresholded_relu": lambda x, alpha=1.0: np.where(x >= np.float32(alpha), x, 0).astype(x.dtype),  # MIL: x >= alpha
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
    "constexpr_lut_to_dense": op_constexpr_lut_to_dense,
}


def supported_ops() -> List[str]:
    return sorted(["const", *OPS, *CONSTEXPR_OPS])


# ---------------------------------------------------------------------------------------------- torch kernels
# The hot path. The NumPy functions above state each op's MIL semantics; for the ops CNN programs spend
# their time in, a kernel factory below binds the op's constant arguments once when the program is loaded
# (weights as torch tensors, padding, axes, scales) and returns a closure over torch tensors. A run then
# does no NumPy<->torch round trip, no per-call weight conversion and no argument parsing — profiled on
# MobileNetV3-Large, those were about half of the executor's time. Ops without a kernel run their NumPy
# function (arguments converted at the call). ``dynamic`` lists the arguments a kernel accepts as variables;
# an op whose other arguments are not constants also falls back to its NumPy function.

def _tensor(v):
    """A constant argument as a torch tensor: floats as float32, integers as they are (None stays None)."""
    if v is None:
        return None
    a = np.array(v, copy=True)
    if a.dtype.kind == "f" and a.dtype != np.float32:
        a = a.astype(np.float32)
    return _torch().from_numpy(a)


def _ints(v, default):
    return [int(s) for s in (v if v is not None else default)]


def k_conv(st):
    F = _torch().nn.functional
    w0 = st.get("weight")
    if w0 is not None and np.ndim(w0) != 4:
        raise UnsupportedOpError(f"conv with {np.ndim(w0) - 2} spatial dims is not supported by the reference executor")
    wt, bt = _tensor(w0), _tensor(st.get("bias"))
    if wt is not None:
        # channels-last weights make oneDNN run the convolution (and hand its output on) in NHWC, measured
        # ~1.3x faster here on MobileNets' depthwise layers; later ops keep the layout, values are the same
        wt = wt.contiguous(memory_format=_torch().channels_last)
    strides, dilations = _ints(st.get("strides"), [1, 1]), _ints(st.get("dilations"), [1, 1])
    groups, pad_type, pad = int(st.get("groups", 1)), str(st.get("pad_type", "valid")), st.get("pad")
    geometry: Dict[tuple, Tuple[Any, Any]] = {}

    def run(x, weight=None, bias=None):
        w = wt if weight is None else weight
        b = bt if bias is None else bias
        key = (tuple(x.shape), tuple(w.shape))
        g = geometry.get(key)
        if g is None:
            if w.ndim != 4:
                raise UnsupportedOpError(f"conv with {w.ndim - 2} spatial dims is not supported by the reference executor")
            top, bottom, left, right = _pads_2d(key[0][2:], key[1][2:], strides, dilations, pad_type, pad)
            g = geometry[key] = ((top, left), None) if top == bottom and left == right else (0, (left, right, top, bottom))
        if g[1] is not None:
            x = F.pad(x, g[1])
        return F.conv2d(x, w, b, strides, g[0], dilations, groups)
    return run


def k_linear(st):
    F = _torch().nn.functional
    wt, bt = _tensor(st.get("weight")), _tensor(st.get("bias"))
    return lambda x, weight=None, bias=None: F.linear(x, wt if weight is None else weight, bt if bias is None else bias)


def k_pool(kind: str):
    def make(st):
        F = _torch().nn.functional
        k = _ints(st["kernel_sizes"], None)
        if len(k) != 2:
            raise UnsupportedOpError(f"{kind} with {len(k)} spatial dims is not supported by the reference executor")
        s = _ints(st.get("strides"), [1, 1])
        pad_type, pad, ceil = str(st.get("pad_type", "valid")), st.get("pad"), bool(st.get("ceil_mode", False))
        exclude = bool(st.get("exclude_padding_from_average", False))
        geometry: Dict[tuple, Tuple[Any, Any]] = {}

        def run(x):
            key = tuple(x.shape)
            g = geometry.get(key)
            if g is None:
                top, bottom, left, right = _pads_2d(key[2:], k, s, [1, 1], pad_type, pad)
                if top == bottom and left == right and top <= k[0] // 2 and left <= k[1] // 2:
                    g = ((top, left), None)
                elif kind == "avg_pool" and exclude:
                    raise UnsupportedOpError("avg_pool with asymmetric padding that excludes padding is not supported")
                else:
                    g = (0, (left, right, top, bottom))
                geometry[key] = g
            if g[1] is not None:
                x = F.pad(x, g[1], value=-math.inf if kind == "max_pool" else 0.0)
            if kind == "max_pool":
                return F.max_pool2d(x, k, s, g[0], ceil_mode=ceil)
            return F.avg_pool2d(x, k, s, g[0], ceil_mode=ceil, count_include_pad=not exclude)
        return run
    return make


def k_batch_norm(st):
    mean, var = st["mean"], st["variance"]
    eps = np.float32(st.get("epsilon", 1e-5))
    sd = np.sqrt(np.asarray(var, np.float32) + eps)     # the same FP32 arithmetic as op_batch_norm
    params = [_tensor(mean), _tensor(sd), _tensor(st.get("gamma")), _tensor(st.get("beta"))]

    def run(x):
        shape = (1, -1) + (1,) * (x.ndim - 2)
        m, s, g, b = (None if p is None else p.reshape(shape) for p in params)
        y = (x - m) / s
        if g is not None:
            y = y * g
        if b is not None:
            y = y + b
        return y
    return run


def k_binary(fn):
    def make(st):
        xs, ys = _tensor(st.get("x")), _tensor(st.get("y"))
        return lambda x=None, y=None: fn(xs if x is None else x, ys if y is None else y)
    return make


def k_unary(fn, *params):
    """``fn(x, *constant params)``; params are (name, default) read once as Python floats."""
    def make(st):
        vals = [float(st.get(name, default)) for name, default in params]
        return lambda x: fn(x, *vals)
    return make


def _axes_t(axes):
    return None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))


def k_reduce(name: str):
    def make(st):
        torch = _torch()
        axes, keep = _axes_t(st.get("axes")), bool(st.get("keep_dims", False))
        fn = {"mean": torch.mean, "sum": torch.sum, "max": torch.amax}[name]

        def run(x):
            if axes is None:
                return fn(x, dim=tuple(range(x.ndim)), keepdim=keep)
            return fn(x, dim=axes, keepdim=keep)
        return run
    return make


def k_reshape(st):
    shape = _ints(st["shape"], None)
    return lambda x: x.reshape(shape)


def k_transpose(st):
    perm = _ints(st["perm"], None)
    return lambda x: x.permute(perm)


def k_squeeze(st):
    axes = _axes_t(st.get("axes"))
    return lambda x: x.squeeze() if axes is None else x.squeeze(tuple(a % x.ndim for a in axes))


def k_expand_dims(st):
    axes = _axes_t(st["axes"])

    def run(x):
        n = x.ndim + len(axes)
        for a in sorted(a % n for a in axes):
            x = x.unsqueeze(a)
        return x
    return run


def k_concat(st):
    torch = _torch()
    axis, interleave = int(st["axis"]), bool(st.get("interleave", False))
    fixed = None if "values" not in st else [_tensor(v) for v in st["values"]]

    def run(values=None):
        values = fixed if values is None else values
        ax = axis % values[0].ndim
        if not interleave:
            return torch.cat(values, ax)
        shape = list(values[0].shape)
        shape[ax] *= len(values)
        return torch.stack(values, ax + 1).reshape(shape)
    return run


def k_split(st):
    axis, sizes, n = int(st["axis"]), st.get("split_sizes"), st.get("num_splits")
    sizes = None if sizes is None else _ints(sizes, None)

    def run(x):
        ax = axis % x.ndim
        return tuple(x.split(sizes if sizes is not None else x.shape[ax] // int(n), ax))
    return run


def k_softmax(st):
    axis = int(st.get("axis", -1))
    return lambda x: _torch().softmax(x, axis)


def _per_axis(param, axis):
    """A scale/zero point as a float32 tensor that broadcasts along ``axis`` of the data."""
    p = _tensor(param)
    if p.ndim == 0 or axis is None:
        return p, None
    return p, int(axis)


def k_quantize(st):
    torch = _torch()
    dt = _NAME_TO_NP[str(st["output_dtype"])]
    info = np.iinfo(dt)
    tdt = _torch().from_numpy(np.zeros(0, dt)).dtype
    s, axis = _per_axis(st["scale"], st.get("axis"))
    zp = None if st.get("zero_point") is None else _per_axis(st["zero_point"], st.get("axis"))[0]

    def run(input):
        sb, zb = _bcast(s, input.ndim, axis), None if zp is None else _bcast(zp, input.ndim, axis)
        q = torch.round(input / sb)
        if zb is not None:
            q = q + zb
        return q.clamp_(info.min, info.max).to(tdt)
    return run


def k_dequantize(st):
    s, axis = _per_axis(st["scale"], st.get("axis"))
    zp = None if st.get("zero_point") is None else _per_axis(st["zero_point"], st.get("axis"))[0]

    def run(input):
        x = input.float()
        if zp is not None:
            x = x - _bcast(zp, input.ndim, axis)
        return x * _bcast(s, input.ndim, axis)
    return run


def _bcast(p, ndim, axis):
    if axis is None or p.ndim == 0 or p.ndim == ndim:
        return p
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return p.reshape(shape)


def _F():
    return _torch().nn.functional


KERNELS: Dict[str, Tuple[Callable[[Dict[str, Any]], Callable[..., Any]], Tuple[str, ...]]] = {
    "conv": (k_conv, ("x", "weight", "bias")),
    "linear": (k_linear, ("x", "weight", "bias")),
    "max_pool": (k_pool("max_pool"), ("x",)),
    "avg_pool": (k_pool("avg_pool"), ("x",)),
    "batch_norm": (k_batch_norm, ("x",)),
    "add": (k_binary(lambda x, y: x + y), ("x", "y")),
    "sub": (k_binary(lambda x, y: x - y), ("x", "y")),
    "mul": (k_binary(lambda x, y: x * y), ("x", "y")),
    "real_div": (k_binary(lambda x, y: x / y), ("x", "y")),
    "maximum": (k_binary(lambda x, y: _torch().maximum(x, y)), ("x", "y")),
    "minimum": (k_binary(lambda x, y: _torch().minimum(x, y)), ("x", "y")),
    "relu": (k_unary(lambda x: _torch().relu(x)), ("x",)),
    "relu6": (k_unary(lambda x: x.clamp(0.0, 6.0)), ("x",)),
    "clip": (k_unary(lambda x, a, b: x.clamp(a, b), ("alpha", 0.0), ("beta", 1.0)), ("x",)),
    "leaky_relu": (k_unary(lambda x, a: _torch().where(x >= 0, x, x * a), ("alpha", 0.01)), ("x",)),
    "sigmoid": (k_unary(lambda x: _torch().sigmoid(x)), ("x",)),
    "silu": (k_unary(lambda x: _F().silu(x)), ("x",)),
    "sigmoid_hard": (k_unary(lambda x, a, b: (x * a + b).clamp_(0.0, 1.0), ("alpha", 0.2), ("beta", 0.5)), ("x",)),
    # MIL keeps x where x >= alpha (torch's threshold keeps x > alpha only; HardSwish programs use alpha = -3)
    "thresholded_relu": (k_unary(lambda x, a: _torch().where(x >= a, x, _torch().zeros((), dtype=x.dtype)),
                                 ("alpha", 1.0)), ("x",)),
    "tanh": (k_unary(lambda x: _torch().tanh(x)), ("x",)),
    "exp": (k_unary(lambda x: _torch().exp(x)), ("x",)),
    "sqrt": (k_unary(lambda x: _torch().sqrt(x)), ("x",)),
    "softmax": (k_softmax, ("x",)),
    "reduce_mean": (k_reduce("mean"), ("x",)),
    "reduce_sum": (k_reduce("sum"), ("x",)),
    "reduce_max": (k_reduce("max"), ("x",)),
    "reshape": (k_reshape, ("x",)),
    "transpose": (k_transpose, ("x",)),
    "squeeze": (k_squeeze, ("x",)),
    "expand_dims": (k_expand_dims, ("x",)),
    "concat": (k_concat, ("values",)),
    "split": (k_split, ("x",)),
    "identity": (k_unary(lambda x: x), ("x",)),
    "quantize": (k_quantize, ("input",)),
    "dequantize": (k_dequantize, ("input",)),
}

# Kernels that may return their input itself or a view of it: their outputs are never rounded in place.
VIEW_OPS = frozenset({"identity", "reshape", "transpose", "squeeze", "expand_dims", "split", "slice_by_index",
                      "slice_by_size"})

# Ops whose output is a selection of their input values (or of constants of the same dtype): an output
# declared with its inputs' dtype needs no rounding — the values are already representable.
EXACT_OPS = frozenset({"relu", "relu6", "clip", "thresholded_relu", "max_pool", "reshape", "transpose", "squeeze",
                       "expand_dims", "concat", "split", "slice_by_index", "slice_by_size", "identity", "maximum",
                       "minimum", "reduce_max"})


def _numpy_kernel(fn, static):
    """The NumPy function of an op as a kernel over torch values (arguments converted at each call)."""
    def run(**dynamic):
        kwargs = dict(static)
        for k, v in dynamic.items():
            kwargs[k] = [_to_np(e) for e in v] if isinstance(v, list) else _to_np(v)
        return _from_np(fn(**kwargs))
    return run


def _to_np(v):
    torch = _torch()
    return v.numpy() if isinstance(v, torch.Tensor) else v


def _from_np(v):
    if isinstance(v, tuple):
        return tuple(_from_np(e) for e in v)
    if isinstance(v, (np.ndarray, np.generic)):
        a = np.array(v, copy=True)   # contiguous, positive strides, owns its memory
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        return _torch().from_numpy(a)
    return v


def _round_tensor(value, code: int, inplace: bool = False):
    """Store a kernel's output as its declared MIL dtype (see ``_round_to``; torch values). ``inplace``:
    the value is a fresh buffer of this op (not a view of an input), so FP16 rounding may overwrite it."""
    torch = _torch()
    if not isinstance(value, torch.Tensor):
        return value
    if code == _FLOAT16:
        if not value.is_floating_point():
            return value.float()
        # torch's FP16 rounding gives the same bits as NumPy's astype (round to nearest even), much faster
        if inplace and value.dtype == torch.float32:
            return value.copy_(value.to(torch.float16))
        return value.to(torch.float16).float()
    if code == _FLOAT32:
        return value if value.dtype == torch.float32 else value.float()
    want = _torch_dtype(code)
    return value if want is None or value.dtype == want else value.to(want)


_TORCH_OF: Dict[int, Any] = {}


def _torch_dtype(code: int):
    """The torch dtype of MIL dtype ``code`` (None if it has none)."""
    if code not in _TORCH_OF:
        _TORCH_OF[code] = _torch().from_numpy(np.zeros(0, _NP_OF[code])).dtype if code in _NP_OF else None
    return _TORCH_OF[code]


# ---------------------------------------------------------------------------------------------- program
@dataclass
class _Step:
    run: Callable[..., Any]                # kernel: dynamic arguments (torch values) -> output(s)
    op_type: str
    dynamic: List[Tuple[str, Any, bool]]   # (argument, variable name(s) or _Imm, is_tuple)
    outputs: List[Tuple[str, int, int]]    # (name, declared dtype code, rounding: 0 none, 1 in place, 2 copy)
    free_after: List[str]                  # variables no later op reads


@dataclass
class _Imm:
    value: Any                             # an argument given inline or a constant in a variable list


def _load_spec(path: Path):
    from .export import import_coremltools

    ct = import_coremltools()
    return ct.utils.load_spec(os.fspath(path))


_MALLOC_TUNED = False
MALLOC_SETTING = "default"   # what _keep_freed_memory set, for describe()


def _keep_freed_memory() -> None:
    """Let glibc's malloc keep freed activation buffers instead of returning them to the OS.

    Every op allocates its output (torch has no caching allocator on CPU); with glibc's defaults the
    multi-megabyte buffers of a 224x224 net are mmapped or trimmed off the heap on free, so each op pays
    page faults on fresh memory — measured on MobileNetV3-Large, about a third of the executor's time.
    Raising the mmap threshold (64 MiB) and the trim threshold (256 MiB) makes them reuse the heap, as
    onnxruntime's arena does. Process-wide and once; glibc only (elsewhere a no-op); skipped when
    ``EDGECNN_COREML_REF_MALLOC=0`` or when the user tuned malloc through the environment already."""
    global _MALLOC_TUNED, MALLOC_SETTING
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    if os.environ.get("EDGECNN_COREML_REF_MALLOC", "1") == "0" or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        if libc.mallopt(M_MMAP_THRESHOLD, 64 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 256 << 20):
            MALLOC_SETTING = "glibc M_MMAP_THRESHOLD 64 MiB, M_TRIM_THRESHOLD 256 MiB (freed buffers reused)"
    except (OSError, AttributeError):
        pass


ACCUMULATIONS = ("fp32", "fp16")


class CoreMLProgram:
    """The ``main`` function of an ML Program, loaded and ready to execute.

    ``accumulation``: "fp32" (the default: each op computed in FP32, its output rounded to its declared dtype;
    CPU-like) or "fp16" (sums of FP16-typed conv/linear/matmul/reduce ops accumulated in FP16, in ``chunks``;
    Neural-Engine-like, see ``exporters.coreml.fp16_accumulation``)."""

    def __init__(self, package: str | os.PathLike, *, accumulation: str = "fp32",
                 chunks: Optional[fp16_accumulation.Chunks] = None):
        from .export import import_coremltools

        if accumulation not in ACCUMULATIONS:
            raise ValueError(f"accumulation {accumulation!r}: use one of {', '.join(ACCUMULATIONS)}")
        self.accumulation, self.chunks = accumulation, chunks or fp16_accumulation.Chunks()
        import_coremltools()
        from coremltools.converters.mil.frontend.milproto.load import TranscriptionContext, _load_value

        self.path = Path(package)
        if not (self.path / "Manifest.json").exists():
            raise ModelFileError(f"{self.path} is not an .mlpackage (no Manifest.json)",
                             hint="pass the .mlpackage folder of an ML Program")
        spec = _load_spec(self.path)
        if spec.WhichOneof("Type") != "mlProgram":
            raise ModelFileError(f"{self.path} is a {spec.WhichOneof('Type')} model, not an ML Program",
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
        self.folded: List[str] = []           # ops computed once at load (all their inputs are constants)
        self.steps: List[_Step] = []
        self._compile(block)
        _keep_freed_memory()

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
                hint="validate this model on macOS with real Core ML, or add the op to exporters/coreml/mil_reference.py")
        codes: Dict[str, int] = {n: c for n, (_, c) in self.inputs.items()}   # declared dtype of each variable
        pending = []
        for op in block.operations:
            self.op_counts[op.type] = self.op_counts.get(op.type, 0) + 1
            if op.type == "const":
                self.consts[op.outputs[0].name] = self._value(op.attributes["val"])
                continue
            static, dynamic = {}, []
            for arg, argument in op.inputs.items():
                entries = []          # (variable name, None) or (None, constant value)
                for b in argument.arguments:
                    if b.WhichOneof("binding") == "name":
                        entries.append((None, self.consts[b.name]) if b.name in self.consts else (b.name, None))
                    else:
                        entries.append((None, self._value(b.value)))
                is_tuple = op.type == "concat" and arg == "values"
                if all(n is None for n, _ in entries):
                    vals = [v for _, v in entries]
                    static[arg] = vals if is_tuple else vals[0]
                else:   # a list mixing variables and constants: the constants as torch values, converted once
                    names = [_Imm(_from_np(v)) if n is None else n for n, v in entries]
                    dynamic.append((arg, names, is_tuple))
            outputs = [(o.name, int(o.type.tensorType.dataType) if o.type.WhichOneof("type") == "tensorType" else 0)
                       for o in op.outputs]
            if op.type in CONSTEXPR_OPS:
                for key in op.attributes:            # iOS16/17 constexpr ops keep their data in attributes
                    if key != "name":
                        static[key] = self._value(op.attributes[key])
                out = CONSTEXPR_OPS[op.type](**static)
                self.consts[outputs[0][0]] = _round_to(_f32(out), outputs[0][1])
                continue
            if not dynamic and op.type != "classify":
                # every input is a constant (e.g. dequantize of stored INT8 weights): compute once, here
                try:
                    result = OPS[op.type](**static)
                except UnsupportedOpError:
                    raise
                except Exception as exc:
                    raise ExportError(f"{self.path.name}: reference executor failed on {op.type} -> "
                                         f"{outputs[0][0]} (constant inputs): {type(exc).__name__}: {exc}") from exc
                result = (result,) if len(outputs) == 1 else result
                for (name, code), value in zip(outputs, result):
                    if isinstance(value, (np.ndarray, np.generic)) and np.asarray(value).dtype == np.float64:
                        value = np.asarray(value, np.float32)
                    self.consts[name] = _round_to(value, code)
                self.folded.append(outputs[0][0])
                continue
            in_codes = {codes.get(n) for _, names, _ in dynamic for n in names if isinstance(n, str)}
            for name, code in outputs:
                codes[name] = code
            exact = op.type in EXACT_OPS and in_codes == {outputs[0][1]} and len({c for _, c in outputs}) == 1
            kernel, accepts = KERNELS.get(op.type, (None, ()))
            if self._accumulates_in_fp16(op.type, outputs, dynamic):
                run = fp16_accumulation.KERNELS[op.type](static, self.chunks, _pads_2d)
            elif kernel is not None and all(arg in accepts for arg, _, _ in dynamic):
                run = kernel(static)
            else:
                run = _numpy_kernel(OPS[op.type], static)
            mode = 0 if exact else 2 if op.type in VIEW_OPS else 1
            pending.append((op.type, run, dynamic, [(n, c, mode) for n, c in outputs]))
        # liveness: free a variable after its last reader (keeps memory flat, caches warm)
        last_use: Dict[str, int] = {}
        for i, (_, _, dynamic, _) in enumerate(pending):
            for _, names, _ in dynamic:
                for n in names:
                    if isinstance(n, str):
                        last_use[n] = i
        keep = set(self.output_names)
        frees: Dict[int, List[str]] = {}
        for n, i in last_use.items():
            if n not in keep and n not in self.inputs:
                frees.setdefault(i, []).append(n)
        for i, (op_type, run, dynamic, outputs) in enumerate(pending):
            self.steps.append(_Step(run, op_type, dynamic, outputs, frees.get(i, [])))
        missing = [n for n in self.output_names if n not in {o for s in self.steps for o, _, _ in s.outputs}
                   and n not in self.consts and n not in self.inputs]
        if missing:
            raise ModelFileError(f"{self.path.name}: program outputs {missing} are not produced by any op")

    def _accumulates_in_fp16(self, op_type: str, outputs, dynamic) -> bool:
        return (self.accumulation == "fp16" and op_type in fp16_accumulation.KERNELS
                and outputs[0][1] == _FLOAT16
                and all(arg in fp16_accumulation.ACCEPTS[op_type] for arg, _, _ in dynamic))

    # -- running
    def run(self, feeds: Dict[str, np.ndarray], also: Sequence[str] = ()) -> Dict[str, Any]:
        """The program's outputs for ``feeds`` (and the intermediate variables named in ``also``)."""
        env: Dict[str, Any] = {}
        for name, (shape, code) in self.inputs.items():
            if name not in feeds:
                raise ModelFileError(f"{self.path.name}: input {name!r} not given (inputs: {', '.join(self.inputs)})")
            x = np.asarray(feeds[name])
            if tuple(x.shape) != shape:
                raise ModelFileError(f"{self.path.name}: input {name!r} has shape {tuple(x.shape)}, the program takes {shape}")
            env[name] = _from_np(_round_to(x.astype(np.float32) if code in (_FLOAT16, _FLOAT32) else x, code))
        kept = self._execute(env, set(also))
        out = {n: v.contiguous().numpy() for n, v in kept.items()}
        for n in self.output_names:
            v = env[n] if n in env else self.consts[n]
            out[n] = v.contiguous().numpy() if isinstance(v, _torch().Tensor) else v
        return out

    def _execute(self, env: Dict[str, Any], keep: set) -> Dict[str, Any]:
        torch = _torch()
        kept: Dict[str, Any] = {}
        # exp overflow in a NumPy fallback's sigmoid is exact (-> 0/1)
        with torch.inference_mode(), np.errstate(over="ignore", under="ignore"):
            for step in self.steps:
                kwargs = {}
                for arg, names, is_tuple in step.dynamic:
                    if is_tuple:
                        kwargs[arg] = [n.value if n.__class__ is _Imm else env[n] for n in names]
                    else:
                        n = names[0]
                        kwargs[arg] = n.value if n.__class__ is _Imm else env[n]
                try:
                    result = step.run(**kwargs)
                except UnsupportedOpError:
                    raise
                except Exception as exc:
                    raise ExportError(f"{self.path.name}: reference executor failed on {step.op_type} -> "
                                         f"{step.outputs[0][0]}: {type(exc).__name__}: {exc}") from exc
                if len(step.outputs) == 1:
                    name, code, mode = step.outputs[0]
                    env[name] = _round_tensor(result, code, mode == 1) if mode else result
                else:
                    for (name, code, mode), value in zip(step.outputs, result):
                        env[name] = _round_tensor(value, code, mode == 1) if mode else value
                if keep:
                    kept.update({n: env[n].clone() for n, _, _ in step.outputs if n in keep})
                for n in step.free_after:
                    env.pop(n, None)
        return kept


def _ct_version() -> str:
    try:
        import importlib.metadata as md

        return md.version("coremltools")
    except Exception:
        return "?"
