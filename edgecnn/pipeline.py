"""The one pipeline behind the CLI, the Makefile and the Python API:

    arch -> zoo entry + weights -> calibration/evaluation images -> target.build (staging folder)
         -> validate (parity on held-out images + latency) -> manifest -> atomic swap into place

A bundle that fails its parity gate is not swapped into place (the previous good artefact stays):
it is kept beside it as ``<target>-<precision>.failed`` for inspection, and the command fails.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from calibration import CalibrationError, CalibrationSet, InputSpec
from exporters.common import ExportError

from . import artefact, targets, weights as weights_mod, zoo
from .errors import GateFailed, InputError, OutputError, ToolchainError, UsageError
from .progress import Progress
from .targets import BuildContext, ExportOptions
from .target_options import check_known
from .validate import REFERENCE_FILE, check_parity, fp64_outputs, measure_latency, torch_reference
from .versions import edgecnn_version, toolchain

log = logging.getLogger(__name__)


def _fallback_line(recipe: dict, fb: dict) -> str:
    """One summary line for the INT8 fallback block of either shape: the Q/DQ recipes' (``agreement_before``/
    ``agreement_after``, ``layers_float``) or Core ML W8A8's (``before``/``after``, ``keep_float`` blocks)."""
    before = fb.get("agreement_before") or fb.get("before") or {}
    after = fb.get("agreement_after") or fb.get("after") or before
    probe = (f"probe agreement {before['top1_agreement']:.1%} -> {after['top1_agreement']:.1%}"
             if "top1_agreement" in before and "top1_agreement" in after else "probe not run")
    if "layers_float" in fb:
        kernels = recipe.get("kernels")   # onnxruntime's fused-kernel count (the trt recipe has none here)
        ops = (f"{kernels['fused']} fused INT8 kernels, {kernels['float']} float ops" if kernels else
               f"{recipe.get('quantized_layers', '?')} INT8 Conv/Gemm")
        ranges = recipe.get("calibration_method") or recipe.get("range_method")
        return (f"  int8     {recipe.get('recipe')} recipe, {ranges} ranges, {len(fb['layers_float'])} layer(s) "
                f"float; {probe}; {ops}")
    return (f"  int8     W8A8, {len(fb.get('keep_float') or [])} of {fb.get('units', '?')} block(s) float; {probe} "
            f"(PyTorch simulation)")


@dataclass
class ExportResult:
    path: Path
    status: str                     # "validated", "pending" (validated elsewhere, e.g. on a Jetson) or "failed"
    manifest: dict
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status in ("validated", "pending")

    def summary(self) -> str:
        m = self.manifest
        lines = [f"{m['arch']} -> {m['target']} {m['precision']}: {self.status.upper()}  ({self.seconds:.1f} s)",
                 f"  folder   {self.path}"]
        model = m.get("model_file")
        if model and model in m.get("files", {}):
            size = f"  model    {model}  ({m['files'][model]['bytes'] / 1e6:.2f} MB"
            if m.get("int8", {}).get("fp32_bytes"):
                size += f", {m['files'][model]['bytes'] / m['int8']['fp32_bytes']:.0%} of FP32"
            lines.append(size + ")")
        fb = (m.get("recipe") or {}).get("fallback")
        if fb:
            lines.append(_fallback_line(m["recipe"], fb))
        w = m.get("weights", {})
        lines.append(f"  weights  {w.get('source')}" + ("" if w.get("pretrained") else "  (RANDOM INIT: accuracy not meaningful)"))
        p = m.get("parity")
        if p:
            lines.append(f"  parity   {p['gate']}: {'PASS' if p['passed'] else 'FAIL'} | max rel err {p['max_rel_error']:.2e}, "
                         f"cosine {p['cosine']:.6f}, SQNR {p['sqnr_db']:.1f} dB, top-1 agree {p['top1_agreement']:.1%} "
                         f"on {p['samples']} held-out images")
            if p.get("ref_accuracy") is not None:
                lines.append(f"  accuracy torch FP32 {p['ref_accuracy']:.1%}, artefact {p['accuracy']:.1%} "
                             f"(labelled held-out images)")
            if p.get("reason"):
                lines.append(f"  reason   {p['reason']}")
        lat = m.get("latency")
        if lat and "batch1" in lat:
            b1, tp = lat["batch1"], lat["throughput"]
            lines.append(f"  latency  batch 1 p50 {b1['p50_ms']:.2f} ms, p90 {b1['p90_ms']:.2f} ms; batch {tp['batch']} "
                         f"{tp['throughput_ips']:.0f} img/s ({lat['runtime'].get('runtime')}, "
                         f"{lat['runtime'].get('threads', '?')} thread(s))")
            if lat.get("speedup_vs_fp32"):
                lines.append(f"  speed-up vs FP32 (batch 1, same run): {lat['speedup_vs_fp32']:.2f}x")
        elif lat and lat.get("not_measured"):
            lines.append(f"  latency  {lat['not_measured']}")
        if p and p.get("runtime"):
            lines.append(f"  runtime  parity measured with {p['runtime']}")
        for check in m.get("local_checks", []):  # checks run here for a bundle validated elsewhere
            lines.append(f"  check    {check['name']}: {'PASS' if check['passed'] else 'FAIL'} | {check['detail']}")
        if m.get("pending") and not (lat and "batch1" in lat):
            lines.append(f"  pending  {m['pending']}")
        return "\n".join(lines)


