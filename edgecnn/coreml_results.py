"""Core ML on a Mac: run a bundle on every compute unit, write a results file, merge it back into the manifest.

NOT RUN BY US YET: no Mac was available where this was written. ``validate_on_mac`` is what ``edgecnn validate
<bundle>`` does on macOS with coremltools' native runtime: the bundle's package runs (``MLModel.predict``) on
CPU_ONLY, CPU_AND_GPU and CPU_AND_NE against its own ``reference.npz``; each unit's raw outputs, parity,
latency and compute plan (``MLComputePlan``, macOS 14.4+) go into ``<bundle>.coreml-results.<host>.json`` next
to the bundle (not inside: the bundle stays as its manifest lists it). ``edgecnn merge-results <bundle> <file>``
then merges it, like the Jetson results of a TensorRT bundle. Everything up to the Core ML runtime is tested on
Linux, and our calls into coremltools by a contract test against its documented API
(``tests/test_coreml_mac_contract.py``); that is no validation of the runtime.

Honesty rules of the merge: the results must come from this very bundle (a digest of every file the manifest
lists), the bundle must be intact, and parity is judged again here by ``exporters.parity`` from the raw outputs
in the file against the bundle's reference, never taken from the file's verdict. The status becomes
``validated`` when every compute unit passes the gate and ``failed`` when one does not.
"""
from __future__ import annotations

import base64
import hashlib
import json
import platform
import re
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from calibration import InputSpec
from exporters import parity as parity_mod
from exporters.runner import run_batched

from . import artefact
from .errors import GateFailed, InputError, IntegrityError, UsageError
from .validate.bundle import load_reference
from .validate.latency import measure_latency
from .versions import edgecnn_version

RESULTS_SCHEMA = "edgecnn-coreml-results/1"
MAC_COMPUTE_UNITS = ("CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE")
RESULTS_DIR = "device-results"
MAIN_UNIT = "CPU_AND_NE"        # the closest to an iPhone app's default (.all) on hardware with a Neural Engine


def bundle_digest(manifest: dict) -> str:
    """sha256 over every file the manifest lists (path and hash): which bundle a results file belongs to."""
    lines = "".join(f"{rel}\t{meta.get('sha256')}\n" for rel, meta in sorted(manifest.get("files", {}).items()))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def results_path(root: Path) -> Path:
    host = re.sub(r"[^A-Za-z0-9_.-]+", "-", platform.node() or "mac").strip("-") or "mac"
    return root.parent / f"{root.name}.coreml-results.{host}.json"


def encode_outputs(a: np.ndarray) -> dict:
    """Raw float32 outputs, exactly (little-endian bytes as base64), so the merge can judge them itself."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"dtype": "float32", "shape": list(a.shape), "base64": base64.b64encode(a.tobytes()).decode("ascii")}


def decode_outputs(d: dict) -> np.ndarray:
    try:
        return np.frombuffer(base64.b64decode(d["base64"]), dtype="<f4").reshape(d["shape"]).astype(np.float32)
    except (KeyError, TypeError, ValueError) as exc:
        raise InputError(f"a compute unit's outputs in the results file are unreadable ({exc})") from None


def _gate_settings(manifest: dict) -> dict:
    """The gate's inputs as the bundle recorded them (the same ones ``validate_bundle`` uses)."""
    return {"precision": manifest["precision"], "trained": bool(manifest["weights"]["pretrained"]),
            "gate": parity_mod.Gate.from_dict((manifest.get("recipe") or {}).get("gate")),
            "noise_floor": (manifest.get("parity") or {}).get("fp32_noise_floor")}


def _judge(reference, outputs, labels, settings: dict) -> parity_mod.Parity:
    return parity_mod.judge(reference, outputs, settings["precision"], settings["trained"], labels=labels,
                            gate=settings["gate"], noise_floor=settings["noise_floor"])


def _run_unit(package: Path, spec: InputSpec, image: bool, unit: str, inputs, reference, labels, settings,
              latency: bool) -> dict:
    from exporters.coreml.runner import CoreMLPredictRunner, compute_plan

    with CoreMLPredictRunner(package, spec=spec, image=image, compute_units=unit) as runner:
        outputs = run_batched(runner, inputs)
        entry = {"outputs": encode_outputs(outputs), "parity": _judge(reference, outputs, labels, settings).to_dict(),
                 "runtime": runner.describe(), "load_seconds": round(float(runner.load_seconds), 4),
                 "compute_plan": compute_plan(runner.model, unit)}
        if latency:
            entry["latency"] = measure_latency(runner, spec.shape)
    return entry


