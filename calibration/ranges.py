"""Activation range estimation for INT8: minmax, percentile, entropy (KL), mse.

onnxruntime's calibrators do the heavy lifting (they run the model with every intermediate tensor
exposed and keep running min/max or merged histograms); this module only adds what they lack:

- feeding them in bounded chunks, so memory stays flat however large the calibration set is
  (onnxruntime's histogram calibrators otherwise keep every intermediate tensor of every image);
- an augmented model written into a private temporary folder, never ``./augmented_model.onnx``
  (onnxruntime's default), and its chatter on stdout kept off the user's terminal;
- an ``mse`` method (onnxruntime has none): per tensor, the clipping range that minimises the
  expected quantization error over the collected value histogram;
- histogram thresholds (entropy is symmetric by construction) clamped to the observed min/max,
  so a ReLU output does not waste half of an asymmetric UINT8 grid on negative values it never takes;
- a cache keyed by model hash + calibration-set fingerprint + method + options, so re-quantizing
  (a fallback loop, a second recipe, a re-export) takes seconds instead of minutes.

It imports onnxruntime and NumPy only (no torch, no edgecnn, no exporters).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import CalibrationError

METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_METHOD = "minmax"
DEFAULT_PERCENTILE = 99.999
CHUNK_IMAGES = 16            # images per collect_data call (bounds the intermediate tensors kept in memory)
CACHE_VERSION = 1

Batches = Union[Iterable[np.ndarray], Callable[[], Iterable[np.ndarray]]]


def default_ranges_cache_dir() -> Path:
    from .dataset import default_cache_dir

    return default_cache_dir() / "ranges"


@dataclass
class Ranges:
    """Per-tensor (low, high) float ranges of one model on one calibration set."""

    method: str
    ranges: Dict[str, Tuple[float, float]]
    images: int = 0
    seconds: float = 0.0             # time spent computing (0 when read from the cache)
    cache_hit: bool = False
    key: str = ""
    options: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ranges)

    def to_tensors_data(self):
        """onnxruntime's ``TensorsData`` (what its quantizers consume)."""
        from onnxruntime.quantization.calibrate import CalibrationMethod, TensorData, TensorsData

        data = {name: TensorData(lowest=np.float32(lo), highest=np.float32(hi)) for name, (lo, hi) in self.ranges.items()}
        return TensorsData(CalibrationMethod.MinMax, data)

    def write_ort_cache(self, path: Union[str, os.PathLike]) -> Path:
        """Write the ranges as onnxruntime's calibration cache (``quantize_static(calibration_cache_path=...)``,
        which must then be called with ``calibrate_method=CalibrationMethod.MinMax``: the file carries final ranges)."""
        from onnxruntime.quantization.calibrate import save_tensors_data

        save_tensors_data(self.to_tensors_data(), Path(path))
        return Path(path)

    def describe(self) -> dict:
        return {"method": self.method, "tensors": len(self.ranges), "images": self.images,
                "seconds": round(self.seconds, 2), "cache_hit": self.cache_hit, "key": self.key,
                "options": dict(self.options)}

    # ---------------------------------------------------------------- (de)serialisation for the cache
    def to_json(self) -> str:
        return json.dumps({"version": CACHE_VERSION, "method": self.method, "images": self.images,
                           "seconds": self.seconds, "key": self.key, "options": self.options,
                           "ranges": {k: [float(lo), float(hi)] for k, (lo, hi) in self.ranges.items()}},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Ranges":
        d = json.loads(text)
        if d.get("version") != CACHE_VERSION:
            raise ValueError("range cache version mismatch")
        return cls(method=d["method"], ranges={k: (float(v[0]), float(v[1])) for k, v in d["ranges"].items()},
                   images=int(d.get("images", 0)), seconds=float(d.get("seconds", 0.0)), key=d.get("key", ""),
                   options=d.get("options", {}))


class BatchReader:
    """onnxruntime ``CalibrationDataReader`` over N×C×H×W float32 batches (one input)."""

    def __init__(self, input_name: str, batches: Iterable[np.ndarray]):
        self.input_name = input_name
        self._it: Iterator[np.ndarray] = iter(batches)

    def get_next(self) -> Optional[dict]:
        batch = next(self._it, None)
        if batch is None:
            return None
        return {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)}

    def __iter__(self):
        return self

    def __next__(self):
        d = self.get_next()
        if d is None:
            raise StopIteration
        return d


