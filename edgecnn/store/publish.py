"""``edgecnn publish``: pack a verified bundle, upload it with its manifest, record it in the index.

Versions are immutable. Publishing a version that exists with the same archive sha256 is a no-op;
with different bytes it is refused. The check runs twice: once before uploading (to fail fast) and
again inside the index update, which is serialised against other publishers (a lock for a folder, a
conditional write for S3), so two publishers racing for one version cannot both win.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import artefact
from ..errors import UsageError
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
                f"  store    {self.store}\n  archive  {e['archive']}  ({e['bytes'] / 1e6:.2f} MB, sha256 {e['sha256']})")


def publish(bundle: str | os.PathLike, store: Store, version: Optional[str] = None, *,
            allow_unvalidated: bool = False) -> PublishResult:
    bundle = Path(bundle)
    manifest = artefact.verify(bundle)   # a modified bundle never leaves the machine
    status = manifest.get("status")
    if status not in PUBLISHABLE and not allow_unvalidated:
        raise UsageError(f"{bundle} is {status!r}, not validated: refusing to publish it",
                         hint="fix and re-export it, or pass --allow-unvalidated to publish it marked as such")
    if version is not None:
        idx.check_version(version)
    if not store.writable:
        store.update_index(lambda i: None)   # raises the read-only error before any work
    key = (manifest["arch"], manifest["target"], manifest["precision"])

    with tempfile.TemporaryDirectory(prefix="edgecnn-publish-") as tmp:
        packed = archive.pack(bundle, Path(tmp) / "bundle.tar.gz")
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

        base = f"{key[0]}-{key[1]}-{key[2]}-{version}.{sha[:16]}"
        manifest_path = Path(tmp) / "manifest.json"
        manifest_path.write_bytes((bundle / artefact.MANIFEST).read_bytes())
        entry = {
            "arch": key[0], "target": key[1], "precision": key[2], "version": version, "status": status,
            "edgecnn_version": manifest.get("edgecnn_version"), "published_with": edgecnn_version(),
            "model_file": manifest.get("model_file"), "weights": (manifest.get("weights") or {}).get("source"),
            **idx.summarize(manifest),
            "sha256": sha, "bytes": packed["bytes"], "files": packed["files"],
            "archive": base + archive.SUFFIX, "manifest": base + ".manifest.json",
            "manifest_sha256": artefact.sha256_file(manifest_path), "created": idx.utc_now(),
        }
        store.put(Path(tmp) / "bundle.tar.gz", entry["archive"])
        store.put(manifest_path, entry["manifest"])

        outcome = {}

        def add(current: dict) -> Optional[dict]:
            found = _clash(idx.find(current, *key), version, sha, bundle)
            if found is not None:
                outcome["unchanged"] = found
                return None
            return {**current, "artefacts": current["artefacts"] + [entry]}

        store.update_index(add)
    if "unchanged" in outcome:
        return PublishResult(outcome["unchanged"], "unchanged", store.url)
    return PublishResult(entry, "published", store.url)


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
