"""A matrix run from start to end: plan -> reuse what is unchanged -> run the rest in parallel -> read
each cell's manifest -> speed-ups -> scorecard -> report -> one summary line."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .. import artefact
from ..errors import EdgeError, Interrupted
from ..options import ExportOptions
from ..versions import edgecnn_version, toolchain
from . import plan as plan_mod
from . import scorecard as sc
from . import state
from .display import Display
from .plan import Cell
from .results import CellResult, error_result, from_manifest
from .scheduler import Outcome, Scheduler, _Interrupted



@dataclass
class MatrixConfig:
    archs: Sequence[str] = plan_mod.DEFAULT_ARCHS
    targets: Sequence[str] = plan_mod.DEFAULT_TARGETS
    precisions: Sequence[str] = plan_mod.DEFAULT_PRECISIONS
    weights: str = "auto"
    calib: Optional[str] = None
    eval_set: Optional[str] = None              # evaluation images of the user's own (default: held out of calib)
    out: str = "artefacts"
    options: ExportOptions = field(default_factory=ExportOptions)
    strict_calib: bool = False
    lock_timeout: float = 600.0
    jobs: Optional[int] = None                  # default: the cores this process may use
    mem_budget_mb: Optional[float] = None       # cap on the summed estimates of running cells
    cell_timeout: float = 3600.0                # seconds; 0 = none
    force: bool = False                         # rebuild every cell even if unchanged
    retry_failed: bool = False                  # rebuild failed cells even if their failure is settled
    report_dir: Optional[str] = "reports"       # a matrix-<time>/ folder is made inside; None = no report
    scorecard: Optional[str] = "benchmarks/scorecard.json"   # None = do not compare
    update_scorecard: bool = False
    results_doc: Optional[str] = None           # also write the cell table there (docs/results/matrix.md)
    sensitivity_arch: Optional[str] = None
    quiet: bool = False


@dataclass
class MatrixRun:
    config: MatrixConfig
    results: List[CellResult]
    started: str
    wall_seconds: float
    jobs: int
    comparison: sc.Comparison
    scorecard_update: Optional[Dict[str, List[str]]] = None
    report: Dict[str, str] = field(default_factory=dict)
    run_dir: Optional[Path] = None
    interrupted: bool = False
    deferred_for_memory: int = 0
    timed: int = 0                      # cells timed in the timing phase, one after another

    def counts(self) -> Dict[str, int]:
        c = {"validated": 0, "pending": 0, "failed": 0, "reused": 0, "ran": 0}
        for r in self.results:
            c[r.status] = c.get(r.status, 0) + 1
            if r.outcome == "reused":
                c["reused"] += 1
            elif r.outcome != "refused":
                c["ran"] += 1
        return c

    def summary_line(self) -> str:
        c = self.counts()
        regress = len(self.comparison.regressions)
        score = ("scorecard: not compared" if self.comparison.path is None else
                 f"scorecard: {len(self.scorecard_update['updated'])} cell(s) updated" if self.scorecard_update else
                 f"scorecard: no file at {self.comparison.path}" if self.comparison.missing_file else
                 f"scorecard: {regress} regression(s)" if regress else "scorecard: ok")
        refused = sum(1 for r in self.results if r.outcome == "refused")
        return (f"matrix: {len(self.results)} cells in {_fmt_duration(self.wall_seconds)} — ✅ {c['validated']} validated, "
                f"⏳ {c['pending']} pending, ❌ {c['failed']} failed"
                + (f" ({refused} refused before running)" if refused else "") + f"; {c['reused']} reused unchanged, "
                f"{c['ran']} run; {score}" + ("; INTERRUPTED" if self.interrupted else ""))


def _fmt_duration(s: float) -> str:
    m, sec = divmod(int(round(s)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s" if m else f"{s:.1f}s"


def run_matrix(cfg: MatrixConfig) -> MatrixRun:
    """Plan -> reuse what is unchanged -> build the rest in parallel -> time them one after another -> score ->
    report. Raises ``Interrupted`` (after writing a partial report) on Ctrl-C."""
    t0 = time.perf_counter()
    started = _dt.datetime.now().astimezone()
    out = Path(cfg.out)
    jobs = int(cfg.jobs or plan_mod.default_jobs())
    cells = _plan(cfg, out)
    run_dir = _new_run_dir(cfg, started)
    log_dir = (run_dir or out / state.STATE_DIR) / "logs"
    results: Dict[str, CellResult] = {}
    with Display(len(cells), quiet=cfg.quiet) as display:
        display.note(f"matrix: {len(cells)} cells ({len(plan_mod.split_names(cfg.archs))} archs x "
                     f"{len(plan_mod.split_names(cfg.targets))} targets x {len(plan_mod.split_names(cfg.precisions))} "
                     f"precisions), weights {cfg.weights}, {jobs} at a time, artefacts in {out}")
        to_run = _reuse_or_queue(cfg, out, cells, results, display)
        interrupted, deferred = _build_phase(cfg, out, jobs, to_run, results, log_dir, display)
        timings = 0
        if not interrupted:
            try:
                timings = _timing_phase(cfg, out, cells, results, log_dir, display)
            except _Interrupted:
                interrupted = True
    ordered = sorted(results.values(), key=lambda r: r.order)
    add_speedups(ordered)
    comparison = sc.compare(ordered, Path(cfg.scorecard)) if cfg.scorecard else sc.Comparison(None)
    for r in ordered:
        v = comparison.verdicts.get(r.id)
        if v is not None:
            r.scorecard = v.state
    run = MatrixRun(cfg, ordered, started.isoformat(timespec="seconds"), time.perf_counter() - t0, jobs, comparison,
                    run_dir=run_dir, interrupted=interrupted, deferred_for_memory=deferred, timed=timings)
    _write_outputs(cfg, run)
    if interrupted:
        raise Interrupted("the matrix was interrupted" + (f"; partial report in {run_dir}" if run_dir else ""),
                          hint="run it again: finished cells are reused")
    return run


def _plan(cfg: MatrixConfig, out: Path) -> List[Cell]:
    """The cells with their input keys (an unusable calibration set or scorecard fails the whole run now, not
    after an hour of exports)."""
    cells = plan_mod.expand(plan_mod.split_names(cfg.archs), plan_mod.split_names(cfg.targets),
                            plan_mod.split_names(cfg.precisions))
    if not cells:
        from ..errors import UsageError

        raise UsageError("the matrix is empty", hint="give at least one arch, target and precision")
    if cfg.scorecard and Path(cfg.scorecard).exists():
        sc.load(Path(cfg.scorecard))
    calib_fp = plan_mod.CalibrationFingerprints(cfg.calib, cfg.options, cfg.strict_calib, cfg.eval_set)
    export_args = {"strict_calib": cfg.strict_calib, "calib": str(cfg.calib) if cfg.calib else None,
                   "eval": str(cfg.eval_set) if cfg.eval_set else None}
    for cell in cells:
        if cell.error is None:
            cell.key = plan_mod.input_key(cell, weights=cfg.weights, calib_fp=calib_fp, options=cfg.options,
                                          extra=export_args)
            cell.key_sha = plan_mod.key_sha(cell.key)
            learned = state.last_peak_rss(out, cell)
            if learned:
                cell.mem_mb = learned * 1.1
    return cells


def _new_run_dir(cfg: MatrixConfig, started) -> Optional[Path]:
    if not cfg.report_dir:
        return None
    stamp = started.strftime("%Y%m%d-%H%M%S")
    run_dir, n = Path(cfg.report_dir) / f"matrix-{stamp}", 1
    while run_dir.exists():
        n += 1
        run_dir = Path(cfg.report_dir) / f"matrix-{stamp}-{n}"
    run_dir.mkdir(parents=True)
    return run_dir


def _reuse_or_queue(cfg: MatrixConfig, out: Path, cells: List[Cell], results: Dict[str, CellResult],
                    display: Display) -> List[Cell]:
    """Record refused and reusable cells; return the cells to build."""
    to_run = []
    for cell in cells:
        if cell.error is not None:
            r = error_result(cell.arch, cell.target, cell.precision, outcome="refused", reason=_reason(cell.error),
                             family=cell.error.family, exit_code=cell.error.exit_code, order=cell.order)
        else:
            r = None if cfg.force else state.reusable(out, cell, failures=not cfg.retry_failed)
            if r is None:
                to_run.append(cell)
                continue
            r.order = cell.order
        results[cell.id] = r
        display.finish(r)
    return to_run


def _build_phase(cfg: MatrixConfig, out: Path, jobs: int, to_run: List[Cell], results: Dict[str, CellResult],
                 log_dir: Path, display: Display) -> tuple:
    """Build and check ``to_run`` in parallel (latency deferred to the timing phase); returns (interrupted,
    times a cell waited for memory)."""
    def make_job(cell: Cell, log: Path) -> dict:
        return {"kind": "export", "arch": cell.arch, "target": cell.target, "precision": cell.precision,
                "weights": cfg.weights, "calib": cfg.calib, "eval": cfg.eval_set, "out": str(out),
                "options": cfg.options.to_dict(), "strict_calib": cfg.strict_calib, "lock_timeout": cfg.lock_timeout,
                "threads": max(1, plan_mod.default_jobs() // max(1, min(jobs, len(to_run)))),
                "timing_dir": str(state.timing_dir(out, cell)) if cfg.options.latency else None, "log": str(log)}

    def on_done(o: Outcome) -> None:
        r = _collect(o, out)
        results[o.cell.id] = r
        display.finish(r)

    sched = Scheduler(jobs, make_job=make_job, log_dir=log_dir, mem_budget_mb=cfg.mem_budget_mb,
                      cell_timeout=cfg.cell_timeout, on_start=display.start, on_stage=display.stage, on_done=on_done)
    try:
        sched.run(to_run)
    except _Interrupted as exc:
        for o in exc.outcomes:
            if o.cell.id not in results:
                on_done(o)
        for cell in to_run:
            if cell.id not in results:
                results[cell.id] = error_result(cell.arch, cell.target, cell.precision, outcome="interrupted",
                                                reason="not run: the matrix was interrupted",
                                                family="interrupted", exit_code=130, order=cell.order)
        return True, sched.deferred_for_memory
    return False, sched.deferred_for_memory


def _write_outputs(cfg: MatrixConfig, run: MatrixRun) -> None:
    """The scorecard update, the report folder and the docs table, as configured."""
    from . import report

    if cfg.update_scorecard and cfg.scorecard and not run.interrupted:
        run.scorecard_update = sc.update(run.results, Path(cfg.scorecard))
    if run.run_dir is not None:
        run.report = report.write(run, run.run_dir, run_info(run))
        _point_latest(run.run_dir)
    if cfg.results_doc and not run.interrupted:
        run.report["results_doc"] = str(report.write_results_doc(run, Path(cfg.results_doc)))


def _timing_phase(cfg: MatrixConfig, out: Path, cells: List[Cell], results: Dict[str, CellResult], log_dir: Path,
                  display: Display) -> int:
    """Time every validated cell whose latency is still deferred, one after another, each in a fresh process
    (a scheduler of one job): no cell is timed while another one runs. Returns the cells timed."""
    todo = [c for c in cells if c.id in results and results[c.id].status == "validated"
            and results[c.id].latency_deferred]
    if not todo:
        return 0
    display.note(f"matrix: timing {len(todo)} cell(s) one after another")

    def make_job(cell: Cell, log: Path) -> dict:
        return {"kind": "time", "bundle": results[cell.id].bundle, "timing_dir": str(state.timing_dir(out, cell)),
                "threads": cfg.options.threads, "seed": cfg.options.seed, "log": str(log)}

    def on_done(o: Outcome) -> None:
        previous = results[o.cell.id]
        if o.message.get("kind") != "done":
            previous.notes.append(f"not timed: {o.message.get('reason', 'failed')}")
            return
        manifest = artefact.verify(previous.bundle)
        r = from_manifest(manifest, Path(previous.bundle), outcome=previous.outcome, seconds=previous.seconds + o.seconds,
                          order=o.cell.order, log=previous.log, peak_rss_mb=previous.peak_rss_mb)
        r.notes = list(dict.fromkeys(previous.notes + r.notes))
        results[o.cell.id] = r
        state.save(out, o.cell, r, o.message.get("manifest_sha"))
        display.finish(r)

    sched = Scheduler(1, make_job=make_job, log_dir=log_dir / "timing", cell_timeout=cfg.cell_timeout,
                      on_start=display.start, on_stage=display.stage, on_done=on_done)
    sched.run(todo)
    return len(todo)


def _reason(exc: EdgeError) -> str:
    return f"{exc.message} — {exc.hint}" if exc.hint else exc.message


def _collect(o: Outcome, out: Path) -> CellResult:
    """Turn a worker's message into the cell's result, and remember settled results for reuse."""
    cell, msg = o.cell, o.message
    peak = msg.get("peak_rss_mb")
    bundle = msg.get("bundle")
    if bundle:
        try:
            manifest = artefact.verify(bundle)
        except EdgeError as exc:
            return error_result(cell.arch, cell.target, cell.precision, outcome="error", reason=_reason(exc),
                                family=exc.family, exit_code=exc.exit_code, seconds=o.seconds, order=cell.order,
                                log=str(o.log), peak_rss_mb=peak)
        is_error = msg.get("kind") != "done"
        r = from_manifest(manifest, Path(bundle), outcome="built", seconds=o.seconds, order=cell.order, log=str(o.log),
                          peak_rss_mb=peak, reason=msg.get("reason", "") if is_error else "",
                          error_family=msg.get("family", "") if is_error else "",
                          exit_code=int(msg.get("exit_code", 0)) if is_error else 0)
        drift = _prediction_drift(cell, manifest)
        if drift:
            r.notes.append(f"not reusable next time: {drift}")
            state.forget(out, cell)
        else:
            state.save(out, cell, r, msg.get("manifest_sha"))
        return r
    family = msg.get("family", "error")
    r = error_result(cell.arch, cell.target, cell.precision, outcome="error" if family != "crash" else "crashed",
                     reason=msg.get("reason", "failed"), family=family, exit_code=int(msg.get("exit_code", 1)),
                     seconds=o.seconds, order=cell.order, log=str(o.log), peak_rss_mb=peak)
    if family in state.SETTLED_FAMILIES:
        state.save(out, cell, r, None)
    return r


def _prediction_drift(cell: Cell, manifest: dict) -> str:
    """Did the export use the weights and calibration set the input key predicted? If not, its key cannot
    vouch for it, and the cell must not be reused."""
    want_w = cell.key.get("weights") or {}
    got_w = manifest.get("weights") or {}
    if want_w.get("sha256") and want_w.get("sha256") != got_w.get("sha256"):
        return f"weights sha256 {str(got_w.get('sha256'))[:12]} differs from the predicted {str(want_w['sha256'])[:12]}"
    if not str(want_w.get("source", "")).startswith("checkpoint:") and want_w.get("source") != got_w.get("source"):
        return f"weights {got_w.get('source')} differ from the predicted {want_w.get('source')}"
    fp = (manifest.get("calibration") or {}).get("fingerprint")
    if fp and fp != cell.key.get("calibration"):
        return "calibration fingerprint differs from the predicted one"
    return ""


def add_speedups(results: List[CellResult]) -> None:
    """Speed-up vs FP32 of the same arch and target (batch-1 p50). A ratio the export measured side by side
    is kept as is; otherwise it is the ratio of the two cells' own measurements, labelled as such."""
    fp32 = {(r.arch, r.target): r for r in results if r.precision == "fp32" and r.latency.get("p50_ms")}
    for r in results:
        if r.speedup_vs_fp32 is not None or not r.latency.get("p50_ms"):
            continue
        base = fp32.get((r.arch, r.target))
        if base is None:
            continue
        r.speedup_vs_fp32 = round(float(base.latency["p50_ms"]) / float(r.latency["p50_ms"]), 3)
        r.speedup_source = "baseline" if r is base else "separate cells"


def _point_latest(run_dir: Path) -> None:
    link = run_dir.parent / "latest"
    try:
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(run_dir.name, target_is_directory=True)
    except OSError:
        pass


def machine() -> dict:
    from ..validate.latency import machine_description

    d = machine_description()
    d["memory_gb"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30, 1) \
        if hasattr(os, "sysconf") else None
    d["node"] = platform.node()
    return d


def run_info(run: MatrixRun) -> dict:
    cfg = run.config
    return {"started": run.started, "wall_seconds": round(run.wall_seconds, 1), "jobs": run.jobs,
            "archs": plan_mod.split_names(cfg.archs), "targets": plan_mod.split_names(cfg.targets),
            "precisions": plan_mod.split_names(cfg.precisions), "weights": cfg.weights,
            "calib": cfg.calib or "bundled sample photos", "out": str(cfg.out), "options": cfg.options.to_dict(),
            "edgecnn_version": edgecnn_version(), "toolchain": toolchain(), "machine": machine(),
            "deferred_for_memory": run.deferred_for_memory, "timed_one_after_another": run.timed,
            "summary": run.summary_line(),
            "scorecard": str(cfg.scorecard) if cfg.scorecard else None}
