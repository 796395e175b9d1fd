"""``edgecnn matrix``: export, validate and score every arch x target x precision, with a report.

Exit codes: 0 when no scored cell regressed (failed cells are shown as ❌ in the report and the summary;
``--strict`` makes any failed cell fail the command), 5 (gate family) on a scorecard regression — the
message names each regressed cell and its numbers — and the usual families for errors of the whole run.
"""
from __future__ import annotations

from ..matrix.defaults import DEFAULT_ARCHS, DEFAULT_PRECISIONS, DEFAULT_TARGETS
from .options import EPILOG, add_export_options, options_from_args


def register(sub) -> dict:
    import argparse

    p = sub.add_parser("matrix", help="export + validate + score every arch x target x precision, with a report",
                       description="Runs the export pipeline for every cell of ARCHS x TARGETS x PRECISIONS in "
                                   "parallel, reuses cells whose inputs are unchanged, compares with the scorecard "
                                   "and writes report.md / report.html.", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", "-a", nargs="+", default=None,
                   help=f"architectures, space or comma separated (default: the focus nets: {', '.join(DEFAULT_ARCHS)})")
    p.add_argument("--targets", "-t", nargs="+", default=None,
                   help=f"targets (default: all: {', '.join(DEFAULT_TARGETS)})")
    p.add_argument("--precisions", "-p", nargs="+", default=None,
                   help=f"precisions (default: {', '.join(DEFAULT_PRECISIONS)})")
    p.add_argument("--weights", "-w", default="auto", help="auto | imagenet | none | <checkpoint> (default auto)")
    p.add_argument("--calib", default=None, help="calibration images (default: the bundled sample photos)")
    p.add_argument("--eval", default=None, help="evaluation images of your own (see `edgecnn export --help`)")
    p.add_argument("--out", "-o", default="artefacts", help="artefact root folder (default ./artefacts)")
    p.add_argument("--report-dir", default="reports",
                   help="where the run's report folder (matrix-<time>/) goes (default ./reports; 'latest' links it)")
    p.add_argument("--no-report", action="store_true", help="write no report files")
    p.add_argument("--results-doc", default=None, metavar="FILE.md",
                   help="also write the cell table, with commit, date and machine, to FILE.md "
                        "(make matrix: docs/results/matrix.md)")
    p.add_argument("--scorecard", default="benchmarks/scorecard.json",
                   help="expected numbers per cell to compare with (default benchmarks/scorecard.json)")
    p.add_argument("--no-scorecard", action="store_true", help="do not compare with a scorecard")
    p.add_argument("--update-scorecard", action="store_true",
                   help="accept this run's numbers into the scorecard (failed cells never replace an entry)")
    p.add_argument("--jobs", "-j", type=int, default=None, help="cells at once (default: the CPU cores)")
    p.add_argument("--mem-budget-gb", type=float, default=None,
                   help="cap on the summed memory estimates of running cells (default: what is free)")
    p.add_argument("--cell-timeout", type=float, default=3600.0, help="seconds before a cell is stopped (0 = none)")
    p.add_argument("--force", action="store_true", help="rebuild every cell, even unchanged ones")
    p.add_argument("--retry-failed", action="store_true",
                   help="rebuild failed cells too (by default a failure with unchanged inputs is reused)")
    p.add_argument("--strict", action="store_true", help="exit non-zero when any cell failed, scored or not")
    p.add_argument("--sensitivity-arch", default=None, help="arch whose per-layer INT8 sensitivity is plotted "
                                                            "(default: the first INT8 cell that has one)")
    p.add_argument("--strict-calib", action="store_true", help="fail a cell on an unreadable calibration image")
    add_export_options(p)
    p.add_argument("--quiet", "-q", action="store_true", help="no progress display (the summary line still prints)")
    return {"matrix": _cmd_matrix}


def _cmd_matrix(args) -> int:
    from ..errors import GateFailed, UsageError
    from ..matrix.run import MatrixConfig, run_matrix

    if args.jobs is not None and args.jobs < 1:
        raise UsageError(f"--jobs must be at least 1 (got {args.jobs})")
    options = options_from_args(args)
    if args.update_scorecard and args.no_scorecard:
        raise UsageError("--update-scorecard and --no-scorecard contradict each other")
    cfg = MatrixConfig(archs=args.archs or DEFAULT_ARCHS, targets=args.targets or DEFAULT_TARGETS,
                       precisions=args.precisions or DEFAULT_PRECISIONS, weights=args.weights, calib=args.calib,
                       eval_set=args.eval,
                       out=args.out, options=options, strict_calib=args.strict_calib, jobs=args.jobs,
                       mem_budget_mb=args.mem_budget_gb * 1024 if args.mem_budget_gb else None,
                       cell_timeout=args.cell_timeout, force=args.force, retry_failed=args.retry_failed,
                       report_dir=None if args.no_report else args.report_dir,
                       scorecard=None if args.no_scorecard else args.scorecard,
                       update_scorecard=args.update_scorecard, results_doc=args.results_doc,
                       sensitivity_arch=args.sensitivity_arch,
                       quiet=args.quiet)
    run = run_matrix(cfg)
    if run.report.get("markdown"):
        print(f"report: {run.report['markdown']}  {run.report['html']}")
    if run.report.get("results_doc"):
        print(f"results table: {run.report['results_doc']}")
    upd = run.scorecard_update
    if upd is not None:
        print(f"scorecard {cfg.scorecard}: {len(upd['updated'])} cell(s) updated"
              + (f"; kept the entries of failed cells {', '.join(upd['kept'])}" if upd["kept"] else ""))
        if run.comparison.regressions:   # say what was accepted, so an update never hides a regression
            print(f"accepted worse numbers: {run.comparison.message()}")
    print(run.summary_line())
    regressions = run.comparison.regressions
    if regressions and not args.update_scorecard:
        raise GateFailed(f"scorecard regression in {len(regressions)} cell(s): {run.comparison.message()}",
                         hint=f"fix the cause, or accept the new numbers with --update-scorecard ({cfg.scorecard})")
    failed = [r for r in run.results if r.status == "failed"]
    if args.strict and failed:
        raise GateFailed(f"{len(failed)} cell(s) failed: " + "; ".join(f"{r.id}: {r.reason}" for r in failed[:5])
                         + (" …" if len(failed) > 5 else ""))
    return 0
