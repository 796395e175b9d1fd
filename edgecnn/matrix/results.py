"""One matrix cell's outcome as a flat, JSON-friendly record, read from the artefact's own manifest (the
single source of truth: the report shows what the bundle says about itself, nothing re-derived)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

STATUS_ICON = {"validated": "✅", "pending": "⏳", "failed": "❌"}
PARITY_FIELDS = ("gate", "passed", "samples", "max_abs_error", "max_rel_error", "cosine", "min_cosine", "sqnr_db",
                 "top1_agreement", "top5_overlap", "ref_top1_in_top5", "nonfinite", "judged_on", "reason")


@dataclass
class CellResult:
    arch: str
    target: str
    precision: str
    status: str                              # validated | pending | failed
    outcome: str = "built"                   # built | reused | refused (plan time) | error | crashed | interrupted
    reason: str = ""                         # why failed / why pending
    error_family: str = ""                   # usage | gate | toolchain | input | ... (edgecnn.errors)
    exit_code: int = 0
    order: int = 0
    seconds: float = 0.0                     # wall time spent on the cell in this run
    export_seconds: Optional[float] = None   # the pipeline's own time (from the manifest, also when reused)
    bundle: Optional[str] = None
    weights_source: Optional[str] = None
    pretrained: Optional[bool] = None
    model_file: Optional[str] = None
    model_bytes: Optional[int] = None
    bundle_bytes: Optional[int] = None
    parity: Dict[str, Any] = field(default_factory=dict)
    parity_source: str = ""                  # "" = the artefact's runtime; else which local proxy produced it
    latency: Dict[str, Any] = field(default_factory=dict)   # p50_ms, p90_ms, p99_ms, throughput_ips, runtime, threads
    latency_note: str = ""
    latency_deferred: bool = False           # built in the matrix, its timing phase still to come
    speedup_vs_fp32: Optional[float] = None
    speedup_source: str = ""                 # "side by side (export)" | "separate cells"
    peak_rss_mb: Optional[float] = None
    checks: List[Dict[str, Any]] = field(default_factory=list)   # local checks of a device-validated bundle
    sensitivity: Optional[Dict[str, Any]] = None   # per-layer INT8 sensitivity, when the recipe carries it
    recipe_keys: List[str] = field(default_factory=list)
    log: Optional[str] = None
    notes: List[str] = field(default_factory=list)
    scorecard: str = ""                      # "ok" | "regression" | "unscored" | "improved" | ...

    @property
    def id(self) -> str:
        return f"{self.arch}/{self.target}/{self.precision}"

    @property
    def icon(self) -> str:
        return STATUS_ICON.get(self.status, "?")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["id"] = self.id
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CellResult":
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)


def from_manifest(manifest: dict, bundle: Path, *, outcome: str, seconds: float, order: int = 0,
                  log: Optional[str] = None, peak_rss_mb: Optional[float] = None,
                  reason: str = "", error_family: str = "", exit_code: int = 0) -> CellResult:
    files = manifest.get("files", {}) or {}
    model_file = manifest.get("model_file")
    weights = manifest.get("weights", {}) or {}
    status = manifest.get("status", "failed")
    parity = {k: manifest["parity"][k] for k in PARITY_FIELDS if k in (manifest.get("parity") or {})}
    if status == "pending" and not reason:
        reason = str(manifest.get("pending") or "validation must run on the device")
    if status == "failed" and not reason:
        reason = parity.get("reason", "") or "failed"
    model_bytes = (files.get(model_file) or {}).get("bytes") if model_file else None
    if model_file and model_bytes is None:   # a model that is a folder (a Core ML .mlpackage)
        inside = [int(f.get("bytes", 0)) for rel, f in files.items() if rel.startswith(model_file.rstrip("/") + "/")]
        model_bytes = sum(inside) if inside else None
    r = CellResult(arch=manifest["arch"], target=manifest["target"], precision=manifest["precision"], status=status,
                   outcome=outcome, reason=reason, error_family=error_family, exit_code=exit_code, order=order,
                   seconds=round(seconds, 2), export_seconds=manifest.get("export_seconds"), bundle=str(bundle),
                   weights_source=weights.get("source"), pretrained=weights.get("pretrained"), model_file=model_file,
                   model_bytes=model_bytes,
                   bundle_bytes=sum(int(f.get("bytes", 0)) for f in files.values()) or None,
                   parity=parity, log=log, peak_rss_mb=peak_rss_mb)
    lat = manifest.get("latency") or {}
    b1 = lat.get("batch1")
    checks = [c for c in manifest.get("local_checks") or [] if isinstance(c, dict) and "name" in c]
    r.checks = [{"name": str(c["name"]), "passed": bool(c.get("passed"))} for c in checks]
    if status == "pending" and not parity:
        proxy = local_proxy_check(checks, manifest["precision"])
        if proxy is not None:
            parity = {k: proxy["parity"][k] for k in PARITY_FIELDS if k in proxy["parity"]}
            r.parity = parity
            r.parity_source = f"{proxy['name']} on this machine, not the device runtime"
    if status == "pending":
        # the runtime that matters is on the device; local timings (e.g. of the ONNX on onnxruntime) are
        # not that runtime's latency and are kept out of the latency columns, plots and speed-ups
        r.latency_note = "on the device" + (f" (local timing was {lat.get('runtime', {}).get('runtime')}, "
                                            "not shown)" if b1 else "")
        b1 = None
    if b1:
        rt = lat.get("runtime") or {}
        r.latency = {"p50_ms": b1.get("p50_ms"), "p90_ms": b1.get("p90_ms"), "p99_ms": b1.get("p99_ms"),
                     "throughput_ips": (lat.get("throughput") or {}).get("throughput_ips"),
                     "runtime": rt.get("runtime"), "threads": rt.get("threads"),
                     "load_avg_1m": (lat.get("machine") or {}).get("load_avg_1m")}
        if lat.get("speedup_vs_fp32"):
            r.speedup_vs_fp32 = float(lat["speedup_vs_fp32"])
            r.speedup_source = "side by side (export)"
    elif status == "validated":
        r.latency_deferred = "deferred" in lat
        why = lat.get("not_measured") or lat.get("deferred") or "not measured"
        runtime = (lat.get("runtime") or {}).get("runtime") if isinstance(lat.get("runtime"), dict) else None
        r.latency_note = f"latency: {why}" + (f"; parity from {runtime}" if runtime else "")
    recipe = manifest.get("recipe") or {}
    r.recipe_keys = sorted(recipe) if isinstance(recipe, dict) else []
    r.sensitivity = extract_sensitivity(recipe)
    if r.sensitivity is None and isinstance(recipe.get("fallback"), dict):
        r.notes.append("INT8 sensitivity: no per-layer analysis was run (the probe met the bar with the defaults, "
                       "or the fallback was off)")
    if weights.get("pretrained") is False:
        r.notes.append("random-init weights: agreement/accuracy not meaningful")
    return r


def local_proxy_check(checks: List[Dict[str, Any]], precision: str) -> Optional[Dict[str, Any]]:
    """The local check that ran the very model the device will run, at the cell's precision, if any.

    A TensorRT INT8 bundle ships the Q/DQ model TensorRT builds from, and onnxruntime ran it here: its parity
    is a fair (clearly labelled) proxy. FP16 has none: the engine's FP16 kernels exist only on the device,
    and the FP32 model.onnx check would say nothing about FP16."""
    with_parity = [c for c in checks if isinstance(c.get("parity"), dict) and "onnxruntime" in str(c["name"])]
    if precision == "int8":
        found = [c for c in with_parity if "Q/DQ" in c["name"] or ".qdq." in c["name"]]
    elif precision == "fp32":
        found = [c for c in with_parity if c["name"].endswith(" model.onnx")]
    else:
        found = []
    return found[-1] if found else None


def error_result(arch: str, target: str, precision: str, *, outcome: str, reason: str, family: str, exit_code: int,
                 seconds: float = 0.0, order: int = 0, log: Optional[str] = None,
                 peak_rss_mb: Optional[float] = None) -> CellResult:
    return CellResult(arch=arch, target=target, precision=precision, status="failed", outcome=outcome, reason=reason,
                      error_family=family, exit_code=exit_code, seconds=round(seconds, 2), order=order, log=log,
                      peak_rss_mb=peak_rss_mb)


# --------------------------------------------------------------------------- per-layer INT8 sensitivity
def extract_sensitivity(recipe: Any) -> Optional[Dict[str, Any]]:
    """The INT8 fallback's per-layer sensitivity (``recipe.fallback.sensitivity_top``: the probe SQNR with each
    layer float alone, most sensitive first) as ``{"metric", "higher_is_worse", "source", "layers": [{"layer",
    "value", "float"}]}``, with the layers the fallback kept float marked; None when no analysis ran."""
    fb = recipe.get("fallback") if isinstance(recipe, dict) else None
    rows = (fb or {}).get("sensitivity_top") or []
    if not rows:
        return None
    floats = set(fb.get("layers_float") or {})
    return {"metric": "sqnr_db", "higher_is_worse": True, "source": "recipe.fallback.sensitivity_top",
            "layers": [{"layer": str(r["node"]), "value": float(r["sqnr_db"]), "float": r["node"] in floats}
                       for r in rows]}
