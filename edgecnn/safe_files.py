"""Reading and writing files in folders that someone else may control.

Bundles, stores, lock files and the folders they live in are handed to edgecnn by other people (an app's
repository, a shared folder, a web server), and edgecnn often runs as root on a device. So:

- a file that must be a file is opened without blocking and checked with ``fstat`` before one byte is read:
  a FIFO would block forever, ``/dev/zero`` would never end, a folder is not a manifest;
- what is read has a size limit, checked before reading;
- JSON is parsed strictly (no ``NaN``/``Infinity``, no duplicate keys, a bounded nesting depth), so what
  edgecnn accepts is what every other JSON parser reads the same way;
- a file is written through a fresh temporary name opened with ``O_EXCL | O_NOFOLLOW`` and renamed into
  place, so a link planted under the final or the temporary name is replaced, never written through.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any, BinaryIO, Callable, Type, Union

from .errors import EdgeError, IntegrityError

MAX_JSON_DEPTH = 64          # the deepest manifest edgecnn writes nests 6 levels; 64 leaves room and no recursion risk
Data = Union[bytes, Callable[[BinaryIO], None]]


def kind_of(mode: int) -> str:
    """What a file of ``mode`` is, in words, for messages ("a FIFO", "a character device", ...)."""
    for test, words in ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link")):
        if test(mode):
            return words
    return "not a regular file"


def open_regular(path: Union[str, os.PathLike], *, error: Type[EdgeError] = IntegrityError,
                 follow_links: bool = True) -> BinaryIO:
    """``path`` opened for reading, once it is known to be a regular file; else ``error`` naming what it is.

    Opened with ``O_NONBLOCK`` (a FIFO does not block the open) and checked with ``fstat`` on the open file
    (no window between the check and the read). ``follow_links=False`` refuses a symbolic link too.
    FileNotFoundError and PermissionError pass through: callers word those themselves."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow_links:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise error(f"{path} is a symbolic link", hint="edgecnn reads plain files only here; replace the link "
                        "by the file") from None
        if exc.errno == errno.ENXIO:   # a socket
            raise error(f"{path} is a socket, not a file") from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise error(f"{path} is {kind_of(mode)}, not a file", hint="pass a regular file")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_regular(path: Union[str, os.PathLike], limit: int, what: str, *, error: Type[EdgeError] = IntegrityError,
                 follow_links: bool = True) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them (a larger file is ``error``)."""
    with open_regular(path, error=error, follow_links=follow_links) as f:
        size = os.fstat(f.fileno()).st_size
        data = f.read(limit + 1) if size <= limit else b""
    if size > limit or len(data) > limit:
        raise error(f"{path} is {max(size, len(data)):,} bytes, over the {limit:,}-byte limit for {what}",
                    hint=f"is it really {what}?")
    return data


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (strict JSON has no NaN or Infinity)")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"{text[:20]} is beyond the range of a double")
    return value


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice in one object")
        out[key] = value
    return out


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, (dict, list)):
            deepest = max(deepest, d)
            todo.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(data: bytes, where: str, *, error: Type[EdgeError] = IntegrityError, hint: str = "") -> Any:
    """Strict JSON from ``data`` (UTF-8, a leading BOM allowed); one ``error`` line naming ``where`` otherwise."""
    try:
        value = json.loads(data.decode("utf-8-sig"), parse_constant=_no_constant, parse_float=_finite,
                           object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise error(f"{where} is not UTF-8 text (byte {exc.start})", hint=hint) from None
    except RecursionError:
        raise error(f"{where} nests deeper than Python can parse", hint=hint) from None
    except ValueError as exc:
        raise error(f"{where} is not valid JSON ({exc})", hint=hint) from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise error(f"{where} nests more than {MAX_JSON_DEPTH} levels deep", hint=hint)
    return value


def dump_json(value: Any, **kwargs) -> str:
    """Strict JSON text (``allow_nan=False``: a NaN is a bug to report, never ``NaN`` in a file)."""
    return json.dumps(value, allow_nan=False, **kwargs)


def write_atomic(path: Union[str, os.PathLike], data: Data) -> None:
    """Write ``data`` (bytes, or a callable writing into the open file) to ``path`` atomically: a fresh hidden
    sibling (``O_CREAT | O_EXCL | O_NOFOLLOW``, random name), fsync'd, then renamed over ``path``. Readers never
    see a half-written file; a link planted at either name is replaced, never followed. OSError passes through."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            data(f) if callable(data) else f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