def validate_on_mac(root: Path, manifest: dict, package: Path, variant: str, *, latency: bool = True,
                    units=MAC_COMPUTE_UNITS, results_file: Optional[Path] = None) -> dict:
    """Run the bundle's ``package`` (its ``variant``: image or tensor) on each of ``units`` (macOS, Core ML), write
    the results file, return a summary for the CLI. ``manifest``: the bundle's verified manifest."""
    import coremltools as ct

    root = Path(root)
    spec = InputSpec.from_dict(manifest["input"])
    inputs, reference, labels = load_reference(root, manifest)
    settings = _gate_settings(manifest)
    per_unit = {unit: _run_unit(package, spec, variant == "image", unit, inputs, reference, labels, settings, latency)
                for unit in units}
    results = {"schema": RESULTS_SCHEMA, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "tool": f"edgecnn {edgecnn_version()} (edgecnn validate on macOS)",
               "device": {"os": platform.platform(), "machine": platform.machine(), "processor": platform.processor(),
                          "python": platform.python_version(), "coremltools": ct.__version__},
               "bundle": {"arch": manifest["arch"], "precision": manifest["precision"], "package": package.name,
                          "variant": variant, "digest": bundle_digest(manifest)},
               "reference": {"file": manifest.get("reference_file", "reference.npz"), "images": int(len(inputs))},
               "compute_units": per_unit}
    path = Path(results_file) if results_file else results_path(root)
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return _cli_summary(root, path, per_unit)


def _cli_summary(root: Path, path: Path, per_unit: Dict[str, dict]) -> dict:
    """What ``edgecnn validate`` prints: the main unit's parity and latency, one line per unit, how to merge."""
    failed = [u for u, e in per_unit.items() if not e["parity"]["passed"]]
    main = per_unit.get(MAIN_UNIT) or next(iter(per_unit.values()))
    shown = per_unit[failed[0]] if failed else main
    details = [f"{unit:<12} {'PASS' if e['parity']['passed'] else 'FAIL'} {e['parity']['gate']} | min cos "
               f"{e['parity']['min_cosine']:.5f}, top-1 agree {e['parity']['top1_agreement']:.1%}"
               + (f" | p50 {e['latency']['batch1']['p50_ms']:.2f} ms" if e.get("latency") else "")
               + f" | plan {(e['compute_plan'] or {}).get('ops_by_preferred_device', 'n/a')}"
               for unit, e in per_unit.items()]
    details.append(f"results  {path} — merge with: edgecnn merge-results {root} {path}")
    out = {"status": "failed" if failed else "validated", "parity": shown["parity"], "runtime": shown["runtime"],
           "compute_units": {u: e["parity"]["passed"] for u, e in per_unit.items()}, "results_file": str(path),
           "details": details}
    if main.get("latency"):
        out["latency"] = main["latency"]
    return out


# ---------------------------------------------------------------------------------------------- merging
def _read_json(path: Path):
    """The JSON in ``path``, or one input error saying why not."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror})") from None
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None


def is_results_file(path) -> bool:
    """True when ``path`` is a JSON file with this module's schema (anything else: not ours to judge)."""
    try:
        data = _read_json(path)
    except InputError:
        return False
    return isinstance(data, dict) and data.get("schema") == RESULTS_SCHEMA


def _load_results(path: Path) -> dict:
    results = _read_json(path)
    if not isinstance(results, dict) or results.get("schema") != RESULTS_SCHEMA:
        raise InputError(f"{path} is not an edgecnn Core ML results file",
                         hint="use the <bundle>.coreml-results.<host>.json written by `edgecnn validate` on a Mac")
    if not isinstance(results.get("compute_units"), dict) or not results["compute_units"]:
        raise InputError(f"{path} has no compute-unit results")
    return results


def _unit_summary(parity: dict, entry: dict) -> dict:
    lat = (entry.get("latency") or {}).get("batch1") or {}
    return {"passed": parity["passed"], "gate": parity["gate"], "min_cosine": parity["min_cosine"],
            "sqnr_db": parity["sqnr_db"], "top1_agreement": parity["top1_agreement"], "p50_ms": lat.get("p50_ms"),
            "ops_by_preferred_device": (entry.get("compute_plan") or {}).get("ops_by_preferred_device")}


