"""Weight-only compression of a Core ML program: coremltools.optimize.coreml's graph passes, one per precision.

Every weight-only precision stores its weights compressed and decompresses them to float16 for compute (on
load or on the fly; activations are never quantized):

* ``int8-weights``: linear 8-bit, symmetric, one scale per output channel (iOS 16+).
* ``palettized8`` / ``palettized6`` / ``palettized4``: each weight tensor as 8/6/4-bit indices into one table
  of 256/64/16 float16 values found by k-means (``palettize_weights``, per-tensor tables, iOS 16+). From iOS 18
  a table is shared by each group of 16 output channels instead (``per_grouped_channel``; 8 or 4 where 16 does
  not divide the channels), which Apple describes for lower approximation error than one table per tensor
  (https://apple.github.io/coremltools/docs-guides/source/opt-palettization-overview.html).
* ``int4-weights``: linear 4-bit, symmetric, one scale per block of 32 input channels of each output channel
  (16 or 8 where 32 does not divide them, per output channel where none does; ``per_block``, iOS 18+;
  https://apple.github.io/coremltools/docs-guides/source/opt-quantization-perf.html).

Tensors under ``WEIGHT_THRESHOLD`` elements (biases, most depthwise kernels) stay float16, as coremltools does
by default. The passes run on the MIL program before the classifier is added (see ``export.convert_variant``).
"""
from __future__ import annotations

from typing import Dict

WEIGHT_THRESHOLD = 2048
PALETTE_BITS = {"palettized8": 8, "palettized6": 6, "palettized4": 4}
# where the preferred size does not divide a weight's channels (coremltools then leaves the tensor float16 with a
# warning), the largest fallback that divides them is used, else the coarser granularity
GROUP_SIZE = 16          # output channels sharing one palette (iOS 18 per_grouped_channel); else 8, 4, per tensor
GROUP_FALLBACKS = (8, 4)
BLOCK_SIZE = 32          # input channels per scale (int4-weights); else 16, 8, then per output channel
BLOCK_FALLBACKS = (16, 8)
PRECISIONS = ("int8-weights", *PALETTE_BITS, "int4-weights")


def describe(precision: str, ios: int) -> Dict[str, str]:
    """The manifest's recipe for a weight-only ``precision`` at deployment target ``ios``."""
    small = f"tensors under {WEIGHT_THRESHOLD} elements (biases, most depthwise kernels) stay float16"
    if precision == "int8-weights":
        what = "int8 symmetric, one scale per output channel (coremltools linear_quantize_weights)"
    elif precision in PALETTE_BITS:
        bits = PALETTE_BITS[precision]
        tables = (f"one table per group of {GROUP_SIZE} output channels (of {' or '.join(map(str, GROUP_FALLBACKS))} "
                  "where 16 does not divide them, one per tensor where none does)" if ios >= 18
                  else "one table per tensor")
        what = (f"{bits}-bit indices into a {2 ** bits}-entry float16 lookup table found by k-means, {tables} "
                "(coremltools palettize_weights)")
    elif precision == "int4-weights":
        what = (f"int4 symmetric, one scale per block of {BLOCK_SIZE} input channels of each output channel (of "
                f"{' or '.join(map(str, BLOCK_FALLBACKS))} where {BLOCK_SIZE} does not divide the input channels, "
                "one scale per output channel where none does; coremltools linear_quantize_weights, per_block; "
                "iOS 18+)")
    else:
        raise ValueError(f"{precision!r} is not a weight-only Core ML precision")
    return {"method": "coremltools.optimize.coreml graph pass on the MIL program", "weights": what,
            "small_tensors": small, "activations": "float16 (not quantized)",
            "note": "weight-only: a smaller file, float16 compute; not W8A8 (that is --precision int8)"}


def _fallback_configs(program, axis: int, preferred: int, fallbacks, config_of) -> dict:
    """Per-weight configs (by const name) for the weights whose channels along ``axis`` ``preferred`` does not
    divide: ``config_of(the largest fallback that divides them)``, or ``config_of(None)`` where none does."""
    configs = {}
    for op in program.functions["main"].operations:
        val = op.outputs[0].val if op.op_type == "const" else None
        if val is None or getattr(val, "ndim", 0) < 2 or val.size < WEIGHT_THRESHOLD or val.shape[axis] % preferred == 0:
            continue
        configs[op.name] = config_of(next((b for b in fallbacks if val.shape[axis] % b == 0), None))
    return configs


def graph_pass(precision: str, ios: int, program=None):
    """The configured coremltools graph pass that compresses the weights for ``precision`` (``program``: the
    MIL program it will run on, for the per-weight block and group sizes)."""
    from coremltools.converters.mil.mil.passes.graph_pass import PassOption
    from coremltools.converters.mil.mil.passes.pass_registry import PASS_REGISTRY
    from coremltools.optimize.coreml import OpLinearQuantizerConfig, OpPalettizerConfig, OptimizationConfig

    names: dict = {}   # per-weight configs where the preferred block or group size does not divide
    if precision == "int8-weights":
        op = OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int8", granularity="per_channel",
                                     weight_threshold=WEIGHT_THRESHOLD)
        name = "compression::linear_quantize_weights"
    elif precision == "int4-weights":
        def int4(block):
            return OpLinearQuantizerConfig(mode="linear_symmetric", dtype="int4", weight_threshold=WEIGHT_THRESHOLD,
                                           **({"granularity": "per_block", "block_size": block} if block
                                              else {"granularity": "per_channel"}))
        op = int4(BLOCK_SIZE)
        names = _fallback_configs(program, 1, BLOCK_SIZE, BLOCK_FALLBACKS, int4) if program is not None else {}
        name = "compression::linear_quantize_weights"
    elif precision in PALETTE_BITS:
        def palette(group):
            return OpPalettizerConfig(nbits=PALETTE_BITS[precision], mode="kmeans", weight_threshold=WEIGHT_THRESHOLD,
                                      **({"granularity": "per_grouped_channel", "group_size": group} if group else {}))
        op = palette(GROUP_SIZE if ios >= 18 else None)
        names = _fallback_configs(program, 0, GROUP_SIZE, GROUP_FALLBACKS, palette) \
            if program is not None and ios >= 18 else {}
        name = "compression::palettize_weights"
    else:
        raise ValueError(f"{precision!r} is not a weight-only Core ML precision")
    config = OptimizationConfig(global_config=op, op_name_configs=names or None)
    p = PASS_REGISTRY[name]
    p.set_options([PassOption("config", config), PassOption("joint_compression", False)])
    return p
