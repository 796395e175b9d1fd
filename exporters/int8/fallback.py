"""Per-layer sensitivity analysis and automatic float fallback, for any INT8 recipe.

The search space is a ``Space``: the layers a recipe may keep float, and a way to get the logits of the
model quantized with a given set of them float. Ranges are computed once (cached), so asking "what if this
layer stayed float?" costs one re-quantization, and this module can ask it for every layer:

The bar is the gate's own criterion, on the probe: the accuracy drop estimated from FP32's confidence
(``exporters.parity``; the probe comes from the calibration split and has no labels to spare), plus the
logit SQNR for random-init nets, whose accuracy means nothing.

1. quantize with the recipe's default float layers; measure against FP32 on the probe images;
2. if the bar is not met: sensitivity = each candidate layer float on its own, measured by the logit SQNR
   on the first ``rank_images`` probe images (continuous, and cheap to rank by);
3. SQNR phase: greedily, most sensitive first, keep a layer float when that raises the probe SQNR by at
   least ``min_gain_db`` (and does not raise the estimated drop) on top of the layers already kept, until
   the bar holds or ``max_float_fraction`` of the candidates is float;
4. batch phase: a net whose error is spread thin has no single layer worth ``min_gain_db`` although
   together they move the drop, so while the bar is missed the next-ranked layers are added ``batch`` at
   a time, a batch kept when the probe's estimated drop (or, at an equal drop, its SQNR) improves.

An optional speed floor stops the search before float layers make INT8 slower than ``min_speedup`` x FP32.
Probe images must come from the calibration split, so that the held-out split stays unseen and the
pipeline's gate on it judges what was chosen here.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from .. import parity


@dataclass
class Bar:
    """What the probe must reach: an estimated accuracy drop (a fraction; None: not judged), top-1 agreement,
    mean cosine and logit SQNR (the bar of random-init nets, whose accuracy means nothing)."""

    max_drop: Optional[float] = 0.005
    min_agreement: float = 0.0
    min_cosine: float = 0.0
    min_sqnr_db: float = -999.0

    def met(self, p: parity.Parity) -> bool:
        drop_ok = self.max_drop is None or (p.estimated_drop is not None and p.estimated_drop <= self.max_drop)
        return bool(drop_ok and p.top1_agreement >= self.min_agreement and p.cosine >= self.min_cosine
                    and p.sqnr_db >= self.min_sqnr_db)

    def to_dict(self) -> dict:
        return {"max_estimated_drop": self.max_drop, "min_agreement": self.min_agreement or None,
                "min_sqnr_db": self.min_sqnr_db if self.min_sqnr_db > -999.0 else None}


def _drop(p: parity.Parity) -> float:
    return p.estimated_drop if p.estimated_drop is not None else 0.0


@dataclass
class Settings:
    """How far the search may go. ``max_seconds`` bounds the sensitivity pass and, again, each later phase."""

    run_sensitivity: bool = True
    max_float_fraction: float = 0.34
    max_seconds: float = 240.0
    min_gain_db: float = 0.25
    rank_images: Optional[int] = None
    batch_phase: bool = True
    batch: int = 4
    min_speedup: float = 0.0


class Space:
    """The layers the fallback may keep float, for one recipe on one model (``exporters.int8.engine``).

    ``candidates``: layer names, in the model's order; ``default_float``: {layer: why} kept float by the
    recipe itself. ``logits(float_layers, inputs)``: the outputs of the model quantized with exactly those
    layers float; ``speedup(float_layers)``: its speed-up over FP32, or None when not measured;
    ``write(float_layers)``: quantize the artefact for real and return the recipe's info."""

    candidates: List[str]
    default_float: Dict[str, str]

    def logits(self, float_layers: Sequence[str], inputs: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def speedup(self, float_layers: Sequence[str]) -> Optional[float]:
        return None

    def write(self, float_layers: Sequence[str]) -> dict:
        raise NotImplementedError


def probe_record(p: parity.Parity) -> dict:
    """The figures of one probe measurement, as the manifest's fallback record keeps them."""
    return {"samples": p.samples, "estimated_drop": None if p.estimated_drop is None else round(p.estimated_drop, 5),
            "top1_agreement": round(p.top1_agreement, 5), "ref_top1_in_top5": round(p.ref_top1_in_top5, 5),
            "cosine": round(p.cosine, 5), "sqnr_db": round(p.sqnr_db, 5), "flips_near_tie": p.flips_near_tie}


@dataclass
class FallbackResult:
    excluded: Dict[str, str]                    # layer -> why it stays float (the defaults included)
    before: parity.Parity                       # recipe defaults only
    after: parity.Parity                        # with the fallback's layers float
    passed: bool
    sensitivity: List[dict] = field(default_factory=list)   # [{node, sqnr_db, top1_agreement, cosine}], most sensitive first
    steps: List[dict] = field(default_factory=list)         # every try: phase, layer(s), kept, probe figures
    candidates: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)                # the recipe's info for the written model
    sqnr_phase: dict = field(default_factory=dict)          # {layers_float, probe} after the SQNR phase
    budget_layers: int = 0                                  # most layers the fallback may keep float
    stopped: Optional[str] = None                           # why the search stopped short of the bar

    def to_dict(self) -> dict:
        return {"layers_float": self.excluded, "before": probe_record(self.before),
                "after": probe_record(self.after), "passed_on_probe": self.passed,
                "after_sqnr_phase": self.sqnr_phase or None, "budget_layers": self.budget_layers,
                "stopped": self.stopped, "sensitivity_top": self.sensitivity[:15], "steps": self.steps,
                "candidates": self.candidates, "seconds": round(self.seconds, 1)}


