"""The store's ``index.json``: one entry per published (arch, target, precision, version).

It is the only mutable object in a store; archives and manifests are written once under names that
carry their content hash. An index read from a store (possibly a web server we do not control) is
validated before use, field by field: names that become paths are safe identifiers, object names are plain
file names inside the store, hashes are 64 hex digits, numbers are numbers; one clear line otherwise.
"""
from __future__ import annotations

import datetime as _dt
import re
from typing import Any, Iterable, List, Optional

from ..errors import IntegrityError, UsageError
from ..manifest import SHA256, is_identifier
from ..safe_files import dump_json, parse_json

INDEX = "index.json"
INDEX_SCHEMA = 1
STATUSES = ("validated", "pending", "failed")
VERSION_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
MAX_INDEX_BYTES = 64 << 20      # ~100,000 entries of ~600 bytes
ENTRY_FIELDS = ("arch", "target", "precision", "version", "status", "sha256", "bytes", "archive", "manifest",
                "manifest_sha256")
_OPTIONAL_TYPES = {"files": int, "created": str, "edgecnn_version": (str, type(None)),
                   "published_with": (str, type(None)), "model_file": (str, type(None)), "weights": (str, type(None)),
                   "parity": dict, "latency": dict, "pending": (str, type(None))}

# From the light module, not edgecnn.targets: that one pulls in onnx, and `edgecnn pull` has to run on a
# device that has neither onnx nor torch.
from ..target_names import TARGET_ALIASES  # noqa: E402  (re-exported for callers)
from ..target_names import canonical_target as normalize_target  # noqa: E402


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.fullmatch(version):
        raise UsageError(f"invalid version {version!r}",
                         hint="use letters, digits and . _ + - (e.g. 1, 1.2.0, 2026.11.1), at most 64 characters")
    return version


def is_object_name(name: Any) -> bool:
    """A plain file name inside the store: no folder, not hidden, no control characters."""
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def empty() -> dict:
    return {"schema_version": INDEX_SCHEMA, "artefacts": []}


def key_of(e: dict) -> tuple:
    return (e["arch"], e["target"], e["precision"])


def version_key(e: dict):
    """Order versions: PEP 440 versions by value; anything else by publication time, below them."""
    from packaging.version import InvalidVersion, Version

    try:
        return (1, Version(e["version"]), e.get("created", ""))
    except InvalidVersion:
        return (0, e.get("created", ""), e["version"])


def next_version(entries: Iterable[dict]) -> str:
    """The version after the latest one: "1" for the first, else its last number plus one (1.2.3 -> 1.2.4)."""
    from packaging.version import InvalidVersion, Version

    entries = list(entries)
    if not entries:
        return "1"
    latest = max(entries, key=version_key)["version"]
    try:
        release = list(Version(latest).release)
    except InvalidVersion:
        raise UsageError(f"cannot pick the version after {latest!r} automatically", hint="pass --version") from None
    release[-1] += 1
    return ".".join(str(n) for n in release)


def parse(data: bytes, where: str) -> dict:
    """Parse and validate an index read from a store."""
    index = parse_json(data, where, hint="the store's index.json is damaged")
    if not isinstance(index, dict) or not isinstance(index.get("artefacts"), list):
        raise IntegrityError(f"{where} is not an edgecnn store index (no 'artefacts' list)")
    if index.get("schema_version") != INDEX_SCHEMA:
        raise IntegrityError(f"{where}: unknown index schema version {str(index.get('schema_version'))[:20]!r} "
                             f"(this edgecnn reads {INDEX_SCHEMA})", hint="use the edgecnn version that wrote the store")
    seen = set()
    for i, e in enumerate(index["artefacts"]):
        wrong = entry_problems(e)
        if wrong:
            raise IntegrityError(f"{where}: entry {i} " + "; ".join(wrong[:3]),
                                 hint="the store's index.json was edited or damaged; refusing paths that leave the "
                                      "store and fields of the wrong type")
        key = (*key_of(e), e["version"])
        if key in seen:
            raise IntegrityError(f"{where}: entry {i} repeats version {e['version']} of {' '.join(key[:3])}",
                                 hint="the store's index.json was edited or damaged")
        seen.add(key)
    return index


