"""What makes a matrix run resumable: after each cell, a small record of its input key and of the exact
manifest it produced, at ``<out>/.matrix/<arch>/<target>-<precision>.json``.

A cell is reused only when (1) its input key is unchanged, (2) its bundle is where it was and still
verifies (every file's sha256 against its manifest) and (3) that manifest is byte-for-byte the one this
record saw. So a bundle re-exported by hand with other options, tampered with, or deleted is rebuilt.

Failures are reused only when they are settled for these inputs (which include the code and toolchain
versions): a parity gate failure (its ``.failed`` bundle verifies), a usage, input or toolchain error, or
an unexpected exception (a bug: the same code on the same inputs fails the same way). Crashes (a signal,
e.g. the OOM killer), timeouts, interruptions and output errors (disk full, lock held) may be transient
and are always retried; ``--retry-failed`` retries every failed cell.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from .. import artefact
from ..errors import EdgeError
from .plan import Cell
from .results import CellResult, from_manifest

STATE_DIR = ".matrix"
SETTLED_FAMILIES = ("gate", "usage", "input", "toolchain", "error")


def timing_dir(out: Path, cell: Cell) -> Path:
    """Where a cell's export leaves the files its timing needs (the FP32 model an INT8 one is timed against)."""
    return Path(out) / STATE_DIR / "timing" / cell.arch / f"{cell.target}-{cell.precision}"


def state_path(out: Path, cell: Cell) -> Path:
    return Path(out) / STATE_DIR / cell.arch / f"{cell.target}-{cell.precision}.json"


def load(out: Path, cell: Cell) -> Optional[dict]:
    path = state_path(out, cell)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def save(out: Path, cell: Cell, result: CellResult, manifest_sha: Optional[str]) -> None:
    path = state_path(out, cell)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"key_sha": cell.key_sha, "key": cell.key, "manifest_sha256": manifest_sha, "result": result.to_dict()}
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def forget(out: Path, cell: Cell) -> None:
    try:
        state_path(out, cell).unlink()
    except FileNotFoundError:
        pass


def reusable(out: Path, cell: Cell, *, failures: bool = True) -> Optional[CellResult]:
    """The earlier result of ``cell`` if it may stand for this run (see module docstring), else None.
    ``failures=False``: only successes are reused (failed cells are retried)."""
    rec = load(out, cell)
    if not rec or rec.get("key_sha") != cell.key_sha or not cell.key_sha:
        return None
    previous = CellResult.from_dict(rec.get("result") or {})
    if previous.status == "failed" and (not failures or previous.error_family not in SETTLED_FAMILIES):
        return None
    if previous.status == "failed" and not previous.bundle:
        previous.outcome, previous.seconds = "reused", 0.0
        return previous
    bundle = Path(previous.bundle) if previous.bundle else None
    if bundle is None or not bundle.is_dir():
        return None
    try:
        manifest = artefact.verify(bundle)
    except EdgeError:
        return None
    if artefact.sha256_file(bundle / artefact.MANIFEST) != rec.get("manifest_sha256"):
        return None
    result = from_manifest(manifest, bundle, outcome="reused", seconds=0.0, order=cell.order, log=previous.log,
                           peak_rss_mb=previous.peak_rss_mb, reason=previous.reason if previous.status == "failed" else "",
                           error_family=previous.error_family, exit_code=previous.exit_code)
    result.notes = list(dict.fromkeys(previous.notes + result.notes))
    return result


def last_peak_rss(out: Path, cell: Cell) -> Optional[float]:
    """The cell's measured peak memory from its last run (any inputs): a better estimate than a guess."""
    rec = load(out, cell)
    try:
        v = (rec or {}).get("result", {}).get("peak_rss_mb")
        return float(v) if v else None
    except (TypeError, ValueError):
        return None