@dataclass
class _Search:
    """The state one search carries from phase to phase."""

    space: Space
    probe: np.ndarray
    reference: np.ndarray
    bar: Bar
    settings: Settings
    say: Callable[[str], None]
    n_rank: int
    result: FallbackResult
    base: List[str]
    chosen: List[str] = field(default_factory=list)
    why: Dict[str, str] = field(default_factory=dict)

    def measure(self, layers: Sequence[str], ranked_only: bool) -> parity.Parity:
        n = self.n_rank if ranked_only else len(self.probe)
        return parity.compare(self.reference[:n], self.space.logits(list(layers), self.probe[:n]))

    def too_slow(self, layers: Sequence[str]) -> Optional[float]:
        """The measured speed-up when it falls below the floor, else None (also when not measured)."""
        speed = self.space.speedup(list(layers))
        return speed if speed is not None and speed < self.settings.min_speedup else None


def fallback(space: Space, probe: np.ndarray, reference: np.ndarray, *, bar: Bar = Bar(),
             settings: Settings = Settings(), say: Callable[[str], None] = lambda s: None) -> FallbackResult:
    """Write the INT8 model with the fewest most-sensitive layers float that bring the probe to ``bar``
    (``reference``: the FP32 logits on ``probe``)."""
    t0 = time.perf_counter()
    base = list(space.default_float)
    candidates = [c for c in space.candidates if c not in space.default_float]
    n_rank = len(probe) if not settings.rank_images else min(len(probe), int(settings.rank_images))
    info = space.write(base)
    out_before = space.logits(base, probe)
    before = parity.compare(reference, out_before)
    result = FallbackResult(excluded=dict(space.default_float), before=before, after=before, passed=bar.met(before),
                            candidates=len(candidates), info=info)
    if result.passed or not candidates or not settings.run_sensitivity:
        result.seconds = time.perf_counter() - t0
        return result
    say(f"INT8 on {len(probe)} probe images: estimated drop {_drop(before):.2%}, SQNR {before.sqnr_db:.1f} dB, "
        f"below the bar: per-layer sensitivity over {len(candidates)} layers ({n_rank} images)")
    search = _Search(space, probe, reference, bar, settings, say, n_rank, result, base)
    rows = _sensitivity(search, candidates)
    result.sensitivity = rows
    ranked = [r["node"] for r in rows]
    if not ranked:
        result.seconds = time.perf_counter() - t0
        return result
    limit = min(len(ranked), max(1, int(len(candidates) * settings.max_float_fraction)))
    rank_before = parity.compare(reference[:n_rank], out_before[:n_rank])
    best = _sqnr_phase(search, rows, rank_before, limit)
    result.sqnr_phase = {"layers_float": len(search.chosen), "probe": probe_record(best)}
    if settings.batch_phase and result.stopped is None and not bar.met(best):
        best = _batch_phase(search, ranked, best, limit)
    result.excluded.update({n: search.why[n] for n in search.chosen})
    result.budget_layers = limit
    result.info = space.write(list(result.excluded))
    result.after = best
    result.passed = bar.met(best)
    result.seconds = time.perf_counter() - t0
    return result


