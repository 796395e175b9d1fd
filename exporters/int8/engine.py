"""The INT8 engine: one sequence for every recipe (ort and trt Q/DQ ONNX, Core ML W8A8).

    prepare -> default float layers -> weight rounding -> bias correction -> ranges -> fallback search
            -> the artefact, with ranges of the whole calibration split -> empirical bias correction

A recipe (``Recipe``) says how each step is done for its runtime; the engine decides which steps run, on which
images, in which order, and writes one record of it (``Int8Record``) for the manifest.

Images: everything here uses the calibration split of ``calib`` only, so the pipeline's gate on the held-out
split judges the result on images nothing here has seen. Within the calibration split the search is honest
too: its ranges are fitted on some groups (photos/files) and its probe is the other groups, so the probe sees
range clipping as new images will; the artefact is then quantized with ranges of the whole calibration split.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from calibration import CalibrationError

from .. import parity
from ..errors import ExportError
from . import fallback as fb
from .options import Int8Options

RANK_IMAGES = 48              # the per-layer sensitivity ranking uses the first 48 probe images
RANDOM_SQNR_MARGIN_DB = 2.0   # random init: the probe is not the held-out images, aim a little above the gate
PROBE_DROP_SHARE = 0.5        # trained weights: aim the probe's estimated drop at this share of the gate's
PROBE_FRACTION = 0.5          # of the calibration groups, held out from the search's range fitting as its probe
EMPIRICAL_BIAS_IMAGES = 64    # calibration images the empirical bias correction measures output means on


class Recipe:
    """How one runtime does each step. Methods a recipe does not have keep these defaults (step skipped).

    ``name``: ``ort`` | ``trt`` | ``coreml-w8a8``. ``timed_here``: the artefact runs on this machine's CPU,
    so the speed floor and the side-by-side timing mean something (onnxruntime); TensorRT and Core ML
    artefacts run elsewhere."""

    name = ""
    timed_here = False

    def prepare(self, say: Callable[[str], None]) -> dict:
        """Rewrite the FP32 model into the one the quantizer reads; returns the rewrites done (counts)."""
        return {}

    def default_float(self) -> Dict[str, str]:
        """Layers the recipe keeps float by default: {name: why}."""
        return {}

    def candidates(self) -> List[str]:
        """Layers whose precision the fallback may change, in model order."""
        raise NotImplementedError

    def round_weights(self, calib, skip: Sequence[str], say: Callable[[str], None]):
        """Move the INT8 weights onto the quantizer's grid with error compensation; returns a report with
        ``to_dict()``, or None when the recipe has no weight rounding."""
        return None

    def correct_bias(self, calib, skip: Sequence[str], say: Callable[[str], None]) -> int:
        """Analytic bias correction; returns the layers corrected (0: not done)."""
        return 0

    def calibrate(self, calib, method: str, say: Callable[[str], None]):
        """Activation ranges on ``calib``'s calibration split, with ``describe()`` for the record."""
        raise NotImplementedError

    def space(self, ranges, base: Dict[str, str], speedup: Optional[Callable]) -> fb.Space:
        """The fallback's search space with ``ranges``; its ``write`` quantizes the artefact."""
        raise NotImplementedError

    def reference(self, inputs: np.ndarray) -> np.ndarray:
        """The FP32 model's logits on ``inputs`` (what the search compares against)."""
        raise NotImplementedError

    def correct_bias_empirically(self, space: fb.Space, ranges, float_layers: Sequence[str], inputs: np.ndarray,
                                 say: Callable[[str], None]):
        """Empirical bias correction for the chosen float layers; a report with ``to_dict()`` and
        ``best_pass``, or None when the recipe has none."""
        return None

    def write_defaults(self, ranges, base: Sequence[str], path) -> None:
        """The INT8 model with only the default float layers, for timing what the fallback's layers cost."""

    def report(self) -> dict:
        """What the written model runs in INT8 and in float (kernel counts, or the checker's statistics)."""
        return {}


@dataclass
class SearchData:
    """What the fallback searches with: ranges are fitted on ``fit`` (a CalibrationSet), its figures are
    measured on ``probe``. ``split``: the probe's groups are not in ``fit``."""

    fit: object
    probe: np.ndarray
    split: bool

    def describe(self, rank_images: int = RANK_IMAGES) -> dict:
        groups = len({i.group for i in self.fit.calib_items})
        return {"images": int(len(self.probe)), "ranked_on": int(min(len(self.probe), rank_images)),
                "split": self.split, "fit_images": len(self.fit.calib_items), "fit_groups": groups,
                "text": (f"{len(self.probe)} calibration-split images of photos/files the search's ranges were not "
                         f"fitted on ({len(self.fit.calib_items)} images of {groups} other groups); the artefact is "
                         "quantized with ranges of the whole calibration split; the held-out split stays unseen")
                if self.split else (f"{len(self.probe)} images of the calibration split, the same the ranges were "
                                    "fitted on (reads optimistic; the held-out split stays unseen)")}


