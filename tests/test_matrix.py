"""`edgecnn matrix`: a small real matrix (lenet5 + squeezenet1_1, random init, real torch/onnxruntime in
real worker processes) with a deliberately broken cell; resume; scorecard gate; report files.

The matrix run is shared by the module (about a minute on 2 busy cores); each test reads its outputs or
runs the matrix again (the reruns reuse every cell, so they take seconds).
"""
from __future__ import annotations

import base64
import json
import os
import re
import types
from pathlib import Path

import pytest

from edgecnn.cli import main
from edgecnn.matrix import plan, scorecard, state
from edgecnn.matrix.results import CellResult, extract_sensitivity
from edgecnn.matrix.scheduler import Running, Scheduler

ARGS = ["--archs", "lenet5,squeezenet1_1", "--targets", "onnx", "--precisions", "fp32", "int8-weights",
        "--weights", "none", "--eval-size", "24", "--calib-size", "32"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(tmp: Path, *extra: str) -> int:
    return main(["matrix", *ARGS, "--out", str(tmp / "art"), "--report-dir", str(tmp / "rep"),
                 "--scorecard", str(tmp / "scorecard.json"), "--quiet", *extra])


def _latest(tmp: Path) -> Path:
    return (tmp / "rep" / "latest").resolve()


def _cells(tmp: Path) -> dict:
    data = json.loads((_latest(tmp) / "results.json").read_text())
    return {c["id"]: c for c in data["cells"]}


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("matrix")
    rc = _run(tmp)
    return tmp, rc


def test_broken_cell_fails_with_reason_while_others_complete(first, capsys):
    tmp, rc = first
    assert rc == 0   # no scorecard yet: failures are reported, not fatal (--strict makes them fatal)
    cells = _cells(tmp)
    assert set(cells) == {"lenet5/onnx/fp32", "lenet5/onnx/int8-weights", "squeezenet1_1/onnx/fp32",
                          "squeezenet1_1/onnx/int8-weights"}
    for cid in ("lenet5/onnx/fp32", "squeezenet1_1/onnx/fp32"):
        c = cells[cid]
        assert c["status"] == "validated" and c["outcome"] == "built", c
        assert c["parity"]["max_rel_error"] <= 1e-4 and c["parity"]["passed"]
        assert c["model_bytes"] > 0 and c["latency"]["p50_ms"] > 0
        assert c["peak_rss_mb"] > 100          # measured in the cell's own process
        assert Path(c["bundle"], "manifest.json").exists()
    run = json.loads((_latest(tmp) / "results.json").read_text())["run"]
    assert run["timed_one_after_another"] == 2   # built in parallel, then timed one cell after another
    assert (_latest(tmp) / "logs" / "timing" / "lenet5-onnx-fp32.log").exists()
    broken = cells["lenet5/onnx/int8-weights"]
    assert broken["status"] == "failed" and broken["outcome"] == "refused" and broken["error_family"] == "usage"
    assert "precision 'int8-weights' is not supported for target 'onnx'" in broken["reason"]
    md = (_latest(tmp) / "report.md").read_text()
    assert re.search(r"\| lenet5 \| onnx \| int8-weights \| ❌ failed .*not supported for target 'onnx'", md)
    assert re.search(r"\| squeezenet1_1 \| onnx \| fp32 \| ✅ validated ", md)


def test_report_files_embed_plots(first):
    tmp, _ = first
    run_dir = _latest(tmp)
    html = (run_dir / "report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) >= 2   # latency vs agreement, size per precision
    for b64 in images:
        assert base64.b64decode(b64)[:8] == PNG_MAGIC
    assert "<script" not in html and "http://" not in html and "https://" not in html   # self-contained
    for name in ("latency_vs_agreement.png", "size_per_precision.png"):
        assert (run_dir / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    md = (run_dir / "report.md").read_text()
    assert "](plots/latency_vs_agreement.png)" in md
    assert "Per-layer INT8 sensitivity: not plotted" in md   # no INT8 cell here: said, not silently dropped
    assert (run_dir / "logs" / "lenet5-onnx-fp32.log").exists()


def test_second_run_does_no_work(first, capsys):
    tmp, _ = first
    manifests = {p: p.stat().st_mtime_ns for p in (tmp / "art").rglob("manifest.json")}
    assert _run(tmp) == 0
    out = capsys.readouterr().out
    assert "0 run;" in out and "4 cells" in out
    cells = _cells(tmp)
    assert {c["outcome"] for c in cells.values()} == {"reused", "refused"}
    assert not list((_latest(tmp) / "logs").glob("*.log"))   # no cell process was started
    assert {p: p.stat().st_mtime_ns for p in (tmp / "art").rglob("manifest.json")} == manifests


def test_scorecard_regression_fails_naming_cell_and_numbers(first, capsys):
    tmp, _ = first
    card = tmp / "scorecard.json"
    assert _run(tmp, "--update-scorecard") == 0
    data = json.loads(card.read_text())
    assert set(data["cells"]) == {"lenet5/onnx/fp32", "squeezenet1_1/onnx/fp32"}   # failed cells not accepted
    assert _run(tmp) == 0
    assert "scorecard: ok" in capsys.readouterr().out
    # the scorecard expected a model half the size: the real one is now a "regression" beyond 5 %
    real = data["cells"]["squeezenet1_1/onnx/fp32"]["model_bytes"]
    data["cells"]["squeezenet1_1/onnx/fp32"]["model_bytes"] = real // 2
    card.write_text(json.dumps(data))
    assert _run(tmp) == 5
    err = capsys.readouterr().err
    assert "squeezenet1_1/onnx/fp32" in err and "model size" in err and f"{real / 1e6:.3f} MB" in err
    assert "lenet5/onnx/fp32" not in err
    md = (_latest(tmp) / "report.md").read_text()
    assert "## Scorecard regressions" in md and "squeezenet1_1/onnx/fp32" in md
    # a cell the scorecard expects validated that fails is a regression too, with its reason
    data["cells"]["squeezenet1_1/onnx/fp32"]["model_bytes"] = real
    data["cells"]["lenet5/onnx/int8-weights"] = {"status": "validated", "weights": "random"}
    card.write_text(json.dumps(data))
    assert _run(tmp) == 5
    err = capsys.readouterr().err
    assert "lenet5/onnx/int8-weights: status failed (expected validated)" in err
    del data["cells"]["lenet5/onnx/int8-weights"]
    card.write_text(json.dumps(data))
    assert _run(tmp, "--strict") == 5      # --strict: the broken cell fails the command even unscored
    assert _run(tmp) == 0


def test_tampered_or_changed_cell_is_rebuilt(first, capsys):
    tmp, _ = first
    model = tmp / "art" / "lenet5" / "onnx-fp32" / "model.onnx"
    blob = bytearray(model.read_bytes())
    blob[-1] ^= 0xFF
    model.write_bytes(bytes(blob))
    assert _run(tmp, "--archs", "lenet5", "--precisions", "fp32") == 0
    cells = _cells(tmp)
    assert cells["lenet5/onnx/fp32"]["outcome"] == "built"       # hashes no longer matched: rebuilt
    assert _run(tmp, "--archs", "lenet5", "--precisions", "fp32") == 0
    assert _cells(tmp)["lenet5/onnx/fp32"]["outcome"] == "reused"
    # an input change (the evaluation set size) makes the cell run again
    assert _run(tmp, "--archs", "lenet5", "--precisions", "fp32", "--eval-size", "20") == 0
    assert _cells(tmp)["lenet5/onnx/fp32"]["outcome"] == "built"


# ------------------------------------------------------------------------------------- fast unit tests
def test_plan_refuses_unknown_names_with_the_registry_message():
    cells = {c.id: c for c in plan.expand(["lenet5", "mobilenetv9"], ["onnx", "tflite", "tensorrt"], ["fp32"])}
    assert cells["lenet5/onnx/fp32"].error is None
    assert "unknown architecture 'mobilenetv9'" in cells["mobilenetv9/onnx/fp32"].error.message
    assert "unknown target 'tflite'" in cells["lenet5/tflite/fp32"].error.message
    assert cells["lenet5/trt/fp32"].error is None       # the alias resolves


def test_input_key_tracks_options_weights_and_calibration():
    from edgecnn.options import ExportOptions

    cell = plan.expand(["lenet5"], ["onnx"], ["fp32"])[0]
    opts = ExportOptions(calib_size=16, eval_size=8)
    fp = plan.CalibrationFingerprints(None, opts)
    k1 = plan.input_key(cell, weights="none", calib_fp=fp, options=opts)
    assert plan.key_sha(k1) == plan.key_sha(plan.input_key(cell, weights="none", calib_fp=fp, options=opts))
    opts2 = ExportOptions(calib_size=16, eval_size=8, opset=13)
    k2 = plan.input_key(cell, weights="none", calib_fp=plan.CalibrationFingerprints(None, opts2), options=opts2)
    assert k1["calibration"] == k2["calibration"] and plan.key_sha(k1) != plan.key_sha(k2)
    opts3 = ExportOptions(calib_size=16, eval_size=9)
    k3 = plan.input_key(cell, weights="none", calib_fp=plan.CalibrationFingerprints(None, opts3), options=opts3)
    assert k3["calibration"] != k1["calibration"]
    assert k1["weights"] == {"source": "random", "sha256": None} and len(k1["code"]) == 64


def test_scorecard_judgement():
    r = CellResult("a", "onnx", "int8", "validated", weights_source="random", model_bytes=1000,
                   parity={"top1_agreement": 0.96, "cosine": 0.999, "sqnr_db": 125.0, "max_rel_error": 3e-7})
    tol = dict(scorecard.DEFAULT_TOLERANCE)
    # fp32-level noise is not a regression: SQNR above 60 dB and errors below 1e-5 are "identical"
    assert scorecard.judge(r, {"status": "validated", "sqnr_db": 139.0, "max_rel_error": 2e-7}, tol).state == "ok"
    v = scorecard.judge(r, {"status": "validated", "top1_agreement": 0.99, "model_bytes": 900}, tol)
    assert v.state == "regression"
    assert any("top1_agreement 0.9600 < 0.9900" in p for p in v.problems)
    assert any("model size" in p for p in v.problems)
    assert scorecard.judge(r, {"status": "pending", "top1_agreement": 0.90}, tol).state == "improved"
    tol["top1_agreement"] = 0.05      # a per-cell tolerance
    assert scorecard.judge(r, {"status": "validated", "top1_agreement": 0.99}, tol).state == "ok"


def test_sensitivity_is_read_from_the_int8_record():
    # the INT8 fallback's record: all-but-one SQNR, most sensitive (highest) first, float layers beside it
    fallback = {"fallback": {"layers_float": {"conv9": "sensitivity"}, "sensitivity_top": [
        {"node": "conv9", "sqnr_db": 31.0, "top1_agreement": 0.98}, {"node": "conv2", "sqnr_db": 22.5,
                                                                      "top1_agreement": 0.93}]}}
    got = extract_sensitivity(fallback)
    assert got["source"] == "recipe.fallback.sensitivity_top" and got["higher_is_worse"] is True
    assert [(x["layer"], x["float"]) for x in got["layers"]] == [("conv9", True), ("conv2", False)]
    assert extract_sensitivity({"precision": "fp32"}) is None
    assert extract_sensitivity({"fallback": {"sensitivity_top": []}}) is None


def test_sensitivity_plot_renders(tmp_path):
    from edgecnn.matrix import report

    rows = [{"node": f"conv{i}", "sqnr_db": 50.0 - i * 0.5} for i in range(50)]
    r = CellResult("mobilenet_v2", "onnx", "int8", "validated", bundle="x", sensitivity=extract_sensitivity(
        {"fallback": {"sensitivity_top": rows, "layers_float": {f"conv{i}": "x" for i in range(3)}}}))
    chosen, why = report.choose_sensitivity([r], None)
    assert chosen is r and not why
    out = report.plot_sensitivity(r, tmp_path / "s.png")
    assert Path(out).read_bytes()[:8] == PNG_MAGIC
    none, why = report.choose_sensitivity([CellResult("a", "onnx", "int8", "validated", bundle="x",
                                                      recipe_keys=["method"])], None)
    assert none is None and "carries no per-layer sensitivity list" in why and "method" in why


def test_scheduler_keeps_heavy_cells_apart_and_respects_memory(tmp_path):
    light = plan.Cell("lenet5", "onnx", "fp32", mem_mb=500)
    heavy1 = plan.Cell("a", "onnx", "int8", heavy=True, mem_mb=500)
    heavy2 = plan.Cell("b", "onnx", "int8", heavy=True, mem_mb=500)
    s = Scheduler(2, make_job=lambda c, log: {}, log_dir=tmp_path)
    me = types.SimpleNamespace(pid=os.getpid())     # a live pid, so the RSS probe reads real numbers
    assert s.can_start(heavy1)                      # nothing running: always
    s.running = [Running(heavy1, me, None, 0.0, tmp_path / "x.log")]
    assert not s.can_start(heavy2) and s.can_start(light)
    s.mem_budget_mb = 800                           # 500 running + 500 more > 800
    assert not s.can_start(light)
    s.mem_budget_mb = None
    huge = plan.Cell("c", "onnx", "fp32", mem_mb=10 ** 9)   # more than any machine has free
    assert not s.can_start(huge)
    s.running = []
    assert s.can_start(huge)                        # alone it still runs: the run always progresses


def test_a_crashed_cell_is_attributed_and_the_others_complete(tmp_path):
    """A cell's process killed by a signal (as the OOM killer would) fails that cell only, by name."""
    import signal

    from edgecnn.options import ExportOptions

    def job(cell, log):
        return {"kind": "export", "arch": cell.arch, "target": cell.target, "precision": cell.precision,
                "weights": "none", "calib": None, "out": str(tmp_path / "art"), "threads": 1, "log": str(log),
                "options": ExportOptions(calib_size=16, eval_size=8, latency=False).to_dict()}

    victim, survivor = plan.Cell("squeezenet1_1", "onnx", "fp32"), plan.Cell("lenet5", "onnx", "fp32", order=1)
    s = Scheduler(2, make_job=job, log_dir=tmp_path / "logs")

    def kill_victim(cell):
        if cell is victim:
            os.kill(s.running[-1].process.pid, signal.SIGKILL)

    s.on_start = kill_victim
    outcomes = {o.cell.id: o for o in s.run([victim, survivor])}
    crashed = outcomes[victim.id].message
    assert crashed["family"] == "crash" and "SIGKILL" in crashed["reason"]
    assert outcomes[survivor.id].message["kind"] == "done" and outcomes[survivor.id].message["status"] == "validated"
    assert not s.running
