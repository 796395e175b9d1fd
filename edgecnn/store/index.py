"""The store's ``index.json``: one entry per published (arch, target, precision, version).

It is the only mutable object in a store; archives and manifests are written once under names that
carry their content hash. An index read from a store (possibly a web server we do not control) is
validated before use: entry fields present, archive paths plain names inside the store.
"""
from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Iterable, List, Optional

from ..errors import IntegrityError, UsageError

INDEX = "index.json"
INDEX_SCHEMA = 1
STATUSES = ("validated", "pending", "failed")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
ENTRY_FIELDS = ("arch", "target", "precision", "version", "status", "sha256", "bytes", "archive", "manifest")

# From the light module, not edgecnn.targets: that one pulls in onnx, and `edgecnn pull` has to run on a
# device that has neither onnx nor torch.
from ..target_names import TARGET_ALIASES  # noqa: E402  (re-exported for callers)
from ..target_names import canonical_target as normalize_target  # noqa: E402


def check_version(version: str) -> str:
    if not isinstance(version, str) or not VERSION_RE.match(version):
        raise UsageError(f"invalid version {version!r}",
                         hint="use letters, digits and . _ + - (e.g. 1, 1.2.0, 2026.11.1), at most 64 characters")
    return version


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
    try:
        index = json.loads(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{where} is not valid JSON ({exc})", hint="the store's index.json is damaged") from None
    if not isinstance(index, dict) or not isinstance(index.get("artefacts"), list):
        raise IntegrityError(f"{where} is not an edgecnn store index (no 'artefacts' list)")
    if index.get("schema_version") != INDEX_SCHEMA:
        raise IntegrityError(f"{where}: unknown index schema version {index.get('schema_version')!r} "
                             f"(this edgecnn reads {INDEX_SCHEMA})", hint="use the edgecnn version that wrote the store")
    for i, e in enumerate(index["artefacts"]):
        missing = [k for k in ENTRY_FIELDS if not isinstance(e, dict) or k not in e]
        if missing:
            raise IntegrityError(f"{where}: entry {i} lacks {', '.join(missing)}")
        for k in ("archive", "manifest"):
            if not isinstance(e[k], str) or not _NAME_RE.match(e[k]):
                raise IntegrityError(f"{where}: entry {i} names {k} {e[k]!r}, not a plain file name in the store",
                                     hint="refusing paths that leave the store")
        if not isinstance(e["sha256"], str) or not _SHA_RE.match(e["sha256"]):
            raise IntegrityError(f"{where}: entry {i} has a malformed sha256")
    return index


def dump(index: dict) -> bytes:
    index = dict(index)
    index["artefacts"] = sorted(index["artefacts"], key=lambda e: (key_of(e), version_key(e)))
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")


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
