"""The one pipeline behind the CLI, the Makefile, the Python API and the matrix:

    arch -> zoo entry + weights -> calibration/evaluation images -> target.build (staging folder)
         -> validate (parity on held-out images + latency) -> manifest -> atomic swap into place

A bundle that fails its parity gate is not swapped into place (the previous good artefact stays): it is kept
beside it as ``<target>-<precision>.failed`` for inspection, and the command fails. ``validate`` re-checks a
finished bundle on this machine from its own reference outputs.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from calibration import CalibrationError, CalibrationSet, InputSpec
from calibration.sources import read_text_lines
from exporters import ExportError, ModelFileError, Precision

from . import artefact, targets, weights as weights_mod, zoo
from .errors import GateFailed, InputError, OutputError, ToolchainError, UsageError
from .manifest import Manifest
from .progress import Progress
from .summary import summary_text
from .targets import FP32_FOR_TIMING, INT8_DEFAULTS_FOR_TIMING, BuildContext, BuildOutput, ExportOptions
from .validate import REFERENCE_FILE, check_parity, fp64_outputs, measure_latency, torch_reference
from .validate.bundle import validate_bundle
from .validate.latency import side_by_side
from .versions import edgecnn_version, toolchain

log = logging.getLogger(__name__)


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
        return summary_text(self.manifest, self.status, self.path, self.seconds)


@dataclass
class _Images:
    calib: CalibrationSet
    eval_inputs: np.ndarray
    eval_labels: Optional[np.ndarray]


def export(arch: str, target: str = "onnx", precision: str = "fp32", weights: str = "auto", calib: Optional[str] = None,
           out: str | os.PathLike = "artefacts", *, num_classes: Optional[int] = None, labels_file: Optional[str] = None,
           trust_checkpoint: bool = False, options: Optional[ExportOptions] = None, strict_calib: bool = False,
           lock_timeout: float = 600.0, quiet: bool = False, input_spec: Optional[InputSpec] = None,
           eval_set: Optional[str | os.PathLike] = None, timing_dir: Optional[str | os.PathLike] = None) -> ExportResult:
    """Export ``arch`` to ``target`` at ``precision``, validate it, and write the artefact bundle.

    ``eval_set``: the images parity and the INT8 gate are judged on (a folder, an ImageFolder tree of class
    folders named after the labels, a .txt list, or an .npy/.npz, labelled with ``labels``); the calibration
    and the INT8 fallback never see them. Default: the held-out split of ``calib``.

    ``timing_dir``: defer the latency measurement (the matrix times its cells afterwards, one after another,
    with ``time_bundle``); what the timing needs besides the bundle is left there.
    ``input_spec`` overrides the zoo entry's input (size, channels, grey, mean/std) for a checkpoint trained on
    other images, e.g. ``calibration.derive_spec(entry.spec, size=32, grey=True, mean=[0.286], std=[0.353])``
    for Fashion-MNIST; the manifest and the model's metadata record the spec actually used. A labelled ``.npz``
    calibration source (``images`` + ``labels``) adds labelled accuracy to parity.
    """
    t_start = time.perf_counter()
    say = Progress(quiet=quiet)
    options = (options or ExportOptions()).check()
    try:
        entry = zoo.resolve(arch)
    except zoo.UnknownArchError as exc:
        raise UsageError(str(exc), hint="`edgecnn list` shows every architecture") from None
    tgt = targets.get(target)
    precision = targets.check_precision(tgt, precision)

    with torch_threads(options.threads):
        return _export(entry, tgt, precision, weights, calib, out, num_classes=num_classes, labels_file=labels_file,
                       trust_checkpoint=trust_checkpoint, options=options, strict_calib=strict_calib,
                       lock_timeout=lock_timeout, input_spec=input_spec, eval_set=eval_set, timing_dir=timing_dir,
                       say=say, t_start=t_start)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run torch's own work (weight loading, the FP32 reference, BatchNorm re-estimation, weight rounding) on
    ``n`` threads, as onnxruntime runs with ``ExportOptions.threads``. Why: on a 2-core machine that other work
    shares, torch's default of one thread per core spends most of its time synchronising — measured here, the
    weight rounding of a 32-px SqueezeNet took 72 s on 2 threads under load and 2.1 s on one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _export(entry, tgt, precision: Precision, weights: str, calib, out, *, num_classes, labels_file, trust_checkpoint,
            options: ExportOptions, strict_calib: bool, lock_timeout: float, input_spec, eval_set, timing_dir, say,
            t_start: float) -> ExportResult:
    say(f"building {entry.name} (weights: {weights})")
    model, winfo = weights_mod.build(entry, weights, num_classes=num_classes, trust_checkpoint=trust_checkpoint)
    labels = _labels(entry, winfo.num_classes, labels_file)
    spec = entry.spec if input_spec is None else _check_spec(entry, model, input_spec)
    say("preparing calibration and held-out evaluation images")
    images = _images(calib, eval_set, spec, labels, options, strict_calib, model, winfo, say)
    say(f"PyTorch FP32 reference on {len(images.eval_inputs)} held-out images")
    reference = torch_reference(model, images.eval_inputs)
    if not np.isfinite(reference).all():
        raise InputError(f"{entry.name}: the PyTorch model itself produces NaN/Inf on real images",
                         hint="check the weights (a diverged checkpoint?)")

    final = artefact.bundle_dir(out, entry.name, tgt.name, precision)
    if timing_dir:
        shutil.rmtree(timing_dir, ignore_errors=True)   # what an earlier export of this cell left for its timing
    ctx = BuildContext(arch=entry.name, model=model, spec=spec, labels=labels, precision=precision,
                       calib=images.calib, eval_inputs=images.eval_inputs, reference=reference,
                       trained=winfo.pretrained, options=options,
                       metadata=_model_metadata(entry, spec, winfo, precision, tgt.name, labels), say=say,
                       eval_labels=images.eval_labels,
                       timing_dir=Path(timing_dir) if timing_dir and options.latency else None)
    with _write_errors_to_output_error(final), \
            artefact.locked(final, timeout=lock_timeout, on_wait=lambda who: say(f"waiting: {final} is locked by {who}")):
        with artefact.Staging(final) as staging:
            built = _build(tgt, ctx, staging.path)
            _write_labels(staging.path, labels)
            _write_reference(staging.path, images.calib, spec, model)
            manifest = _manifest(entry, spec, tgt.name, precision, winfo, labels, images.calib, options, built)
            _validate_staged(tgt, ctx, staging.path, manifest, built, model)
            manifest.export_seconds = round(time.perf_counter() - t_start, 2)
            written = artefact.write_manifest(staging.path, manifest.to_dict())
            if manifest.status == "failed":
                _keep_failed(final, staging, written, built, f"{entry.name} {tgt.name} {precision}")
            staging.commit()
    return ExportResult(final, manifest.status, written, time.perf_counter() - t_start)


def _build(tgt, ctx: BuildContext, staging: Path) -> BuildOutput:
    try:
        return tgt.build(ctx, staging)
    except ModelFileError as exc:
        raise InputError(str(exc), hint=exc.hint) from None
    except ExportError as exc:
        raise ToolchainError(str(exc), hint=exc.hint) from None
    except CalibrationError as exc:
        raise InputError(str(exc), hint=exc.hint) from None


def _images(calib, eval_set, spec: InputSpec, labels: list, options: ExportOptions, strict: bool, model, winfo,
            say) -> _Images:
    """The calibration set with its evaluation split (inputs and, for a labelled source, labels); random-init
    models get their BatchNorm statistics re-estimated on the calibration split."""
    try:
        calib_set = CalibrationSet.create(calib, spec, calib_size=options.calib_size, eval_size=options.eval_size,
                                          seed=options.seed, strict=strict, eval_source=eval_set, class_names=labels)
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
    return _Images(calib_set, eval_inputs, eval_labels)


def _validate_staged(tgt, ctx: BuildContext, staging: Path, manifest: Manifest, built: BuildOutput,
                     model) -> None:
    """Parity (and latency) of the staged bundle on this machine's runtime; sets the manifest's status."""
    if built.pending:
        manifest.status, manifest.pending = "pending", built.pending
    else:
        runner = tgt.open_runner(staging, manifest.to_dict(), threads=ctx.options.threads)
        if runner is None:
            manifest.status, manifest.pending = "pending", tgt.runtime_unavailable_reason(manifest.to_dict())
        else:
            with runner:
                _parity_and_latency(runner, ctx, manifest, built, model)
    if built.failed:
        manifest.status = "failed"


def _parity_and_latency(runner, ctx: BuildContext, manifest: Manifest, built: BuildOutput, model) -> None:
    runtime = runner.describe().get("runtime")
    ctx.say(f"validating on {runtime}: parity on {len(ctx.eval_inputs)} held-out images")
    parity = check_parity(runner, ctx.eval_inputs, ctx.reference, ctx.precision, trained=ctx.trained,
                          labels=ctx.eval_labels, gate=ctx.options.int8.gate(),
                          noise_floor=lambda idx: fp64_outputs(model, ctx.eval_inputs, idx))
    manifest.parity = {**parity.to_dict(), "runtime": runtime}
    manifest.status = "validated" if parity.passed else "failed"
    if not parity.passed or not ctx.options.latency:
        return
    if runner.latency_reason:   # e.g. the Core ML reference executor on Linux: its speed says nothing of an iPhone
        manifest.latency = {"not_measured": runner.latency_reason, "runtime": runner.describe()}
        return
    if ctx.timing_dir is not None:
        manifest.latency = {"deferred": "timed after every cell is built, one after another (edgecnn matrix)"}
        return
    ctx.say("measuring latency")
    manifest.latency = measure_latency(runner, ctx.spec.shape, seed=ctx.options.seed)
    if (built.int8 or {}).get("speedup_vs_fp32"):   # measured side by side by the target, in the same run
        manifest.latency["speedup_vs_fp32"] = built.int8["speedup_vs_fp32"]


def _keep_failed(final: Path, staging, manifest: dict, built: BuildOutput, what: str) -> None:
    """Move the failed bundle to ``<final>.failed`` (the previous good artefact stays) and raise GateFailed."""
    failed = final.with_name(final.name + ".failed")
    shutil.rmtree(failed, ignore_errors=True)
    os.rename(staging.path, failed)
    parity = manifest.get("parity") or {}
    reason = (f"failed its parity gate: {parity['reason']}" if parity and not parity.get("passed")
              else f"failed a check: {built.failed}")
    raise GateFailed(f"{what} {reason}",
                     hint=f"the failed bundle is kept at {failed} for inspection; "
                          f"{'the previous artefact is untouched' if final.exists() else 'nothing was written to ' + str(final)}")


def validate(bundle: str | os.PathLike, *, threads: int = 1, latency: bool = True) -> dict:
    """Verify a finished bundle's hashes, run its model on this machine's runtime on its reference inputs, gate
    and time it. Returns a results dict (``status``: validated, failed or pending)."""
    root = Path(bundle)
    manifest = artefact.verify(root)  # refuses a tampered bundle before running anything in it
    tgt = targets.get(manifest["target"])
    result = tgt.validate_on_device(root, manifest, latency=latency)   # e.g. Core ML on a Mac: every compute unit
    if result is not None:
        return result
    try:
        runner = tgt.open_runner(root, manifest, threads=threads)
    except ModelFileError as exc:
        raise InputError(str(exc), hint=exc.hint) from None
    if runner is None:
        return {"status": "pending", "reason": tgt.runtime_unavailable_reason(manifest)}
    with runner:
        try:
            return validate_bundle(root, manifest, runner, latency=latency)
        except ExportError as exc:
            raise ToolchainError(str(exc), hint=exc.hint) from None


def time_bundle(bundle: str | os.PathLike, timing_dir: str | os.PathLike, *, threads: int = 1, seed: int = 0) -> dict:
    """Measure the latency of a bundle exported with ``timing_dir`` (and, for an INT8 ONNX bundle, FP32 and
    INT8 side by side) and write it into its manifest; the files in ``timing_dir`` are removed after."""
    root, tdir = Path(bundle), Path(timing_dir)
    with artefact.locked(root):
        manifest = artefact.verify(root)
        if "deferred" not in (manifest.get("latency") or {}):
            return manifest
        tgt = targets.get(manifest["target"])
        shape = InputSpec.from_dict(manifest["input"]).shape
        runner = tgt.open_runner(root, manifest, threads=threads)
        if runner is None:
            raise ToolchainError(f"{root}: no runtime here to time it", hint=tgt.runtime_unavailable_reason(manifest))
        with runner:
            manifest["latency"] = measure_latency(runner, shape, seed=seed)
        fp32 = tdir / FP32_FOR_TIMING
        if fp32.exists():
            defaults = tdir / INT8_DEFAULTS_FOR_TIMING
            manifest["int8"] = side_by_side(fp32, root / manifest["model_file"], shape, threads=threads, seed=seed,
                                            defaults_path=defaults if defaults.exists() else None)
            manifest["latency"]["speedup_vs_fp32"] = manifest["int8"]["speedup_vs_fp32"]
        manifest = artefact.write_manifest(root, manifest)
    shutil.rmtree(tdir, ignore_errors=True)
    return manifest


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
        try:   # UTF-8 (a BOM dropped), a regular file of bounded size; else one line naming the file and line
            labels = [ln for ln in read_text_lines(labels_file, "labels file") if ln.strip()]
        except CalibrationError as exc:
            raise InputError(str(exc), hint="pass a text file with one label per line, in class-index order") from None
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


def _model_metadata(entry, spec, winfo, precision: Precision, target: str, labels: list) -> dict:
    return {"edgecnn.version": edgecnn_version(), "edgecnn.arch": entry.name, "edgecnn.precision": str(precision),
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


def _manifest(entry, spec, target: str, precision: Precision, winfo, labels, calib_set, options: ExportOptions,
              built: BuildOutput) -> Manifest:
    return Manifest(
        arch=entry.name, family=entry.family, target=target, precision=str(precision), status="pending",
        model_file=built.model_file, weights=winfo.to_dict(), input=spec.to_dict(),
        input_from="zoo" if spec == entry.spec else "override (custom-trained checkpoint)",
        output=built.output or {"name": "logits", "shape": [1, winfo.num_classes], "kind": "logits (no softmax)"},
        num_classes=winfo.num_classes, labels_file="labels.txt", reference_file=REFERENCE_FILE, export=built.export,
        recipe=built.recipe, calibration={**calib_set.describe(), "used_for": _calib_use(precision, winfo)},
        seed=options.seed, toolchain=toolchain(), edgecnn_version=edgecnn_version(), int8=built.int8,
        tensorrt=built.tensorrt, coreml=built.coreml, local_checks=list(built.local_checks))


def _calib_use(precision: Precision, winfo) -> str:
    uses = ["held-out evaluation (parity)"]
    if precision == Precision.INT8:
        uses.insert(0, "INT8 range calibration")
    if winfo.bn_reestimated:
        uses.insert(0, "BatchNorm re-estimation (random init)")
    return ", ".join(uses)
