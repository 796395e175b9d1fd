"""One archive per bundle: a deterministic ``.tar.gz`` to publish, and a refusing extractor to pull.

Deterministic so that identical bundles give byte-identical archives (and so the same sha256): entries
sorted, only regular files, fixed mtime/uid/gid/owner names, modes normalised to 0644 (0755 when the
file is executable), gzip header without file name and with mtime 0. Republishing an unchanged bundle
is then recognisable as a no-op, and a changed one as a change.

Extraction trusts nothing in the archive: every entry is checked before anything is written (regular
files and folders only — no symbolic or hard links, no devices or FIFOs; no absolute paths, no ``..``,
no duplicates; at most ``MAX_ENTRIES`` entries of at most ``MAX_ENTRY_BYTES`` each), the uncompressed
stream is bounded while it is read (``MAX_RATIO`` times the archive's size, at least ``RATIO_FLOOR_BYTES``,
at most ``MAX_TOTAL_BYTES``: a gzip bomb is refused after reading its headers, before one byte is written),
then extracted with the standard library's ``data`` filter (PEP 706) as a second fence. The caller
extracts into a fresh staging folder and swaps it in only after every file has been checked against the
manifest.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import stat
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import List, Optional

from ..artefact import MANIFEST, hash_tree, scan_tree, sha256_file
from ..errors import IntegrityError, OutputError, ToolchainError
from ..safe_files import open_regular

SUFFIX = ".tar.gz"
FIXED_MTIME = 315532800          # 1980-01-01T00:00:00Z: a fixed, zip-compatible timestamp
GZIP_LEVEL = 6
# Extraction limits. Bundles hold model weights (float or int8 tensors: gzip gains 5-15 %), a reference.npz
# of photo pixels and small text files: measured 1.09x (ONNX FP32), 1.14x (Core ML) and 1.25x (TensorRT) for
# LeNet-5 bundles. So 20x is far beyond any real bundle, and a gzip bomb (up to 1000x) is refused. Small
# archives (labels of 1000 classes compress 5x) may always unpack to 32 MiB.
MAX_RATIO = 20
RATIO_FLOOR_BYTES = 32 << 20
MAX_TOTAL_BYTES = 16 << 30       # 16 GiB: several EfficientNet-B7 engines and their ONNX models
MAX_ENTRY_BYTES = 4 << 30        # an ONNX protobuf is at most 2 GiB; a TensorRT engine of a classic CNN < 1 GiB
MAX_ENTRIES = 10_000             # a bundle holds 4-20 files (an .mlpackage a few more)


class _TooLarge(Exception):
    pass


class _Bounded:
    """A read/seek/tell view of the decompressed stream that refuses to go past ``limit`` bytes: ``tarfile``
    skips an entry's data by seeking, so an entry claiming 2 GB is refused before it is decompressed."""

    def __init__(self, f, limit: int):
        self.f, self.limit = f, limit

    def read(self, n: int = -1) -> bytes:
        room = self.limit + 1 - self.f.tell()
        data = self.f.read(room if n is None or n < 0 else min(n, room))
        if self.f.tell() > self.limit:
            raise _TooLarge()
        return data

    def seek(self, offset: int, whence: int = 0) -> int:
        target = offset if whence == 0 else self.f.tell() + offset if whence == 1 else None
        if target is None:
            raise io.UnsupportedOperation("seek from the end of a compressed stream")
        if target > self.limit:
            raise _TooLarge()
        return self.f.seek(target)

    def tell(self) -> int:
        return self.f.tell()


def allowance(compressed: int) -> int:
    """How many uncompressed bytes an archive of ``compressed`` bytes may hold."""
    return min(MAX_TOTAL_BYTES, max(RATIO_FLOOR_BYTES, MAX_RATIO * compressed))


def bundle_files(bundle: str | os.PathLike) -> List[str]:
    """The files an archive holds: every file the manifest hashes, plus manifest.json itself."""
    return sorted(list(hash_tree(bundle)) + [MANIFEST])


class _Hashing:
    """A file read through sha256 (``tarfile.addfile`` reads exactly ``size`` bytes)."""

    def __init__(self, f):
        self.f, self.h, self.n = f, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.f.read(n)
        self.h.update(data)
        self.n += len(data)
        return data


