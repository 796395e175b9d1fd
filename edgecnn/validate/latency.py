"""Latency measured where the artefact runs: warm-up, then enough timed runs for stable percentiles.

Time-boxed rather than count-boxed, because these machines are shared: at least ``min_runs`` and
``min_seconds``, at most ``max_seconds``. Batch 1 for latency, a larger batch for throughput.
"""
from __future__ import annotations

import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Dict, Sequence

import numpy as np


@dataclass
class Latency:
    batch: int
    runs: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    mean_ms: float
    min_ms: float
    throughput_ips: float  # images per second at this batch (from the median)

    def to_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def time_runs(fn: Callable[[], object], batch: int, *, warmup: int = 5, min_runs: int = 30, min_seconds: float = 1.0,
              max_seconds: float = 8.0, max_runs: int = 2000) -> Latency:
    """Call ``fn`` ``warmup`` times, then time it: at least ``min_runs`` runs and ``min_seconds``, at most
    ``max_seconds`` or ``max_runs``."""
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_runs:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
        elapsed = time.perf_counter() - start
        if (len(times) >= min_runs and elapsed >= min_seconds) or elapsed >= max_seconds:
            break
    a = np.asarray(times)
    p50 = float(np.percentile(a, 50))
    return Latency(batch=batch, runs=len(a), p50_ms=p50, p90_ms=float(np.percentile(a, 90)),
                   p99_ms=float(np.percentile(a, 99)), mean_ms=float(a.mean()), min_ms=float(a.min()),
                   throughput_ips=batch / (p50 / 1000.0) if p50 > 0 else 0.0)


def machine_description() -> dict:
    """What the numbers were measured on: CPU model, cores, relevant ISA flags, load."""
    info = {"system": platform.system(), "machine": platform.machine(), "python": platform.python_version(),
            "cpu": platform.processor() or "", "logical_cores": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        flags = next((ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags")), [])
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
                                   "avx512_fp16") if f in flags]
    except OSError:
        pass
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def measure_latency(runner, input_shape: Sequence[int], *, throughput_batch: int = 8, seed: int = 0,
                    max_seconds: float = 6.0) -> dict:
    """Batch-1 latency and a throughput batch of ``runner``, on random inputs of the model's shape."""
    rng = np.random.default_rng(seed)
    x1 = rng.standard_normal((1, *input_shape)).astype(np.float32)
    xb = rng.standard_normal((throughput_batch, *input_shape)).astype(np.float32)
    one = time_runs(lambda: runner.run(x1), 1, max_seconds=max_seconds)
    many = time_runs(lambda: runner.run(xb), throughput_batch, min_runs=10, max_seconds=max_seconds)
    return {"batch1": one.to_dict(), "throughput": many.to_dict(),
            "load_seconds": round(float(runner.load_seconds), 4), "runtime": runner.describe(),
            "machine": machine_description()}


def alternated(calls: Dict[str, Callable[[], object]], *, seconds: float, min_rounds: int = 30,
               warmup: int = 5) -> Dict[str, float]:
    """Median milliseconds per call of each of ``calls``, timed call by call in alternation (A B B A A B ...:
    neither goes first every time), for at least ``min_rounds`` rounds and ``seconds``, at most 4x that. Load
    and clock changes on a shared machine then hit every model alike, so their ratios hold."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    names = list(calls)
    times: Dict[str, list] = {k: [] for k in names}
    start = time.perf_counter()
    rounds = 0
    while True:
        for k in (names if rounds % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t0)
        rounds += 1
        elapsed = time.perf_counter() - start
        if (rounds >= min_rounds and elapsed >= seconds) or elapsed >= 4 * seconds:
            break
    return {k: float(np.median(v)) * 1000.0 for k, v in times.items()}


def quick_speedup(fp32_path, shape, *, threads: int = 1, seconds: float = 0.6):
    """A callable ``path -> speed-up over FP32`` for the INT8 fallback's speed floor: FP32 and the candidate
    alternated call by call at batch 1 (short: it runs once per kept fallback step; the artefact is timed
    properly by ``side_by_side``)."""
    from exporters.onnx.runner import OnnxRuntimeRunner

    x = np.random.default_rng(0).standard_normal((1, *shape)).astype(np.float32)
    fp32 = OnnxRuntimeRunner(fp32_path, threads=threads)

    def measure(path) -> float:
        with OnnxRuntimeRunner(path, threads=threads) as cand:
            ms = alternated({"fp32": lambda: fp32.run(x), "int8": lambda: cand.run(x)}, seconds=seconds, min_rounds=10)
        return ms["fp32"] / ms["int8"]

    return measure


def side_by_side(fp32_path, int8_path, shape, *, threads: int = 1, seconds: float = 3.0, seed: int = 0,
                 defaults_path=None) -> dict:
    """Batch-1 latency of the FP32 and INT8 ONNX models in one run, alternated call by call (``alternated``);
    the speed-up is the ratio of the medians. ``defaults_path``: the INT8 model without the fallback's float
    layers, timed in the same alternation, so what those layers cost is a measured ratio too."""
    import os

    from exporters.onnx.runner import OnnxRuntimeRunner

    x = np.random.default_rng(seed).standard_normal((1, *shape)).astype(np.float32)
    paths = {"fp32": fp32_path, "int8": int8_path}
    if defaults_path is not None:
        paths["int8_defaults"] = defaults_path
    runners = {k: OnnxRuntimeRunner(p, threads=threads) for k, p in paths.items()}
    try:
        ms = alternated({k: (lambda r=r: r.run(x)) for k, r in runners.items()}, seconds=seconds, min_rounds=50)
    finally:
        for r in runners.values():
            r.close()
    fp32, int8 = ms["fp32"], ms["int8"]
    out = {}
    if defaults_path is not None:
        d = ms["int8_defaults"]
        out = {"int8_without_fallback_p50_ms": round(d, 4), "speedup_without_fallback": round(fp32 / d, 3),
               "fallback_slowdown": round(int8 / d, 3)}
    out.update({"fp32_p50_ms": round(fp32, 4), "int8_p50_ms": round(int8, 4), "speedup_vs_fp32": round(fp32 / int8, 3),
                "threads": threads, "batch": 1, "seconds": seconds,
                "fp32_bytes": os.path.getsize(fp32_path), "int8_bytes": os.path.getsize(int8_path),
                "size_ratio": round(os.path.getsize(int8_path) / os.path.getsize(fp32_path), 3),
                "machine": machine_description(),
                "method": "FP32 and INT8 sessions alternated call by call in one process, median per call"})
    return out
