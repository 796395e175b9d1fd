"""Per-layer sensitivity analysis and automatic float fallback, for any Q/DQ recipe.

A recipe is ``quantize(fp32_onnx_path, out_path, ranges, nodes_to_exclude) -> info`` (``exporters.quant_ort``,
``exporters.quant_trt``). Ranges are computed once (``calibration.ranges``, cached), so re-quantizing with
a different exclusion list costs a couple of seconds and this module can afford to ask "what if this one
layer stayed float?" for every layer:

1. quantize with the recipe's default exclusions; measure against the FP32 model on probe images;
2. if the agreement bar is not met: sensitivity = quantize all-but-one (each candidate layer float on its
   own) and measure the SQNR of the logits (a continuous measure: top-1 flips on a few dozen images are
   too coarse to rank layers);
3. greedily, most sensitive first, keep a layer float when that improves the probe SQNR (and does not
   lower the agreement) on top of the layers already kept, until the bar holds or ``max_float_fraction``
   of the candidate layers is float;
4. if the top-1 agreement is still below the bar, keep going toward it: add the next layers of the
   sensitivity ranking float a batch at a time (each batch is one re-quantization with the cached ranges),
   keeping a batch when the probe agreement or SQNR improves, until the agreement bar holds or the budget
   (``max_float_fraction`` of the layers, ``max_seconds``) is spent. The SQNR phase alone stops early on
   nets whose per-layer gains are each below ``min_gain_db`` (EfficientNet-Lite0: none of them passes it)
   although together they move the agreement.

Ranking (steps 2-3) uses the first ``rank_images`` probe images; the agreement (before, after, step 4)
uses all of them: top-1 agreement on a few dozen images moves in steps of 2 %, too coarse for a 99 % bar.

Probe images must come from the calibration split: the held-out evaluation split stays unseen, so the
pipeline's parity gate on it remains an honest check of what the fallback chose.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

Recipe = Callable[..., dict]


@dataclass
class Agreement:
    """INT8 vs FP32 logits on probe images."""

    samples: int
    top1_agreement: float
    ref_top1_in_top5: float
    cosine: float
    sqnr_db: float

    flips_low_margin: int = 0       # disagreements on images whose FP32 top-1/top-2 gap is within the logit noise

    def to_dict(self) -> dict:
        return {k: (round(v, 5) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def meets(self, min_agreement: float, min_cosine: float, min_sqnr_db: float = -999.0) -> bool:
        return bool(self.top1_agreement >= min_agreement and self.cosine >= min_cosine and self.sqnr_db >= min_sqnr_db)


def compare(out: np.ndarray, ref: np.ndarray) -> Agreement:
    out = np.asarray(out, np.float64).reshape(len(out), -1)
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    noise = float(((out - ref) ** 2).sum())
    sqnr = float("inf") if noise == 0 else float(10 * np.log10(float((ref ** 2).sum()) / noise))
    norms = np.linalg.norm(out, axis=1) * np.linalg.norm(ref, axis=1)
    cos = float(np.mean(np.where(norms > 0, (out * ref).sum(1) / np.maximum(norms, 1e-30), 1.0)))
    k = min(5, ref.shape[1])
    top5 = np.argsort(-out, axis=1)[:, :k]
    r1 = ref.argmax(1)
    flipped = out.argmax(1) != r1
    low = int(near_tie_flips(ref, out).sum())
    return Agreement(samples=len(ref), top1_agreement=float((~flipped).mean()),
                     ref_top1_in_top5=float(np.mean([a in b for a, b in zip(r1, top5)])), cosine=cos,
                     sqnr_db=sqnr if np.isfinite(sqnr) else 999.0,  # plain floats: they go into JSON
                     flips_low_margin=low)


def near_tie_flips(ref: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Per image: top-1 flipped although the FP32 top-1/top-2 logit gap is under twice that image's RMS
    logit error, i.e. the quantization noise alone can swap the two. A diagnostic for reports (on photos
    the model is unsure of, most flips are these: pretrained Lite0, 5 of 6 held-out flips); gates count
    every flip."""
    ref = np.asarray(ref, np.float64).reshape(len(ref), -1)
    out = np.asarray(out, np.float64).reshape(len(out), -1)
    flipped = out.argmax(1) != ref.argmax(1)
    if ref.shape[1] < 2:
        return np.zeros(len(ref), bool)
    top2 = np.sort(ref, axis=1)[:, -2:]
    rms = np.sqrt(((out - ref) ** 2).mean(1))
    return flipped & (top2[:, 1] - top2[:, 0] < 2 * rms)


