"""FP16 accumulation for the reference executor: the Neural-Engine-like end of its bracket.

The executor's default mode computes every op in FP32 and rounds the op's output to its declared dtype: one
legal execution, close to Core ML on the CPU. The Neural Engine computes in FP16 (coremltools' "Typed
Execution" guide: https://apple.github.io/coremltools/docs-guides/source/typed-execution.html; it is
"float16 for everything" as far as outside measurements tell, https://github.com/hollance/neural-engine,
docs/16-bit.md). Apple does not document how its sums are accumulated, so this mode models the pessimistic
end: the products of a reduction are summed in FP32 within chunks of ``chunk`` products, each chunk's partial
sum is rounded to FP16, and the partials are added one after another in FP16 (rounding after every add); the
bias is added in FP16 last. The ops whose results are long sums get it: ``conv``, ``linear``, ``matmul``,
``reduce_sum`` and ``reduce_mean`` (a mean is that FP16 sum divided by the count: over 112 x 112 values the
running sum reaches thousands, where FP16's step is 4 to 8, and it overflows past 65504). Everything else runs
as in the default mode. Only ops the program
types FP16 are affected (an FP32-typed op cannot run on the Neural Engine anyway).

The chunk sizes are a model, not a measurement (Apple documents no accumulator): 32 products for conv, linear
and matmul, 4 values for reduce_sum and reduce_mean. Measured here on random-init EfficientNet-B0 (FP16
program, 8 sample photos) against the default mode: with these defaults the logits keep 30.8 dB SQNR (min
cosine 0.99928, just over the FP16 gate) while the first squeeze-excite mean (over 112 x 112 values) falls to
16.1 dB in the worst image (min cosine 0.990); with the reductions chunked like the products (32) the logits
keep 43 dB, i.e. the conv/linear sums alone leave 10-15 dB over the gate (~27 dB); with fully sequential
reductions (1) the logits fall to 17.8 dB (cosine 0.974). Through the pipeline (48 held-out photos, BatchNorm
re-estimated on 256) the defaults give 16.6 dB against 46.0 dB with FP32 accumulation (min cosine 0.984 vs
0.99998). Both sizes are recorded with every result.

Conv chunks are groups of input channels (``chunk // (kh * kw)`` of them, at least one), computed in one
grouped convolution: group ``g * k + j`` is input-channel chunk ``j`` of group ``g``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict

import numpy as np

DEFAULT_CHUNK = 32          # conv/linear/matmul: products summed exactly before a partial is rounded to FP16
DEFAULT_REDUCTION_CHUNK = 4  # reduce_sum/reduce_mean: values summed exactly before a partial is rounded
ACCUMULATING_OPS = ("conv", "linear", "matmul", "reduce_sum", "reduce_mean")


@dataclass(frozen=True)
class Chunks:
    """How many terms are summed exactly before a partial sum is rounded to FP16."""

    products: int = DEFAULT_CHUNK            # conv, linear, matmul
    reduction: int = DEFAULT_REDUCTION_CHUNK  # reduce_sum, reduce_mean

    def describe(self) -> dict:
        return {"products_per_fp16_partial": self.products, "values_per_fp16_partial": self.reduction}


def _torch():
    import torch

    return torch


def _half(x):
    """``x`` rounded to FP16, kept as float32."""
    return x.to(_torch().float16).float()


def _sum_partials(partials, dim: int):
    """Add FP16 partial sums along ``dim`` one after another, rounding to FP16 after every add."""
    partials = _half(partials)
    acc = partials.select(dim, 0)
    for j in range(1, partials.shape[dim]):
        acc = _half(acc + partials.select(dim, j))
    return acc


def _add_bias(y, bias, shape):
    return y if bias is None else _half(y + bias.reshape(shape))


def _constant(v):
    if v is None:
        return None
    a = np.array(v, dtype=np.float32, copy=True)
    return _torch().from_numpy(a)


def k_conv(static: Dict[str, Any], chunks: "Chunks", pads: Callable) -> Callable:
    """``conv`` with FP16 accumulation (2-D; ``pads`` is the executor's MIL padding rule)."""
    chunk = chunks.products
    F = _torch().nn.functional
    wt, bt = _constant(static.get("weight")), _constant(static.get("bias"))
    strides = [int(s) for s in (static["strides"] if static.get("strides") is not None else [1, 1])]
    dilations = [int(d) for d in (static["dilations"] if static.get("dilations") is not None else [1, 1])]
    groups, pad_type, pad = int(static.get("groups", 1)), str(static.get("pad_type", "valid")), static.get("pad")

    def run(x, weight=None, bias=None):
        w = wt if weight is None else weight.float()
        b = bt if bias is None else bias.float()
        top, bottom, left, right = pads(tuple(x.shape[2:]), tuple(w.shape[2:]), strides, dilations, pad_type, pad)
        x = F.pad(x, (left, right, top, bottom)) if (top, bottom, left, right) != (0, 0, 0, 0) else x
        n, cin = x.shape[:2]
        cout, cin_g, kh, kw = w.shape
        per_chunk = max(1, chunk // (kh * kw))
        k = math.ceil(cin_g / per_chunk)
        if k > 1:
            width = k * per_chunk
            xs = F.pad(x.reshape(n, groups, cin_g, *x.shape[2:]), (0, 0, 0, 0, 0, width - cin_g))
            ws = F.pad(w, (0, 0, 0, 0, 0, width - cin_g)).reshape(groups, cout // groups, k, per_chunk, kh, kw)
            ws = ws.permute(0, 2, 1, 3, 4, 5).reshape(groups * k * (cout // groups), per_chunk, kh, kw)
            y = F.conv2d(xs.reshape(n, groups * width, *x.shape[2:]), ws, None, strides, 0, dilations, groups * k)
            y = _sum_partials(y.reshape(n, groups, k, cout // groups, *y.shape[2:]), 2).reshape(n, cout, *y.shape[2:])
        else:
            y = _half(F.conv2d(x, w, None, strides, 0, dilations, groups))
        return _add_bias(y, b, (1, -1, 1, 1))
    return run


def _chunked_dot(x, w, chunk: int):
    """x (..., K) · w (N, K) -> (..., N) with FP16 accumulation over K."""
    torch = _torch()
    kdim = x.shape[-1]
    k = math.ceil(kdim / chunk)
    if k == 1:
        return _half(x @ w.T)
    pad = k * chunk - kdim
    F = torch.nn.functional
    xs = F.pad(x, (0, pad)).reshape(*x.shape[:-1], k, chunk)
    ws = F.pad(w, (0, pad)).reshape(w.shape[0], k, chunk)
    partials = torch.einsum("...kc,nkc->...kn", xs, ws)
    return _sum_partials(partials, partials.ndim - 2)


def k_linear(static: Dict[str, Any], chunks: "Chunks", pads=None) -> Callable:
    chunk = chunks.products
    wt, bt = _constant(static.get("weight")), _constant(static.get("bias"))

    def run(x, weight=None, bias=None):
        w = wt if weight is None else weight.float()
        b = bt if bias is None else bias.float()
        return _add_bias(_chunked_dot(x, w, chunk), b, (-1,))
    return run


def k_matmul(static: Dict[str, Any], chunks: "Chunks", pads=None) -> Callable:
    chunk = chunks.products
    xs_, ys_ = _constant(static.get("x")), _constant(static.get("y"))
    tx, ty = bool(static.get("transpose_x", False)), bool(static.get("transpose_y", False))

    def run(x=None, y=None):
        a = xs_ if x is None else x.float()
        b = ys_ if y is None else y.float()
        a = a.transpose(-1, -2) if tx else a
        b = b.transpose(-1, -2) if ty else b
        kdim = a.shape[-1]
        k = math.ceil(kdim / chunk)
        partials = _torch().stack([a[..., j * chunk:(j + 1) * chunk] @ b[..., j * chunk:(j + 1) * chunk, :]
                                   for j in range(k)])
        return _sum_partials(partials, 0)
    return run


def k_reduce(mean: bool) -> Callable:
    def make(static: Dict[str, Any], chunks: "Chunks", pads=None) -> Callable:
        chunk = chunks.reduction
        axes = static.get("axes")
        keep = bool(static.get("keep_dims", False))

        def run(x):
            torch = _torch()
            dims = list(range(x.ndim)) if axes is None else sorted(int(a) % x.ndim for a in np.atleast_1d(axes))
            rest = [d for d in range(x.ndim) if d not in dims]
            moved = x.permute(*rest, *dims)
            count = int(np.prod([x.shape[d] for d in dims]))
            flat = moved.reshape(*moved.shape[:len(rest)], count)
            k = math.ceil(count / chunk)
            flat = torch.nn.functional.pad(flat, (0, k * chunk - count))
            partials = flat.reshape(*flat.shape[:-1], k, chunk).sum(-1)
            y = _sum_partials(partials, partials.ndim - 1)
            if mean:
                y = _half(y / count)
            if keep:
                shape = [1 if d in dims else x.shape[d] for d in range(x.ndim)]
                y = y.reshape(shape)
            return y
        return run
    return make


# op -> factory(static arguments, Chunks, the executor's MIL padding rule) -> kernel over torch values
KERNELS = {"conv": k_conv, "linear": k_linear, "matmul": k_matmul, "reduce_sum": k_reduce(False),
           "reduce_mean": k_reduce(True)}
ACCEPTS = {"conv": ("x", "weight", "bias"), "linear": ("x", "weight", "bias"), "matmul": ("x", "y"),
           "reduce_sum": ("x",), "reduce_mean": ("x",)}
