"""Parity: how close an artefact's outputs are to the PyTorch FP32 reference, and the gate it must pass.

The one place these metrics and gates are computed. The validator, the INT8 fallback, the empirical bias
correction, the benchmarks and the on-device TensorRT tool all call it. It needs Python >= 3.8 and NumPy
only, because a byte-identical copy of this file ships inside every TensorRT bundle as
``edgecnn_parity.py`` (``tests/test_parity.py`` checks the copy).

Gates, by precision:

* FP32: max relative error <= 1e-4 against the PyTorch FP32 reference. When PyTorch FP32 is itself further
  than that from the same net in FP64 (an ill-conditioned net), the artefact is judged against FP64: no
  worse than twice PyTorch's own error; without FP64 at hand (a device), 3x the recorded floor against the
  reference (triangle inequality).
* FP16: min cosine >= 0.999.
* INT8 on trained weights, judged as users judge quantization — by the accuracy it loses:
  with labels, the measured top-1 accuracy drop (FP32 minus artefact, same images) <= ``Gate.max_drop``
  (default 1.0 point, NNCF's default); without labels, the drop estimated from FP32's own confidence,
  D = mean over images of p(FP32's top-1) - p(the artefact's top-1) under FP32's softmax — what accuracy
  would lose were FP32's probabilities calibrated: a flip between near-equal classes costs ~0, a confident
  flip ~1 — <= the same bar. In both cases a floor rejects broken models a low-confidence image set would
  hide (logit cosine, FP32's top-1 within the artefact's top-5). Top-1 agreement is a diagnostic, and an
  opt-in stricter gate (``Gate.min_agreement``).
* INT8 on random-init weights: accuracy means nothing there, so SQNR >= 10 dB (a structure check).

NaN/Inf anywhere in the output fails in its own right.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import List, Optional, Sequence

import numpy as np

FP32_MAX_REL_ERROR = 1e-4
FP16_MIN_COSINE = 0.999
INT8_MAX_DROP = 0.01             # top-1 accuracy, measured or estimated (1.0 point)
INT8_FLOOR_COSINE = 0.95         # below this mean logit cosine the artefact is broken, whatever the drop says
INT8_FLOOR_TOP5 = 0.90           # share of images whose FP32 top-1 is within the artefact's top-5
INT8_RANDOM_MIN_SQNR_DB = 10.0   # structure check only for random-init nets
# quantized precisions, judged by the INT8 gate: W8A8 and the weight-only ones (8-bit, palettized, 4-bit blocks)
QUANTIZED = ("int8", "int8-weights", "palettized8", "palettized6", "palettized4", "int4-weights")
SQNR_CAP_DB = 999.0              # identical outputs: a finite stand-in for +inf (strict JSON has no Infinity)
BOOTSTRAP_SAMPLES = 400          # resamples of the images for the estimated drop's 95% interval


@dataclass
class Gate:
    """The INT8 gate's settings: ``max_drop`` (a fraction: 0.01 is one point of top-1 accuracy) and the opt-in
    stricter ``min_agreement`` (None: agreement is a diagnostic only)."""

    max_drop: float = INT8_MAX_DROP
    min_agreement: Optional[float] = None

    def to_dict(self) -> dict:
        return {"max_drop": self.max_drop, "min_agreement": self.min_agreement}

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "Gate":
        """The gate a manifest records (``recipe.gate``); ValueError naming the field when it is malformed."""
        d = {} if d is None else d
        if not isinstance(d, dict):
            raise ValueError(f"recipe.gate must be an object, not {type(d).__name__}")
        max_drop, min_agreement = d.get("max_drop", INT8_MAX_DROP), d.get("min_agreement")
        if not _is_fraction(max_drop):
            raise ValueError(f"recipe.gate.max_drop must be a number from 0 to 1, not {max_drop!r}")
        if min_agreement is not None and not _is_fraction(min_agreement):
            raise ValueError(f"recipe.gate.min_agreement must be null or a number from 0 to 1, not {min_agreement!r}")
        return cls(max_drop=float(max_drop), min_agreement=None if min_agreement is None else float(min_agreement))


def _is_fraction(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= value <= 1.0


def _rows(a) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1)


def sqnr_db(out, ref) -> float:
    """Signal-to-quantization-noise ratio of ``out`` against ``ref`` in dB, pooled over every image."""
    out, ref = _rows(out), _rows(ref)
    noise = float(((out - ref) ** 2).sum())
    if noise == 0:
        return SQNR_CAP_DB
    return float(min(SQNR_CAP_DB, 10.0 * math.log10(max(float((ref ** 2).sum()), 1e-300) / noise)))


def near_tie_flips(ref, out) -> np.ndarray:
    """Per image: top-1 flipped although the FP32 top-1/top-2 logit gap is under twice that image's RMS
    logit error, i.e. the noise alone can swap the two. A diagnostic; gates count every flip."""
    ref, out = _rows(ref), _rows(out)
    flipped = out.argmax(1) != ref.argmax(1)
    if ref.shape[1] < 2:
        return np.zeros(len(ref), bool)
    top2 = np.sort(ref, axis=1)[:, -2:]
    rms = np.sqrt(((out - ref) ** 2).mean(1))
    return flipped & (top2[:, 1] - top2[:, 0] < 2 * rms)


def softmax(logits) -> np.ndarray:
    z = _rows(logits)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def estimated_drop_per_image(ref, out) -> np.ndarray:
    """Per image: p(FP32's top-1) - p(the artefact's top-1), both under FP32's softmax (>= 0; 0 when they agree)."""
    ref, out = _rows(ref), _rows(out)
    p = softmax(ref)
    rows = np.arange(len(ref))
    return p[rows, ref.argmax(1)] - p[rows, out.argmax(1)]


