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
import os
import shutil
import signal
import stat
import time
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from .errors import IntegrityError, OutputError
from .manifest import READABLE_VERSIONS, REQUIRED_ALWAYS, SCHEMA_VERSION, problems
from .safe_files import dump_json, kind_of, open_regular, parse_json, read_regular, write_atomic
from .safe_text import printable

MANIFEST = "manifest.json"
MAX_MANIFEST_BYTES = 16 << 20    # the largest manifest written (an INT8 bundle's fallback record) is ~100 kB
STAGING_PREFIX = ".staging-"
PREVIOUS_PREFIX = ".previous-"


def bundle_dir(out: str | os.PathLike, arch: str, target: str, precision: str) -> Path:
    return Path(out) / arch / f"{target}-{precision}"


def sha256_file(path: str | os.PathLike) -> str:
    """sha256 of a regular file (a FIFO or a device is refused, never read forever)."""
    h = hashlib.sha256()
    with open_regular(path) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def scan_tree(root: str | os.PathLike) -> Tuple[List[str], List[str], List[Tuple[str, str]]]:
    """(regular files, symbolic links, other entries as (path, what)) under ``root``, as sorted relative posix
    paths; links are listed, never followed."""
    root = Path(root)
    files, links, odd = [], [], []
    for folder, dirs, names in os.walk(root):
        base = Path(folder)
        for name in sorted(dirs):
            if (base / name).is_symlink():
                links.append((base / name).relative_to(root).as_posix())
        for name in names:
            path = base / name
            rel = path.relative_to(root).as_posix()
            mode = os.lstat(path).st_mode
            if stat.S_ISREG(mode):
                files.append(rel)
            elif stat.S_ISLNK(mode):
                links.append(rel)
            else:
                odd.append((rel, kind_of(mode)))
    return sorted(files), sorted(links), sorted(odd)


def hash_tree(root: str | os.PathLike) -> Dict[str, dict]:
    """{relative posix path: {sha256, bytes}} for every regular file under ``root`` except the manifest."""
    root = Path(root)
    out = {}
    for rel in scan_tree(root)[0]:
        if rel != MANIFEST:
            path = root / rel
            out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def write_manifest(root: str | os.PathLike, manifest: dict) -> dict:
    """Hash every file, then write manifest.json (strict JSON, fsync'd, atomically) with ``files`` filled in."""
    manifest = dict(manifest)
    manifest.setdefault("schema_version", SCHEMA_VERSION)
    manifest["files"] = hash_tree(root)
    text = dump_json(manifest, indent=2, sort_keys=False, default=_json_default) + "\n"
    write_atomic(Path(root) / MANIFEST, text.encode("utf-8"))
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
    """The bundle's manifest, checked against its declared schema (one IntegrityError line otherwise)."""
    path = Path(root) / MANIFEST
    if not Path(root).is_dir():
        raise IntegrityError(f"not an artefact folder: {root}", hint="pass the folder that holds manifest.json")
    if not os.path.lexists(path):
        raise IntegrityError(f"{path} is missing", hint="this folder is not an edgecnn artefact")
    try:
        data = read_regular(path, MAX_MANIFEST_BYTES, "a manifest", follow_links=False)
    except OSError as exc:
        raise IntegrityError(f"cannot read {path} ({exc.strerror or exc})") from None
    manifest = parse_json(data, str(path))
    if not isinstance(manifest, dict):
        raise IntegrityError(f"{path} is not a JSON object")
    version = manifest.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise IntegrityError(f"{path}: unknown manifest schema version {printable(repr(version))[:40]} (this edgecnn "
                             f"reads {', '.join(map(str, READABLE_VERSIONS))})",
                             hint="use the edgecnn version that wrote it, or re-export")
    missing = [k for k in REQUIRED_ALWAYS if k not in manifest]
    if missing:
        raise IntegrityError(f"{path}: manifest lacks {', '.join(missing)}")
    wrong = problems(manifest)
    if wrong:
        raise IntegrityError(f"{path}: manifest does not follow schema {version}: " + "; ".join(wrong[:3]),
                             hint="the manifest was edited or damaged; re-export or pull the artefact again")
    return manifest


def verify(root: str | os.PathLike) -> dict:
    """Check the manifest's schema and every file's sha256; extra or missing files, links and anything that is
    not a plain file are errors too."""
    manifest = read_manifest(root)
    expected = manifest["files"]
    _, links, odd = scan_tree(root)
    actual = hash_tree(root)
    problems_ = [f"{rel}: a symbolic link (a bundle holds plain files only)" for rel in links]
    problems_ += [f"{rel}: {what} (a bundle holds plain files only)" for rel, what in odd]
    for rel, meta in sorted(expected.items()):
        if rel not in actual:
            if rel not in links and all(rel != o for o, _ in odd):
                problems_.append(f"{rel}: missing")
        elif actual[rel]["sha256"] != meta["sha256"] or actual[rel]["bytes"] != meta["bytes"]:
            size = actual[rel]["bytes"]
            problems_.append(f"{rel}: sha256 mismatch (manifest {meta['sha256'][:12]}…, file "
                             f"{actual[rel]['sha256'][:12]}…)"
                             + (f", {size} bytes, manifest says {meta['bytes']}" if size != meta["bytes"] else ""))
    for rel in sorted(set(actual) - set(expected)):
        problems_.append(f"{rel}: not listed in the manifest")
    if problems_:
        raise IntegrityError(f"{root}: {len(problems_)} problem(s): " + "; ".join(problems_[:5]),
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
            if prefix == PREVIOUS_PREFIX and not os.path.lexists(final) and entry.is_dir() and not entry.is_symlink():
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


LOCK_OPEN_FLAGS = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)


