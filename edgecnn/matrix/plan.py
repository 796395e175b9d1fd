"""Planning a matrix run: expand ARCHS x TARGETS x PRECISIONS into cells, refuse the impossible ones up
front (with the registry's own UsageError message, so no work is spent on them), and compute for every
other cell the fingerprint of its inputs, which decides whether an earlier result can be reused.

The inputs of a cell are everything that can change its artefact: arch, target, precision, the weights
actually resolved (source + sha256 of the file), the calibration/evaluation set fingerprint, the export
options, the edgecnn version, the toolchain versions and a fingerprint of the exporting code itself.
The code fingerprint is deliberate: the matrix is also a CI gate against the scorecard, and a gate that
skipped a cell because "the inputs are unchanged" after the exporter's code changed would never see the
regression it exists to catch.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

from .. import artefact, targets, weights as weights_mod, zoo
from ..errors import EdgeError, InputError, UsageError
from ..options import ExportOptions
from ..versions import edgecnn_version, toolchain

from .defaults import DEFAULT_ARCHS, DEFAULT_PRECISIONS, DEFAULT_TARGETS  # noqa: F401 (re-exported)


@dataclass
class Cell:
    """One arch x target x precision of the matrix."""
    arch: str                        # canonical zoo name (or what the user typed, when it is unknown)
    target: str                      # canonical target name (or what the user typed)
    precision: str
    order: int = 0                   # position in the plan (report order)
    error: Optional[EdgeError] = None  # refused at plan time (unknown arch/target, unsupported precision)
    heavy: bool = False              # never run two heavy cells at once
    mem_mb: float = 0.0              # estimated peak memory of the cell's process
    key: Dict[str, object] = field(default_factory=dict)
    key_sha: str = ""

    @property
    def id(self) -> str:
        return f"{self.arch}/{self.target}/{self.precision}"

    @property
    def slug(self) -> str:
        return f"{self.arch}-{self.target}-{self.precision}"


def split_names(value: Optional[Iterable[str] | str]) -> List[str]:
    """'a,b c' or ['a,b', 'c'] -> ['a', 'b', 'c'] (the Makefile passes space- or comma-separated lists)."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out: List[str] = []
    for item in items:
        for part in str(item).replace(",", " ").split():
            if part not in out:
                out.append(part)
    return out


def expand(archs: Sequence[str], target_names: Sequence[str], precisions: Sequence[str]) -> List[Cell]:
    """Every combination, in a stable order; combinations the registry refuses carry their UsageError."""
    cells: List[Cell] = []
    for arch in archs:
        try:
            entry = zoo.resolve(arch)
            arch_name, arch_error = entry.name, None
        except zoo.UnknownArchError as exc:
            entry, arch_name = None, arch
            arch_error = UsageError(str(exc), hint="`edgecnn list` shows every architecture")
        for tname in target_names:
            try:
                tgt = targets.get(tname)
                target_name, target_error = tgt.name, None
            except UsageError as exc:   # unknown, or known but not built in this version: the cell shows why
                key = tname.strip().lower()
                tgt, target_name, target_error = None, getattr(targets, "_ALIASES", {}).get(key, key), exc
            for precision in precisions:
                p = precision.strip().lower()
                error = arch_error or target_error
                if error is None:
                    try:
                        p = targets.check_precision(tgt, p)
                    except UsageError as exc:
                        error = exc
                cell = Cell(arch_name, target_name, p, order=len(cells), error=error)
                if entry is not None:
                    cell.heavy = bool(entry.heavy) or p.startswith("int8") or target_name == "coreml"
                    cell.mem_mb = estimate_memory_mb(entry, target_name, p)
                if not any(c.id == cell.id for c in cells):
                    cells.append(cell)
    return cells


def estimate_memory_mb(entry, target: str, precision: str) -> float:
    """A first guess of a cell's peak RSS, replaced by the measured peak once the cell has run once.

    Measured here: an FP32 ONNX cell of a focus net peaks at 1.3-1.75 GB RSS (torch, onnxruntime, the
    model, 96 held-out and up to 256 calibration images). Calibration (INT8) and the Core ML converter hold
    more copies of the model and activations; heavy archs (VGG, ResNet-101+, EfficientNet-B3+) are large.
    """
    mb = 1700.0
    if entry.heavy:
        mb += 2500.0
    if precision.startswith("int8"):
        mb += 1200.0
    if target == "coreml":
        mb += 1000.0
    pixels = entry.spec.height * entry.spec.width / (224.0 * 224.0)
    return mb * max(1.0, pixels ** 0.5)