def run_onnx(path: str, inputs: np.ndarray, batch: int = 16) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: np.ascontiguousarray(inputs[i:i + batch])})[0]
                           for i in range(0, len(inputs), batch)])


@dataclass
class FallbackResult:
    excluded: Dict[str, str]                    # node -> why it stays float
    before: Agreement                           # recipe defaults only
    after: Agreement                            # with the fallback layers float
    passed: bool
    sensitivity: List[dict] = field(default_factory=list)   # [{node, sqnr_db, top1_agreement}] most sensitive first
    steps: List[dict] = field(default_factory=list)         # each fallback try: {float_layers, agreement, ...}
    candidates: int = 0
    seconds: float = 0.0
    info: dict = field(default_factory=dict)                # the recipe's own info for the final model
    sqnr_phase: dict = field(default_factory=dict)          # {layers_float, agreement} after the SQNR phase
    budget_layers: int = 0                                  # most layers the fallback may keep float
    stopped: Optional[str] = None                           # why the agreement phase stopped short of the bar

    def to_dict(self) -> dict:
        return {"layers_float": self.excluded, "agreement_before": self.before.to_dict(),
                "agreement_after": self.after.to_dict(), "passed_on_probe": self.passed,
                "after_sqnr_phase": self.sqnr_phase or None, "budget_layers": self.budget_layers,
                "stopped": self.stopped,
                "sensitivity_top": self.sensitivity[:15], "steps": self.steps, "candidates": self.candidates,
                "seconds": round(self.seconds, 1)}


def sensitivity(recipe: Recipe, fp32_path: str, ranges, probe: np.ndarray, reference: np.ndarray,
                candidates: Sequence[str], base_exclude: Dict[str, str], workdir: str,
                say: Callable[[str], None] = lambda s: None, max_seconds: float = float("inf")) -> List[dict]:
    """Quantize all but one: for each candidate node, the probe metrics with only it (plus the base
    exclusions) float. Sorted most sensitive first (largest SQNR when the node stays float)."""
    rows = []
    path = os.path.join(workdir, "sens.onnx")
    t0 = time.perf_counter()
    for i, node in enumerate(candidates):
        if time.perf_counter() - t0 > max_seconds:
            say(f"sensitivity: time budget of {max_seconds:.0f} s spent after {i} of {len(candidates)} layers; "
                "ranking those")
            break
        recipe(fp32_path, path, ranges, list(base_exclude) + [node])
        m = compare(run_onnx(path, probe), reference)
        rows.append({"node": node, "sqnr_db": round(m.sqnr_db, 3), "top1_agreement": round(m.top1_agreement, 4),
                     "cosine": round(m.cosine, 5)})
        if i == 0 or (i + 1) % 10 == 0:
            say(f"sensitivity: {i + 1}/{len(candidates)} layers ({time.perf_counter() - t0:.0f} s)")
    rows.sort(key=lambda r: (-r["sqnr_db"], -r["top1_agreement"]))
    return rows


