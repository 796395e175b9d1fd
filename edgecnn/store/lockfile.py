"""``edgecnn.lock``: the exact artefacts an app project builds with, committed next to its code.

JSON, one entry per (arch, target, precision) with the version and the archive's sha256; optionally
the store to fetch from. ``edgecnn pull --lock edgecnn.lock`` fetches exactly those and fails when
the store's bytes differ from the pinned sha256, so an app's CI can never pick up a different model
than the one that was reviewed and validated.
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse
from pathlib import Path
from typing import Optional

from ..errors import InputError, OutputError
from . import index as idx

LOCK_NAME = "edgecnn.lock"
LOCK_SCHEMA = 1
FIELDS = ("arch", "target", "precision", "version", "sha256")
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


def read(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"lock file {path} not found", hint="create it with `edgecnn lock add` or `pull --write-lock`") from None
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read lock file {path} ({exc})") from None
    if not isinstance(data, dict) or data.get("edgecnn_lock") != LOCK_SCHEMA or not isinstance(data.get("artefacts"), list):
        raise InputError(f"{path} is not an edgecnn lock file (schema {LOCK_SCHEMA})")
    for i, e in enumerate(data["artefacts"]):
        missing = [k for k in FIELDS if not isinstance(e, dict) or not isinstance(e.get(k), str)]
        if missing:
            raise InputError(f"{path}: entry {i} lacks {', '.join(missing)}")
        if not _SHA_RE.match(e["sha256"]):
            raise InputError(f"{path}: entry {i} ({e['arch']}) has a malformed sha256", hint="64 lowercase hex digits")
    return data


def empty(store: Optional[str] = None) -> dict:
    out = {"edgecnn_lock": LOCK_SCHEMA, "artefacts": []}
    if store:
        out["store"] = store
    return out


def add(path: str | os.PathLike, entry: dict, store: Optional[str] = None) -> dict:
    """Pin ``entry`` (an index entry) in the lock file, replacing the same arch/target/precision."""
    path = Path(path)
    lock = read(path) if path.exists() else empty()
    if store and not lock.get("store"):
        lock["store"] = _relative_to_lock(store, path)
    pinned = {k: entry[k] for k in FIELDS}
    pinned["status"] = entry.get("status", "")
    rest = [e for e in lock["artefacts"] if idx.key_of(e) != idx.key_of(pinned)]
    lock["artefacts"] = sorted(rest + [pinned], key=idx.key_of)
    write(path, lock)
    return lock


def _is_local(store: str) -> bool:
    scheme = urllib.parse.urlparse(store).scheme
    return not scheme or len(scheme) == 1   # no scheme (or a Windows drive letter)


def _relative_to_lock(store: str, lock_path: Path) -> str:
    """A folder store is recorded relative to the lock file, so the project can move and CI can run anywhere."""
    if not _is_local(store):
        return store
    return os.path.relpath(os.path.abspath(store), os.path.abspath(lock_path.parent))


def store_of(lock: dict, lock_path: str | os.PathLike) -> Optional[str]:
    """The lock file's store as an address usable from the current folder."""
    store = lock.get("store")
    if not store or not _is_local(store) or os.path.isabs(store):
        return store
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(lock_path)), store))


def write(path: str | os.PathLike, lock: dict) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(lock, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write lock file {path} ({exc.strerror})") from None
    finally:
        if tmp.exists():
            tmp.unlink()