# ------------------------------------------------------------------------------------------ input keys
def weights_identity(entry, weights: str) -> Dict[str, object]:
    """Which weights ``weights_mod.build`` will use for ``entry``, without building the model.

    Mirrors the resolution rules of ``edgecnn.weights.build`` (auto: packaged, then the torch hub cache,
    else random). After a cell runs, the matrix checks this prediction against the manifest and does not
    trust a result for reuse when they differ, so a drift between the two can only cost a re-run.
    """
    w = (weights or "auto").strip()
    if w in ("none", "random"):
        return {"source": "random", "sha256": None}
    if w in ("auto", "imagenet"):
        if entry.packaged_weights:
            path = weights_mod.packaged_weights_file(entry)
            if path is not None and path.exists():
                return {"source": f"package:{entry.packaged_weights}", "sha256": _cached_sha(path)}
        elif entry.torchvision_weights:
            cached = weights_mod.hub_cache_file(entry)
            if cached is not None and cached.exists():
                return {"source": f"imagenet:{entry.torchvision_weights}", "sha256": _cached_sha(cached)}
        if w == "imagenet":
            # the export itself will fail (or download); key on the request so the failure is re-tried
            return {"source": "imagenet:unavailable", "sha256": None}
        return {"source": "random", "sha256": None}
    path = Path(w).expanduser()
    if not path.is_file():
        return {"source": f"checkpoint:{w}", "sha256": None}   # the export fails clearly; never reused
    return {"source": f"checkpoint:{path.resolve()}", "sha256": _cached_sha(path)}


def _cached_sha(path: Path) -> str:
    st = path.stat()
    return _sha_for(str(path.resolve()), st.st_size, st.st_mtime_ns)


@lru_cache(maxsize=None)
def _sha_for(path: str, size: int, mtime_ns: int) -> str:
    return artefact.sha256_file(path)


@lru_cache(maxsize=None)
def code_fingerprint() -> str:
    """sha256 over the source of everything that shapes an artefact: the ``calibration`` and ``exporters``
    packages and ``edgecnn`` itself, except the matrix/report/CLI modules (they cannot change a bundle) —
    but with the matrix's worker, which sets up the process the export runs in."""
    import calibration
    import exporters

    import edgecnn

    h = hashlib.sha256()
    for pkg in (calibration, exporters, edgecnn):
        root = Path(pkg.__file__).parent
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root.parent).as_posix()
            if (rel.startswith("edgecnn/matrix/") and rel != "edgecnn/matrix/worker.py") or rel.startswith("edgecnn/cli/"):
                continue
            h.update(rel.encode())
            h.update(path.read_bytes())
    return h.hexdigest()


class CalibrationFingerprints:
    """The calibration/evaluation set fingerprint per input spec (the same images preprocessed for
    224 px and 28 px models are different sets), computed once per spec."""

    def __init__(self, calib: Optional[str], options: ExportOptions, strict: bool = False,
                 eval_set: Optional[str] = None):
        self.calib, self.options, self.strict, self.eval_set = calib, options, strict, eval_set
        self._cache: Dict[str, str] = {}

    def __call__(self, spec, class_names=None) -> str:
        from calibration import CalibrationError, CalibrationSet

        k = json.dumps([spec.to_dict(), list(class_names or [])], sort_keys=True)
        if k not in self._cache:
            try:
                cs = CalibrationSet.create(self.calib, spec, calib_size=self.options.calib_size,
                                           eval_size=self.options.eval_size, seed=self.options.seed,
                                           strict=self.strict, eval_source=self.eval_set, class_names=class_names)
            except CalibrationError as exc:
                raise InputError(str(exc), hint=exc.hint) from None
            self._cache[k] = cs.fingerprint()
        return self._cache[k]


def input_key(cell: Cell, *, weights: str, calib_fp: CalibrationFingerprints, options: ExportOptions,
              extra: Optional[dict] = None) -> Dict[str, object]:
    entry = zoo.resolve(cell.arch)
    return {
        "arch": cell.arch, "target": cell.target, "precision": cell.precision,
        "weights": weights_identity(entry, weights),
        "calibration": calib_fp(entry.spec, zoo.labels_for(entry)),
        "options": _jsonable(asdict(options)),
        "export_args": _jsonable(extra or {}),
        "edgecnn_version": edgecnn_version(),
        "toolchain": toolchain(),
        "code": code_fingerprint(),
    }


def key_sha(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def _jsonable(obj):
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