def pack(bundle: str | os.PathLike, dest: str | os.PathLike, manifest: Optional[bytes] = None) -> dict:
    """Write ``dest`` (a .tar.gz of ``bundle``); returns {sha256, bytes, files}.

    With ``manifest`` (the bytes of the bundle's verified manifest.json) the archive holds exactly those bytes
    and exactly the files they list, each checked against its sha256 while it is packed: a bundle changed
    after it was verified (a file swapped, the manifest rewritten) is refused, not published."""
    bundle = Path(bundle)
    _, links, odd = scan_tree(bundle)
    if links or odd:
        rel, what = (links[0], "(inside) a symbolic link") if links else (odd[0][0], odd[0][1])
        raise IntegrityError(f"{bundle}: {rel} is {what}", hint="bundles hold plain files only; copy the file into "
                             "the bundle")
    files = json.loads(manifest)["files"] if manifest is not None else None
    names = sorted(list(files) + [MANIFEST]) if files is not None else bundle_files(bundle)
    with open(dest, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel in names:
                    if rel == MANIFEST and manifest is not None:
                        tar.addfile(_info(rel, len(manifest), 0o644), io.BytesIO(manifest))
                    else:
                        _add_file(tar, bundle, rel, None if files is None else files[rel])
        raw.flush()
        os.fsync(raw.fileno())
    return {"sha256": sha256_file(dest), "bytes": Path(dest).stat().st_size, "files": len(names)}


def _info(rel: str, size: int, mode: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(rel)
    info.size, info.mtime, info.mode = size, FIXED_MTIME, mode
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.type = tarfile.REGTYPE
    return info


def _add_file(tar: tarfile.TarFile, bundle: Path, rel: str, expected: Optional[dict]) -> None:
    path = bundle / rel
    if any(p.is_symlink() for p in [path, *path.parents][: rel.count("/") + 1]):
        raise IntegrityError(f"{bundle}: {rel} is (inside) a symbolic link",
                             hint="bundles hold plain files only; copy the file into the bundle")
    try:
        f = open_regular(path, follow_links=False)
    except FileNotFoundError:
        raise IntegrityError(f"{bundle}: {rel} disappeared while it was being packed",
                             hint="something is writing into the bundle; nothing was published") from None
    with f:
        st = os.fstat(f.fileno())
        executable = st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        src = _Hashing(f)
        tar.addfile(_info(rel, st.st_size, 0o755 if executable else 0o644), src)
    if expected is not None and (src.h.hexdigest() != expected["sha256"] or src.n != expected["bytes"]):
        raise IntegrityError(f"{bundle}: {rel} changed while it was being packed (sha256 no longer matches "
                             f"manifest.json)", hint="something is writing into the bundle; nothing was published")


def _describe(member: tarfile.TarInfo) -> str:
    if member.issym():
        return f"a symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"a hard link to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "a device file"
    if member.isfifo():
        return "a FIFO"
    return f"an entry of tar type {member.type!r}"


def check_members(members: List[tarfile.TarInfo], where: str, limit: int = MAX_TOTAL_BYTES) -> None:
    """Refuse, naming the entry, anything that is not a plain relative file or folder inside the bundle, and
    archives with too many or too large entries."""
    if len(members) > MAX_ENTRIES:
        raise IntegrityError(f"{where}: {len(members):,} entries, more than the {MAX_ENTRIES:,} a bundle may hold",
                             hint="nothing was extracted")
    seen = set()
    total = 0
    for m in members:
        name = m.name
        if not (m.isreg() or m.isdir()):
            raise IntegrityError(f"{where}: entry {name!r} is {_describe(m)}; edgecnn archives hold regular files only",
                                 hint="the archive was not written by edgecnn publish, or was tampered with; nothing was extracted")
        if not name or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or "\\" in name:
            raise IntegrityError(f"{where}: entry {name!r} has an absolute path",
                                 hint="refusing to write outside the destination; nothing was extracted")
        parts = PurePosixPath(name).parts
        if ".." in parts:
            raise IntegrityError(f"{where}: entry {name!r} climbs out of the folder with '..'",
                                 hint="refusing a path-traversal (zip-slip) archive; nothing was extracted")
        if not name.isprintable():
            raise IntegrityError(f"{where}: entry {name!r} has control characters in its name", hint="nothing was extracted")
        total += m.size
        if m.size > MAX_ENTRY_BYTES or total > limit:
            raise IntegrityError(f"{where}: entry {name!r} of {m.size:,} bytes takes the archive past "
                                 f"{MAX_ENTRY_BYTES if m.size > MAX_ENTRY_BYTES else limit:,} bytes: refusing a "
                                 f"decompression bomb", hint="nothing was extracted")
        key = "/".join(p for p in parts if p != ".")
        if m.isreg():
            if key in seen:
                raise IntegrityError(f"{where}: entry {name!r} appears twice", hint="nothing was extracted")
            seen.add(key)


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> List[str]:
    """Extract ``archive`` into the (empty) folder ``dest`` after checking every entry; returns file names."""
    if not hasattr(tarfile, "data_filter"):
        raise ToolchainError("this Python's tarfile has no extraction filters (PEP 706)",
                             hint="use Python 3.10.12+, 3.11.4+ or 3.12+")
    where = Path(archive).name
    limit = allowance(Path(archive).stat().st_size)
    try:
        with gzip.open(archive, "rb") as gz, tarfile.open(fileobj=_Bounded(gz, limit), mode="r:") as tar:
            members = tar.getmembers()
            check_members(members, where, limit)
            tar.extractall(dest, members=members, filter="data")
            for m in members:   # stamp "now", not the fixed 1980 time: Xcode and make compare mtimes
                if m.isreg():
                    os.utime(Path(dest) / m.name)
    except _TooLarge:
        raise IntegrityError(f"{where} unpacks to more than {limit:,} bytes ({MAX_RATIO}x its size, at least "
                             f"{RATIO_FLOOR_BYTES >> 20} MiB): refusing a decompression bomb",
                             hint="nothing was extracted") from None
    except tarfile.FilterError as exc:
        raise IntegrityError(f"{where}: refused entry ({exc})", hint="nothing was extracted") from None
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IntegrityError(f"{where} is not a readable .tar.gz ({exc})",
                             hint="the download is corrupt; it was deleted — pull again") from None
    except OSError as exc:
        raise OutputError(f"cannot extract into {dest} ({exc.strerror or exc})",
                          hint="check free space and permissions of the destination") from None
    return sorted(m.name for m in members if m.isreg())