def model_sha256(path: Union[str, os.PathLike]) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def cache_key(model_path: Union[str, os.PathLike], fingerprint: str, method: str, options: dict) -> str:
    payload = json.dumps({"model": model_sha256(model_path), "calib": fingerprint, "method": method,
                          "options": options, "v": CACHE_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def compute_ranges(model_path: Union[str, os.PathLike], batches: Batches, method: str = DEFAULT_METHOD, *,
                   fingerprint: Optional[str] = None, cache_dir: Union[str, os.PathLike, None, bool] = None,
                   percentile: float = DEFAULT_PERCENTILE, num_bins: int = 2048, entropy_bins: int = 512,
                   num_quantized_bins: int = 128,
                   op_types: Optional[Sequence[str]] = None, chunk_images: int = CHUNK_IMAGES,
                   providers: Optional[Sequence[str]] = None) -> Ranges:
    """Ranges of every float tensor of ``model_path`` (an FP32 ONNX file) over ``batches``.

    ``batches``: float32 N×C×H×W arrays in model space (e.g. ``CalibrationSet.iter_batches("calib")``), or a
    callable returning them (only called on a cache miss). ``fingerprint`` identifies the calibration data
    (``CalibrationSet.fingerprint()``); with it the result is cached under ``cache_dir`` (default
    ``$EDGECNN_CACHE/ranges``; ``False`` disables the cache). Nothing is written to the current directory.
    Entropy uses ``entropy_bins`` histogram bins (onnxruntime's default of 128 equals ``num_quantized_bins``,
    which makes its KL search return the full range, i.e. minmax; TensorRT uses 2048, slower in Python).
    """
    method = (method or DEFAULT_METHOD).strip().lower()
    if method not in METHODS:
        raise CalibrationError(f"unknown calibration method {method!r}", hint="use one of: " + ", ".join(METHODS))
    options = {"percentile": percentile} if method == "percentile" else {}
    if method == "mse":
        options = {"num_bins": num_bins}
    if method == "entropy":
        options = {"num_bins": entropy_bins, "num_quantized_bins": num_quantized_bins}
    if op_types:
        options["op_types"] = sorted(op_types)
    path = None
    key = ""
    if fingerprint and cache_dir is not False:
        key = cache_key(model_path, fingerprint, method, options)
        path = Path(cache_dir if cache_dir else default_ranges_cache_dir()) / f"{key}.json"
        if path.is_file():
            try:
                cached = Ranges.from_json(path.read_text())
                cached.cache_hit, cached.seconds = True, 0.0
                return cached
            except (OSError, ValueError, KeyError):
                pass  # a damaged entry is recomputed
    t0 = time.perf_counter()
    source = batches() if callable(batches) else batches
    ranges, images = _calibrate(os.fspath(model_path), source, method, percentile=percentile,
                                num_bins=entropy_bins if method == "entropy" else num_bins, num_quantized_bins=num_quantized_bins, op_types=op_types,
                                chunk_images=chunk_images, providers=providers)
    result = Ranges(method=method, ranges=ranges, images=images, seconds=time.perf_counter() - t0, key=key,
                    options=options)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(result.to_json())
            os.replace(tmp, path)
        except OSError:
            pass  # the cache is an optimisation; a read-only home must not fail the export
    return result


# ------------------------------------------------------------------------------------------ internals
def _chunks(batches: Iterable[np.ndarray], images: int) -> Iterator[List[np.ndarray]]:
    """Group batches into lists of about ``images`` images (one collect_data call each)."""
    chunk: List[np.ndarray] = []
    n = 0
    for b in batches:
        b = np.asarray(b, dtype=np.float32)
        if b.ndim == 3:
            b = b[None]
        chunk.append(b)
        n += len(b)
        if n >= images:
            yield chunk
            chunk, n = [], 0
    if chunk:
        yield chunk


def _calibrate(model_path: str, batches: Iterable[np.ndarray], method: str, *, percentile: float, num_bins: int,
               num_quantized_bins: int, op_types, chunk_images: int, providers) -> Tuple[Dict[str, Tuple[float, float]], int]:
    import onnx
    from onnxruntime.quantization.calibrate import CalibrationMethod, create_calibrator

    input_name = onnx.load(model_path, load_external_data=False).graph.input[0].name
    ort_method, extra = {
        "minmax": (CalibrationMethod.MinMax, {}),
        "percentile": (CalibrationMethod.Percentile, {"percentile": percentile, "num_bins": num_bins, "symmetric": False}),
        "entropy": (CalibrationMethod.Entropy, {"num_bins": num_bins, "num_quantized_bins": num_quantized_bins,
                                                "symmetric": False}),
        # mse: onnxruntime collects the value histograms (percentile collector, asymmetric); we pick the ranges
        "mse": (CalibrationMethod.Percentile, {"percentile": 100.0, "num_bins": num_bins, "symmetric": False}),
    }[method]
    images = 0
    with tempfile.TemporaryDirectory(prefix="edgecnn-calib-") as tmp, contextlib.redirect_stdout(io.StringIO()):
        try:
            calibrator = create_calibrator(Path(model_path), list(op_types) if op_types else None,
                                           augmented_model_path=os.path.join(tmp, "augmented_model.onnx"),
                                           calibrate_method=ort_method, providers=list(providers or ["CPUExecutionProvider"]),
                                           extra_options=extra)
        except Exception as exc:  # onnxruntime raises many types for a model it cannot augment
            raise CalibrationError(f"{model_path}: cannot prepare the model for calibration ({_first_line(exc)})",
                                   path=model_path) from exc
        for chunk in _chunks(batches, chunk_images):
            images += sum(len(b) for b in chunk)
            calibrator.collect_data(BatchReader(input_name, chunk))
        if images == 0:
            raise CalibrationError("no calibration images to compute ranges from",
                                   hint="check the calibration folder (every image may have been skipped)")
        if method == "mse":
            ranges = _mse_ranges(calibrator.collector.histogram_dict)
        elif method == "minmax":
            ranges = {k: _pair(v.range_value) for k, v in calibrator.compute_data().items()}
        else:
            hists = calibrator.collector.histogram_dict
            ranges = {}
            for k, v in calibrator.compute_data().items():
                lo, hi = _pair(v.range_value)
                if k in hists:  # clamp to what was observed (entropy thresholds are symmetric by construction)
                    lo, hi = max(lo, float(hists[k][2])), min(hi, float(hists[k][3]))
                ranges[k] = (lo, hi)
        del calibrator
    return ranges, images


def _pair(v) -> Tuple[float, float]:
    return float(np.asarray(v[0]).reshape(-1)[0]), float(np.asarray(v[1]).reshape(-1)[0])


def _mse_ranges(histograms: dict, levels: int = 255, steps: int = 64) -> Dict[str, Tuple[float, float]]:
    """Per tensor, the clipping range [lo, hi] that minimises the expected squared error of an asymmetric
    8-bit quantizer over the tensor's value histogram. Candidates shrink the observed range from each side
    (grid search over ``steps`` fractions per side, then a joint refinement). Error model: uniform rounding
    noise step²/12 inside the range, squared distance to the clip bound outside it."""
    out = {}
    fractions = np.linspace(0.05, 1.0, steps)
    for name, (hist, edges, vmin, vmax, *_rest) in histograms.items():
        hist = np.asarray(hist, dtype=np.float64)
        edges = np.asarray(edges, dtype=np.float64)
        vmin, vmax = float(vmin), float(vmax)
        total = hist.sum()
        if total <= 0 or vmax - vmin <= 0:
            out[name] = (vmin, vmax)
            continue
        centers = (edges[:-1] + edges[1:]) / 2
        p = hist / total

        def err(lo: float, hi: float) -> float:
            step = (hi - lo) / levels
            clipped = np.where(centers > hi, (centers - hi) ** 2, np.where(centers < lo, (lo - centers) ** 2, step * step / 12))
            return float((p * clipped).sum())

        best = (err(vmin, vmax), vmin, vmax)
        # shrink toward the value the quantizer keeps exact (0 when the range spans it, else the near end)
        anchor = 0.0 if vmin <= 0.0 <= vmax else (vmin if vmin > 0 else vmax)
        for f in fractions:  # shrink both sides together, then each side on its own around the best
            lo, hi = anchor + (vmin - anchor) * f, anchor + (vmax - anchor) * f
            e = err(lo, hi)
            if e < best[0]:
                best = (e, lo, hi)
        _, blo, bhi = best
        for f in fractions:
            for lo, hi in ((anchor + (vmin - anchor) * f, bhi), (blo, anchor + (vmax - anchor) * f)):
                if hi - lo <= 0:
                    continue
                e = err(lo, hi)
                if e < best[0]:
                    best = (e, lo, hi)
        out[name] = (float(best[1]), float(best[2]))
    return out


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]
