"""Artefact bundles: ``<out>/<arch>/<target>-<precision>/`` with model file(s), labels.txt,
reference.npz and manifest.json — written atomically, locked against concurrent writers, verifiable.

Atomicity: everything is written into a hidden staging sibling; the finished folder is then swapped
into place with one ``renameat2(RENAME_EXCHANGE)`` (Linux) or, elsewhere, two renames with the old
copy kept as a ``.previous-*`` sibling until the new one is in place (restored on the next run if we
died in between). So an interrupted export leaves the previous good artefact, or nothing.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, Optional

from .errors import IntegrityError, OutputError
from .manifest import READABLE_VERSIONS, SCHEMA_VERSION, field_problems
MANIFEST = "manifest.json"
STAGING_PREFIX = ".staging-"
PREVIOUS_PREFIX = ".previous-"


def bundle_dir(out: str | os.PathLike, arch: str, target: str, precision: str) -> Path:
    return Path(out) / arch / f"{target}-{precision}"


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def hash_tree(root: str | os.PathLike) -> Dict[str, dict]:
    """{relative posix path: {sha256, bytes}} for every file under ``root`` except the manifest."""
    root = Path(root)
    out = {}
    for path in sorted(root.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            rel = path.relative_to(root).as_posix()
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def write_manifest(root: str | os.PathLike, manifest: dict) -> dict:
    """Hash every file, then write manifest.json (fsync'd) with ``files`` filled in."""
    manifest = dict(manifest)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    manifest["files"] = hash_tree(root)
    path = Path(root) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=2, sort_keys=False, default=_json_default, allow_nan=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return manifest


def _json_default(obj):
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_manifest(root: str | os.PathLike) -> dict:
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise IntegrityError(f"not an artefact folder: {root}", hint="pass the folder that holds manifest.json")
    if not path.exists():
        raise IntegrityError(f"{path} is missing", hint="this folder is not an edgecnn artefact")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise IntegrityError(f"{path} is not valid JSON ({exc})") from None
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path} is not a JSON object")
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise IntegrityError(f"{path}: unknown manifest schema version {version!r} (this edgecnn reads "
                             f"{', '.join(map(str, READABLE_VERSIONS))})",
                             hint="use the edgecnn version that wrote it, or re-export")
    missing = [k for k in ("schema_version", "edgecnn_version", "arch", "target", "precision", "status", "input",
                           "files") if k not in manifest]
    if missing:
        raise IntegrityError(f"{path}: manifest lacks {', '.join(missing)}")
    wrong = field_problems(manifest) + _file_problems(manifest)
    if wrong:
        raise IntegrityError(f"{path}: manifest does not follow schema {version}: " + "; ".join(wrong[:3]),
                             hint="the manifest was edited or damaged; re-export or pull the artefact again")
    return manifest


_HEX64 = re.compile(r"^[0-9a-f]{64}$")


def _file_problems(manifest: dict) -> list:
    """The ``files`` table and ``model_file``: what verify and the validator rely on."""
    problems = []
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        return ["files must be a non-empty object {path: {sha256, bytes}}"]
    for rel, meta in files.items():
        if not isinstance(meta, dict) or not _HEX64.match(str(meta.get("sha256", ""))) \
                or not isinstance(meta.get("bytes"), int):
            problems.append(f"files[{rel!r}] must be {{sha256: 64 hex digits, bytes: integer}}")
        elif rel.startswith("/") or ".." in rel.split("/"):
            problems.append(f"files[{rel!r}] points outside the bundle")
    model = manifest.get("model_file")
    # model_file is a file (model.onnx) or a folder of hashed files (a Core ML model.mlpackage)
    if model is not None and model not in files and not any(rel.startswith(f"{model}/") for rel in files):
        problems.append(f"model_file {model!r} is not among the hashed files")
    return problems


def verify(root: str | os.PathLike) -> dict:
    """Check the manifest's schema and every file's sha256; extra or missing files are errors too."""
    manifest = read_manifest(root)
    expected = manifest["files"]
    actual = hash_tree(root)
    problems = [f"{p.relative_to(root).as_posix()}: a symbolic link (a bundle holds plain files only)"
                for p in sorted(Path(root).rglob("*")) if p.is_symlink()]
    for rel, meta in sorted(expected.items()):
        if rel not in actual:
            problems.append(f"{rel}: missing")
        elif actual[rel]["sha256"] != meta.get("sha256") or actual[rel]["bytes"] != meta.get("bytes"):
            size = actual[rel]["bytes"]
            problems.append(f"{rel}: sha256 mismatch (manifest {meta.get('sha256', '')[:12]}…, file "
                            f"{actual[rel]['sha256'][:12]}…)"
                            + (f", {size} bytes, manifest says {meta.get('bytes')}" if size != meta.get("bytes") else ""))
    for rel in sorted(set(actual) - set(expected)):
        problems.append(f"{rel}: not listed in the manifest")
    if problems:
        raise IntegrityError(f"{root}: {len(problems)} problem(s): " + "; ".join(problems[:5]),
                             hint="the artefact was modified after export; re-export or pull it again")
    return manifest


