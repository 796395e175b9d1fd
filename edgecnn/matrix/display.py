"""Progress of a whole matrix run with rich: one bar for the run, one live row per running cell (its
current pipeline stage and elapsed time), and a permanent line per finished cell with its timing.
On a non-terminal (CI logs) rich draws no live rows; the per-cell lines still appear."""
from __future__ import annotations

from typing import Dict, Optional

from rich.console import Console
from rich.progress import BarColumn, Progress, SpinnerColumn, TaskID, TextColumn, TimeElapsedColumn

from .results import CellResult


def cell_line(r: CellResult) -> str:
    how = {"reused": "unchanged, reused", "refused": "refused before running"}.get(r.outcome, f"{r.seconds:.1f} s")
    bits = [f"{r.icon} {r.id:<42} {r.status:<9} ({how})"]
    if r.status == "failed" or r.status == "pending":
        bits.append(f"— {r.reason}")
    else:
        if r.latency.get("p50_ms") is not None:
            bits.append(f"p50 {r.latency['p50_ms']:.2f} ms")
        if r.parity.get("top1_agreement") is not None:
            bits.append(f"agree {r.parity['top1_agreement']:.1%}")
        if r.model_bytes:
            bits.append(f"{r.model_bytes / 1e6:.2f} MB")
    return "  ".join(bits)


class Display:
    def __init__(self, total: int, *, quiet: bool = False, console: Optional[Console] = None):
        self.quiet = quiet
        self.console = console or Console(stderr=True, highlight=False)
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=24),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=self.console,
                                 disable=quiet, transient=True)
        self.total, self.done = total, 0
        self.overall = self.progress.add_task("matrix", total=total, info=f"0/{total} cells")
        self.cells: Dict[str, TaskID] = {}

    def __enter__(self) -> "Display":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, cell) -> None:
        self.cells[cell.id] = self.progress.add_task(f"  {cell.id}", total=None, info="starting")

    def stage(self, cell, text: str, elapsed: float) -> None:
        task = self.cells.get(cell.id)
        if task is not None:
            self.progress.update(task, info=(text[:70] + "…") if len(text) > 71 else text)

    def finish(self, r: CellResult) -> None:
        task = self.cells.pop(r.id, None)
        if task is not None:
            self.progress.remove_task(task)
        self.done += 1
        self.progress.update(self.overall, completed=self.done, info=f"{self.done}/{self.total} cells")
        if not self.quiet:
            self.progress.console.print(cell_line(r), markup=False, highlight=False, soft_wrap=True)

    def note(self, text: str) -> None:
        if not self.quiet:
            self.progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
