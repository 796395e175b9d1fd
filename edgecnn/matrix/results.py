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
        why = lat.get("not_measured") or lat.get("note") or manifest.get("latency_note") or "not measured"
        runtime = (lat.get("runtime") or {}).get("runtime") if isinstance(lat.get("runtime"), dict) else None
        r.latency_note = f"latency: {why}" + (f"; parity from {runtime}" if runtime else "")
    recipe = manifest.get("recipe") or {}
    r.recipe_keys = sorted(recipe) if isinstance(recipe, dict) else []
    r.sensitivity = extract_sensitivity(recipe)
    if r.sensitivity is None:
        empty = _empty_sensitivity_key(recipe)
        if empty:
            r.notes.append(f"INT8 sensitivity: {empty} is empty (no per-layer analysis was run for this artefact)")
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
_LIST_KEYS = ("sensitivity", "sensitivity_top", "per_layer_sensitivity", "layer_sensitivity", "sensitivities", "per_layer")
_FLOAT_KEYS = ("layers_float", "float_layers", "excluded", "kept_float", "fallback_layers")
_NAME_KEYS = ("layer", "node", "name", "op", "tensor")
# which number to plot, best first; "higher is worse" for errors, "lower is worse" for agreement/SQNR
_VALUE_KEYS = (("agreement_drop", True), ("top1_drop", True), ("delta_agreement", True), ("mse", True),
               ("error", True), ("output_error", True), ("rel_error", True), ("kl", True), ("score", True),
               ("sensitivity", True), ("sqnr_db", False), ("sqnr", False), ("cosine", False),
               ("top1_agreement", False), ("agreement", False))


def extract_sensitivity(recipe: Any) -> Optional[Dict[str, Any]]:
    """Find a per-layer sensitivity list anywhere in the INT8 recipe and normalise it to
    ``{"metric", "higher_is_worse", "source", "layers": [{"layer", "value", "float"}]}``.

    The INT8 recipe is owned by the INT8 work; this reads whatever shape it has — a list of
    ``{layer/node/name, <metric>}`` dicts, or a ``{layer: number}`` mapping — under any of the usual keys
    (``sensitivity``, ``sensitivity_top`` …), at the top of the recipe or one level down. Which way is
    "more sensitive" is read from the list itself when the producer sorted it (most sensitive first, by
    that metric); only an unsorted list falls back to the metric's usual meaning. Layers the fallback kept
    in float (a sibling ``layers_float``/``excluded`` …) are marked. Returns None when there is no list.
    """
    if not isinstance(recipe, dict):
        return None
    candidates = [(k, recipe[k], k, recipe) for k in recipe]
    for k, v in list(recipe.items()):
        if isinstance(v, dict):
            candidates += [(k2, v2, f"{k}.{k2}", v) for k2, v2 in v.items()]
    for key, value, where, parent in candidates:
        if str(key).lower() not in _LIST_KEYS:
            continue
        got = _normalise(value)
        if got:
            got["source"] = f"recipe.{where}"
            floats = set()
            for fk in _FLOAT_KEYS:
                fv = parent.get(fk)
                if isinstance(fv, dict):
                    floats |= {str(x) for x in fv}
                elif isinstance(fv, list):
                    floats |= {str(x) for x in fv if isinstance(x, (str, int))}
            for layer in got["layers"]:
                layer["float"] = bool(layer.get("float")) or layer["layer"] in floats
            return got
    return None


def _empty_sensitivity_key(recipe: Any) -> Optional[str]:
    if not isinstance(recipe, dict):
        return None
    for k, v in recipe.items():
        if str(k).lower() in _LIST_KEYS and not v:
            return f"recipe.{k}"
        if isinstance(v, dict):
            for k2, v2 in v.items():
                if str(k2).lower() in _LIST_KEYS and not v2:
                    return f"recipe.{k}.{k2}"
    return None


def _normalise(value: Any) -> Optional[Dict[str, Any]]:
    if isinstance(value, dict) and value and all(isinstance(v, (int, float)) for v in value.values()):
        layers = [{"layer": str(k), "value": float(v)} for k, v in value.items()]
        return {"metric": "sensitivity", "higher_is_worse": True, "layers": layers}
    if isinstance(value, dict):
        for k in ("layers", "items", "per_layer"):
            if isinstance(value.get(k), list):
                got = _normalise(value[k])
                if got and isinstance(value.get("metric"), str):
                    got["metric"] = value["metric"]
                return got
        return None
    if not isinstance(value, list) or not value or not all(isinstance(x, dict) for x in value):
        return None
    name_key = next((k for k in _NAME_KEYS if all(k in x for x in value)), None)
    if name_key is None:
        return None
    for vkey, worse_high in _VALUE_KEYS:
        if all(isinstance(x.get(vkey), (int, float)) for x in value):
            layers = [{"layer": str(x[name_key]), "value": float(x[vkey]),
                       "float": bool(x.get("kept_float") or x.get("float") or x.get("fallback"))} for x in value]
            vals = [x["value"] for x in layers]
            if len(set(vals)) > 1 and vals == sorted(vals, reverse=True):
                worse_high = True       # the producer listed them most sensitive first, highest first
            elif len(set(vals)) > 1 and vals == sorted(vals):
                worse_high = False
            return {"metric": vkey, "higher_is_worse": worse_high, "layers": layers}
    return None