def entry_problems(e: Any) -> List[str]:
    """What is wrong with one index entry (empty: nothing)."""
    if not isinstance(e, dict):
        return [f"is {type(e).__name__}, not an object"]
    missing = [k for k in ENTRY_FIELDS if k not in e]
    if missing:
        return [f"lacks {', '.join(missing)}"]
    out = [f"has {k} {e[k]!r}, not a plain name" for k in ("arch", "target", "precision") if not is_identifier(e[k])]
    if not isinstance(e["version"], str) or not VERSION_RE.fullmatch(e["version"]):
        out.append(f"has version {e['version']!r}, not letters, digits and . _ + -")
    if e["status"] not in STATUSES:
        out.append(f"has status {e['status']!r}, not one of {', '.join(STATUSES)}")
    for k in ("archive", "manifest"):
        if not is_object_name(e[k]):
            out.append(f"names {k} {e[k]!r}, not a plain file name in the store")
    for k in ("sha256", "manifest_sha256"):
        if not isinstance(e[k], str) or not SHA256.fullmatch(e[k]):
            out.append(f"has a malformed {k}")
    if not isinstance(e["bytes"], int) or isinstance(e["bytes"], bool) or e["bytes"] < 0:
        out.append(f"has bytes {e['bytes']!r}, not a whole number >= 0")
    for k, kind in _OPTIONAL_TYPES.items():
        if k in e and (not isinstance(e[k], kind) or isinstance(e[k], bool)):
            out.append(f"has {k} of type {type(e[k]).__name__}")
    return out


def dump(index: dict) -> bytes:
    index = dict(index)
    index["artefacts"] = sorted(index["artefacts"], key=lambda e: (key_of(e), version_key(e)))
    return (dump_json(index, indent=2, sort_keys=True) + "\n").encode("utf-8")


def find(index: dict, arch: str, target: str, precision: str, version: Optional[str] = None) -> List[dict]:
    out = [e for e in index["artefacts"] if key_of(e) == (arch, target, precision)]
    if version is not None:
        out = [e for e in out if e["version"] == version]
    return sorted(out, key=version_key)


def resolve(index: dict, arch: str, target: str, precision: str, version: Optional[str] = None, *,
            allow_pending: bool = False, where: str = "the store") -> dict:
    """The entry to pull: exactly ``version`` when given, else the latest validated one (or pending, if allowed)."""
    target = normalize_target(target)
    precision = (precision or "").strip().lower()
    matches = find(index, arch, target, precision)
    if not matches:
        have = sorted({f"{e['arch']} {e['target']} {e['precision']}" for e in index["artefacts"]})
        near = [h for h in have if h.split()[0] == arch]
        raise UsageError(f"{where} has no {arch} {target} {precision}",
                         hint=("it has: " + ", ".join(near)) if near else
                         (f"`edgecnn ls --from {where}` lists what it has" if have else "the store is empty"))
    if version is not None:
        exact = [e for e in matches if e["version"] == version]
        if not exact:
            raise UsageError(f"{where} has no version {version!r} of {arch} {target} {precision}",
                             hint="versions: " + ", ".join(e["version"] for e in matches))
        return exact[0]
    wanted = ("validated", "pending") if allow_pending else ("validated",)
    ok = [e for e in matches if e["status"] in wanted]
    if not ok:
        statuses = ", ".join(f"{e['version']} ({e['status']})" for e in matches)
        raise UsageError(f"{where} has no validated version of {arch} {target} {precision} (it has {statuses})",
                         hint="pass --allow-pending for a bundle that is validated on its device (TensorRT, Core ML), "
                              "or --version to pick one explicitly")
    return ok[-1]


def summarize(manifest: dict) -> dict:
    """The parity/latency summary an index entry carries (the full numbers stay in the manifest)."""
    out = {}
    p = manifest.get("parity")
    if isinstance(p, dict):
        out["parity"] = {k: p[k] for k in ("gate", "passed", "max_rel_error", "cosine", "top1_agreement", "samples")
                         if k in p}
    lat = manifest.get("latency")
    if isinstance(lat, dict) and isinstance(lat.get("batch1"), dict):
        rt = lat.get("runtime") or {}
        out["latency"] = {"batch1_p50_ms": lat["batch1"].get("p50_ms"), "runtime": rt.get("runtime"),
                          "threads": rt.get("threads")}
    if manifest.get("pending"):
        out["pending"] = manifest["pending"]
    return out


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")
