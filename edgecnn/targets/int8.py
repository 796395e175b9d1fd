"""INT8 for a target: prepare -> ranges (cached) -> recipe + sensitivity fallback -> op report -> FP32 vs
INT8 latency side by side. Recipe-agnostic: the ONNX target passes ``exporters.quant_ort``; a TensorRT
target can pass its own recipe (same ``quantize(fp32, out, ranges, nodes_to_exclude)`` contract).

Calibration uses ``ctx.calib``'s calibration split only; the fallback's probe images also come from it,
so the pipeline's parity gate on the held-out split judges the result on images nothing here has seen.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from calibration.ranges import DEFAULT_METHOD, METHODS, channel_means, compute_ranges
from exporters import quant_fallback

from ..errors import UsageError
from ..validate.metrics import INT8_RANDOM_MIN_SQNR_DB
from .base import BuildContext

PROBE_IMAGES = 128   # agreement on the probe: 1 flip = 0.8 %, fine enough to aim at a 99 % bar
RANK_IMAGES = 48     # the per-layer sensitivity ranking (one quantize + run per layer) uses the first 48
RANDOM_SQNR_MARGIN_DB = 2.0   # probe images are not the held-out ones: aim a little above the gate


def calib_method(ctx: BuildContext) -> str:
    method = str(ctx.options.extra.get("calib_method") or DEFAULT_METHOD).lower()
    if method not in METHODS:
        raise UsageError(f"unknown calibration method {method!r}", hint="use one of: " + ", ".join(METHODS))
    return method


def quantize_for_target(ctx: BuildContext, fp32_path: Path, out_path: Path, *, recipe_module,
                        work: Path, defaults_out: Optional[Path] = None) -> dict:
    """Quantize ``fp32_path`` into ``out_path`` with ``recipe_module`` (prepare/quantize/default_exclusions/
    quantizable_nodes/op_report); returns the manifest's ``recipe`` block. When the fallback keeps layers
    float and ``defaults_out`` is given, the recipe-defaults model (no fallback) is written there too."""
    from calibration import CalibrationError

    method = calib_method(ctx)
    prepared = work / ".prepared.onnx"
    ctx.say("preparing the FP32 graph for INT8 kernels")
    rewrites = recipe_module.prepare(fp32_path, prepared)
    base = recipe_module.default_exclusions(prepared)
    uncorrected = work / ".prepared-uncorrected.onnx"
    corrected = 0
    if ctx.options.extra.get("bias_correction", True) and hasattr(recipe_module, "bias_correction"):
        ctx.say("bias correction: channel means on the calibration split")
        means = channel_means(prepared, ctx.calib.iter_batches("calib", batch_size=16),
                              recipe_module.bias_correction_inputs(prepared))
        shutil.copyfile(prepared, uncorrected)
        corrected = recipe_module.bias_correction(prepared, prepared, means, skip=base)
        rewrites["bias_corrected_convs"] = corrected
    ctx.say(f"calibrating activation ranges ({method}) on the calibration split")
    try:
        ranges = compute_ranges(prepared, lambda: ctx.calib.iter_batches("calib", batch_size=16), method,
                                fingerprint=ctx.calib.fingerprint())
        probe = ctx.calib.array("calib", limit=int(ctx.options.extra.get("int8_probe_images", PROBE_IMAGES)))
    except CalibrationError as exc:
        from ..errors import InputError

        raise InputError(str(exc), hint=exc.hint) from None
    if ranges.cache_hit:
        ctx.say(f"ranges read from the cache ({ranges.key[:12]})")
    fallback_on = bool(ctx.options.extra.get("int8_fallback", True))
    # trained weights: the agreement gate; random init: agreement means nothing, aim at the SQNR gate + margin
    min_agreement = ctx.options.int8_min_agreement if ctx.trained else 0.0
    min_sqnr = -999.0 if ctx.trained else INT8_RANDOM_MIN_SQNR_DB + RANDOM_SQNR_MARGIN_DB

    def run_recipe(fp32, out, ranges_, exclude):
        """The recipe, with bias correction undone for the layers the fallback keeps float."""
        extra = [n for n in exclude if n not in base]
        if not corrected or not extra:
            return recipe_module.quantize(fp32, out, ranges_, exclude)
        variant = work / ".prepared-variant.onnx"
        recipe_module.restore_biases(fp32, uncorrected, extra, variant)
        try:
            return recipe_module.quantize(variant, out, ranges_, exclude)
        finally:
            os.remove(variant)

    result = quant_fallback.fallback(
        run_recipe, os.fspath(prepared), os.fspath(out_path), ranges, probe,
        reference=quant_fallback.run_onnx(os.fspath(fp32_path), probe),  # the FP32 model, not the corrected one
        candidates=recipe_module.quantizable_nodes(prepared), base_exclude=base, min_agreement=min_agreement, min_sqnr_db=min_sqnr,
        max_float_fraction=float(ctx.options.extra.get("int8_max_float_fraction", 0.34)),
        run_sensitivity=fallback_on, max_seconds=float(ctx.options.extra.get("int8_sensitivity_seconds", 240.0)),
        rank_images=RANK_IMAGES, agreement_phase=bool(ctx.options.extra.get("int8_agreement_phase", True)),
        batch=int(ctx.options.extra.get("int8_fallback_batch", 4)), say=ctx.say)
    if defaults_out is not None and len(result.excluded) > len(base):
        # the recipe-defaults model, so the target can time what the layers kept float cost in speed
        run_recipe(os.fspath(prepared), os.fspath(defaults_out), ranges, list(base))
    report = recipe_module.op_report(out_path)
    recipe = {
        "precision": "int8", **result.info,
        "calibration_method": method, "ranges": ranges.describe(), "graph_preparation": rewrites,
        "bias_correction": {"convs": corrected, "method": "b -= (Wq - W)·E[x] per output channel, E[x] from the "
                                                          "calibration split; undone for layers kept float"}
        if corrected else None,
        "kernels": report,
        "fallback": {**result.to_dict(), "enabled": fallback_on, "min_agreement": min_agreement,
                     "probe": f"{len(probe)} images of the calibration split (the held-out split stays unseen); "
                              f"sensitivity ranked on the first {min(len(probe), RANK_IMAGES)}",
                     "max_float_fraction": float(ctx.options.extra.get("int8_max_float_fraction", 0.34)),
                     "min_sqnr_db": None if ctx.trained else min_sqnr,
                     "note": None if ctx.trained else "random-init weights: agreement is not meaningful; the fallback "
                                                      "aims at the SQNR gate instead"},
    }
    for leftover in (prepared, uncorrected):
        try:
            os.remove(leftover)
        except OSError:
            pass
    return recipe


def side_by_side_latency(fp32_path: Path, int8_path: Path, shape, *, threads: int = 1, rounds: int = 3,
                         seconds: float = 1.0, seed: int = 0, defaults_path: Optional[Path] = None) -> dict:
    """Batch-1 latency of FP32 and INT8 measured alternately in one run (a busy machine slows both alike);
    the speed-up is the ratio of the medians of the per-round p50s. ``defaults_path``: the INT8 model
    without the fallback's float layers, timed in the same rounds, so their speed cost is a measured ratio."""
    from ..runtimes.onnxruntime import OnnxRuntimeRunner
    from ..validate.latency import machine_description, time_runs

    x = np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32)
    runners = {"fp32": OnnxRuntimeRunner(fp32_path, threads=threads), "int8": OnnxRuntimeRunner(int8_path, threads=threads)}
    if defaults_path is not None:
        runners["int8_defaults"] = OnnxRuntimeRunner(defaults_path, threads=threads)
    p50 = {k: [] for k in runners}
    for _ in range(rounds):
        for k, r in runners.items():
            p50[k].append(time_runs(lambda: r.run(x), 1, warmup=3, min_runs=10, min_seconds=seconds,
                                    max_seconds=4 * seconds).p50_ms)
    fp32, int8 = float(np.median(p50["fp32"])), float(np.median(p50["int8"]))
    fallback_cost = {}
    if defaults_path is not None:
        d = float(np.median(p50["int8_defaults"]))
        fallback_cost = {"int8_without_fallback_p50_ms": round(d, 3), "speedup_without_fallback": round(fp32 / d, 3),
                         "fallback_slowdown": round(int8 / d, 3)}
    return {**fallback_cost,"fp32_p50_ms": round(fp32, 3), "int8_p50_ms": round(int8, 3), "speedup_vs_fp32": round(fp32 / int8, 3),
            "threads": threads, "rounds": rounds, "batch": 1,
            "fp32_bytes": os.path.getsize(fp32_path), "int8_bytes": os.path.getsize(int8_path),
            "size_ratio": round(os.path.getsize(int8_path) / os.path.getsize(fp32_path), 3),
            "machine": machine_description(),
            "method": "FP32 and INT8 sessions timed alternately in the same process, median of per-round p50"}