def _sensitivity(search: _Search, candidates: Sequence[str]) -> List[dict]:
    return sensitivity(search.space, search.probe[:search.n_rank], search.reference[:search.n_rank], candidates,
                       max_seconds=search.settings.max_seconds, say=search.say)


def sensitivity(space: Space, probe: np.ndarray, reference: np.ndarray, candidates: Sequence[str], *,
                max_seconds: float = float("inf"), say: Callable[[str], None] = lambda s: None) -> List[dict]:
    """Quantize all but one: each candidate float on its own (with the space's defaults), measured on
    ``probe``. Sorted most sensitive first (largest SQNR when the layer stays float)."""
    base = list(space.default_float)
    rows = []
    t0 = time.perf_counter()
    for i, node in enumerate(candidates):
        if time.perf_counter() - t0 > max_seconds:
            say(f"sensitivity: time budget of {max_seconds:.0f} s spent after {i} of {len(candidates)} layers; "
                "ranking those")
            break
        m = parity.compare(reference, space.logits(base + [node], probe))
        rows.append({"node": node, "sqnr_db": round(m.sqnr_db, 3), "top1_agreement": round(m.top1_agreement, 4),
                     "cosine": round(m.cosine, 5)})
        if i == 0 or (i + 1) % 10 == 0:
            say(f"sensitivity: {i + 1}/{len(candidates)} layers ({time.perf_counter() - t0:.0f} s)")
    rows.sort(key=lambda r: (-r["sqnr_db"], -r["top1_agreement"]))
    return rows


def _sqnr_phase(search: _Search, rows: List[dict], rank_before: parity.Parity, limit: int) -> parity.Parity:
    """Greedy, most sensitive first, keeping a layer float only when that measurably helps: layers do not add
    up (three individually helpful layers together can make a net worse), so each is tried on top of those
    already kept. Returns the full-probe figures of the choice."""
    s, result = search.settings, search.result
    best_rank = rank_before
    t0 = time.perf_counter()
    for node in [r["node"] for r in rows if r["sqnr_db"] > rank_before.sqnr_db]:
        if len(search.chosen) >= limit or search.bar.met(best_rank):
            break
        if time.perf_counter() - t0 > s.max_seconds:
            search.say("fallback: SQNR phase time budget spent")
            break
        trial = search.base + search.chosen + [node]
        m = search.measure(trial, ranked_only=True)
        kept = m.sqnr_db > best_rank.sqnr_db + s.min_gain_db and _drop(m) <= _drop(best_rank) + 1e-9
        speed = search.space.speedup(trial) if kept else None
        too_slow = speed is not None and speed < s.min_speedup
        kept = kept and not too_slow
        result.steps.append({"phase": "sqnr", "layer": node, "float_layers": len(search.chosen) + int(kept),
                             "kept": kept, "images": search.n_rank, **probe_record(m),
                             **({"speedup_vs_fp32": round(speed, 3)} if speed is not None else {})})
        if too_slow:
            search.say(f"fallback: {node} float would leave INT8 {speed:.2f}x FP32 (floor {s.min_speedup:.2f}x): stop")
            result.stopped = "speed floor"
            break
        search.say(f"fallback: {node} float -> estimated drop {_drop(m):.2%}, SQNR {m.sqnr_db:.1f} dB "
                   f"({'kept' if kept else 'no gain, stays INT8'})")
        if kept:
            search.chosen.append(node)
            best_rank = m
    sens = {r["node"]: r for r in rows}
    for node in search.chosen:
        search.why[node] = (f"sensitivity: float alone gives logit SQNR {sens[node]['sqnr_db']:.1f} dB "
                            f"(all-INT8 {rank_before.sqnr_db:.1f} dB)")
    if not search.chosen:
        return search.result.before
    return search.measure(search.base + search.chosen, ranked_only=False)


