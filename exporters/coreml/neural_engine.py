"""A Neural Engine report of one ML Program: a static reading of what Core ML is likely to place where, and the
compute-unit advice that follows. Core ML decides placement itself when it loads the model (per device and OS:
https://github.com/apple/coremltools/issues/1761); ``MLComputePlan`` on a Mac shows the actual plan
(``edgecnn validate`` there writes it). What this report reads from the program:

* ops typed FP32: the Neural Engine computes in FP16 only (coremltools' Typed Execution guide), so FP32-typed
  ops run on the CPU or GPU; at the start (the image variant's normalisation) and the end (the logits) they make
  CPU -> Neural Engine -> CPU splits, each a hand-over of the tensor between processors;
* FP16 reductions over more than ``LONG_REDUCTION`` elements: summed in FP16 on the Neural Engine, they lose
  precision (the executor's FP16-accumulation mode measures how much; ``exporters.coreml.fp16_accumulation``);
* quantize/dequantize boundaries of a W8A8 program;
* ops an outside, experimental list reports as not running on the Neural Engine (its author calls it
  "incomplete and possibly wrong"): dilated convolutions, pooling with a kernel over 13 or a stride over 2,
  gather, and broadcasting a C x 1 x 1 tensor over C x H x W.
"""
from __future__ import annotations

from collections import Counter
from typing import Dict, List, Optional

LONG_REDUCTION = 2048        # "a few thousand" summed elements: the accumulation error of FP16 shows from here
MAX_LISTED = 8

SOURCES = {
    "typed_execution": "https://apple.github.io/coremltools/docs-guides/source/typed-execution.html",
    "quantization_performance": "https://apple.github.io/coremltools/docs-guides/source/opt-quantization-perf.html",
    "placement_factors": "https://github.com/apple/coremltools/issues/1761",
    "ane_numerics_vs_cpu": "https://github.com/apple/coremltools/issues/1023",
    "ane_16_bit": "https://github.com/hollance/neural-engine/blob/master/docs/16-bit.md",
    "ane_unsupported_layers": "https://github.com/hollance/neural-engine/blob/master/docs/unsupported-layers.md",
}
_SKIP = ("const",)
_ELEMENTWISE = ("mul", "add", "sub", "real_div")


def _dtype(var) -> str:
    from coremltools.converters.mil.mil import types

    return types.builtin_to_string(var.dtype) if var.dtype is not None else "?"


def _shape(var) -> tuple:
    return tuple(int(d) for d in var.shape) if var.shape is not None else ()


def _ops(program) -> list:
    return [op for op in program.functions["main"].operations
            if op.op_type not in _SKIP and not op.op_type.startswith("constexpr_")]


def _is_fp32(op) -> bool:
    """FP32-typed (or the classifier's label lookup): runs on the CPU or GPU."""
    return op.op_type == "classify" or any(_dtype(out) == "fp32" for out in op.outputs)


def reduction_length(op) -> Optional[int]:
    """How many values one output element of ``op`` sums (None for ops that sum nothing)."""
    t = op.op_type
    if t == "conv":
        w = _shape(op.inputs["weight"])
        return int(w[1] * w[2] * w[3]) if len(w) == 4 else None
    if t == "linear":
        return int(_shape(op.inputs["weight"])[-1])
    if t == "matmul":
        x = _shape(op.inputs["x"])
        return int(x[-2] if op.inputs.get("transpose_x") is not None and op.inputs["transpose_x"].val else x[-1])
    if t in ("reduce_mean", "reduce_sum"):
        shape = _shape(op.inputs["x"])
        axes = op.inputs.get("axes")
        dims = range(len(shape)) if axes is None else [int(a) % len(shape) for a in axes.val]
        n = 1
        for d in dims:
            n *= shape[d]
        return n
    if t == "avg_pool":
        k = op.inputs["kernel_sizes"].val
        return int(k[0] * k[1])
    return None


def _left_reasons(op) -> List[str]:
    """Why the outside list would put ``op`` off the Neural Engine (empty: nothing known)."""
    t, why = op.op_type, []
    if t == "conv" and op.inputs.get("dilations") is not None and max(op.inputs["dilations"].val) > 1:
        why.append("dilated convolution")
    if t in ("max_pool", "avg_pool"):
        k, s = op.inputs["kernel_sizes"].val, (op.inputs["strides"].val if op.inputs.get("strides") is not None
                                               else [1, 1])
        if max(k) > 13 or max(s) > 2:
            why.append(f"pooling with kernel {list(map(int, k))}, stride {list(map(int, s))} (kernel > 13 or stride > 2)")
    if t.startswith("gather"):
        why.append("gather")
    if t in _ELEMENTWISE and "x" in op.inputs and "y" in op.inputs and not _is_fp32(op):
        a, b = _shape(op.inputs["x"]), _shape(op.inputs["y"])
        if len(a) == len(b) == 4 and op.inputs["x"].val is None and op.inputs["y"].val is None and a != b and \
                (a[2:] == (1, 1) or b[2:] == (1, 1)):
            why.append("broadcast of a C x 1 x 1 tensor over C x H x W (e.g. squeeze-excite's scaling)")
    return why