def merge_results(bundle, results_file) -> dict:
    """Merge a Core ML results file into ``bundle``'s manifest (parity re-judged here); returns the manifest."""
    root, rpath = Path(bundle), Path(results_file)
    with artefact.locked(root):
        manifest = artefact.verify(root)
        if manifest.get("target") != "coreml":
            raise UsageError(f"{root} is a {manifest.get('target')} bundle; Core ML results are for Core ML bundles")
        results = _load_results(rpath)
        if (results.get("bundle") or {}).get("digest") != bundle_digest(manifest):
            raise IntegrityError(f"{rpath} was measured on another bundle than {root} (its files differ)",
                                 hint="merge results into the bundle they were measured on")
        _, reference, labels = load_reference(root, manifest)
        settings = _gate_settings(manifest)
        judged = {unit: _judge(reference, decode_outputs(e.get("outputs") or {}), labels, settings).to_dict()
                  for unit, e in results["compute_units"].items()}
        manifest = _merged(manifest, results, judged, rpath)
        (root / RESULTS_DIR).mkdir(exist_ok=True)
        shutil.copyfile(rpath, root / RESULTS_DIR / rpath.name)
        manifest = artefact.write_manifest(root, manifest)
    if manifest["device_results"][-1]["status"] == "failed":
        raise GateFailed(f"{root}: Core ML results merged; parity failed on "
                         f"{', '.join(u for u, p in judged.items() if not p['passed'])}: {manifest['parity']['reason']}",
                         hint="the manifest now says failed; see device_results")
    return manifest


def _merged(manifest: dict, results: dict, judged: Dict[str, dict], rpath: Path) -> dict:
    """The manifest with the re-judged results: device_results entry, coreml.device_validation, parity of the
    main (or the first failing) unit, its latency, the status."""
    device = results.get("device") or {}
    where = f"{device.get('machine', '?')} Mac, {device.get('os', '?')}"
    units = results["compute_units"]
    failed = [u for u, p in judged.items() if not p["passed"]]
    status = "failed" if failed else "validated"
    entry = {"results_file": f"{RESULTS_DIR}/{rpath.name}", "created": results.get("created"),
             "tool": results.get("tool"), "device": device, "status": status,
             "compute_units": {u: {"parity": p, "latency": units[u].get("latency"),
                                   "compute_plan": units[u].get("compute_plan")} for u, p in judged.items()}}
    history = [e for e in manifest.get("device_results", []) if e.get("results_file") != entry["results_file"]]
    manifest["device_results"] = history + [entry]
    coreml = manifest.setdefault("coreml", {})
    coreml.setdefault("reference_executor_parity", manifest.get("parity"))
    coreml["device_validation"] = {"where": where, "results_file": entry["results_file"],
                                   "units": {u: _unit_summary(p, units[u]) for u, p in judged.items()}}
    shown = failed[0] if failed else (MAIN_UNIT if MAIN_UNIT in judged else next(iter(judged)))
    manifest["parity"] = {**judged[shown], "runtime": f"Core ML {shown} on {where} (edgecnn validate on a Mac)"}
    if units[shown].get("latency"):
        manifest["latency"] = {**units[shown]["latency"], "note": f"measured on {where}, not on an iPhone"}
    statuses = [e.get("status") for e in manifest["device_results"]]
    manifest["status"] = "failed" if "failed" in statuses else "validated"
    if manifest["status"] == "validated":
        manifest.pop("pending", None)
    return manifest


def cmd_merge(args) -> int:
    """``edgecnn merge-results <bundle> <results>`` for a Core ML results file."""
    manifest = merge_results(args.bundle, args.results)
    if getattr(args, "json", False):
        print(json.dumps(manifest, indent=2))
        return 0
    dv = manifest["coreml"]["device_validation"]
    print(f"{args.bundle}: {manifest['status'].upper()} — Core ML on {dv['where']}")
    for unit, u in dv["units"].items():
        p50 = f", p50 {u['p50_ms']:.2f} ms" if u.get("p50_ms") is not None else ""
        print(f"  {unit:<12} {'PASS' if u['passed'] else 'FAIL'} {u['gate']} | min cos {u['min_cosine']:.5f}{p50}")
    return 0


__all__: List[str] = ["RESULTS_SCHEMA", "MAC_COMPUTE_UNITS", "validate_on_mac", "merge_results", "is_results_file",
                      "cmd_merge", "bundle_digest"]
