"""The child side of a matrix cell: one fresh process per cell runs ``edgecnn.pipeline.export`` and sends
back a small message. A fresh process per cell gives each cell a clean torch state and memory (so its
peak RSS can be measured and learned), and lets the parent attribute a crash (segfault, OOM kill) to
exactly one cell — a shared pool breaks every pending task when one worker dies.

Imports nothing heavy at module level: the spawn start method imports this module in the child
before anything is configured (thread counts must be set before torch is imported).
"""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_cell(conn, job: dict) -> None:
    """Entry point in the child. ``job["kind"]`` "export" (arch, target, precision, weights, calib, out,
    options (dict), strict_calib, lock_timeout, timing_dir) or "time" (bundle, timing_dir, threads, seed);
    both: threads (torch intra-op), log (path)."""
    t0 = time.perf_counter()
    fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    threads = str(max(1, int(job.get("threads", 1))))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = threads
    signal.signal(signal.SIGTERM, _raise_interrupt)   # unwinds like Ctrl-C: staging folders are removed
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent decides what Ctrl-C means for its cells
    msg = {"kind": "error", "family": "error", "exit_code": 1, "reason": "no result"}
    try:
        msg = _time(job) if job.get("kind") == "time" else _run(job, int(threads))
    except KeyboardInterrupt:
        msg = {"kind": "interrupted", "family": "interrupted", "exit_code": 130, "reason": "interrupted"}
    except BaseException as exc:  # a bug: full traceback in the cell's log, one line to the parent
        traceback.print_exc()
        first = " ".join(ln.strip() for ln in str(exc).splitlines() if ln.strip())
        first = first if len(first) <= 240 else first[:240] + "…"
        msg = {"kind": "error", "family": "error", "exit_code": 1,
               "reason": f"unexpected {type(exc).__name__}: {first} (traceback in {job['log']})"}
    finally:
        msg["seconds"] = time.perf_counter() - t0
        msg["peak_rss_mb"] = _peak_rss_mb()
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            conn.send(msg)
        finally:
            conn.close()


def _run(job: dict, threads: int) -> dict:
    import logging

    import torch

    torch.set_num_threads(threads)
    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")

    from calibration import CalibrationError
    from exporters import ExportError

    from .. import artefact
    from ..errors import EdgeError
    from ..options import ExportOptions
    from ..pipeline import export

    options = ExportOptions.from_dict(job["options"])
    print(f"matrix cell {job['arch']} {job['target']} {job['precision']} (weights {job['weights']}, "
          f"{threads} torch thread(s))", flush=True)
    try:
        result = export(job["arch"], job["target"], job["precision"], job["weights"], job.get("calib"), job["out"],
                        options=options, strict_calib=bool(job.get("strict_calib")),
                        lock_timeout=float(job.get("lock_timeout", 600.0)), timing_dir=job.get("timing_dir"),
                        eval_set=job.get("eval"))
    except EdgeError as exc:
        print(exc.one_line(), flush=True)
        msg = {"kind": "error", "family": exc.family, "exit_code": exc.exit_code, "reason": _reason(exc)}
        failed = artefact.bundle_dir(job["out"], job["arch"], job["target"], job["precision"])
        failed = failed.with_name(failed.name + ".failed")
        if exc.family == "gate" and (failed / artefact.MANIFEST).exists():
            msg["bundle"] = str(failed)
            msg["manifest_sha"] = artefact.sha256_file(failed / artefact.MANIFEST)
        return msg
    except ExportError as exc:
        return {"kind": "error", "family": "toolchain", "exit_code": 7, "reason": _reason(exc)}
    except CalibrationError as exc:
        return {"kind": "error", "family": "input", "exit_code": 3, "reason": _reason(exc)}
    print(result.summary(), flush=True)
    return {"kind": "done", "status": result.status, "bundle": str(result.path),
            "manifest_sha": artefact.sha256_file(result.path / artefact.MANIFEST)}


def _time(job: dict) -> dict:
    """The timing phase of one built cell: latency (and INT8 vs FP32 side by side) written into its manifest."""
    import logging

    from .. import artefact
    from ..errors import EdgeError
    from ..pipeline import time_bundle

    logging.basicConfig(level=logging.WARNING, format="warning: %(message)s")
    print(f"matrix timing of {job['bundle']}", flush=True)
    try:
        manifest = time_bundle(job["bundle"], job["timing_dir"], threads=int(job.get("threads", 1)),
                               seed=int(job.get("seed", 0)))
    except EdgeError as exc:
        print(exc.one_line(), flush=True)
        return {"kind": "error", "family": exc.family, "exit_code": exc.exit_code, "reason": _reason(exc)}
    return {"kind": "done", "status": manifest["status"], "bundle": job["bundle"],
            "manifest_sha": artefact.sha256_file(f"{job['bundle']}/{artefact.MANIFEST}")}


def _reason(exc) -> str:
    text = getattr(exc, "message", None) or str(exc)
    hint = getattr(exc, "hint", "")
    return f"{text} — {hint}" if hint else text


def _peak_rss_mb() -> float:
    try:
        import resource

        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return round(kb / 1024.0 if sys.platform != "darwin" else kb / 1024.0 / 1024.0, 1)
    except Exception:
        return 0.0
