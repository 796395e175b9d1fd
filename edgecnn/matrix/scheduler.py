"""Runs the matrix's cells in parallel, each in its own fresh process, within what the machine allows.

Rules, checked each time a slot frees up:
- at most ``jobs`` cells at once (default: the CPU cores this process may use);
- never two *heavy* cells at once (INT8 calibration, Core ML conversion, heavy archs): those are the
  ones whose peak memory is large;
- memory: a cell starts only if the memory available now covers its estimated peak plus what the
  running cells may still grow to (estimate - current RSS). Estimates are the cell's peak RSS measured
  last time it ran, else a guess from the arch and precision. With nothing running, a cell always
  starts, so the run always makes progress;
- a cell past ``cell_timeout`` seconds is stopped (SIGTERM, then SIGKILL) and recorded as failed.

Latency is not measured here: the matrix times every built cell afterwards, one after another, with a
scheduler of one job (``edgecnn.matrix.run``), so no cell is timed while another competes for the CPU.

One cell's failure — an error, a crash, a kill by the OOM killer — is recorded for that cell only.
Ctrl-C stops the running cells cleanly (their staging folders are removed) and ends the run.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .plan import Cell

MEM_MARGIN_MB = 512.0


@dataclass
class Running:
    cell: Cell
    process: mp.Process
    conn: object
    started: float
    log: Path
    message: Optional[dict] = None
    stage: str = ""
    killed_for_timeout: bool = False
    term_sent: float = 0.0


@dataclass
class Outcome:
    cell: Cell
    message: dict                      # the worker's message, or one made up for a crash/timeout
    seconds: float
    log: Path


def mem_available_mb() -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2 ** 20
    except (ValueError, OSError, AttributeError):
        return None


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return 0.0


def last_line(path: Path, limit: int = 4096) -> str:
    """The last non-empty line of a cell's log (its current stage), without reading the whole file."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            lines = [ln.strip() for ln in f.read().decode(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    if not lines:
        return ""
    text = lines[-1]
    if text.startswith("[") and "s]" in text[:10]:   # edgecnn.progress prefix "[  1.2s] "
        text = text.split("]", 1)[1].strip()
    return text


