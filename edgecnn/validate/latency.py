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
    with exclusive_timing():
        return _time_runs(fn, batch, warmup=warmup, min_runs=min_runs, min_seconds=min_seconds,
                          max_seconds=max_seconds, max_runs=max_runs)


def _time_runs(fn: Callable[[], object], batch: int, *, warmup: int, min_runs: int, min_seconds: float,
               max_seconds: float, max_runs: int) -> Latency:
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


_timing_guard: Optional[Callable[[], "contextlib.AbstractContextManager"]] = None


def set_timing_guard(factory: Optional[Callable[[], "contextlib.AbstractContextManager"]]) -> None:
    """Install a context-manager factory that every latency measurement runs inside.

    ``edgecnn matrix`` runs several exports at once; its worker processes install a guard that asks the
    matrix for an exclusive timing slot, and the matrix pauses the other cells until the timing is done,
    so no cell's latency is measured while another cell competes for the CPU. None (a plain
    ``edgecnn export``): no guard. Guards must be reentrant: ``measure_latency`` holds one slot for both
    of its timings and ``time_runs`` (also used directly, e.g. for side-by-side ratios) enters it again.
    """
    global _timing_guard
    _timing_guard = factory


def exclusive_timing() -> "contextlib.AbstractContextManager":
    return _timing_guard() if _timing_guard is not None else contextlib.nullcontext()


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
