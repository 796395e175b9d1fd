"""The scorecard: the expected status, parity/agreement and size of each matrix cell, kept in the repo
(``benchmarks/scorecard.json``) so a matrix run is a gate a CI can run: a cell worse than its expectation
beyond tolerance fails the command, naming the cell and the numbers. ``--update-scorecard`` accepts the
numbers of a run (keeping any per-cell tolerance someone tuned by hand).

Scored per cell: status (validated > pending > failed), top-1 agreement, top-5 overlap and cosine
(absolute drops), SQNR (dB drop, compared up to 60 dB — beyond that both are "numerically identical"
and the digits are rounding noise), max relative error (ratio, with a 1e-5 floor for the same reason)
and model size (ratio). Latency is not scored: on a shared machine it is too noisy to gate on.

A cell is compared only against an entry made with the same weights source (random-init numbers say
nothing about pretrained ones and vice versa); otherwise it is reported as unscored.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ..errors import InputError
from ..versions import edgecnn_version
from .results import CellResult

SCHEMA_VERSION = 1
DEFAULT_TOLERANCE = {
    "top1_agreement": 0.02,        # absolute drop (2 of 96 held-out images)
    "top5_overlap": 0.02,          # absolute drop
    "cosine": 0.001,               # absolute drop
    "sqnr_db": 3.0,                # dB drop
    "max_rel_error_ratio": 10.0,   # new may be at most 10x the expected (floored at 1e-5)
    "size_ratio": 1.05,            # model file at most 5% larger
}
SQNR_CAP_DB = 60.0
REL_ERROR_FLOOR = 1e-5
STATUS_RANK = {"failed": 0, "pending": 1, "validated": 2}
METRICS = ("top1_agreement", "top5_overlap", "cosine", "sqnr_db", "max_rel_error")


@dataclass
class Verdict:
    cell: str
    state: str                                   # ok | regression | improved | unscored
    problems: List[str] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)


@dataclass
class Comparison:
    path: Optional[Path]
    verdicts: Dict[str, Verdict] = field(default_factory=dict)
    missing_file: bool = False

    @property
    def regressions(self) -> List[Verdict]:
        return [v for v in self.verdicts.values() if v.state == "regression"]

    def counts(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for v in self.verdicts.values():
            out[v.state] = out.get(v.state, 0) + 1
        return out

    def message(self) -> str:
        return "; ".join(f"{v.cell}: {', '.join(v.problems)}" for v in self.regressions)


def load(path: Path) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read scorecard {path} ({exc.strerror})") from None
    except ValueError as exc:
        raise InputError(f"scorecard {path} is not valid JSON ({exc})", hint="fix it, or recreate it with "
                         "--update-scorecard") from None
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION or \
            not isinstance(data.get("cells", {}), dict):
        raise InputError(f"scorecard {path} has an unknown layout (schema_version {data.get('schema_version')!r}, "
                         f"expected {SCHEMA_VERSION})", hint="recreate it with --update-scorecard")
    return data


def _metrics(r: CellResult) -> Dict[str, float]:
    out = {}
    for k in METRICS:
        v = r.parity.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = float(v)
    return out


def compare(results: List[CellResult], path: Optional[Path]) -> Comparison:
    if path is None:
        return Comparison(None)
    path = Path(path)
    if not path.exists():
        return Comparison(path, {r.id: Verdict(r.id, "unscored", notes=["no scorecard file"]) for r in results},
                          missing_file=True)
    data = load(path)
    default_tol = {**DEFAULT_TOLERANCE, **(data.get("tolerance") or {})}
    comp = Comparison(path)
    for r in results:
        exp = data["cells"].get(r.id)
        if exp is None:
            comp.verdicts[r.id] = Verdict(r.id, "unscored", notes=["not in the scorecard"])
            continue
        if exp.get("weights") and r.weights_source and exp["weights"] != r.weights_source:
            comp.verdicts[r.id] = Verdict(r.id, "unscored", notes=[
                f"scorecard entry is for weights {exp['weights']}, this run used {r.weights_source}"])
            continue
        comp.verdicts[r.id] = judge(r, exp, {**default_tol, **(exp.get("tolerance") or {})})
    return comp


def judge(r: CellResult, exp: dict, tol: dict) -> Verdict:
    v = Verdict(r.id, "ok")
    better = []
    want, got = exp.get("status", "validated"), r.status
    if STATUS_RANK.get(got, 0) < STATUS_RANK.get(want, 2):
        v.problems.append(f"status {got} (expected {want})" + (f": {r.reason}" if r.reason else ""))
    elif STATUS_RANK.get(got, 0) > STATUS_RANK.get(want, 2):
        better.append(f"status {got} (scorecard: {want})")
    m = _metrics(r)
    for k in ("top1_agreement", "top5_overlap", "cosine"):
        if k in exp and k in m:
            if m[k] < exp[k] - tol[k]:
                v.problems.append(f"{k} {m[k]:.4f} < {exp[k]:.4f} - {tol[k]:g}")
            elif m[k] > exp[k] + tol[k]:
                better.append(f"{k} {m[k]:.4f} (scorecard {exp[k]:.4f})")
    if "sqnr_db" in exp and "sqnr_db" in m:
        new, old = min(m["sqnr_db"], SQNR_CAP_DB), min(float(exp["sqnr_db"]), SQNR_CAP_DB)
        if new < old - tol["sqnr_db"]:
            v.problems.append(f"sqnr_db {m['sqnr_db']:.1f} < {exp['sqnr_db']:.1f} - {tol['sqnr_db']:g} dB")
        elif new > old + tol["sqnr_db"]:
            better.append(f"sqnr_db {m['sqnr_db']:.1f} (scorecard {exp['sqnr_db']:.1f})")
    if "max_rel_error" in exp and "max_rel_error" in m:
        limit = max(float(exp["max_rel_error"]), REL_ERROR_FLOOR) * tol["max_rel_error_ratio"]
        if m["max_rel_error"] > limit:
            v.problems.append(f"max_rel_error {m['max_rel_error']:.3g} > {exp['max_rel_error']:.3g} x "
                              f"{tol['max_rel_error_ratio']:g}")
    if exp.get("model_bytes") and r.model_bytes:
        if r.model_bytes > exp["model_bytes"] * tol["size_ratio"]:
            v.problems.append(f"model size {r.model_bytes / 1e6:.3f} MB > {exp['model_bytes'] / 1e6:.3f} MB x "
                              f"{tol['size_ratio']:g}")
        elif r.model_bytes < exp["model_bytes"] / tol["size_ratio"]:
            better.append(f"model size {r.model_bytes / 1e6:.3f} MB (scorecard {exp['model_bytes'] / 1e6:.3f} MB)")
    if v.problems:
        v.state = "regression"
    elif better:
        v.state = "improved"
        v.notes.append("better than the scorecard: " + ", ".join(better) + " (accept with --update-scorecard)")
    return v


def update(results: List[CellResult], path: Path) -> Dict[str, List[str]]:
    """Write the run's numbers for every cell that did not fail; returns {"updated": [...], "kept": [...]}.
    A failed cell never replaces its entry: accepting a failure would silently weaken the gate."""
    path = Path(path)
    data = load(path) if path.exists() else {
        "schema_version": SCHEMA_VERSION,
        "about": "Expected status, parity and model size per `edgecnn matrix` cell (arch/target/precision). "
                 "The matrix fails when a cell is worse than this beyond tolerance. Accept new numbers with "
                 "`edgecnn matrix ... --update-scorecard`; per-cell \"tolerance\" overrides are kept.",
        "tolerance": dict(DEFAULT_TOLERANCE), "cells": {}}
    today = _dt.date.today().isoformat()
    done: Dict[str, List[str]] = {"updated": [], "kept": []}
    for r in sorted(results, key=lambda x: x.id):
        if r.status == "failed":
            if r.id in data["cells"]:
                done["kept"].append(r.id)
            continue
        old = data["cells"].get(r.id, {})
        entry = {"status": r.status, "weights": r.weights_source}
        for k, val in _metrics(r).items():
            if math.isfinite(val):
                entry[k] = val
            elif k == "sqnr_db":
                entry[k] = 999.0  # identical outputs: infinite SQNR, stored as a JSON number
        if r.model_bytes:
            entry["model_bytes"] = int(r.model_bytes)
        entry["updated"] = f"{today} (edgecnn {edgecnn_version()})"
        if "tolerance" in old:
            entry["tolerance"] = old["tolerance"]
        data["cells"][r.id] = entry
        done["updated"].append(r.id)
    data["cells"] = dict(sorted(data["cells"].items()))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return done
