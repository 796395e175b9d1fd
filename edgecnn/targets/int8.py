"""INT8 for a target: prepare -> weight rounding (``exporters.weight_rounding``) -> bias correction -> ranges
(cached) -> recipe + sensitivity fallback -> empirical bias correction for the layers left INT8
(``exporters.empirical_bias``; recipes with bias correction) -> op report -> FP32 vs INT8 latency side by
side. Recipe-agnostic: the ONNX target passes ``exporters.quant_ort``; a TensorRT target can pass its own recipe (same
``quantize(fp32, out, ranges, nodes_to_exclude)`` contract).

Calibration uses ``ctx.calib``'s calibration split only; the fallback's probe images also come from it,
so the pipeline's parity gate on the held-out split judges the result on images nothing here has seen.
Within the calibration split the fallback's search is honest too (``search_data``): its ranges are fitted
on some groups and its probe is other groups, so the probe sees range clipping as new images will; the
artefact itself is then quantized with ranges from the whole calibration split.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from calibration.ranges import DEFAULT_METHOD, METHODS, channel_means, compute_ranges
from exporters import empirical_bias, quant_fallback, weight_rounding

from ..errors import UsageError
from ..validate.metrics import INT8_RANDOM_MIN_SQNR_DB
from .base import BuildContext

PROBE_IMAGES = 256   # most probe images (1 flip = 0.4 %); the probe is half the calibration groups
RANK_IMAGES = 48     # the per-layer sensitivity ranking (one quantize + run per layer) uses the first 48
RANDOM_SQNR_MARGIN_DB = 2.0   # probe images are not the held-out ones: aim a little above the gate
MIN_SPEEDUP = 1.1    # float layers may not take INT8 below this speed-up over FP32 (quick timing: keep a margin)
AGREEMENT_MARGIN = 0.5  # trained weights: aim the probe at gate + this share of (1 - gate)
WEIGHT_ROUNDING = ("gptq", "nearest")
PROBE_FRACTION = 0.5  # of the calibration groups, held out from the search's range fitting as its probe
EMPIRICAL_BIAS_IMAGES = 128  # calibration images the empirical bias correction measures output means on


def calib_method(ctx: BuildContext) -> str:
    method = str(ctx.options.extra.get("calib_method") or DEFAULT_METHOD).lower()
    if method not in METHODS:
        raise UsageError(f"unknown calibration method {method!r}", hint="use one of: " + ", ".join(METHODS))
    return method


def weight_rounding_method(ctx: BuildContext) -> str:
    """``gptq`` (default: error-compensated rounding, ``exporters.weight_rounding``) or ``nearest``."""
    method = str(ctx.options.extra.get("weight_rounding") or "gptq").lower()
    if method not in WEIGHT_ROUNDING:
        raise UsageError(f"unknown weight rounding {method!r}", hint="use one of: " + ", ".join(WEIGHT_ROUNDING))
    return method


def fallback_bar(ctx: BuildContext) -> tuple:
    """(enabled, min_agreement, min_sqnr_db) the fallback aims at on its probe: trained weights at the
    agreement gate plus half the allowed disagreement (99% -> 99.5%); random init, whose agreement means
    nothing, at the SQNR gate plus a margin. The margins because the probe is a few hundred images at
    most and not the held-out ones: aimed at the gate itself, a probe that reads one flip short of it
    (Fashion-MNIST SqueezeNet: 99.2% on 250 probe images) left a model that missed it held-out (98.75%)."""
    gate = ctx.options.int8_min_agreement
    min_agreement = min(1.0, gate + (1.0 - gate) * AGREEMENT_MARGIN) if ctx.trained else 0.0
    min_sqnr = -999.0 if ctx.trained else INT8_RANDOM_MIN_SQNR_DB + RANDOM_SQNR_MARGIN_DB
    return bool(ctx.options.extra.get("int8_fallback", True)), min_agreement, min_sqnr


def fallback_options(ctx: BuildContext) -> dict:
    """Keyword arguments of ``quant_fallback.fallback`` from the gate and ``ExportOptions.extra``
    (int8_fallback, int8_max_float_fraction, int8_sensitivity_seconds, int8_agreement_phase, int8_fallback_batch)."""
    on, min_agreement, min_sqnr = fallback_bar(ctx)
    x = ctx.options.extra
    return dict(min_agreement=min_agreement, min_sqnr_db=min_sqnr,
                max_float_fraction=ctx.options.number("int8_max_float_fraction", 0.34), run_sensitivity=on,
                max_seconds=ctx.options.number("int8_sensitivity_seconds", 240.0), rank_images=RANK_IMAGES,
                agreement_phase=bool(x.get("int8_agreement_phase", True)), batch=ctx.options.number("int8_fallback_batch", 4, int),
                say=ctx.say)


@dataclass
class SearchData:
    """What the fallback searches with: ranges are fitted on ``fit`` (a CalibrationSet), agreement is
    measured on ``probe``. ``split``: the probe's groups are not in ``fit`` (the honest probe); False when
    the calibration split is too small to divide, or ``int8_probe_split`` is off."""

    fit: object
    probe: np.ndarray
    split: bool

    def describe(self, rank_images: int = RANK_IMAGES) -> str:
        ranked = f"sensitivity ranked on the first {min(len(self.probe), rank_images)}"
        if not self.split:
            return (f"{len(self.probe)} images of the calibration split, the same the ranges were fitted on "
                    f"(reads optimistic; the held-out split stays unseen); {ranked}")
        fit = self.fit.calib_items
        return (f"{len(self.probe)} calibration-split images of groups (photos/files) the search's ranges were not "
                f"fitted on (those: {len(fit)} images of {len({i.group for i in fit})} other groups); {ranked}. The "
                "artefact is quantized with ranges of the whole calibration split; the held-out split stays unseen")


def search_data(ctx: BuildContext, max_probe: Optional[int] = None, split: bool = True) -> SearchData:
    """Divide the calibration split for the fallback: fit ranges on half its groups, probe on the others
    (``split=False``, or option ``int8_probe_split`` off: probe the first calibration images, undivided)."""
    from calibration import CalibrationError

    from ..errors import InputError

    limit = max_probe or ctx.options.number("int8_probe_images", PROBE_IMAGES, int)
    if split and ctx.options.extra.get("int8_probe_split", True):
        fit, probe_set = ctx.calib.split_calibration(PROBE_FRACTION, max_probe=limit)
        # both halves need a readable image; a folder whose unreadable files (skipped, counted) all fell on
        # one side gets the undivided probe instead of a failed export
        if probe_set.calib_items and next(fit.iter_batches("calib", batch_size=1), None) is not None:
            try:
                return SearchData(fit, probe_set.array("calib"), True)
            except CalibrationError:
                pass
    try:
        return SearchData(ctx.calib, ctx.calib.array("calib", limit=limit), False)
    except CalibrationError as exc:
        raise InputError(str(exc), hint=exc.hint) from None


def search_ranges(ctx: BuildContext, data: SearchData, ranges, method: str, fit: Callable):
    """Ranges for the fallback's search: ``ranges`` (the whole calibration split) unless the probe is
    split off, then ``fit(fit_set)``: the same calibration, on ``data.fit`` only."""
    if not data.split:
        return ranges
    ctx.say(f"calibrating search ranges ({method}) on {len(data.fit.calib_items)} images; the fallback's probe is "
            f"{len(data.probe)} images of other photos/files")
    return fit(data.fit)


def fallback_block(ctx: BuildContext, result, data: SearchData) -> dict:
    """The manifest's ``recipe.fallback``: what stayed float and why, probe agreement before/after."""
    on, min_agreement, min_sqnr = fallback_bar(ctx)
    return {**result.to_dict(), "enabled": on, "min_agreement": min_agreement if ctx.trained else None,
            "gate_min_agreement": ctx.options.int8_min_agreement if ctx.trained else None,
            "probe": data.describe(), "probe_split": data.split,
            "max_float_fraction": ctx.options.number("int8_max_float_fraction", 0.34),
            "min_speedup": ctx.options.number("int8_min_speedup", MIN_SPEEDUP) if ctx.options.latency else None,
            "min_sqnr_db": None if ctx.trained else min_sqnr,
            "note": None if ctx.trained else "random-init weights: agreement is not meaningful; the fallback "
                                             "aims at the SQNR gate instead"}