def bootstrap_interval(values: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> List[float]:
    """The 95% percentile-bootstrap interval of the mean of ``values`` (seeded: the same figures every run)."""
    values = np.asarray(values, dtype=np.float64)
    n = len(values)
    if n == 0:
        return [0.0, 0.0]
    rng = np.random.default_rng(seed)
    means = []
    chunk = max(1, min(samples, 4_000_000 // max(n, 1)))   # bounds the index array at ~32 MB
    while len(means) < samples:
        k = min(chunk, samples - len(means))
        means.extend(values[rng.integers(0, n, size=(k, n))].mean(axis=1).tolist())
    lo, hi = np.percentile(np.asarray(means), [2.5, 97.5])
    return [float(lo), float(hi)]


def wilson_interval(hits: int, n: int, z: float = 1.96) -> List[float]:
    """The 95% Wilson score interval of a proportion ``hits / n`` as ``[low, high]``. On ~100 images one
    flip is a whole point, so the figure alone overstates what it knows. Wilson, not the normal
    approximation: it stays inside [0, 1] and is not zero-width at n/n."""
    if n <= 0:
        return [0.0, 1.0]
    p = hits / float(n)
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4.0 * n * n)) / denom
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


@dataclass
class Parity:
    samples: int
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float          # max |out - ref| / max |ref|
    cosine: float                 # mean over samples of the per-sample logit cosine
    min_cosine: float
    sqnr_db: float                # pooled over every image
    top1_agreement: float
    top5_overlap: float           # mean |top5(out) ∩ top5(ref)| / 5
    ref_top1_in_top5: float       # share of samples whose reference top-1 is in the artefact's top-5
    nonfinite: int = 0            # NaN/Inf values in the artefact's output
    # the pooled SQNR is decided by the few images with the largest logits; the median per image says
    # whether the error is everywhere or in a few images (a diagnostic)
    median_image_sqnr_db: Optional[float] = None
    flips: Optional[int] = None                 # top-1 disagreements
    flips_near_tie: Optional[int] = None        # of which near-ties (``near_tie_flips``)
    top1_agreement_ci95: Optional[List[float]] = None   # Wilson 95% interval of top1_agreement
    fp32_noise_floor: Optional[float] = None    # PyTorch FP32 vs PyTorch FP64, relative, on the same inputs
    fp32_error_vs_fp64: Optional[float] = None  # the artefact vs PyTorch FP64, on the same inputs
    ref_accuracy: Optional[float] = None        # labelled inputs: PyTorch FP32's top-1 accuracy
    accuracy: Optional[float] = None            # labelled inputs: the artefact's top-1 accuracy
    accuracy_drop: Optional[float] = None       # labelled: ref_accuracy - accuracy (a fraction)
    accuracy_drop_se: Optional[float] = None    # its paired standard error, sqrt(fixed + broken) / N
    estimated_drop: Optional[float] = None      # the drop estimated from FP32's confidence (no labels needed)
    estimated_drop_ci95: Optional[List[float]] = None   # its 95% bootstrap interval
    criterion: str = ""           # what judged: accuracy drop (labelled) | estimated accuracy drop | ...
    gate: str = ""
    passed: bool = False
    reason: str = ""
    judged_on: str = ""           # "trained weights" or "random-init weights: structure and SQNR only"
    notes: List[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain JSON types, floats to 6 significant digits."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float):
                d[k] = float("%.6g" % v)
            elif k in ("top1_agreement_ci95", "estimated_drop_ci95") and v is not None:
                d[k] = [float("%.4g" % x) for x in v]
        return d


def compare(ref, out, labels: Optional[Sequence[int]] = None) -> Parity:
    """Metrics of ``out`` against ``ref`` (both N x classes); no gate yet (``apply_gate``)."""
    ref, out = _rows(ref), _rows(out)
    if ref.shape != out.shape:
        raise ValueError("output shape %s differs from the reference %s" % (out.shape, ref.shape))
    nonfinite = int((~np.isfinite(out)).sum())
    safe = np.where(np.isfinite(out), out, 0.0)
    err = np.abs(safe - ref)
    scale = float(np.abs(ref).max()) or 1.0
    norms = np.linalg.norm(safe, axis=1) * np.linalg.norm(ref, axis=1)
    cos = np.where(norms > 0, (safe * ref).sum(1) / np.maximum(norms, 1e-30), 1.0)
    noise_i, signal_i = ((safe - ref) ** 2).sum(1), (ref ** 2).sum(1)
    with np.errstate(divide="ignore"):
        per_image = np.where(noise_i > 0, 10.0 * np.log10(np.maximum(signal_i, 1e-300) / np.maximum(noise_i, 1e-300)),
                             SQNR_CAP_DB)
    k = min(5, ref.shape[1])
    top_ref = np.argsort(-ref, axis=1)[:, :k]
    top_out = np.argsort(-safe, axis=1)[:, :k]
    agree = top_ref[:, 0] == top_out[:, 0]
    p = Parity(samples=len(ref), max_abs_error=float(err.max()), mean_abs_error=float(err.mean()),
               max_rel_error=float(err.max()) / scale, cosine=float(cos.mean()), min_cosine=float(cos.min()),
               sqnr_db=sqnr_db(safe, ref), top1_agreement=float(agree.mean()),
               top5_overlap=float(np.mean([len(set(a) & set(b)) / float(k) for a, b in zip(top_ref, top_out)])),
               ref_top1_in_top5=float(np.mean([a[0] in b for a, b in zip(top_ref, top_out)])), nonfinite=nonfinite,
               median_image_sqnr_db=float(np.clip(np.median(per_image), -SQNR_CAP_DB, SQNR_CAP_DB)),
               flips=int((~agree).sum()), flips_near_tie=int(near_tie_flips(ref, safe).sum()),
               top1_agreement_ci95=wilson_interval(int(agree.sum()), len(ref)))
    if ref.shape[1] > 1:
        per_image = estimated_drop_per_image(ref, safe)
        p.estimated_drop = float(per_image.mean())
        p.estimated_drop_ci95 = bootstrap_interval(per_image)
    if labels is not None:
        y = np.asarray(labels)
        ref_right, out_right = top_ref[:, 0] == y, top_out[:, 0] == y
        p.ref_accuracy, p.accuracy = float(ref_right.mean()), float(out_right.mean())
        p.accuracy_drop = p.ref_accuracy - p.accuracy
        fixed, broken = int((~ref_right & out_right).sum()), int((ref_right & ~out_right).sum())
        p.accuracy_drop_se = math.sqrt(fixed + broken) / len(y)
    return p


def fp32_threshold(noise_floor: Optional[float]) -> float:
    """The FP32 bar on the error against the PyTorch FP32 reference: 1e-4 relative, or 3x PyTorch's own
    FP32 error against FP64 when the net is worse conditioned (see ``apply_gate``)."""
    return max(FP32_MAX_REL_ERROR, 3.0 * noise_floor) if noise_floor else FP32_MAX_REL_ERROR


def apply_gate(p: Parity, precision: str, trained: bool, gate: Optional[Gate] = None) -> Parity:
    """Set ``criterion``, ``gate``, ``passed`` and ``reason`` of ``p`` for ``precision`` (fp32, fp16, or one of
    ``QUANTIZED``); ``gate``: the INT8 gate's settings (default ``Gate()``)."""
    precision = str(precision)
    gate = gate or Gate()
    p.judged_on = "trained weights" if trained else "random-init weights: structure and SQNR only"
    p.reason = ""
    if p.nonfinite:
        p.criterion = p.gate = "outputs finite"
        p.passed = False
        p.reason = "%d NaN/Inf values in the artefact's output" % p.nonfinite
        return p
    if precision == "fp32":
        passed = _fp32_gate(p)
    elif precision == "fp16":
        p.criterion, p.gate = "min cosine", "cosine >= %s" % FP16_MIN_COSINE
        passed = p.min_cosine >= FP16_MIN_COSINE
    elif precision in QUANTIZED:
        passed = _int8_gate(p, trained, gate)
    else:
        raise ValueError("no parity gate for precision %r" % precision)
    p.passed = bool(passed)   # a NumPy bool would break json.dumps of the manifest
    if not p.passed:
        p.reason = "gate %s not met: %s" % (p.gate, _measured(p, precision, gate))
    return p


def _fp32_gate(p: Parity) -> bool:
    p.criterion = "max relative error"
    floor = p.fp32_noise_floor
    if p.fp32_error_vs_fp64 is not None and floor and p.max_rel_error > FP32_MAX_REL_ERROR:
        limit = max(FP32_MAX_REL_ERROR, 2.0 * floor)
        p.gate = ("max relative error vs FP64 <= %.3g (2x PyTorch FP32's own error vs FP64, %.2g; error vs "
                  "PyTorch FP32 %.3g)" % (limit, floor, p.max_rel_error))
        return p.fp32_error_vs_fp64 <= limit
    limit = fp32_threshold(floor)
    p.gate = "max relative error <= %.3g" % limit
    if limit > FP32_MAX_REL_ERROR:
        p.gate += " (3x PyTorch's own FP32 error vs FP64, %.2g)" % floor
    return p.max_rel_error <= limit


def _int8_gate(p: Parity, trained: bool, gate: Gate) -> bool:
    if not trained:
        p.criterion = "SQNR (random-init weights)"
        p.gate = "SQNR >= %g dB (random-init weights: accuracy not judged)" % INT8_RANDOM_MIN_SQNR_DB
        return p.sqnr_db >= INT8_RANDOM_MIN_SQNR_DB
    labelled = p.accuracy_drop is not None
    drop = p.accuracy_drop if labelled else p.estimated_drop
    p.criterion = "accuracy drop (labelled)" if labelled else "estimated accuracy drop (FP32 confidence, no labels)"
    p.gate = "%s <= %.2g pt, floor cosine >= %g and FP32 top-1 in top-5 >= %.0f%%" % (
        "accuracy drop" if labelled else "estimated accuracy drop", gate.max_drop * 100, INT8_FLOOR_COSINE,
        INT8_FLOOR_TOP5 * 100)
    passed = drop is not None and drop <= gate.max_drop + 1e-12
    passed = passed and p.cosine >= INT8_FLOOR_COSINE and p.ref_top1_in_top5 >= INT8_FLOOR_TOP5
    if gate.min_agreement is not None:
        p.gate += ", top-1 agreement >= %.1f%%" % (gate.min_agreement * 100)
        passed = passed and p.top1_agreement >= gate.min_agreement
    return passed


def _measured(p: Parity, precision: str, gate: Gate) -> str:
    """The figures behind a failed gate, in words."""
    if precision == "fp32":
        if p.fp32_error_vs_fp64 is not None and p.max_rel_error > FP32_MAX_REL_ERROR:
            return "max relative error vs FP64 %.3g" % p.fp32_error_vs_fp64
        return "max relative error %.3g" % p.max_rel_error
    if precision == "fp16":
        return "min cosine %.5f" % p.min_cosine
    if p.criterion.startswith("SQNR"):
        text = "SQNR %.1f dB" % p.sqnr_db
        if p.median_image_sqnr_db is not None and p.median_image_sqnr_db - p.sqnr_db >= 3.0:
            text += " (median per image %.1f dB: a few images hold most of the error)" % p.median_image_sqnr_db
        return text
    parts = [drop_text(p)]
    if p.cosine < INT8_FLOOR_COSINE or p.ref_top1_in_top5 < INT8_FLOOR_TOP5:
        parts.append("below the floor: cosine %.4f, FP32 top-1 in top-5 %.1f%%" % (p.cosine, p.ref_top1_in_top5 * 100))
    parts.append(agreement_text(p))
    return "; ".join(parts)


def drop_text(p: Parity) -> str:
    """The accuracy figure that judged, with its uncertainty, e.g. "accuracy drop 0.4 pt (SE 0.2 pt) of
    10000 labelled images" or "estimated accuracy drop 0.3 pt (95% interval 0.1-0.6 pt) of 96 images"."""
    if p.accuracy_drop is not None:
        return "accuracy drop %.2f pt (SE %.2f pt; FP32 %.1f%%, artefact %.1f%%) of %d labelled images" % (
            p.accuracy_drop * 100, (p.accuracy_drop_se or 0) * 100, p.ref_accuracy * 100, p.accuracy * 100, p.samples)
    if p.estimated_drop is None:
        return "no accuracy figure"
    lo, hi = p.estimated_drop_ci95 or (p.estimated_drop, p.estimated_drop)
    return "estimated accuracy drop %.2f pt (95%% interval %.2f-%.2f pt) of %d images" % (
        p.estimated_drop * 100, lo * 100, hi * 100, p.samples)


def agreement_text(p: Parity) -> str:
    """Top-1 agreement with its interval, flips and near-ties (a diagnostic)."""
    text = "top-1 agreement %.1f%% of %d images" % (p.top1_agreement * 100, p.samples)
    notes = []
    if p.top1_agreement_ci95:
        notes.append("95%% interval %.1f%%–%.1f%%" % (p.top1_agreement_ci95[0] * 100, p.top1_agreement_ci95[1] * 100))
    if p.flips and p.flips_near_tie:
        notes.append("%d flips, %d of them near-ties: FP32 top-1/top-2 gap under twice the image's logit error"
                     % (p.flips, p.flips_near_tie))
    if notes:
        text += " (%s)" % "; ".join(notes)
    return text + ", SQNR %.1f dB" % p.sqnr_db


def judge(ref, out, precision: str, trained: bool, labels: Optional[Sequence[int]] = None,
          gate: Optional[Gate] = None, noise_floor: Optional[float] = None) -> Parity:
    """``compare`` then ``apply_gate``; ``noise_floor``: PyTorch FP32's recorded error against FP64, if any."""
    p = compare(ref, out, labels=labels)
    p.fp32_noise_floor = noise_floor
    return apply_gate(p, precision, trained, gate)