def _batch_phase(search: _Search, ranked: List[str], best: parity.Parity, limit: int) -> parity.Parity:
    """Add the next-ranked layers ``batch`` at a time while the bar is missed; keep a batch when the probe's
    estimated drop, or at an equal drop the SQNR, improves."""
    s, result = search.settings, search.result
    rest = [n for n in ranked if n not in search.chosen]
    t0 = time.perf_counter()
    search.say(f"fallback: estimated drop {_drop(best):.2%}, SQNR {best.sqnr_db:.1f} dB on {len(search.probe)} probe "
               f"images after the SQNR phase ({len(search.chosen)} layer(s) float), the bar missed: adding ranked "
               f"layers {s.batch} at a time (budget {limit} layers, {s.max_seconds:.0f} s)")
    i = 0
    while i < len(rest) and len(search.chosen) < limit and result.stopped != "speed floor":
        if search.bar.met(best):
            break
        if time.perf_counter() - t0 > s.max_seconds:
            search.say("fallback: batch phase time budget spent")
            result.stopped = "time budget"
            break
        group = rest[i:i + min(s.batch, limit - len(search.chosen))]
        i += len(group)
        trial = search.base + search.chosen + group
        m = search.measure(trial, ranked_only=False)
        kept = (_drop(m) < _drop(best) - 1e-9 or (_drop(m) <= _drop(best) + 1e-9 and m.sqnr_db > best.sqnr_db))
        speed = search.space.speedup(trial) if kept else None
        too_slow = speed is not None and speed < s.min_speedup
        kept = kept and not too_slow
        result.steps.append({"phase": "batch", "layers": group,
                             "float_layers": len(search.chosen) + len(group) * kept, "kept": kept,
                             "images": len(search.probe), **probe_record(m),
                             **({"speedup_vs_fp32": round(speed, 3)} if speed is not None else {})})
        if too_slow:
            search.say(f"fallback: +{len(group)} float would leave INT8 {speed:.2f}x FP32 (floor "
                       f"{s.min_speedup:.2f}x): stop")
            result.stopped = "speed floor"
            break
        search.say(f"fallback: +{len(group)} float ({len(search.chosen) + len(group)} in all) -> estimated drop "
                   f"{_drop(m):.2%}, SQNR {m.sqnr_db:.1f} dB ({'kept' if kept else 'no gain, stay INT8'})")
        if kept:
            for node in group:
                search.why[node] = (f"batch phase: probe estimated drop {_drop(best):.2%} -> {_drop(m):.2%}, SQNR "
                                    f"{best.sqnr_db:.1f} -> {m.sqnr_db:.1f} dB with its batch float (rank "
                                    f"{ranked.index(node) + 1} of {len(ranked)} by sensitivity)")
            search.chosen += group
            best = m
    else:
        if not search.bar.met(best) and result.stopped is None:
            result.stopped = "layer budget" if len(search.chosen) >= limit else "ranked layers exhausted"
    return best
