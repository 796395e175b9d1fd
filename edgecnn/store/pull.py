"""``edgecnn pull``: fetch exactly one published bundle and prove it is the one the index names.

    index entry -> download (progress bar, sha256 computed on the fly) -> archive sha256 == index (and lock)
    -> safe extraction into a staging sibling -> every file's sha256 == manifest (``artefact.verify``)
    -> manifest identity == index entry -> atomic swap into ``<to>/<arch>/<target>-<precision>``

Anything that does not check out raises ``IntegrityError``; the downloaded archive and the staging
folder are deleted on the way out, and the destination keeps whatever it held before — a refused pull into
an empty destination leaves nothing at all (no lock file, no empty folder). The manifest is covered too: its
sha256 must be the one the index records (and the one a lock file pins). A download may not exceed the
size the index records; a stalled or broken download is retried a few times, then named in one line. A
killed pull (SIGTERM/Ctrl-C) cleans up the same way; after SIGKILL only hidden ``.staging-*`` folders can
remain, and the next pull or export of that bundle removes them.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .. import artefact
from ..errors import IntegrityError, NetworkError
from ..safe_text import printable
from . import archive, index as idx
from .backends import Store

CHUNK = 1 << 16


@dataclass
class PullResult:
    path: Path
    entry: dict
    action: str          # "pulled" | "unchanged"
    files: int = 0       # files checked against manifest.json

    def summary(self) -> str:
        e = self.entry
        what = "already up to date" if self.action == "unchanged" else "pulled and verified"
        note = "" if e["status"] == "validated" else (
            f"\n  note     status {e['status']}: " + printable(e.get("pending") or "not validated by the publisher"))
        return (f"{e['arch']} {e['target']} {e['precision']} version {e['version']} ({e['status']}): {what}\n"
                f"  folder   {printable(self.path)}\n  sha256   {e['sha256']}  (archive; its {self.files} files match "
                f"manifest.json)" + note)


def pull(store: Store, arch: str, target: str, precision: str, version: Optional[str] = None, *,
         to: str | os.PathLike = "artefacts", allow_pending: bool = False, quiet: bool = False) -> PullResult:
    entry = idx.resolve(store.read_index(), arch, target, precision, version, allow_pending=allow_pending,
                        where=store.url)
    return pull_entry(store, entry, to=to, quiet=quiet)


def pull_entry(store: Store, entry: dict, *, to: str | os.PathLike = "artefacts", expect_sha256: Optional[str] = None,
               expect_manifest_sha256: Optional[str] = None, quiet: bool = False) -> PullResult:
    final = artefact.bundle_dir(to, entry["arch"], entry["target"], entry["precision"])
    label = f"{entry['arch']} {entry['target']} {entry['precision']} {entry['version']}"
    for what, pinned, listed in (("sha256", expect_sha256, entry["sha256"]),
                                 ("manifest sha256", expect_manifest_sha256, entry["manifest_sha256"])):
        if pinned is not None and pinned != listed:
            raise IntegrityError(f"{label}: the store's index says {what} {listed}, the lock file pins {pinned}",
                                 hint="the published bytes differ from the locked ones; nothing was downloaded — "
                                      "re-lock deliberately (`edgecnn lock add`) if the change is expected")
    with artefact.locked(final):
        current = _up_to_date(final, entry)
        if current is not None:
            return PullResult(final, entry, "unchanged", len(current["files"]))
        with artefact.Staging(final) as download:   # also tidies what a killed pull left here
            got = download.path / entry["archive"]
            sha = _download(store, entry, got, label, quiet)
            if sha != entry["sha256"]:
                raise IntegrityError(f"{label}: archive sha256 mismatch (index {entry['sha256'][:16]}…, downloaded "
                                     f"{sha[:16]}…)", hint=f"the download was deleted and nothing was written to "
                                     f"{final}; the store's copy is damaged or was altered")
            manifest = _extract_checked(got, final, entry, label)
    return PullResult(final, entry, "pulled", len(manifest["files"]))


def _extract_checked(got: Path, final: Path, entry: dict, label: str) -> dict:
    """Extract the archive into a second staging folder, check it, swap it in; the manifest it held."""
    stage = artefact.Staging(final)   # not entered: that would tidy away the download (same process id)
    stage.path.mkdir()
    try:
        try:
            archive.safe_extract(got, stage.path)
            manifest = artefact.verify(stage.path)
            _check_identity(manifest, entry, stage.path)
        except IntegrityError as exc:
            what = exc.message.replace(f"{stage.path}: ", "the archive's files do not match its manifest: ")
            raise IntegrityError(f"{label}: {what}",
                                 hint=f"the download was deleted and nothing was written to {final}") from None
        stage.commit()
    finally:
        shutil.rmtree(stage.path, ignore_errors=True)
    return manifest


def _up_to_date(final: Path, entry: dict) -> Optional[dict]:
    """The manifest of ``final`` when it already is this entry, intact; None when it must be fetched."""
    try:
        if artefact.sha256_file(final / artefact.MANIFEST) != entry["manifest_sha256"]:
            return None
        return artefact.verify(final)
    except (OSError, IntegrityError):
        return None   # no copy, another one, or a modified one: fetch a clean copy


def _check_identity(manifest: dict, entry: dict, root: Path) -> None:
    sha = artefact.sha256_file(root / artefact.MANIFEST)
    if sha != entry["manifest_sha256"]:
        raise IntegrityError(f"manifest.json has sha256 {sha[:16]}…, the index records {entry['manifest_sha256'][:16]}…")
    for k in ("arch", "target", "precision", "status"):
        if manifest.get(k) != entry[k]:
            raise IntegrityError(f"manifest says {k} {manifest.get(k)!r}, the index {entry[k]!r}")


def _download(store: Store, entry: dict, dest: Path, label: str, quiet: bool) -> str:
    """Stream object -> file with a progress bar; returns the sha256 of what arrived. A stalled or broken
    download starts again, ``store.attempts`` times in all; more bytes than the index records are refused."""
    attempts = getattr(store, "attempts", 1)
    for attempt in range(1, attempts + 1):
        try:
            return _download_once(store, entry, dest, label, quiet)
        except NetworkError as exc:
            if attempt == attempts:
                raise NetworkError(f"{label}: {exc.message}" + (f" (tried {attempts} times)" if attempts > 1 else ""),
                                   hint=exc.hint) from None
            time.sleep(0.5 * attempt)
    raise AssertionError("unreachable")


def _download_once(store: Store, entry: dict, dest: Path, label: str, quiet: bool) -> str:
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn,
                               TransferSpeedColumn)

    h = hashlib.sha256()
    expected = entry["bytes"]
    got = 0
    with store.open(entry["archive"]) as (src, size), open(dest, "wb") as out, \
            Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                     TimeRemainingColumn(), console=Console(stderr=True), disable=quiet, transient=False) as bar:
        if size is not None and size != expected:
            raise IntegrityError(f"{label}: the store serves {size:,} bytes for {entry['archive']}, the index records "
                                 f"{expected:,}", hint="the store's copy is damaged or was altered; nothing was written")
        task = bar.add_task(f"pull {printable(label)}", total=expected)
        read = getattr(src, "read1", src.read)   # read1: whatever has arrived, so the bar moves on slow links
        while True:
            block = read(min(CHUNK, expected + 1 - got))
            if not block:
                break
            got += len(block)
            if got > expected:
                raise IntegrityError(f"{label}: {entry['archive']} is longer than the {expected:,} bytes the index "
                                     f"records", hint="the store's copy is damaged or was altered; the download was "
                                     "deleted")
            h.update(block)
            out.write(block)
            bar.advance(task, len(block))
    if got < expected:
        raise NetworkError(f"{entry['archive']}: the download ended after {got:,} of {expected:,} bytes",
                           hint="check the network or the server, then pull again")
    return h.hexdigest()
