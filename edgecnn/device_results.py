"""Merge results measured on a device (``edgecnn_trt.py all`` on a Jetson) into the bundle's manifest.

Honesty rules: the results must come from this very bundle (the sha256 of the ONNX file the engine was
built from must match the manifest); the parity gate is judged again here from the raw metrics with
edgecnn's own gate, not taken from the device's verdict; the status becomes ``validated`` only when the
device ran the engine and that gate passes, ``failed`` when it does not, and stays ``pending`` when the
device only built the engine. The results file is copied into the bundle and the manifest re-hashed.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Optional

from exporters.parity import Gate, Parity, apply_gate

from . import artefact
from .errors import GateFailed, InputError, IntegrityError, UsageError

RESULTS_SCHEMA = "edgecnn-trt-results/1"
RESULTS_DIR = "device-results"


def _check_listed_files(root: Path, manifest: dict) -> None:
    """Files the manifest lists must be intact; files the device added (engine, logs, results) are allowed."""
    problems = []
    for rel, meta in sorted(manifest.get("files", {}).items()):
        path = root / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
        elif artefact.sha256_file(path) != meta.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch")
    if problems:
        raise IntegrityError(f"{root}: {len(problems)} problem(s): " + "; ".join(problems[:5]),
                             hint="the bundle was modified after export; re-export it")


def _load_results(path: Path) -> dict:
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise InputError(f"cannot read {path} ({exc.strerror})") from None
    except ValueError as exc:
        raise InputError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(results, dict) or results.get("schema") != RESULTS_SCHEMA:
        raise InputError(f"{path} is not an edgecnn_trt.py results file (schema {results.get('schema') if isinstance(results, dict) else None!r})",
                         hint="use the results.<gpu>-trt<version>.json written by `python3 edgecnn_trt.py all`")
    return results


def _judge(parity_raw: dict, precision: str, trained: bool, gate: Gate) -> dict:
    names = {f.name for f in fields(Parity)}
    try:
        p = Parity(**{k: v for k, v in parity_raw.items() if k in names and k not in
                      ("gate", "passed", "reason", "judged_on", "notes")})
    except TypeError as exc:
        raise InputError(f"device parity results are incomplete ({exc})") from None
    p = apply_gate(p, precision, trained, gate)
    return p.to_dict()


def merge_results(bundle: str | Path, results_file: str | Path, *, gate: Optional[Gate] = None) -> dict:
    """Merge ``results_file`` into ``bundle``'s manifest; returns the new manifest."""
    root, rpath = Path(bundle), Path(results_file)
    manifest = artefact.read_manifest(root)
    if manifest.get("target") != "trt":
        raise UsageError(f"{root} is a {manifest.get('target')} bundle; device results are for TensorRT bundles")
    _check_listed_files(root, manifest)
    results = _load_results(rpath)
    info = results.get("bundle", {})
    if info.get("arch") != manifest["arch"] or info.get("precision") != manifest["precision"]:
        raise IntegrityError(f"{rpath} is for {info.get('arch')} {info.get('precision')}, this bundle is "
                             f"{manifest['arch']} {manifest['precision']}")
    build = results.get("build") or {}
    validation = results.get("validation")
    built_from = build.get("onnx") or (validation or {}).get("onnx")
    for name, sha in (info.get("onnx_sha256") or {}).items():
        listed = manifest["files"].get(name, {}).get("sha256")
        if listed and listed != sha:
            raise IntegrityError(f"{rpath} was produced from a different {name} than this bundle's",
                                 hint="merge results into the bundle they were measured on")
    if built_from and build.get("onnx_sha256") and \
            build["onnx_sha256"] != manifest["files"].get(built_from, {}).get("sha256"):
        raise IntegrityError(f"the engine in {rpath} was built from a {built_from} that is not this bundle's")

    device = results.get("device", {})
    gpu = (device.get("gpu") or {}).get("name", "?")
    trt_version = device.get("tensorrt", "?")
    entry = {"results_file": f"{RESULTS_DIR}/{rpath.name}", "created": results.get("created"),
             "tool": results.get("tool"), "gpu": device.get("gpu"), "tensorrt": trt_version,
             "jetson": device.get("jetson"), "python": device.get("python"), "build": build or None}
    tensorrt = manifest.setdefault("tensorrt", {})
    if validation:
        parity = _judge(validation["parity"], manifest["precision"], bool(manifest["weights"].get("pretrained")),
                        gate or Gate.from_dict((manifest.get("recipe") or {}).get("gate")))
        parity["runtime"] = f"TensorRT {trt_version} on {gpu} (measured on the device by edgecnn_trt.py)"
        entry["parity"] = parity
        entry["engine"] = validation.get("engine")
        manifest["parity"] = parity
        if validation.get("latency"):
            manifest["latency"] = validation["latency"]
        status = "validated" if parity["passed"] else "failed"
        engine = (f"{validation.get('engine')}: built and {'validated' if parity['passed'] else 'FAILED parity'} on "
                  f"{gpu} with TensorRT {trt_version} (device-specific; rebuild on other devices)")
    else:
        status = "pending"
        engine = (f"{build.get('engine')}: built on {gpu} with TensorRT {trt_version}, not validated"
                  if build else "pending")
    entry["status"] = status
    history = [e for e in manifest.get("device_results", []) if e.get("results_file") != entry["results_file"]]
    manifest["device_results"] = history + [entry]
    statuses = [e["status"] for e in manifest["device_results"]]
    manifest["status"] = "failed" if "failed" in statuses else "validated" if "validated" in statuses else "pending"
    tensorrt["engine_status"] = engine
    if manifest["status"] == "validated":
        manifest.pop("pending", None)
    (root / RESULTS_DIR).mkdir(exist_ok=True)
    dest = root / RESULTS_DIR / rpath.name
    if rpath.resolve() != dest.resolve():
        shutil.copyfile(rpath, dest)
    manifest = artefact.write_manifest(root, manifest)
    if status == "failed":
        raise GateFailed(f"{root}: device results merged; TensorRT parity failed on {gpu}: {manifest['parity']['reason']}",
                         hint="the manifest now says failed; see device_results")
    return manifest