@contextlib.contextmanager
def locked(final: Path, timeout: float = 600.0, on_wait=None) -> Iterator[None]:
    """Serialise writers of one bundle path: the second waits (up to ``timeout`` s) or fails clearly.

    The lock is ``.<name>.lock`` beside ``final``, in a folder someone else may write to (a shared output
    folder, an app's model folder, a store). So the folder must be a real folder (not a link), the lock file is
    opened with ``O_NOFOLLOW`` relative to it and must be a regular file with one link: a planted symbolic or
    hard link is refused, never written through. The lock file is removed on the way out, and so are the
    folders this call created if they are empty, so a refused or failed run leaves nothing behind. Removal is
    safe against waiters: whoever gets the lock checks that the path still names the file it locked, and
    starts again if not."""
    final = Path(final)
    name = f".{final.name}.lock"
    deadline = time.monotonic() + timeout
    created: List[Path] = []
    try:
        while True:
            created += [d for d in _make_dirs(final.parent) if d not in created]
            dir_fd = _open_folder(final.parent)
            try:
                fd = _acquire(dir_fd, name, final, deadline, timeout, on_wait)
                break
            except _FolderGone:   # the holder before us removed the folder it had made: make it again
                os.close(dir_fd)
            except BaseException:
                os.close(dir_fd)
                raise
        try:
            try:
                os.ftruncate(fd, 0)
                os.write(fd, f"pid {os.getpid()}\n".encode())
                yield
            finally:
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=dir_fd)   # still ours: only a holder ever unlinks it
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
        finally:
            os.close(dir_fd)
    finally:
        for folder in reversed(created):
            try:
                folder.rmdir()
            except OSError:   # not empty (the bundle is there) or already gone
                break


class _FolderGone(Exception):
    pass


def _lock_error(where: Path, exc: OSError) -> OutputError:
    if isinstance(exc, NotADirectoryError):
        return OutputError(f"output path {where} runs through a file", hint="choose another OUT")
    if isinstance(exc, PermissionError):
        return OutputError(f"cannot write to {where} (permission denied)", hint="choose another OUT")
    return OutputError(f"cannot write to {where} ({exc.strerror or exc})", hint="choose another OUT")


def _make_dirs(folder: Path) -> List[Path]:
    """mkdir -p ``folder``; returns the folders it created, outermost first."""
    missing = []
    probe = folder
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise OutputError(f"{folder} is not a folder", hint="choose another OUT") from None
    except OSError as exc:
        raise _lock_error(folder, exc) from None
    return list(reversed(missing))


def _open_folder(folder: Path) -> int:
    """A descriptor of ``folder`` itself, refusing a symbolic link in its place."""
    try:
        return os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(folder):
            raise OutputError(f"{folder} is a symbolic link; edgecnn writes bundles into real folders only",
                              hint="replace the link by a folder (someone who can write the output folder may have "
                                   "planted it)") from None
        raise _lock_error(folder, exc) from None


def _open_lock(dir_fd: int, name: str, where: Path) -> int:
    try:
        fd = os.open(name, LOCK_OPEN_FLAGS, 0o644, dir_fd=dir_fd)
    except FileNotFoundError:
        raise _FolderGone() from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OutputError(f"{where / name} is a symbolic link; refusing to write through it",
                              hint=f"remove it, and check who can write to {where}") from None
        if exc.errno in (errno.EISDIR, errno.ENXIO):
            raise OutputError(f"{where / name} is {'a folder' if exc.errno == errno.EISDIR else 'a socket'}, "
                              f"not a lock file", hint=f"remove it, and check who can write to {where}") from None
        raise _lock_error(where, exc) from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = kind_of(st.st_mode) if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
        raise OutputError(f"{where / name} is {what}, not a lock file edgecnn made; refusing to write it",
                          hint=f"remove it, and check who can write to {where}")
    return fd


def _acquire(dir_fd: int, name: str, final: Path, deadline: float, timeout: float, on_wait) -> int:
    """An open, flock'ed descriptor of the lock file that the path still names."""
    told = False
    while True:
        fd = _open_lock(dir_fd, name, final.parent)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not told and on_wait is not None:
                    on_wait(_holder(fd))
                    told = True
                if time.monotonic() >= deadline:
                    who = _holder(fd)
                    os.close(fd)
                    raise OutputError(f"{final} is being written by another export ({who}); gave up after "
                                      f"{timeout:.0f} s", hint="wait for it to finish, or raise --lock-timeout") from None
                time.sleep(0.2)
        try:
            now = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            now = None
        mine = os.fstat(fd)
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            return fd
        os.close(fd)   # the holder before us removed it: lock the file that is there now


def _holder(fd: int) -> str:
    try:
        return printable(os.pread(fd, 64, 0).decode(errors="replace").strip()) or "unknown process"
    except OSError:
        return "unknown process"
