"""One archive per bundle: a deterministic ``.tar.gz`` to publish, and a refusing extractor to pull.

Deterministic so that identical bundles give byte-identical archives (and so the same sha256): entries
sorted, only regular files, fixed mtime/uid/gid/owner names, modes normalised to 0644 (0755 when the
file is executable), gzip header without file name and with mtime 0. Republishing an unchanged bundle
is then recognisable as a no-op, and a changed one as a change.

Extraction trusts nothing in the archive: every entry is checked before anything is written (regular
files and folders only — no symbolic or hard links, no devices or FIFOs; no absolute paths, no ``..``,
no duplicates), then extracted with the standard library's ``data`` filter (PEP 706) as a second
fence. The caller extracts into a fresh staging folder and swaps it in only after every file has
been checked against the manifest.
"""
from __future__ import annotations

import gzip
import os
import stat
import tarfile
import zlib
from pathlib import Path, PurePosixPath
from typing import List

from ..artefact import MANIFEST, hash_tree, sha256_file
from ..errors import IntegrityError, OutputError, ToolchainError

SUFFIX = ".tar.gz"
FIXED_MTIME = 315532800          # 1980-01-01T00:00:00Z: a fixed, zip-compatible timestamp
GZIP_LEVEL = 6


def bundle_files(bundle: str | os.PathLike) -> List[str]:
    """The files an archive holds: every file the manifest hashes, plus manifest.json itself."""
    return sorted(list(hash_tree(bundle)) + [MANIFEST])


def pack(bundle: str | os.PathLike, dest: str | os.PathLike) -> dict:
    """Write ``dest`` (a .tar.gz of ``bundle``); returns {sha256, bytes, files}."""
    bundle = Path(bundle)
    names = bundle_files(bundle)
    with open(dest, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=GZIP_LEVEL) as gz:
            with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for rel in names:
                    path = bundle / rel
                    if any(p.is_symlink() for p in [path, *path.parents][: rel.count("/") + 1]):
                        raise IntegrityError(f"{bundle}: {rel} is (inside) a symbolic link",
                                             hint="bundles hold plain files only; copy the file into the bundle")
                    st = path.stat()
                    info = tarfile.TarInfo(rel)
                    info.size = st.st_size
                    info.mtime = FIXED_MTIME
                    info.mode = 0o755 if st.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH) else 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    info.type = tarfile.REGTYPE
                    with open(path, "rb") as f:
                        tar.addfile(info, f)
        raw.flush()
        os.fsync(raw.fileno())
    return {"sha256": sha256_file(dest), "bytes": Path(dest).stat().st_size, "files": len(names)}


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


def check_members(members: List[tarfile.TarInfo], where: str) -> None:
    """Refuse, naming the entry, anything that is not a plain relative file or folder inside the bundle."""
    seen = set()
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
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = tar.getmembers()
            check_members(members, where)
            tar.extractall(dest, members=members, filter="data")
            for m in members:   # stamp "now", not the fixed 1980 time: Xcode and make compare mtimes
                if m.isreg():
                    os.utime(Path(dest) / m.name)
    except tarfile.FilterError as exc:
        raise IntegrityError(f"{where}: refused entry ({exc})", hint="nothing was extracted") from None
    except (tarfile.TarError, EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise IntegrityError(f"{where} is not a readable .tar.gz ({exc})",
                             hint="the download is corrupt; it was deleted — pull again") from None
    except OSError as exc:
        raise OutputError(f"cannot extract into {dest} ({exc.strerror or exc})",
                          hint="check free space and permissions of the destination") from None
    return sorted(m.name for m in members if m.isreg())
