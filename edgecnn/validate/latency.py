"""Latency measured where the artefact runs: warm-up, then enough timed runs for stable percentiles.

Time-boxed rather than count-boxed, because these machines are shared: at least ``min_runs`` and
``min_seconds``, at most ``max_seconds``. Batch 1 for latency, a larger batch for throughput.
"""
from __future__ import annotations

import contextlib
import os
import platform
import time
from dataclasses import asdict, dataclass
from typing import Callable, Optional

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


@contextlib.contextmanager
def exclusive_timing():
    """Hold an exclusive lock on the file named by ``EDGECNN_LATENCY_LOCK`` (if set) while timing.

    ``edgecnn matrix`` runs several exports at once; with this, no two of them time their models at the
    same moment (each would slow the other down). Unset (a plain ``edgecnn export``): no lock.
    """
    path = os.environ.get("EDGECNN_LATENCY_LOCK")
    if not path:
        yield
        return
    import fcntl

    with open(path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


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
