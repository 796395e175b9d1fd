"""The matrix report: ``report.md`` (for a README or a PR), a self-contained ``report.html`` (plots
embedded as base64 PNG, no external files or scripts), ``results.json`` (machine-readable), and the
PNG plots, all in one run folder.

What is shown is what each artefact's manifest says; the report adds only the speed-up ratios and
the scorecard verdicts, and says how each was obtained.
"""
from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from .results import CellResult

PRECISION_ORDER = ("fp32", "fp16", "int8", "int8-weights")
MARKERS = {"fp32": "o", "fp16": "s", "int8": "^", "int8-weights": "D"}
SCORE_ICON = {"ok": "ok", "regression": "REGRESSION", "improved": "improved", "unscored": "—", "": "—"}


# ------------------------------------------------------------------------------------------- formatting
def _num(v, fmt: str, dash: str = "—") -> str:
    if v is None or isinstance(v, bool):
        return dash
    try:
        f = float(v)
    except (TypeError, ValueError):
        return dash
    if math.isinf(f):
        return "∞"
    return format(f, fmt)


def _pct(v) -> str:
    return "—" if v is None or isinstance(v, bool) else f"{float(v) * 100:.1f}%"


def _mb(b) -> str:
    return "—" if not b else f"{b / 1e6:.2f}"


def _weights(r: CellResult) -> str:
    if r.weights_source is None:
        return "—"
    if r.pretrained is False:
        return "random†"
    return r.weights_source.split(":", 1)[0] if ":" in r.weights_source else r.weights_source


def _speedup(r: CellResult) -> str:
    if r.speedup_vs_fp32 is None:
        return "—"
    mark = {"side by side (export)": "", "separate cells": "‡", "baseline": ""}.get(r.speedup_source, "")
    return f"{r.speedup_vs_fp32:.2f}×{mark}"


def _status(r: CellResult) -> str:
    word = {"validated": "validated", "pending": "pending on device", "failed": "failed"}[r.status]
    return f"{r.icon} {word}" + (" (reused)" if r.outcome == "reused" else "")


HEADERS = ("arch", "target", "precision", "status", "weights", "size MB", "max rel err", "cosine", "SQNR dB",
           "top-1 agree", "top-5 overlap", "p50 ms", "p90 ms", "speed-up vs FP32", "time s", "scorecard", "reason / note")


def row(r: CellResult) -> Tuple[str, ...]:
    p, lat = r.parity, r.latency
    note = r.reason if r.status != "validated" else (r.latency_note or "")
    if r.parity_source:
        note += ("; " if note else "") + f"parity §: {r.parity_source}"
    if r.checks:
        note += ("; " if note else "") + "local checks: " + ", ".join(
            f"{c['name']} {'PASS' if c['passed'] else 'FAIL'}" for c in r.checks)
    time_s = "—" if r.outcome == "refused" else (f"{r.export_seconds:.1f}" if r.outcome == "reused" and r.export_seconds
                                                 else f"{r.seconds:.1f}")
    return (r.arch, r.target, r.precision, _status(r), _weights(r), _mb(r.model_bytes),
            _num(p.get("max_rel_error"), ".1e"), _num(p.get("cosine"), ".5f"), _num(p.get("sqnr_db"), ".1f"),
            _pct(p.get("top1_agreement")), _pct(p.get("top5_overlap")),
            _num(lat.get("p50_ms"), ".2f"), _num(lat.get("p90_ms"), ".2f"), _speedup(r), time_s,
            SCORE_ICON.get(r.scorecard, r.scorecard), note)


def markdown_table(results: List[CellResult]) -> str:
    def esc(s: str) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "|".join("---" for _ in HEADERS) + "|"]
    lines += ["| " + " | ".join(esc(c) for c in row(r)) + " |" for r in results]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _arch_colors(archs: List[str]) -> Dict[str, tuple]:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if len(archs) <= 10 else "tab20")
    return {a: cmap(i % cmap.N) for i, a in enumerate(archs)}