def trt_fallback(ctx: BuildContext, fp32_path: Path, int8_path: Path, ranges, *, nodes_to_exclude=(),
                 metadata: Optional[dict] = None, max_opset: int = 17, range_method: str = DEFAULT_METHOD) -> tuple:
    """The same fallback for the ``trt`` recipe: re-quantize ``fp32_path`` into ``int8_path`` with the ranges
    the bundle was calibrated with (``range_method``), keeping layers float (Conv/Gemm: ``quant_trt`` leaves their inputs
    unquantized, so the Q/DQ rules still hold; ``quantize_trt`` proves that on every try). Returns
    (recipe info of the final model, manifest fallback block)."""
    import onnx

    from exporters import quant_ort, quant_trt

    model = onnx.load(os.fspath(fp32_path))
    base = quant_trt.default_float_layers(model)
    base.update({n: "excluded by the caller (ExportOptions.extra nodes_to_exclude)" for n in nodes_to_exclude})
    candidates = [n.name for n in model.graph.node if n.op_type in quant_trt.QUANTIZED_OPS and n.name not in base]
    del model

    def run_recipe(fp32, out, ranges_, exclude):
        return quant_trt.quantize_trt(fp32, out, ranges_, list(exclude), max_opset=max_opset, metadata=metadata)

    data = search_data(ctx, split=fallback_bar(ctx)[0])
    searched = search_ranges(ctx, data, ranges, range_method, lambda fit: quant_trt.calibrate_ranges(
        fp32_path, fit.iter_batches("calib", batch_size=8), method=range_method)[0])
    with tempfile.TemporaryDirectory(prefix="edgecnn-trt-round-") as tmp:
        source, rounding = Path(fp32_path), None
        if weight_rounding_method(ctx) == "gptq":  # the recipe quantizes a copy with grid-chosen weights
            source = Path(tmp) / "model.rounded.onnx"
            rounding = weight_rounding.round_weights(
                fp32_path, source, lambda: ctx.calib.iter_batches("calib", batch_size=16), skip=base, say=ctx.say)
            run_recipe = quant_ort.quantize_with_biases_restored(fp32_path, base, tmp, quantize_fn=run_recipe)
        result = quant_fallback.fallback(run_recipe, os.fspath(source), os.fspath(int8_path), searched, data.probe,
                                         reference=quant_fallback.run_onnx(os.fspath(fp32_path), data.probe),
                                         candidates=candidates, base_exclude=base, **fallback_options(ctx))
        if searched is not ranges:  # the artefact: the chosen float layers, ranges of the whole calibration split
            result.info = run_recipe(os.fspath(source), os.fspath(int8_path), ranges, list(result.excluded))
    info = dict(result.info)
    info.pop("ranges", None)
    info["weight_rounding"] = rounding.to_dict() if rounding else {"method": "nearest"}
    return info, fallback_block(ctx, result, data)