class Scheduler:
    def __init__(self, jobs: int, *, make_job: Callable[[Cell, Path], dict], log_dir: Path,
                 mem_budget_mb: Optional[float] = None, cell_timeout: float = 0.0,
                 on_start: Callable[[Cell], None] = lambda c: None,
                 on_stage: Callable[[Cell, str, float], None] = lambda c, s, t: None,
                 on_done: Callable[[Outcome], None] = lambda o: None):
        self.jobs = max(1, int(jobs))
        self.make_job = make_job
        self.log_dir = Path(log_dir)
        self.mem_budget_mb = mem_budget_mb
        self.cell_timeout = float(cell_timeout or 0.0)
        self.on_start, self.on_stage, self.on_done = on_start, on_stage, on_done
        self.ctx = mp.get_context("spawn")   # never fork a process that has torch loaded
        self.running: List[Running] = []
        self.deferred_for_memory = 0         # how often a cell waited for memory (reported)

    # -------------------------------------------------------------------------------------- policy
    def can_start(self, cell: Cell) -> bool:
        if not self.running:
            return True
        if len(self.running) >= self.jobs:
            return False
        if cell.heavy and any(r.cell.heavy for r in self.running):
            return False
        need = cell.mem_mb + sum(max(0.0, r.cell.mem_mb - rss_mb(r.process.pid)) for r in self.running)
        avail = mem_available_mb()
        if avail is not None and avail < need + MEM_MARGIN_MB:
            self.deferred_for_memory += 1
            return False
        if self.mem_budget_mb is not None and \
                cell.mem_mb + sum(r.cell.mem_mb for r in self.running) > self.mem_budget_mb:
            self.deferred_for_memory += 1
            return False
        return True

    # ------------------------------------------------------------------------------------ running
    def run(self, cells: List[Cell]) -> List[Outcome]:
        # heavy first, then the biggest: long cells start early and light ones fill the other slots
        queue = sorted(cells, key=lambda c: (not c.heavy, -c.mem_mb, c.order))
        outcomes: List[Outcome] = []
        try:
            while queue or self.running:
                for cell in list(queue):
                    if len(self.running) >= self.jobs:
                        break
                    if self.can_start(cell):
                        queue.remove(cell)
                        self._start(cell)
                outcomes.extend(self._poll(timeout=0.5))
        except KeyboardInterrupt:
            outcomes.extend(self._stop_all("interrupted"))
            raise _Interrupted(outcomes)
        return outcomes

    def _start(self, cell: Cell) -> None:
        log = self.log_dir / f"{cell.slug}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        parent_conn, child_conn = self.ctx.Pipe(duplex=False)
        from .worker import run_cell

        proc = self.ctx.Process(target=run_cell, args=(child_conn, self.make_job(cell, log)),
                                name=f"edgecnn-matrix-{cell.slug}", daemon=False)
        proc.start()
        child_conn.close()
        self.running.append(Running(cell, proc, parent_conn, time.perf_counter(), log))
        self.on_start(cell)

    def _poll(self, timeout: float) -> List[Outcome]:
        if not self.running:
            return []
        wait([r.conn for r in self.running] + [r.process.sentinel for r in self.running], timeout=timeout)
        done: List[Outcome] = []
        now = time.perf_counter()
        for r in list(self.running):
            if r.message is None and r.conn.poll():
                try:
                    r.message = r.conn.recv()
                except (EOFError, OSError):
                    pass
            if r.message is not None or not r.process.is_alive():
                r.process.join(timeout=30)
                if r.process.is_alive():  # sent its result but hangs on exit
                    r.process.kill()
                    r.process.join()
                msg = r.message or self._death_message(r)
                if r.killed_for_timeout:
                    msg = {"kind": "error", "family": "timeout", "exit_code": 124,
                           "reason": f"stopped after {self.cell_timeout:.0f} s (--cell-timeout)",
                           "peak_rss_mb": msg.get("peak_rss_mb")}
                r.conn.close()
                self.running.remove(r)
                out = Outcome(r.cell, msg, now - r.started, r.log)
                done.append(out)
                self.on_done(out)
                continue
            if self.cell_timeout and now - r.started > self.cell_timeout:
                if not r.killed_for_timeout:
                    r.killed_for_timeout, r.term_sent = True, now
                    r.process.terminate()
                elif now - r.term_sent > 20:
                    r.process.kill()
            r.stage = last_line(r.log)
            self.on_stage(r.cell, r.stage, now - r.started)
        return done

    def _death_message(self, r: Running) -> dict:
        code = r.process.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            why = " (killed: out of memory?)" if -code == signal.SIGKILL else ""
            reason = f"the cell's process died from {name}{why}; see {r.log}"
        else:
            reason = f"the cell's process exited with code {code} without a result; see {r.log}"
        return {"kind": "error", "family": "crash", "exit_code": 1, "reason": reason}

    def _stop_all(self, why: str) -> List[Outcome]:
        for r in self.running:
            if r.process.is_alive():
                r.process.terminate()        # SIGTERM -> KeyboardInterrupt in the child: staging cleaned up
        deadline = time.perf_counter() + 20
        for r in self.running:
            r.process.join(timeout=max(0.1, deadline - time.perf_counter()))
            if r.process.is_alive():
                r.process.kill()
                r.process.join()
        outs = []
        now = time.perf_counter()
        for r in list(self.running):
            msg = {"kind": "interrupted", "family": "interrupted", "exit_code": 130, "reason": why}
            r.conn.close()
            outs.append(Outcome(r.cell, msg, now - r.started, r.log))
        self.running.clear()
        return outs


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during the run, carrying the outcomes gathered so far (so a partial report can be written)."""

    def __init__(self, outcomes: List[Outcome]):
        super().__init__("interrupted")
        self.outcomes = outcomes