def export(arch: str, target: str = "onnx", precision: str = "fp32", weights: str = "auto", calib: Optional[str] = None,
           out: str | os.PathLike = "artefacts", *, num_classes: Optional[int] = None, labels_file: Optional[str] = None,
           trust_checkpoint: bool = False, options: Optional[ExportOptions] = None, strict_calib: bool = False,
           lock_timeout: float = 600.0, quiet: bool = False, input_spec: Optional[InputSpec] = None) -> ExportResult:
    """Export ``arch`` to ``target`` at ``precision``, validate it, and write the artefact bundle.

    ``input_spec`` overrides the zoo entry's input (size, channels, grey, mean/std) for a checkpoint
    trained on other images, e.g. ``calibration.derive_spec(entry.spec, size=32, grey=True, mean=[0.286],
    std=[0.353])`` for Fashion-MNIST; the manifest and the model's metadata record the spec actually used.
    A labelled ``.npz`` calibration source (``images`` + ``labels``) adds labelled accuracy to parity.
    """
    t_start = time.perf_counter()
    say = Progress(quiet=quiet)
    options = options or ExportOptions()
    check_known(options.extra)
    try:
        entry = zoo.resolve(arch)
    except zoo.UnknownArchError as exc:
        raise UsageError(str(exc), hint="`edgecnn list` shows every architecture") from None
    tgt = targets.get(target)
    precision = targets.check_precision(tgt, precision)

    say(f"building {entry.name} (weights: {weights})")
    model, winfo = weights_mod.build(entry, weights, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    labels = _labels(entry, winfo.num_classes, labels_file)
    spec = entry.spec if input_spec is None else _check_spec(entry, model, input_spec)

    say("preparing calibration and held-out evaluation images")
    try:
        calib_set = CalibrationSet.create(calib, spec, calib_size=options.calib_size,
                                          eval_size=options.eval_size, seed=options.seed, strict=strict_calib)
        if not calib_set.eval_items:
            raise CalibrationError(f"{calib_set.source}: too few images to hold any out for evaluation",
                                   hint="use a folder with at least two images", path=calib_set.source)
        eval_inputs = calib_set.array("eval")
        eval_labels = calib_set.labels("eval")
        if eval_labels is not None and len(eval_labels) != len(eval_inputs):
            log.warning("labelled accuracy not reported: %d of %d held-out images could not be read",
                        len(eval_labels) - len(eval_inputs), len(eval_labels))
            eval_labels = None
        if eval_labels is not None and eval_labels.max() >= winfo.num_classes:
            raise CalibrationError(f"{calib_set.source}: label {int(eval_labels.max())} is out of range for a "
                                   f"{winfo.num_classes}-class model", hint="labels are class indices from 0",
                                   path=calib_set.source)
        if winfo.source == "random":
            used = weights_mod.reestimate_batchnorm(model, calib_set.iter_batches("calib", batch_size=16))
            if used:
                winfo.bn_reestimated = True
                winfo.notes.append(f"BatchNorm statistics re-estimated on {used} calibration images")
                say(f"random init: BatchNorm statistics re-estimated on {used} calibration images")
    except CalibrationError as exc:
        raise InputError(str(exc), hint=exc.hint) from None

    say(f"PyTorch FP32 reference on {len(eval_inputs)} held-out images")
    reference = torch_reference(model, eval_inputs)
    if not np.isfinite(reference).all():
        raise InputError(f"{entry.name}: the PyTorch model itself produces NaN/Inf on real images",
                         hint="check the weights (a diverged checkpoint?)")

    final = artefact.bundle_dir(out, entry.name, tgt.name, precision)
    metadata = _model_metadata(entry, spec, winfo, precision, tgt.name, labels)
    ctx = BuildContext(arch=entry.name, model=model, spec=spec, labels=labels, precision=precision,
                       calib=calib_set, eval_inputs=eval_inputs, reference=reference, trained=winfo.pretrained,
                       options=options, metadata=metadata, say=say)

    with _write_errors_to_output_error(final), \
            artefact.locked(final, timeout=lock_timeout, on_wait=lambda who: say(f"waiting: {final} is locked by {who}")):
        with artefact.Staging(final) as staging:
            try:
                built = tgt.build(ctx, staging.path)
            except ExportError as exc:
                raise ToolchainError(str(exc), hint=exc.hint) from None
            _write_labels(staging.path, labels)
            _write_reference(staging.path, calib_set, spec, model)
            manifest = _base_manifest(entry, spec, tgt.name, precision, winfo, labels, calib_set, options, built)
            status = "pending" if built.pending else "validated"
            if not built.pending:
                runner = tgt.open_runner(staging.path, manifest, threads=options.threads)
                if runner is None:
                    status = "pending"
                    manifest["pending"] = tgt.runtime_unavailable_reason(manifest)
                else:
                    say(f"validating on {runner.describe().get('runtime')}: parity on {len(eval_inputs)} held-out images")
                    parity = check_parity(runner, eval_inputs, reference, precision, trained=winfo.pretrained,
                                          labels=eval_labels, min_agreement=options.int8_min_agreement,
                                          noise_floor=lambda idx: fp64_outputs(model, eval_inputs, idx))
                    manifest["parity"] = {**parity.to_dict(), "runtime": runner.describe().get("runtime")}
                    if not parity.passed:
                        status = "failed"
                    elif options.latency and getattr(runner, "latency_reason", None):
                        # e.g. the Core ML reference executor on Linux: its speed says nothing of an iPhone
                        manifest["latency"] = {"not_measured": runner.latency_reason, "runtime": runner.describe()}
                    elif options.latency:
                        say("measuring latency")
                        manifest["latency"] = measure_latency(runner, spec.shape, seed=options.seed)
                        side = built.extra.get("int8", {})
                        if side.get("speedup_vs_fp32"):  # measured side by side by the target, same run
                            manifest["latency"]["speedup_vs_fp32"] = side["speedup_vs_fp32"]
                    del runner
            else:
                manifest["pending"] = built.pending
            if built.failed:
                status = "failed"
            manifest["status"] = status
            manifest["export_seconds"] = round(time.perf_counter() - t_start, 2)
            manifest = artefact.write_manifest(staging.path, manifest)
            if status == "failed":
                failed = final.with_name(final.name + ".failed")
                shutil.rmtree(failed, ignore_errors=True)
                os.rename(staging.path, failed)
                result = ExportResult(failed, status, manifest, time.perf_counter() - t_start)
                reason = (f"failed its parity gate: {manifest['parity']['reason']}" if manifest.get("parity")
                          and not manifest["parity"].get("passed") else f"failed a check: {built.failed}")
                raise GateFailed(f"{entry.name} {tgt.name} {precision} {reason}",
                                 hint=f"the failed bundle is kept at {failed} for inspection; "
                                      f"{'the previous artefact is untouched' if final.exists() else 'nothing was written to ' + str(final)}")
            staging.commit()
    return ExportResult(final, status, manifest, time.perf_counter() - t_start)


# A failed write of the bundle is the output location's fault (exit 4), whichever step hit it.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM}


@contextlib.contextmanager
def _write_errors_to_output_error(final: Path):
    """Disk full, file-size limit, read-only or permission errors while writing the bundle -> OutputError.

    Staging is removed by then (``artefact.Staging.__exit__``), so the message can promise that."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _WRITE_ERRNOS:
            raise
        raise OutputError(f"cannot write the artefact under {final.parent} ({exc.strerror})",
                          hint="free some space or choose another OUT; nothing half-written was left behind"
                          + (", the previous artefact is untouched" if final.exists() else "")) from None


def _labels(entry, num_classes: int, labels_file: Optional[str]) -> list:
    if labels_file:
        try:
            labels = [ln.rstrip("\n") for ln in Path(labels_file).read_text(encoding="utf-8").splitlines() if ln.strip()]
        except OSError as exc:
            raise InputError(f"cannot read labels file {labels_file} ({exc.strerror})",
                             hint="pass a text file with one label per line, in class-index order") from None
        if len(labels) != num_classes:
            raise InputError(f"{labels_file} has {len(labels)} labels but the model has {num_classes} classes",
                             hint="one label per line, in class-index order")
        return labels
    return zoo.labels_for(entry, num_classes)


def _check_spec(entry, model, spec: InputSpec) -> InputSpec:
    """An overridden input spec must fit the model: one forward pass on zeros says so before any work."""
    import torch

    try:
        with torch.no_grad():
            out = model(torch.zeros(spec.batch_shape(2)))
    except RuntimeError as exc:
        raise UsageError(f"{entry.name} does not accept {spec.channels}x{spec.height}x{spec.width} inputs "
                         f"({str(exc).splitlines()[0][:160]})",
                         hint=f"the zoo's input is {'x'.join(map(str, entry.spec.shape))}; check --input-size/--grey") from None
    if out.ndim != 2:
        raise UsageError(f"{entry.name} gives outputs of shape {tuple(out.shape)} at {spec.height}x{spec.width} "
                         "instead of N x classes", hint="check --input-size")
    return spec


def _model_metadata(entry, spec, winfo, precision: str, target: str, labels: list) -> dict:
    return {"edgecnn.version": edgecnn_version(), "edgecnn.arch": entry.name, "edgecnn.precision": precision,
            "edgecnn.target": target, "edgecnn.weights": winfo.source if not winfo.source.startswith("checkpoint:")
            else "checkpoint", "edgecnn.input": json.dumps(spec.to_dict(), sort_keys=True),
            "edgecnn.labels": json.dumps(labels)}


def _write_labels(root: Path, labels: list) -> None:
    (root / "labels.txt").write_text("\n".join(labels) + "\n", encoding="utf-8")


def reference_count(spec) -> int:
    """How many held-out images go into reference.npz: up to 16, about 4 MB of pixels at most."""
    return int(max(4, min(16, 4_000_000 // (spec.height * spec.width * spec.channels))))


def _write_reference(root: Path, calib_set: CalibrationSet, spec, model) -> None:
    """reference.npz: a few held-out images (8-bit, resized+cropped) and the PyTorch FP32 outputs on them,
    so the bundle can be validated anywhere (a Jetson, a Mac) without torch or the source images."""
    from calibration import normalize

    ids, pixels = calib_set.pixels("eval", limit=reference_count(spec))
    if len(pixels) == 0:
        return
    ref = torch_reference(model, normalize(pixels, spec))
    extra = {}
    label_of = {it.id: it.label for it in calib_set.eval_items}
    if all(label_of.get(i) is not None for i in ids):
        extra["labels"] = np.asarray([label_of[i] for i in ids], dtype=np.int64)  # labelled source: keep them
    np.savez_compressed(root / REFERENCE_FILE, pixels=pixels, reference=ref.astype(np.float32),
                        ids=np.asarray(ids), input_spec=np.asarray(json.dumps(spec.to_dict(), sort_keys=True)), **extra)


def _base_manifest(entry, spec, target: str, precision: str, winfo, labels, calib_set, options, built) -> dict:
    return {
        "schema_version": artefact.SCHEMA_VERSION,
        "edgecnn_version": edgecnn_version(),
        "arch": entry.name,
        "family": entry.family,
        "target": target,
        "precision": precision,
        "status": "building",
        "model_file": built.model_file,
        "weights": winfo.to_dict(),
        "input": spec.to_dict(),
        "input_from": "zoo" if spec == entry.spec else "override (custom-trained checkpoint)",
        "output": {"name": "logits", "shape": [1, winfo.num_classes], "kind": "logits (no softmax)"},
        "num_classes": winfo.num_classes,
        "labels_file": "labels.txt",
        "reference_file": REFERENCE_FILE,
        "export": built.export,
        "recipe": built.recipe,
        "calibration": {**calib_set.describe(), "used_for": _calib_use(precision, winfo)},
        "seed": options.seed,
        "toolchain": toolchain(),
        **built.extra,
    }


def _calib_use(precision: str, winfo) -> str:
    uses = ["held-out evaluation (parity)"]
    if precision.startswith("int8"):
        uses.insert(0, "INT8 range calibration")
    if winfo.bn_reestimated:
        uses.insert(0, "BatchNorm re-estimation (random init)")
    return ", ".join(uses)