def search_data(calib, options: Int8Options, max_probe: Optional[int] = None) -> SearchData:
    """Divide the calibration split for the fallback: fit ranges on half its groups, probe on the others;
    undivided (probe = the first calibration images) when ``probe_split`` or the fallback is off, or when
    one half would have no readable image."""
    limit = max_probe or options.probe_images
    if options.fallback and options.probe_split:
        fit, probe_set = calib.split_calibration(PROBE_FRACTION, max_probe=limit)
        if probe_set.calib_items and next(fit.iter_batches("calib", batch_size=1), None) is not None:
            try:
                return SearchData(fit, probe_set.array("calib"), True)
            except CalibrationError:   # every probe image unreadable: probe undivided
                pass
    return SearchData(calib, calib.array("calib", limit=limit), False)


def bar_for(options: Int8Options, trained: bool) -> fb.Bar:
    """What the search aims at on its probe: trained weights at the gate's own criterion, the estimated accuracy
    drop, at half the allowed drop (the probe is a few hundred images at most and not the held-out ones), and
    at the opt-in agreement gate when one is set; random init, whose accuracy means nothing, at the SQNR gate
    plus a margin."""
    if trained:
        gate = options.gate()
        agree = 0.0 if gate.min_agreement is None else \
            min(1.0, gate.min_agreement + (1.0 - gate.min_agreement) * PROBE_DROP_SHARE)
        return fb.Bar(max_drop=gate.max_drop * PROBE_DROP_SHARE, min_agreement=agree)
    return fb.Bar(max_drop=None, min_sqnr_db=parity.INT8_RANDOM_MIN_SQNR_DB + RANDOM_SQNR_MARGIN_DB)


def settings_for(options: Int8Options, floor: float) -> fb.Settings:
    return fb.Settings(run_sensitivity=options.fallback, max_float_fraction=options.max_float_fraction,
                       max_seconds=options.sensitivity_seconds, rank_images=RANK_IMAGES,
                       batch_phase=options.batch_phase, batch=options.fallback_batch, min_speedup=floor)


@dataclass
class Int8Record:
    """The manifest's ``recipe`` block of every INT8 artefact, one shape for every recipe."""

    recipe: str
    precision: str = "int8"
    ranges: dict = field(default_factory=dict)             # method, tensors, images, cache
    graph_preparation: dict = field(default_factory=dict)  # the recipe's rewrites (counts)
    weight_rounding: dict = field(default_factory=dict)    # {"method": "nearest"} or the GPTQ report
    bias_correction: Optional[dict] = None                 # {"layers", "method"} when done
    empirical_bias_correction: Optional[dict] = None
    fallback: dict = field(default_factory=dict)           # see ``fallback_record``
    quantizer: dict = field(default_factory=dict)          # the recipe's own account of the written model
    report: dict = field(default_factory=dict)             # INT8 kernels / checker statistics of the written model
    gate: dict = field(default_factory=dict)               # the gate it is judged by (``exporters.parity.Gate``)

    def to_dict(self) -> dict:
        return asdict(self)


def fallback_record(result: fb.FallbackResult, bar: fb.Bar, options: Int8Options, data: SearchData,
                    trained: bool, floor: Optional[float]) -> dict:
    """The manifest's ``recipe.fallback``: what stayed float and why, probe figures before and after."""
    return {"enabled": options.fallback, "layers_float": dict(result.excluded),
            "before": fb.probe_record(result.before), "after": fb.probe_record(result.after),
            "passed_on_probe": result.passed, "after_sqnr_phase": result.sqnr_phase or None,
            "bar": bar.to_dict(),
            "probe": data.describe(), "budget_layers": result.budget_layers,
            "max_float_fraction": options.max_float_fraction, "min_speedup": floor, "stopped": result.stopped,
            "candidates": result.candidates, "sensitivity_top": result.sensitivity[:15], "steps": result.steps,
            "seconds": round(result.seconds, 1),
            "note": None if trained else "random-init weights: accuracy is not meaningful; the search aims at "
                                         "the SQNR gate instead"}