def quantize_for_target(ctx: BuildContext, fp32_path: Path, out_path: Path, *, recipe_module,
                        work: Path, defaults_out: Optional[Path] = None) -> dict:
    """Quantize ``fp32_path`` into ``out_path`` with ``recipe_module`` (prepare/quantize/default_exclusions/
    quantizable_nodes/op_report); returns the manifest's ``recipe`` block. When the fallback keeps layers
    float and ``defaults_out`` is given, the recipe-defaults model (no fallback) is written there too.
    The weight rounding aims at onnxruntime's weight grid (symmetric per-channel amax/127), which is what
    every Q/DQ recipe here quantizes with."""
    from calibration import CalibrationError

    method = calib_method(ctx)
    prepared = work / ".prepared.onnx"
    ctx.say("preparing the FP32 graph for INT8 kernels")
    rewrites = recipe_module.prepare(fp32_path, prepared)
    base = recipe_module.default_exclusions(prepared)
    uncorrected = work / ".prepared-uncorrected.onnx"   # the prepared FP32 weights and biases, untouched
    shutil.copyfile(prepared, uncorrected)
    rounding = None
    if weight_rounding_method(ctx) == "gptq":
        rounding = weight_rounding.round_weights(
            prepared, prepared, lambda: ctx.calib.iter_batches("calib", batch_size=16), skip=base, say=ctx.say)
        ctx.say(f"weight rounding: {rounding.layers} layers rounded with error compensation in {rounding.seconds:.0f} s")
    corrected = 0
    if ctx.options.extra.get("bias_correction", True) and hasattr(recipe_module, "bias_correction"):
        ctx.say("bias correction: channel means on the calibration split")
        means = channel_means(prepared, ctx.calib.iter_batches("calib", batch_size=16),
                              recipe_module.bias_correction_inputs(prepared))
        corrected = recipe_module.bias_correction(prepared, prepared, means, skip=base, original=uncorrected)
        rewrites["bias_corrected_convs"] = corrected
    ctx.say(f"calibrating activation ranges ({method}) on the calibration split")
    try:
        ranges = compute_ranges(prepared, lambda: ctx.calib.iter_batches("calib", batch_size=16), method,
                                fingerprint=ctx.calib.fingerprint())
    except CalibrationError as exc:
        from ..errors import InputError

        raise InputError(str(exc), hint=exc.hint) from None
    if ranges.cache_hit:
        ctx.say(f"ranges read from the cache ({ranges.key[:12]})")
    fallback_on = fallback_bar(ctx)[0]
    data = search_data(ctx, split=fallback_on)
    searched = search_ranges(ctx, data, ranges, method, lambda fit: compute_ranges(
        prepared, lambda: fit.iter_batches("calib", batch_size=16), method, fingerprint=fit.fingerprint()))

    # the recipe, with bias correction undone for the layers the fallback keeps float
    run_recipe = (recipe_module.quantize_with_biases_restored(uncorrected, base, work) if corrected or rounding
                  else recipe_module.quantize)

    speed_opts = {}
    floor = ctx.options.number("int8_min_speedup", MIN_SPEEDUP)
    if ctx.options.latency and floor > 0:
        speed_opts = {"speedup": quick_speedup(fp32_path, ctx.spec.shape, threads=ctx.options.threads),
                      "min_speedup": floor}
    result = quant_fallback.fallback(
        run_recipe, os.fspath(prepared), os.fspath(out_path), searched, data.probe, **speed_opts,
        reference=quant_fallback.run_onnx(os.fspath(fp32_path), data.probe),  # the FP32 model, not the corrected one
        candidates=recipe_module.quantizable_nodes(prepared), base_exclude=base, **fallback_options(ctx))
    if searched is not ranges:  # the artefact: the chosen float layers, ranges of the whole calibration split
        result.info = run_recipe(os.fspath(prepared), os.fspath(out_path), ranges, list(result.excluded))
    empirical = None
    if corrected and ctx.options.extra.get("empirical_bias_correction", True):
        # for the layers the fallback chose: the shifts depend on which layers stay float
        empirical = empirical_bias.correct(
            os.fspath(prepared), os.fspath(uncorrected), run_recipe, ranges, list(result.excluded),
            ctx.calib.array("calib", limit=EMPIRICAL_BIAS_IMAGES), say=ctx.say)
        ctx.say(f"empirical bias correction: {empirical.convs} Convs, calibration SQNR {empirical.sqnr_db_before:.1f} -> "
                f"{empirical.sqnr_db_after:.1f} dB (pass {empirical.best_pass} of {empirical.passes}) in {empirical.seconds:.0f} s")
        if empirical.best_pass:
            result.info = run_recipe(os.fspath(prepared), os.fspath(out_path), ranges, list(result.excluded))
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
        "empirical_bias_correction": empirical.to_dict() if empirical else None,
        "weight_rounding": rounding.to_dict() if rounding else {"method": "nearest"},
        "kernels": report,
        "fallback": fallback_block(ctx, result, data),
    }
    for leftover in (prepared, uncorrected):
        try:
            os.remove(leftover)
        except OSError:
            pass
    return recipe


def quick_speedup(fp32_path: Path, shape, *, threads: int = 1, rounds: int = 2, seconds: float = 0.3):
    """A callable ``path -> speed-up over FP32`` for the fallback's speed floor: FP32 and the candidate
    timed alternately at batch 1 (short: it runs once per kept fallback step; the final artefact is timed
    properly by ``side_by_side_latency``)."""
    from ..runtimes.onnxruntime import OnnxRuntimeRunner
    from ..validate.latency import time_runs

    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    fp32 = OnnxRuntimeRunner(Path(fp32_path), threads=threads)

    def measure(path) -> float:
        cand = OnnxRuntimeRunner(Path(path), threads=threads)
        t = {"fp32": [], "int8": []}
        for _ in range(rounds):
            for k, r in (("fp32", fp32), ("int8", cand)):
                t[k].append(time_runs(lambda: r.run(x), 1, warmup=3, min_runs=5, min_seconds=seconds,
                                      max_seconds=4 * seconds).p50_ms)
        return float(np.median(t["fp32"]) / np.median(t["int8"]))

    return measure


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
