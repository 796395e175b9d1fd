"""``edgecnn publish``: pack a verified bundle, upload it with its manifest, record it in the index.

Versions are immutable. Publishing a version that exists with the same archive sha256 is a no-op;
with different bytes it is refused. The check runs twice: once before uploading (to fail fast) and
again inside the index update, which is serialised against other publishers (a lock for a folder, a
conditional write for S3), so two publishers racing for one version cannot both win — and the loser
removes what it uploaded (unless an index entry names it), so no orphan stays in the store.

What is published is exactly what was verified: the manifest's bytes are read once, checked, packed and
uploaded as read, and every file is hashed again while it is packed. Every name the store writes comes from
validated fields (arch, target, precision: identifiers; the version: ``index.check_version``), so a
manifest cannot steer a write outside the store.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import artefact
from ..errors import IntegrityError, UsageError
from ..safe_files import parse_json, read_regular
from ..safe_text import printable
from ..versions import edgecnn_version
from . import archive, index as idx
from .backends import Store

PUBLISHABLE = ("validated", "pending")   # pending: validated on its device (a TensorRT engine, Core ML on a Mac)


@dataclass
class PublishResult:
    entry: dict
    action: str          # "published" | "unchanged"
    store: str

    def summary(self) -> str:
        e = self.entry
        what = "already published (same bytes): nothing to do" if self.action == "unchanged" else "published"
        return (f"{e['arch']} {e['target']} {e['precision']} version {e['version']} ({e['status']}): {what}\n"
                f"  store    {printable(self.store)}\n  archive  {e['archive']}  ({e['bytes'] / 1e6:.2f} MB, "
                f"sha256 {e['sha256']})")


def publish(bundle: str | os.PathLike, store: Store, version: Optional[str] = None, *,
            allow_unvalidated: bool = False) -> PublishResult:
    bundle = Path(bundle)
    manifest = artefact.verify(bundle)   # a modified bundle never leaves the machine
    manifest_bytes = _verified_bytes(bundle, manifest)
    status = manifest["status"]
    if status not in PUBLISHABLE and not allow_unvalidated:
        raise UsageError(f"{bundle} is {status!r}, not validated: refusing to publish it",
                         hint="fix and re-export it, or pass --allow-unvalidated to publish it marked as such")
    if version is not None:
        idx.check_version(version)
    store.update_index(lambda i: None)   # a read-only store, or an index lock that cannot be taken: before any upload
    key = (manifest["arch"], manifest["target"], manifest["precision"])

    with tempfile.TemporaryDirectory(prefix="edgecnn-publish-") as tmp:
        packed = archive.pack(bundle, Path(tmp) / "bundle.tar.gz", manifest=manifest_bytes)
        sha = packed["sha256"]
        existing = idx.find(store.read_index(missing_ok=True), *key)
        if version is None:
            same = [e for e in existing if e["sha256"] == sha]
            if same:
                return PublishResult(same[-1], "unchanged", store.url)
            version = idx.next_version(existing)
        clash = _clash(existing, version, sha, bundle)
        if clash is not None:
            return PublishResult(clash, "unchanged", store.url)
        manifest_path = Path(tmp) / "manifest.json"
        manifest_path.write_bytes(manifest_bytes)
        entry = _entry(manifest, key, version, packed, _sha(manifest_bytes))
        objects = {entry["archive"]: Path(tmp) / "bundle.tar.gz", entry["manifest"]: manifest_path}
        outcome = _upload_and_record(store, entry, objects, bundle)
    return PublishResult(outcome, "unchanged" if outcome is not entry else "published", store.url)


def _verified_bytes(bundle: Path, manifest: dict) -> bytes:
    """The bytes of manifest.json, read once more and checked to be the manifest ``verify`` accepted."""
    path = bundle / artefact.MANIFEST
    data = read_regular(path, artefact.MAX_MANIFEST_BYTES, "a manifest", follow_links=False)
    if parse_json(data, str(path)) != manifest:
        raise IntegrityError(f"{path} changed while it was being published",
                             hint="something is writing into the bundle; nothing was published")
    return data


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _entry(manifest: dict, key: tuple, version: str, packed: dict, manifest_sha256: str) -> dict:
    base = f"{key[0]}-{key[1]}-{key[2]}-{version}.{packed['sha256'][:16]}"
    entry = {
        "arch": key[0], "target": key[1], "precision": key[2], "version": version, "status": manifest["status"],
        "edgecnn_version": manifest.get("edgecnn_version"), "published_with": edgecnn_version(),
        "model_file": manifest.get("model_file"), "weights": (manifest.get("weights") or {}).get("source"),
        **idx.summarize(manifest),
        "sha256": packed["sha256"], "bytes": packed["bytes"], "files": packed["files"],
        "archive": base + archive.SUFFIX, "manifest": base + ".manifest.json",
        "manifest_sha256": manifest_sha256, "created": idx.utc_now(),
    }
    wrong = idx.entry_problems(entry)
    if wrong:   # every field comes from a verified manifest: this is a bug, never a write outside the store
        raise IntegrityError(f"refusing to publish an index entry that {'; '.join(wrong[:2])}")
    return entry


def _upload_and_record(store: Store, entry: dict, objects: dict, bundle: Path) -> dict:
    """Upload ``objects`` ({name: local file}), then add ``entry`` to the index; the entry kept (ours, or the
    existing one with these very bytes). If ours is not recorded, what we uploaded is removed again unless
    an index entry names it (a rival published the same bytes under the same name)."""
    key = idx.key_of(entry)
    outcome = {}

    def add(current: dict) -> Optional[dict]:
        found = _clash(idx.find(current, *key), entry["version"], entry["sha256"], bundle)
        if found is not None:
            outcome["kept"] = found
            return None
        for name, local in objects.items():   # a rival's cleanup may have removed a same-named object
            if not store.has(name):
                store.put(local, name)
        outcome["kept"] = entry
        return {**current, "artefacts": current["artefacts"] + [entry]}

    try:
        for name, local in objects.items():
            store.put(local, name)
        store.update_index(add)
    finally:
        if outcome.get("kept") is not entry:
            _remove_unrecorded(store, list(objects))
    return outcome["kept"]


def _remove_unrecorded(store: Store, names: list) -> None:
    """Delete ``names`` from the store unless an index entry names them (under the index's lock, so no
    publisher records them while they go)."""
    def sweep(current: dict) -> None:
        recorded = {e[k] for e in current["artefacts"] for k in ("archive", "manifest")}
        for name in names:
            if name not in recorded:
                store.delete(name)
        return None

    try:
        store.update_index(sweep)
    except Exception:   # noqa: BLE001 - the publish's own error is the one to report; cleanup is best effort
        pass


def _clash(existing: list, version: str, sha: str, bundle: Path) -> Optional[dict]:
    """The existing entry when ``version`` holds these very bytes; an error when it holds others."""
    for e in existing:
        if e["version"] == version:
            if e["sha256"] == sha:
                return e
            raise UsageError(f"version {version} of {e['arch']} {e['target']} {e['precision']} is already published "
                             f"with different content (sha256 {e['sha256'][:12]}…, {bundle} packs to {sha[:12]}…): "
                             f"versions are immutable",
                             hint="publish it under a new --version (or leave --version out to take the next one)")
    return None