@dataclass
class Int8Result:
    record: Int8Record
    float_layers: List[str]        # every layer kept float (defaults and the fallback's)
    default_float: List[str]       # the recipe's defaults alone
    ranges: object = None          # the activation ranges of the whole calibration split


@dataclass
class Prepared:
    """The engine's state after the steps before the search: the recipe's model prepared, rounded and
    corrected, and the activation ranges of the whole calibration split."""

    rewrites: dict
    base: Dict[str, str]           # layers float from the start (the recipe's and the caller's)
    rounding: object               # the rounding report, or None (nearest)
    corrected: int                 # layers whose bias the analytic correction changed
    ranges: object


def prepare(recipe: Recipe, calib, options: Int8Options, say: Callable[[str], None] = lambda s: None) -> Prepared:
    """prepare -> default float layers -> weight rounding -> bias correction -> ranges."""
    options.check()
    require_images(calib)
    say("preparing the FP32 model for INT8")
    rewrites = recipe.prepare(say)
    base = {**recipe.default_float(),
            **{n: "kept float by the caller (int8.keep_float)" for n in options.keep_float}}
    rounding = recipe.round_weights(calib, list(base), say) if options.weight_rounding == "gptq" else None
    corrected = recipe.correct_bias(calib, list(base), say) if options.bias_correction else 0
    say(f"calibrating activation ranges ({options.ranges}) on the calibration split")
    return Prepared(rewrites, base, rounding, corrected, recipe.calibrate(calib, options.ranges, say))


def quantize(recipe: Recipe, calib, *, options: Int8Options, trained: bool,
             speedup: Optional[Callable[[str], float]] = None, defaults_path=None,
             say: Callable[[str], None] = lambda s: None) -> Int8Result:
    """Run the INT8 sequence with ``recipe`` on ``calib`` (a ``calibration.CalibrationSet``).

    ``speedup(model_path) -> float``: measures a candidate's speed-up over FP32 for the speed floor (only
    used when the recipe is ``timed_here`` and ``options.min_speedup`` > 0). ``defaults_path``: where to
    write the model with only the default float layers when the fallback keeps more (for timing)."""
    p = prepare(recipe, calib, options, say)
    base, ranges = p.base, p.ranges
    data = search_data(calib, options)
    searched = ranges
    if data.split:
        say(f"calibrating search ranges ({options.ranges}) on {len(data.fit.calib_items)} images; the fallback's "
            f"probe is {len(data.probe)} images of other photos/files")
        searched = recipe.calibrate(data.fit, options.ranges, say)
    floor = options.min_speedup if (recipe.timed_here and speedup is not None and options.min_speedup > 0) else None
    bar = bar_for(options, trained)
    space = recipe.space(searched, base, speedup if floor is not None else None)
    result = fb.fallback(space, data.probe, recipe.reference(data.probe), bar=bar,
                         settings=settings_for(options, floor or 0.0), say=say)
    final = recipe.space(ranges, base, None) if searched is not ranges else space
    if searched is not ranges:   # the artefact: the chosen float layers, ranges of the whole calibration split
        result.info = final.write(list(result.excluded))
    empirical = None
    if p.corrected and options.empirical_bias_correction:
        empirical = recipe.correct_bias_empirically(final, ranges, list(result.excluded),
                                                    calib.array("calib", limit=EMPIRICAL_BIAS_IMAGES), say)
        if empirical is not None and empirical.best_pass:
            result.info = final.write(list(result.excluded))
    if defaults_path is not None and len(result.excluded) > len(base):
        recipe.write_defaults(ranges, list(base), defaults_path)
    record = Int8Record(
        recipe=recipe.name, ranges=ranges.describe(), graph_preparation=p.rewrites,
        weight_rounding=p.rounding.to_dict() if p.rounding is not None else {"method": "nearest"},
        bias_correction={"layers": p.corrected, "method": "b -= (Wq - W)·E[x] per output channel, E[x] from the "
                                                          "calibration split; undone for layers kept float"}
        if p.corrected else None,
        empirical_bias_correction=empirical.to_dict() if empirical is not None else None,
        fallback=fallback_record(result, bar, options, data, trained, floor),
        quantizer=dict(result.info), report=recipe.report(), gate=options.gate().to_dict())
    return Int8Result(record, list(result.excluded), list(base), ranges)


def require_images(calib) -> None:
    """INT8 needs calibration images: a clear error before any work."""
    if not calib.calib_items:
        raise ExportError("INT8 needs calibration images and the calibration split is empty",
                          hint="pass a calibration folder with images (CALIB=...)")