def _segments(ops) -> List[dict]:
    """Runs of consecutive ops by where they can run: FP32-typed (CPU/GPU) or FP16/INT8 (Neural Engine)."""
    out: List[dict] = []
    for op in ops:
        where = "CPU/GPU (FP32-typed)" if _is_fp32(op) else "Neural Engine candidate (FP16/INT8-typed)"
        if out and out[-1]["where"] == where:
            out[-1]["ops"] += 1
            out[-1]["types"][op.op_type] = out[-1]["types"].get(op.op_type, 0) + 1
        else:
            out.append({"where": where, "ops": 1, "types": {op.op_type: 1}})
    return out


def report(program, precision: str, *, scheme: Optional[str] = None) -> dict:
    """The Neural Engine report of ``program`` (a coremltools MIL program, e.g. ``packaging.reload_program``)."""
    ops = _ops(program)
    fp32 = [op for op in ops if _is_fp32(op)]
    long_sums = sorted(({"op": op.op_type, "name": op.outputs[0].name, "elements": reduction_length(op)}
                        for op in ops if not _is_fp32(op) and (reduction_length(op) or 0) > LONG_REDUCTION),
                       key=lambda r: -r["elements"])
    left = [{"op": op.op_type, "name": op.outputs[0].name, "why": why}
            for op in ops for why in _left_reasons(op)]
    quantize = sum(op.op_type == "quantize" for op in ops)
    dequantize = sum(op.op_type == "dequantize" and op.inputs["input"].val is None for op in ops)
    segments = _segments(ops)
    r = {"ops": len(ops),
         "fp32_ops": {"count": len(fp32), "types": dict(Counter(op.op_type for op in fp32))},
         "segments": segments,
         "long_fp16_reductions": {"threshold": LONG_REDUCTION, "count": len(long_sums), "longest": long_sums[:MAX_LISTED]},
         "quantization": {"quantize": quantize, "dequantize": dequantize},
         "reported_to_leave_neural_engine": {"count": len(left), "ops": left[:MAX_LISTED],
                                             "source": SOURCES["ane_unsupported_layers"]},
         "sources": dict(SOURCES),
         "note": "a static reading of the program; Core ML places ops itself at load time (per device and OS); "
                 "on a Mac, `edgecnn validate <bundle>` records MLComputePlan's actual placement"}
    r["advice"] = advice(r, precision, scheme)
    return r


def _splits(segments: List[dict]) -> str:
    return " -> ".join("CPU" if s["where"].startswith("CPU") else "Neural Engine" for s in segments)


def advice(r: dict, precision: str, scheme: Optional[str]) -> List[str]:
    """Compute-unit advice that follows from the report (the reasons are in the report itself)."""
    precision = str(precision)
    if precision == "fp32":
        return ["FP32-typed throughout: Core ML runs it on the CPU or GPU, never on the Neural Engine (FP16 only). "
                "Use computeUnits = .cpuAndGPU; export fp16 (or a weight-only precision) for the Neural Engine."]
    out = []
    fp32 = r["fp32_ops"]["count"]
    if fp32:
        out.append(f"{fp32} FP32-typed op(s) ({', '.join(sorted(r['fp32_ops']['types']))}) run on the CPU: with .all "
                   f"or .cpuAndNeuralEngine expect {_splits(r['segments'])} ({len(r['segments'])} segment(s)); "
                   "these are the input normalisation and the logits, kept FP32 on purpose for accuracy.")
    long_sums = r["long_fp16_reductions"]
    if long_sums["count"]:
        top = long_sums["longest"][0]
        out.append(f"{long_sums['count']} FP16 reduction(s) over more than {long_sums['threshold']} elements "
                   f"(longest: {top['op']} {top['name']} over {top['elements']}): on the Neural Engine they sum in "
                   "FP16; see the Neural-Engine-like parity, and if it misses the gate use .cpuAndGPU (the GPU "
                   "accumulates in FP32 by default).")
    if r["reported_to_leave_neural_engine"]["count"]:
        kinds = sorted({o["why"].split(" (")[0] for o in r["reported_to_leave_neural_engine"]["ops"]})
        out.append(f"{r['reported_to_leave_neural_engine']['count']} op(s) an outside list reports as not running "
                   f"on the Neural Engine ({'; '.join(kinds)}): each may add a hand-over; MLComputePlan on a Mac "
                   "shows whether it does.")
    if precision == "int8":
        out.append("W8A8 pays off only when the model runs (mostly) on the Neural Engine of an A17 Pro / M4 or later "
                   "(int8-int8 compute); on the CPU or GPU activation quantization can be slower than weight-only "
                   "(Apple: use it 'only when your model is fully or mostly running on the Neural Engine'). "
                   "Elsewhere prefer fp16, int8-weights or a palettized precision.")
        if scheme == "affine":
            out.append("Activations here are affine (a zero point per tensor); coremltools' default is symmetric: "
                       "--target-option coreml.w8a8_scheme=symmetric exports that (compare parity and device latency).")
    return out