# ---------------------------------------------------------------------------------------------- writing
def _renameat2_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux >= 3.15, glibc >= 2.28). False when unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    if fn is None:
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    rc = fn(AT_FDCWD, os.fsencode(str(a)), AT_FDCWD, os.fsencode(str(b)), RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover(final: Path) -> None:
    """Tidy what a killed run left beside ``final``: restore a lost previous copy, drop dead staging."""
    parent = final.parent
    if not parent.is_dir():
        return
    for entry in parent.iterdir():
        name = entry.name
        for prefix in (STAGING_PREFIX, PREVIOUS_PREFIX):
            if not name.startswith(prefix + final.name + "."):
                continue
            try:
                pid = int(name.rsplit(".", 2)[-2])
            except ValueError:
                continue
            if _pid_alive(pid) and pid != os.getpid():
                continue
            if prefix == PREVIOUS_PREFIX and not final.exists():
                os.rename(entry, final)  # died between the two renames: put the good one back
            else:
                shutil.rmtree(entry, ignore_errors=True)


class Staging:
    """A hidden sibling folder to build a bundle in; ``commit()`` swaps it into place."""

    def __init__(self, final: Path):
        self.final = Path(final)
        self.path = self.final.parent / f"{STAGING_PREFIX}{self.final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"

    def __enter__(self) -> "Staging":
        try:
            self.final.parent.mkdir(parents=True, exist_ok=True)
            recover(self.final)
            self.path.mkdir()
        except FileExistsError:
            raise OutputError(f"{self.final.parent} is not a folder", hint="choose another OUT") from None
        except NotADirectoryError:
            raise OutputError(f"output path {self.final.parent} runs through a file", hint="choose another OUT") from None
        except PermissionError:
            raise OutputError(f"cannot write to {self.final.parent} (permission denied)", hint="choose another OUT") from None
        except OSError as exc:
            raise OutputError(f"cannot write to {self.final.parent} ({exc.strerror})", hint="choose another OUT") from None
        self._refuse_foreign()
        return self

    def _refuse_foreign(self) -> None:
        """Never swap away something that is not an artefact: a file, a link, or a folder without a manifest
        (the swap would otherwise move a user's own files into a staging folder and delete them)."""
        final = self.final
        if not os.path.lexists(final):
            return
        if final.is_symlink() or not final.is_dir():
            self._discard()
            raise OutputError(f"{final} exists and is not an artefact folder (a {'link' if final.is_symlink() else 'file'})",
                              hint="move it away or choose another OUT")
        if not (final / MANIFEST).is_file() and any(final.iterdir()):
            self._discard()
            raise OutputError(f"{final} exists and is not an edgecnn artefact (no {MANIFEST}); refusing to replace it",
                              hint="move it away or choose another OUT")

    def _discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    def commit(self) -> Path:
        with _signals_deferred():
            if self.final.exists() and _renameat2_exchange(self.path, self.final):
                shutil.rmtree(self.path, ignore_errors=True)  # now holds the previous bundle
                return self.final
            if self.final.exists():
                previous = self.final.parent / f"{PREVIOUS_PREFIX}{self.final.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
                os.rename(self.final, previous)
                os.rename(self.path, self.final)
                shutil.rmtree(previous, ignore_errors=True)
            else:
                os.rename(self.path, self.final)
        return self.final

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.path.exists():
            shutil.rmtree(self.path, ignore_errors=True)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during the final swap so it cannot be cut between two renames."""
    pending = []
    handlers = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            handlers[sig] = signal.signal(sig, lambda s, f: pending.append(s))
    except ValueError:  # not the main thread: signals cannot be caught here anyway
        handlers = {}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        for sig in pending:
            os.kill(os.getpid(), sig)


@contextlib.contextmanager
def locked(final: Path, timeout: float = 600.0, on_wait=None) -> Iterator[None]:
    """Serialise writers of one bundle path: the second waits (up to ``timeout`` s) or fails clearly."""
    lock_path = Path(final).parent / f".{Path(final).name}.lock"
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except NotADirectoryError:
        raise OutputError(f"output path {lock_path.parent} runs through a file", hint="choose another OUT") from None
    except PermissionError:
        raise OutputError(f"cannot write to {lock_path.parent} (permission denied)", hint="choose another OUT") from None
    except OSError as exc:
        raise OutputError(f"cannot write to {lock_path.parent} ({exc.strerror})", hint="choose another OUT") from None
    try:
        deadline = time.monotonic() + timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait is not None:
                    on_wait(_holder(fd))
                    told = True
                if time.monotonic() >= deadline:
                    raise OutputError(f"{final} is being written by another export ({_holder(fd)}); gave up after "
                                      f"{timeout:.0f} s", hint="wait for it to finish, or raise --lock-timeout")
                time.sleep(0.2)
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()}\n".encode())
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown process"
    except OSError:
        return "unknown process"