def fallback(recipe: Recipe, fp32_path: str, out_path: str, ranges, probe: np.ndarray, *,
             reference: Optional[np.ndarray] = None, candidates: Sequence[str], base_exclude: Optional[Dict[str, str]] = None,
             min_agreement: float = 0.99, min_cosine: float = 0.0, min_sqnr_db: float = -999.0, max_float_fraction: float = 0.34,
             run_sensitivity: bool = True, max_seconds: float = 240.0, min_gain_db: float = 0.25,
             rank_images: Optional[int] = None, agreement_phase: bool = True, batch: int = 4,
             speedup: Optional[Callable[[str], float]] = None, min_speedup: float = 0.0,
             say: Callable[[str], None] = lambda s: None) -> FallbackResult:
    """Quantize ``fp32_path`` into ``out_path`` with ``recipe``, keeping the fewest most-sensitive layers
    float so that the probe agreement with FP32 is >= ``min_agreement`` (and cosine >= ``min_cosine``, logit
    SQNR >= ``min_sqnr_db``: the bar for random-init nets, whose agreement means nothing). In the SQNR phase
    a layer stays float only for a probe SQNR gain of at least ``min_gain_db`` (smaller gains are noise on a
    few dozen images, and each float layer costs speed and size); the agreement phase (``agreement_phase``)
    then adds the next-ranked layers ``batch`` at a time while the agreement bar is missed. ``max_seconds``
    bounds the sensitivity pass and, again, each later phase. ``speedup(path)`` (optional) measures a
    candidate's speed-up over FP32: a step that would take it below ``min_speedup`` is not kept and the
    search stops there ("speed floor"), so the float layers never make the INT8 model slower than FP32
    (measured on EfficientNet-Lite0: 20 of 59 layers float made it 0.78x FP32)."""
    t0 = time.perf_counter()
    base = dict(base_exclude or {})
    candidates = [c for c in candidates if c not in base]
    if reference is None:
        reference = run_onnx(fp32_path, probe)
    n_rank = len(probe) if not rank_images else min(len(probe), int(rank_images))
    rank_probe, rank_ref = probe[:n_rank], reference[:n_rank]
    info = recipe(fp32_path, out_path, ranges, list(base))
    out_before = run_onnx(out_path, probe)
    before = compare(out_before, reference)
    result = FallbackResult(excluded=dict(base), before=before, after=before,
                            passed=before.meets(min_agreement, min_cosine, min_sqnr_db), candidates=len(candidates), info=info)
    if result.passed or not candidates or not run_sensitivity:
        result.seconds = time.perf_counter() - t0
        return result
    say(f"INT8 on {len(probe)} probe images: agreement {before.top1_agreement:.1%}, SQNR {before.sqnr_db:.1f} dB, "
        f"below the bar: per-layer sensitivity over {len(candidates)} layers ({n_rank} images)")
    with tempfile.TemporaryDirectory(prefix="edgecnn-fallback-") as work:
        rows = sensitivity(recipe, fp32_path, ranges, rank_probe, rank_ref, candidates, base, work, say,
                           max_seconds=max_seconds)
        result.sensitivity = rows
        ranked = [r["node"] for r in rows]
        if not ranked:
            result.seconds = time.perf_counter() - t0
            return result
        limit = min(len(ranked), max(1, int(len(candidates) * max_float_fraction)))
        rank_before = compare(out_before[:n_rank], rank_ref)
        helpful = [r["node"] for r in rows if r["sqnr_db"] > rank_before.sqnr_db]
        trial = os.path.join(work, "trial.onnx")
        # Greedy, most sensitive first, keeping a layer float only when that measurably helps: layers do not
        # add up (measured: with onnxruntime's exclusions, three individually helpful layers together made
        # EfficientNet-Lite0 worse, 16 -> 12 dB), so each one is tried on top of those already kept.
        chosen: List[str] = []
        why: Dict[str, str] = {}
        best_rank = rank_before
        phase_t0 = time.perf_counter()
        for node in helpful:
            if len(chosen) >= limit or best_rank.meets(min_agreement, min_cosine, min_sqnr_db):
                break
            if time.perf_counter() - phase_t0 > max_seconds:
                say("fallback: SQNR phase time budget spent")
                break
            recipe(fp32_path, trial, ranges, list(base) + chosen + [node])
            m = compare(run_onnx(trial, rank_probe), rank_ref)
            kept = m.sqnr_db > best_rank.sqnr_db + min_gain_db and m.top1_agreement >= best_rank.top1_agreement - 1e-9
            speed = speedup(trial) if (kept and speedup is not None) else None
            too_slow = speed is not None and speed < min_speedup
            kept = kept and not too_slow
            result.steps.append({"phase": "sqnr", "layer": node, "float_layers": len(chosen) + int(kept), "kept": kept,
                                 "images": n_rank, **m.to_dict(),
                                 **({"speedup_vs_fp32": round(speed, 3)} if speed is not None else {})})
            if too_slow:
                say(f"fallback: {node} float would leave INT8 {speed:.2f}x FP32 (floor {min_speedup:.2f}x): stop")
                result.stopped = "speed floor"
                break
            say(f"fallback: {node} float -> agreement {m.top1_agreement:.1%}, SQNR {m.sqnr_db:.1f} dB "
                f"({'kept' if kept else 'no gain, stays INT8'})")
            if kept:
                chosen.append(node)
                best_rank = m
        sens = {r["node"]: r for r in rows}
        for node in chosen:
            r = sens[node]
            why[node] = (f"sensitivity: float alone gives logit SQNR {r['sqnr_db']:.1f} dB "
                         f"(all-INT8 {rank_before.sqnr_db:.1f} dB)")
        # the full probe with the SQNR phase's choice
        if chosen:
            recipe(fp32_path, trial, ranges, list(base) + chosen)
            best = compare(run_onnx(trial, probe), reference)
        else:
            best = before
        result.sqnr_phase = {"layers_float": len(chosen), "agreement": best.to_dict()}
        # Agreement phase: the SQNR gate of each single layer is too strict for a net whose error is spread
        # thin (no layer alone is worth 0.25 dB, together they flip top-1 on low-margin images), so keep
        # adding the next-ranked layers a batch at a time while the agreement bar is missed.
        if agreement_phase and result.stopped is None and not best.meets(min_agreement, min_cosine, min_sqnr_db):
            rest = [n for n in ranked if n not in chosen]
            phase_t0 = time.perf_counter()
            say(f"fallback: agreement {best.top1_agreement:.1%} on {len(probe)} probe images after the SQNR phase "
                f"({len(chosen)} layer(s) float), below {min_agreement:.1%}: adding ranked layers {batch} at a time "
                f"(budget {limit} layers, {max_seconds:.0f} s)")
            i = 0
            while i < len(rest) and len(chosen) < limit and result.stopped != "speed floor":
                if best.meets(min_agreement, min_cosine, min_sqnr_db):
                    break
                if time.perf_counter() - phase_t0 > max_seconds:
                    say("fallback: agreement phase time budget spent")
                    result.stopped = "time budget"
                    break
                group = rest[i:i + min(batch, limit - len(chosen))]
                i += len(group)
                recipe(fp32_path, trial, ranges, list(base) + chosen + group)
                m = compare(run_onnx(trial, probe), reference)
                kept = (m.top1_agreement > best.top1_agreement + 1e-9 or
                        (m.top1_agreement >= best.top1_agreement - 1e-9 and m.sqnr_db > best.sqnr_db))
                speed = speedup(trial) if (kept and speedup is not None) else None
                too_slow = speed is not None and speed < min_speedup
                kept = kept and not too_slow
                result.steps.append({"phase": "agreement", "layers": group, "float_layers": len(chosen) + len(group) * kept,
                                     "kept": kept, "images": len(probe), **m.to_dict(),
                                     **({"speedup_vs_fp32": round(speed, 3)} if speed is not None else {})})
                if too_slow:
                    say(f"fallback: +{len(group)} float would leave INT8 {speed:.2f}x FP32 (floor {min_speedup:.2f}x): stop")
                    result.stopped = "speed floor"
                    break
                say(f"fallback: +{len(group)} float ({len(chosen) + len(group)} in all) -> agreement "
                    f"{m.top1_agreement:.1%}, SQNR {m.sqnr_db:.1f} dB ({'kept' if kept else 'no gain, stay INT8'})")
                if kept:
                    for node in group:
                        why[node] = (f"agreement phase: probe agreement {best.top1_agreement:.1%} -> "
                                     f"{m.top1_agreement:.1%}, SQNR {best.sqnr_db:.1f} -> {m.sqnr_db:.1f} dB with "
                                     f"its batch float (rank {ranked.index(node) + 1} of {len(ranked)} by sensitivity)")
                    chosen += group
                    best = m
            else:
                if not best.meets(min_agreement, min_cosine, min_sqnr_db) and result.stopped is None:
                    result.stopped = ("layer budget" if len(chosen) >= limit else "ranked layers exhausted")
        result.excluded.update({n: why[n] for n in chosen})
        result.budget_layers = limit
        result.info = recipe(fp32_path, out_path, ranges, list(result.excluded))
        result.after = best
        result.passed = result.after.meets(min_agreement, min_cosine, min_sqnr_db)
    result.seconds = time.perf_counter() - t0
    return result
