"""``edgecnn.lock``: the exact artefacts an app project builds with, committed next to its code.

JSON, one entry per (arch, target, precision) with the version and the archive's sha256; optionally
the store to fetch from. ``edgecnn pull --lock edgecnn.lock`` fetches exactly those and fails when
the store's bytes differ from the pinned sha256, so an app's CI can never pick up a different model
than the one that was reviewed and validated.
"""
from __future__ import annotations

import os
import stat
import urllib.parse
from pathlib import Path
from typing import List, Optional

from ..errors import InputError, OutputError, UsageError
from ..manifest import SHA256, is_identifier
from ..safe_files import dump_json, parse_json, read_regular, write_atomic
from . import index as idx

LOCK_NAME = "edgecnn.lock"
LOCK_SCHEMA = 1
FIELDS = ("arch", "target", "precision", "version", "sha256")
MAX_LOCK_BYTES = 1 << 20        # a pin is ~300 bytes: 1 MiB holds thousands


def read(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        data = read_regular(path, MAX_LOCK_BYTES, "a lock file", error=InputError)
    except FileNotFoundError:
        raise InputError(f"lock file {path} not found", hint="create it with `edgecnn lock add` or `pull --write-lock`") from None
    except OSError as exc:
        raise InputError(f"cannot read lock file {path} ({exc.strerror or exc})") from None
    lock = parse_json(data, f"lock file {path}", error=InputError)
    if not isinstance(lock, dict) or lock.get("edgecnn_lock") != LOCK_SCHEMA or not isinstance(lock.get("artefacts"), list):
        raise InputError(f"{path} is not an edgecnn lock file (schema {LOCK_SCHEMA})")
    if not isinstance(lock.get("store", ""), str):
        raise InputError(f"{path}: 'store' must be a folder or an address, not {type(lock['store']).__name__}")
    for i, e in enumerate(lock["artefacts"]):
        wrong = pin_problems(e)
        if wrong:
            raise InputError(f"{path}: entry {i} " + "; ".join(wrong[:3]),
                             hint="fix the entry, or pin it again with `edgecnn lock add`")
    return lock


def pin_problems(e) -> List[str]:
    """What is wrong with one pinned entry (empty: nothing)."""
    if not isinstance(e, dict):
        return [f"is {type(e).__name__}, not an object"]
    missing = [k for k in FIELDS if not isinstance(e.get(k), str)]
    if missing:
        return [f"lacks {', '.join(missing)}"]
    out = [f"has {k} {e[k]!r}, not a plain name" for k in ("arch", "target", "precision") if not is_identifier(e[k])]
    if not idx.VERSION_RE.fullmatch(e["version"]):
        out.append(f"has version {e['version']!r}, not letters, digits and . _ + -")
    for k in ("sha256", "manifest_sha256"):
        if k in e and not (isinstance(e[k], str) and SHA256.fullmatch(e[k])):
            out.append(f"has a malformed {k} (64 lowercase hex digits)")
    return out


def check_writable(path: str | os.PathLike) -> None:
    """Before anything is pulled: ``path`` can take a lock file (a new file in an existing folder, or a valid
    lock file to update), so a pull is never half-done because the lock cannot be written afterwards."""
    path = Path(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise UsageError(f"cannot write the lock file {path} ({exc.strerror})", hint="choose another --write-lock") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise UsageError(f"--write-lock {path} is a folder or a special file, not a lock file",
                         hint="pass a file name, e.g. --write-lock edgecnn.lock; nothing was pulled")
    if st is not None:
        read(path)   # an existing lock file must be one we can update
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write the lock file {path}: {parent} is not a writable folder",
                          hint="choose another --write-lock; nothing was pulled")


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
    pinned["manifest_sha256"] = entry["manifest_sha256"]   # the manifest is pinned too, not only the archive
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
    try:
        write_atomic(path, (dump_json(lock, indent=2, sort_keys=True) + "\n").encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write lock file {path} ({exc.strerror})") from None