def plot_latency_vs_agreement(results: List[CellResult], path: Path) -> Optional[str]:
    pts = [r for r in results if r.latency.get("p50_ms") and r.parity.get("top1_agreement") is not None]
    if not pts:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    tgts = list(dict.fromkeys(r.target for r in pts))
    archs = list(dict.fromkeys(r.arch for r in results))
    colors = _arch_colors(archs)
    fig, axes = plt.subplots(1, len(tgts), figsize=(6.2 * len(tgts), 4.8), squeeze=False)
    for ax, tgt in zip(axes[0], tgts):
        sub = [r for r in pts if r.target == tgt]
        for r in sub:
            ax.scatter(r.latency["p50_ms"], r.parity["top1_agreement"] * 100, s=70, c=[colors[r.arch]],
                       marker=MARKERS.get(r.precision, "x"), edgecolors="black", linewidths=0.6, zorder=3)
        for arch in dict.fromkeys(r.arch for r in sub):   # connect an arch's precisions: the trade-off line
            line = sorted((r for r in sub if r.arch == arch), key=lambda r: r.latency["p50_ms"])
            if len(line) > 1:
                ax.plot([r.latency["p50_ms"] for r in line], [r.parity["top1_agreement"] * 100 for r in line],
                        color=colors[arch], alpha=0.5, lw=1, zorder=2)
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        runtime = next((r.latency.get("runtime") for r in sub if r.latency.get("runtime")), "")
        ax.set_title(f"{tgt} ({runtime}, batch 1)" if runtime else tgt)
        ax.set_xlabel("latency p50 (ms, log scale) — lower is better")
        ax.set_ylabel("top-1 agreement with PyTorch FP32 (%)")
        lo = min(r.parity["top1_agreement"] * 100 for r in sub)
        ax.set_ylim(max(0.0, min(lo - 2.0, 95.0)), 100.8)
        ax.grid(True, which="both", alpha=0.3)
    arch_handles = [Line2D([], [], marker="o", ls="", color=colors[a], markeredgecolor="black", label=a)
                    for a in archs if any(r.arch == a for r in pts)]
    prec_handles = [Line2D([], [], marker=MARKERS.get(p, "x"), ls="", color="grey", label=p)
                    for p in PRECISION_ORDER if any(r.precision == p for r in pts)]
    fig.legend(handles=arch_handles + prec_handles, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=9)
    title = "Latency vs top-1 agreement per arch and target"
    if any(r.pretrained is False for r in pts):
        title += "\n(random-init weights among these: their agreement is a structural check, not accuracy)"
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def plot_size(results: List[CellResult], path: Path) -> Optional[str]:
    pts = [r for r in results if r.model_bytes and r.status != "failed"]   # a failed bundle is no artefact
    if not pts:
        return None
    plt = _plt()
    import numpy as np

    tgts = list(dict.fromkeys(r.target for r in pts))
    fig, axes = plt.subplots(len(tgts), 1, figsize=(max(7.0, 1.3 * len({r.arch for r in pts}) + 3), 3.6 * len(tgts)),
                             squeeze=False)
    for ax, tgt in zip(axes[:, 0], tgts):
        sub = [r for r in pts if r.target == tgt]
        archs = list(dict.fromkeys(r.arch for r in sub))
        precs = [p for p in PRECISION_ORDER if any(r.precision == p for r in sub)] + \
            sorted({r.precision for r in sub} - set(PRECISION_ORDER))
        width = 0.8 / max(1, len(precs))
        x = np.arange(len(archs))
        cmap = plt.get_cmap("viridis")
        for i, p in enumerate(precs):
            vals = [next((r.model_bytes / 1e6 for r in sub if r.arch == a and r.precision == p), 0.0) for a in archs]
            bars = ax.bar(x + (i - (len(precs) - 1) / 2) * width, vals, width, label=p,
                          color=cmap(0.15 + 0.7 * i / max(1, len(precs) - 1)))
            for b, v in zip(bars, vals):
                if v:
                    ax.annotate(f"{v:.2f}" if v < 10 else f"{v:.1f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=7)
        ax.set_xticks(x)
        ax.set_xticklabels(archs, rotation=20, ha="right", fontsize=9)
        ax.set_ylabel("model file (MB)")
        ax.set_title(f"{tgt}: model size per precision")
        ax.legend(fontsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def choose_sensitivity(results: List[CellResult], arch: Optional[str]) -> Tuple[Optional[CellResult], str]:
    """The INT8 cell whose per-layer sensitivity to plot (the chosen arch, ONNX first), or why there is none."""
    int8 = [r for r in results if r.precision == "int8" and (arch is None or r.arch == arch)]
    with_list = [r for r in int8 if r.sensitivity and r.sensitivity.get("layers")]
    if with_list:
        with_list.sort(key=lambda r: (r.target != "onnx", r.order))
        return with_list[0], ""
    who = f"arch {arch}" if arch else "any arch"
    if not int8:
        return None, f"no INT8 cell for {who} in this run"
    built = [r for r in int8 if r.bundle]
    if not built:
        return None, f"no INT8 artefact for {who} was built in this run ({int8[0].reason or int8[0].status})"
    for r in built:
        note = next((n for n in r.notes if n.startswith("INT8 sensitivity:")), None)
        if note:
            return None, f"{r.id}: {note[len('INT8 sensitivity: '):]}"
    keys = ", ".join(built[0].recipe_keys) or "none"
    return None, (f"the INT8 manifest of {built[0].id} carries no per-layer sensitivity list under recipe "
                  f"(recipe keys: {keys})")


def plot_sensitivity(r: CellResult, path: Path, top: int = 30) -> str:
    plt = _plt()
    sens = r.sensitivity
    worse_high = sens.get("higher_is_worse", True)
    layers = sorted(sens["layers"], key=lambda x: x["value"], reverse=worse_high)[:top]
    layers = layers[::-1]   # worst at the top of a horizontal bar chart
    fig, ax = plt.subplots(figsize=(8.5, max(3.0, 0.28 * len(layers) + 1.4)))
    colors = ["#d62728" if x.get("float") else "#1f77b4" for x in layers]
    ax.barh([x["layer"] for x in layers], [x["value"] for x in layers], color=colors)
    ax.set_xlabel(f"{sens['metric']} as the INT8 recipe reports it ({'higher' if worse_high else 'lower'} = more "
                  "sensitive)")
    vals = [x["value"] for x in layers]
    lo, hi = min(vals), max(vals)
    if lo > 0 and hi > lo and (hi - lo) < 0.5 * hi:   # small differences on a large offset: zoom in
        ax.set_xlim(left=lo - 0.15 * (hi - lo), right=hi + 0.05 * (hi - lo))
    ax.tick_params(axis="y", labelsize=7)
    n = len(sens["layers"])
    ax.set_title(f"{r.arch} {r.target} INT8: per-layer sensitivity ({min(top, n)} most sensitive of {n})"
                 + ("\nred: kept in floating point by the fallback" if any(x.get("float") for x in layers) else ""),
                 fontsize=10)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


# --------------------------------------------------------------------------------------------- writing
def write(run, run_dir: Path, info: dict) -> Dict[str, str]:
    """report.md, report.html and results.json of ``run`` (a ``MatrixRun``) into ``run_dir``; ``info``: the
    run's configuration and machine (``run.run_info``)."""
    run_dir = Path(run_dir)
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(parents=True, exist_ok=True)
    results = run.results
    plots: List[Tuple[str, str, str]] = []      # (title, path, caption)
    notes: List[str] = []

    p = plot_latency_vs_agreement(results, plots_dir / "latency_vs_agreement.png")
    if p:
        plots.append(("Latency vs top-1 agreement", p, "Each point is a cell; one panel per target, colour = arch, "
                      "marker = precision; lines join the precisions of one arch."))
    else:
        notes.append("Latency vs agreement: no cell has both a latency and an agreement measurement in this run.")
    p = plot_size(results, plots_dir / "size_per_precision.png")
    if p:
        plots.append(("Model size per precision", p, "Size of the file each target runs (model_file in the manifest; a Core ML .mlpackage "
                      "counts all its files); for TensorRT, the ONNX the engine is built from on the device. "
                      "Failed cells are left out."))
    else:
        notes.append("Model size: no artefact was produced in this run.")
    chosen, why = choose_sensitivity(results, run.config.sensitivity_arch)
    if chosen is not None:
        p = plot_sensitivity(chosen, plots_dir / f"int8_sensitivity_{chosen.arch}.png")
        plots.append((f"Per-layer INT8 sensitivity: {chosen.arch} ({chosen.target})", p,
                      f"From the manifest's {chosen.sensitivity.get('source')}, metric {chosen.sensitivity['metric']}."))
    else:
        notes.append(f"Per-layer INT8 sensitivity: not plotted — {why}.")

    (run_dir / "results.json").write_text(json.dumps({"run": info, "cells": [r.to_dict() for r in results],
                                                      "scorecard": _scorecard_dict(run)}, indent=2, default=str)
                                          + "\n", encoding="utf-8")
    md = render_markdown(run, info, plots, notes, run_dir)
    (run_dir / "report.md").write_text(md, encoding="utf-8")
    page = render_html(run, info, plots, notes)
    (run_dir / "report.html").write_text(page, encoding="utf-8")
    return {"markdown": str(run_dir / "report.md"), "html": str(run_dir / "report.html"),
            "json": str(run_dir / "results.json"), **{f"plot:{Path(p).stem}": p for _, p, _ in plots}}


def _scorecard_dict(run) -> dict:
    c = run.comparison
    return {"file": str(c.path) if c.path else None, "missing_file": c.missing_file, "counts": c.counts(),
            "regressions": {v.cell: v.problems for v in c.regressions},
            "notes": {k: v.notes for k, v in c.verdicts.items() if v.notes},
            "update": run.scorecard_update}


def write_results_doc(run, path: Path) -> Path:
    """The run's cell table as ``path`` (``docs/results/matrix.md`` from ``make matrix``), with what it was
    measured at, so the supported-matrix table in the docs is the one this run measured."""
    from ..versions import provenance

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "\n".join([
        "# Supported matrix, measured", "",
        f"Measured by `edgecnn matrix` — {provenance()}. Written by the matrix run; do not edit by hand.", "",
        f"**{run.summary_line()}**", "", *[f"- {ln}" for ln in _legend_lines(run)], "", markdown_table(run.results),
        ""])
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path


def _machine_line(info: dict) -> str:
    m = info["machine"]
    return (f"{m.get('cpu', '?')}, {m.get('logical_cores', '?')} logical cores, {m.get('memory_gb', '?')} GB RAM, "
            f"{m.get('system', '')} {m.get('machine', '')}, Python {m.get('python', '')}; ISA {', '.join(m.get('isa', []))}; "
            f"load average (1 min) at the end: {m.get('load_avg_1m', '?')}")


def _legend_lines(run) -> List[str]:
    lines = [
        "✅ validated: parity gate passed on this machine's runtime; ⏳ pending on device: built here, to be "
        "validated where its runtime exists (e.g. a Jetson for TensorRT); ❌ failed, with the reason.",
        "Parity is measured on held-out real images (never the calibration images) against the PyTorch FP32 "
        "reference; † random-init weights: numeric parity is real, agreement/accuracy mean little.",
        "Latency: batch 1, on each artefact's runtime (threads as in the options). The matrix builds and checks "
        f"{run.jobs} cells at a time, then times the cells one after another, so no cell is timed while another "
        "runs; other users of a shared machine still add noise (see the load average above).",
        "Speed-up vs FP32 = FP32 p50 / this p50 for the same arch and target; ‡ = from two separate cells' "
        "measurements (not side by side); no mark = measured side by side in one export.",
        "Time s: wall time of the cell in this run (for reused cells, the original export time).",
        "Parity § (pending cells): numbers of a local stand-in named in the note — for a TensorRT INT8 bundle, "
        "onnxruntime running the very Q/DQ model TensorRT will build from — not of the device runtime.",
    ]
    return lines


def notes_list(results: List[CellResult]) -> List[str]:
    """Per-cell notes, with the same note on many cells said once (e.g. random-init weights)."""
    by_note: Dict[str, List[str]] = {}
    for r in results:
        for n in r.notes:
            by_note.setdefault(n, []).append(r.id)
    return [f"{n}: {', '.join(ids)}" if len(ids) > 1 else f"{ids[0]}: {n}" for n, ids in by_note.items()]


def render_markdown(run, info: dict, plots, notes, run_dir: Path) -> str:
    out = [f"# edgecnn export matrix — {info['started']}", "", f"**{run.summary_line()}**", "",
           f"- machine: {_machine_line(info)}",
           f"- edgecnn {info['edgecnn_version']}; " + ", ".join(f"{k} {v}" for k, v in info["toolchain"].items()),
           f"- weights `{info['weights']}`, calibration: {info['calib']}, {info['jobs']} cells at a time, "
           f"artefacts in `{info['out']}`", ""]
    regs = run.comparison.regressions
    if regs:
        out += ["## Scorecard regressions", ""] + [f"- **{v.cell}**: {'; '.join(v.problems)}" for v in regs] + [""]
    out += ["## Cells", "", markdown_table(run.results), ""]
    out += [f"- {ln}" for ln in _legend_lines(run)] + [""]
    issues = [r for r in run.results if r.status != "validated"]
    if issues:
        out += ["## Failed and pending cells", ""]
        out += [f"- {r.icon} `{r.id}`: {r.reason}" + (f" (log: `{r.log}`)" if r.log and r.status == "failed"
                                                       and r.log not in r.reason else "")
                for r in issues] + [""]
    if plots or notes:
        out += ["## Plots", ""]
        for title, path, caption in plots:
            out += [f"### {title}", "", f"![{title}]({Path(path).relative_to(run_dir).as_posix()})", "", caption, ""]
        out += [f"- {n}" for n in notes] + ([""] if notes else [])
    extra = notes_list(run.results)
    if extra:
        out += ["## Notes", ""] + [f"- {n}" for n in extra] + [""]
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:24px;color:#222}
h1{font-size:1.4em} h2{font-size:1.15em;margin-top:1.6em}
table{border-collapse:collapse;font-size:12px} th,td{border:1px solid #ccc;padding:3px 6px;text-align:right}
th{background:#f2f2f2;position:sticky;top:0} td.l{text-align:left}
tr.validated td.s{background:#e6f4ea} tr.pending td.s{background:#fff6d5} tr.failed td.s{background:#fde2e1}
td.REGRESSION{background:#fde2e1;font-weight:bold} .sum{font-weight:bold;margin:.6em 0}
.reg{background:#fde2e1;padding:6px 10px;border-left:4px solid #d62728} img{max-width:100%;border:1px solid #ddd}
.small{font-size:12px;color:#555}
"""


def render_html(run, info: dict, plots, notes) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>edgecnn matrix {e(info['started'])}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>edgecnn export matrix — {e(info['started'])}</h1>", f"<div class='sum'>{e(run.summary_line())}</div>",
             "<ul class='small'>", f"<li>machine: {e(_machine_line(info))}</li>",
             f"<li>edgecnn {e(info['edgecnn_version'])}; "
             + e(", ".join(f"{k} {v}" for k, v in info["toolchain"].items())) + "</li>",
             f"<li>weights <code>{e(info['weights'])}</code>, calibration: {e(str(info['calib']))}, "
             f"{info['jobs']} cells at a time, artefacts in <code>{e(info['out'])}</code></li></ul>"]
    regs = run.comparison.regressions
    if regs:
        parts.append("<h2>Scorecard regressions</h2><div class='reg'><ul>" +
                     "".join(f"<li><b>{e(v.cell)}</b>: {e('; '.join(v.problems))}</li>" for v in regs) + "</ul></div>")
    parts.append("<h2>Cells</h2><table><thead><tr>" + "".join(f"<th>{e(h)}</th>" for h in HEADERS) + "</tr></thead><tbody>")
    left = {0, 1, 2, 3, 4, 15, 16}
    for r in run.results:
        cells = row(r)
        tds = []
        for i, c in enumerate(cells):
            cls = ["l"] if i in left else []
            if i == 3:
                cls.append("s")
            if i == 15 and c == "REGRESSION":
                cls.append("REGRESSION")
            tds.append(f"<td class='{' '.join(cls)}'>{e(c)}</td>")
        parts.append(f"<tr class='{e(r.status)}'>" + "".join(tds) + "</tr>")
    parts.append("</tbody></table><ul class='small'>" + "".join(f"<li>{e(ln)}</li>" for ln in _legend_lines(run))
                 + "</ul>")
    if plots or notes:
        parts.append("<h2>Plots</h2>")
        for title, path, caption in plots:
            data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
            parts.append(f"<h3>{e(title)}</h3><img alt='{e(title)}' src='data:image/png;base64,{data}'>"
                         f"<p class='small'>{e(caption)}</p>")
        if notes:
            parts.append("<ul class='small'>" + "".join(f"<li>{e(n)}</li>" for n in notes) + "</ul>")
    extra = notes_list(run.results)
    if extra:
        parts.append("<h2>Notes</h2><ul class='small'>" + "".join(f"<li>{e(n)}</li>" for n in extra) + "</ul>")
    parts.append("</body></html>\n")
    return "\n".join(parts)
