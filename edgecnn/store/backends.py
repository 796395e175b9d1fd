"""Where published artefacts live. Three kinds, one small interface:

- ``LocalStore``: a folder (the default ``./artefact-store``); index updates under an exclusive
  ``flock``, every object written to a temporary name and renamed into place.
- ``HttpStore``: any static HTTP(S) host serving ``index.json`` and the archives (a web server, a
  bucket's website endpoint, a release page). Read-only.
- ``S3Store``: S3-compatible object storage through fsspec/s3fs, read and write. The index is
  replaced with a conditional PUT (``If-Match`` on the ETag read, ``If-None-Match: *`` when there
  was none), so two publishers cannot silently overwrite each other: the loser re-reads and retries,
  and after a few lost races fails with a clear error.

Objects other than ``index.json`` are write-once and named by their content hash, so re-uploading
one is harmless and a reader never sees half an object under a final name.
"""
from __future__ import annotations

import contextlib
import os
import http.client
import shutil
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Optional, Tuple

from .. import artefact
from ..errors import IntegrityError, InputError, NetworkError, OutputError, ToolchainError, UsageError
from ..safe_files import open_regular, read_regular, write_atomic
from . import index as idx

DEFAULT_STORE = "artefact-store"
ENV_STORE = "EDGECNN_STORE"
HTTP_TIMEOUT = 30.0              # seconds without a byte before a request or a download counts as stalled
HTTP_ATTEMPTS = 3                # tries of one request (and of one download, in pull), then one clear line
RETRY_PAUSE = 0.5                # seconds before the second try; twice that before the third
ENV_TIMEOUT = "EDGECNN_HTTP_TIMEOUT"
S3_INDEX_ATTEMPTS = 5

Updater = Callable[[dict], Optional[dict]]


class Store:
    url: str = ""
    kind: str = ""
    writable: bool = True

    def read_index(self, missing_ok: bool = False) -> dict:
        """The index; an error that says so when the store has none (an empty index if ``missing_ok``)."""
        data = self._read_index_bytes(missing_ok)
        if data is None and missing_ok:
            return idx.empty()
        if data is None:
            raise InputError(f"no {idx.INDEX} at {self.url}",
                             hint="check the store address, or publish to it first (`edgecnn publish DIR --to STORE`)")
        return idx.parse(data, f"{self.url.rstrip('/')}/{idx.INDEX}")

    def update_index(self, fn: Updater) -> dict:
        """Apply ``fn`` to the current index (an empty one if none) and store the result, safely against
        other publishers. ``fn`` returns the new index, or None to change nothing. Returns the index kept."""
        raise UsageError(f"{self.url} is a read-only {self.kind} store",
                         hint="publish to a local folder or an s3:// store, then serve that folder over HTTP")

    def put(self, local: Path, name: str) -> None:
        raise UsageError(f"{self.url} is a read-only {self.kind} store")

    def delete(self, name: str) -> None:
        """Remove object ``name`` (what a failed publish uploaded); missing is fine."""
        raise UsageError(f"{self.url} is a read-only {self.kind} store")

    def has(self, name: str) -> bool:
        """Whether object ``name`` is in the store."""
        raise UsageError(f"{self.url} is a read-only {self.kind} store")

    @contextlib.contextmanager
    def open(self, name: str) -> Iterator[Tuple[BinaryIO, Optional[int]]]:
        """A readable stream of object ``name`` and its size (None when the server does not say)."""
        raise NotImplementedError
        yield  # pragma: no cover

    def _read_index_bytes(self, missing_ok: bool = False) -> Optional[bytes]:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------------ local
class LocalStore(Store):
    kind = "local"

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser()
        self.url = str(self.root)

    def _read_index_bytes(self, missing_ok: bool = False) -> Optional[bytes]:
        if not self.root.exists():
            if missing_ok:
                return None
            raise InputError(f"no artefact store at {self.root}",
                             hint="check --from, or publish to it first (`edgecnn publish DIR --to STORE`)")
        if not self.root.is_dir():
            raise InputError(f"{self.root} is not a folder", hint="pass the store folder (it holds index.json)")
        return self._index_bytes()

    def _index_bytes(self) -> Optional[bytes]:
        path = self.root / idx.INDEX
        try:
            return read_regular(path, idx.MAX_INDEX_BYTES, "a store index")
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise InputError(f"cannot read {path} ({exc.strerror})") from None

    def _path(self, name: str) -> Path:
        """The object's path: a plain file name directly in the store folder, never anywhere else."""
        if not idx.is_object_name(name):
            raise IntegrityError(f"{self.root}: object name {name!r} is not a plain file name",
                                 hint="refusing a path that leaves the store")
        return self.root / name

    def _mkroot(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except FileExistsError:
            raise OutputError(f"{self.root} is not a folder", hint="choose another store") from None
        except OSError as exc:
            raise OutputError(f"cannot create the store {self.root} ({exc.strerror})", hint="choose another store") from None

    def update_index(self, fn: Updater) -> dict:
        self._mkroot()
        with artefact.locked(self.root / idx.INDEX, timeout=120.0):
            path = self.root / idx.INDEX
            data = self._index_bytes()
            current = idx.parse(data, str(path)) if data is not None else idx.empty()
            new = fn(current)
            if new is None:
                return current
            self._write_atomic(idx.dump(new), path)
            return new

    def put(self, local: Path, name: str) -> None:
        dest = self._path(name)
        self._mkroot()
        if os.path.isfile(dest) and not dest.is_symlink() and artefact.sha256_file(dest) == artefact.sha256_file(local):
            return  # already there, same bytes
        with open(local, "rb") as src:
            self._write_atomic(lambda dst: shutil.copyfileobj(src, dst, 1 << 20), dest)

    def delete(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path(name))

    def has(self, name: str) -> bool:
        return os.path.isfile(self._path(name))

    def _write_atomic(self, data, path: Path) -> None:
        """Readers never see a half-written archive or index; a link planted at ``path`` is replaced."""
        try:
            write_atomic(path, data)
        except OSError as exc:
            raise OutputError(f"cannot write {path} ({exc.strerror})", hint="check free space and permissions") from None

    @contextlib.contextmanager
    def open(self, name: str):
        path = self._path(name)
        try:
            f = open_regular(path)
        except FileNotFoundError:
            raise InputError(f"{path} is listed in the index but missing",
                             hint="the store is incomplete; republish that bundle") from None
        except OSError as exc:
            raise InputError(f"cannot read {path} ({exc.strerror})") from None
        with f:
            yield f, os.fstat(f.fileno()).st_size


# ------------------------------------------------------------------------------------------------- http
class HttpStore(Store):
    kind = "HTTP"
    writable = False
    attempts = HTTP_ATTEMPTS

    def __init__(self, url: str):
        self.url = url if url.endswith("/") else url + "/"

    def _url(self, name: str) -> str:
        if name != idx.INDEX and not idx.is_object_name(name):
            raise IntegrityError(f"{self.url}: object name {name!r} is not a plain file name",
                                 hint="refusing a path that leaves the store")
        return urllib.parse.urljoin(self.url, urllib.parse.quote(name))

    def _get(self, name: str):
        """The response for ``name`` (None for a missing index); connection failures and server errors are
        retried ``attempts`` times, then one NetworkError line."""
        url = self._url(name)
        for attempt in range(1, self.attempts + 1):
            try:
                return self._get_once(url, name)
            except NetworkError as exc:
                if attempt == self.attempts:
                    raise NetworkError(f"{exc.message} (tried {attempt} times)", hint=exc.hint) from None
                time.sleep(RETRY_PAUSE * attempt)

    def _get_once(self, url: str, name: str):
        req = urllib.request.Request(url, headers={"User-Agent": "edgecnn", "Accept-Encoding": "identity"})
        timeout = http_timeout()
        try:
            return urllib.request.urlopen(req, timeout=timeout)
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and name == idx.INDEX:
                return None
            if exc.code >= 500 or exc.code == 429:
                raise NetworkError(f"{url}: HTTP {exc.code} {exc.reason}", hint="the server is failing; try again "
                                   "later") from None
            raise InputError(f"{url}: HTTP {exc.code} {exc.reason}",
                             hint="the store is incomplete or the address is wrong" if exc.code == 404 else
                             "check access to the server") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, (socket.timeout, TimeoutError)) or isinstance(exc, (socket.timeout, TimeoutError)):
                reason = f"no answer within {timeout:g} s"
            raise NetworkError(f"cannot reach {url} ({reason})",
                               hint=f"check the address and the network (timeout: ${ENV_TIMEOUT} seconds)") from None

    def _read_index_bytes(self, missing_ok: bool = False) -> Optional[bytes]:
        resp = self._get(idx.INDEX)
        if resp is None:
            return None
        with resp:
            data = _HttpBody(resp, self._url(idx.INDEX)).read(idx.MAX_INDEX_BYTES + 1)
        if len(data) > idx.MAX_INDEX_BYTES:
            raise IntegrityError(f"{self._url(idx.INDEX)} is over the {idx.MAX_INDEX_BYTES:,}-byte limit for a store "
                                 f"index", hint="is the address right?")
        return data

    @contextlib.contextmanager
    def open(self, name: str):
        resp = self._get(name)
        if resp is None:
            raise InputError(f"{self._url(name)}: not found")
        with resp:
            length = resp.headers.get("Content-Length")
            yield _HttpBody(resp, self._url(name)), (int(length) if length and length.isdigit() else None)


class _HttpBody:
    """An HTTP response body whose stalls and breaks come out as one NetworkError line naming the URL."""

    def __init__(self, resp, url: str):
        self.resp, self.url, self.got = resp, url, 0

    def _call(self, fn, n: int) -> bytes:
        try:
            data = fn(n)
        except (socket.timeout, TimeoutError):
            raise NetworkError(f"{self.url}: the server stopped sending after {self.got:,} bytes (nothing for "
                               f"{http_timeout():g} s)", hint="check the network or the server, then pull again "
                               f"(timeout: ${ENV_TIMEOUT} seconds)") from None
        except (OSError, http.client.HTTPException) as exc:
            raise NetworkError(f"{self.url}: the download broke off after {self.got:,} bytes "
                               f"({type(exc).__name__})", hint="check the network or the server, then pull again") from None
        self.got += len(data)
        return data

    def read(self, n: int = -1) -> bytes:
        return self._call(self.resp.read, n)

    def read1(self, n: int = -1) -> bytes:
        return self._call(self.resp.read1, n)


def http_timeout() -> float:
    """Seconds an HTTP store may stay silent: $EDGECNN_HTTP_TIMEOUT, default 30."""
    text = os.environ.get(ENV_TIMEOUT, "").strip()
    if not text:
        return HTTP_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):
        raise UsageError(f"{ENV_TIMEOUT}={text!r} is not a number of seconds > 0", hint=f"e.g. {ENV_TIMEOUT}=30")
    return value


# --------------------------------------------------------------------------------------------------- s3
class S3Store(Store):
    kind = "S3"

    def __init__(self, url: str, endpoint_url: Optional[str] = None):
        try:
            import s3fs
        except ImportError:
            raise ToolchainError("s3:// stores need s3fs", hint="pip install 'edgecnn[s3]' (or s3fs)") from None
        parsed = urllib.parse.urlparse(url)
        if not parsed.netloc:
            raise UsageError(f"{url}: no bucket name", hint="write s3://BUCKET or s3://BUCKET/PREFIX")
        self.url = url.rstrip("/")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        self.fs = s3fs.S3FileSystem(endpoint_url=endpoint_url, skip_instance_cache=True, use_listings_cache=False)

    def _key(self, name: str) -> str:
        if name != idx.INDEX and not idx.is_object_name(name):
            raise IntegrityError(f"{self.url}: object name {name!r} is not a plain file name",
                                 hint="refusing a key that leaves the store's prefix")
        return f"{self.prefix}/{name}" if self.prefix else name

    def _path(self, name: str) -> str:
        return f"{self.bucket}/{self._key(name)}"

    @contextlib.contextmanager
    def _errors(self, what: str, writing: bool = False):
        try:
            yield
        except (UsageError, InputError, OutputError, IntegrityError):
            raise
        except Exception as exc:  # botocore/aiohttp/s3fs errors: one line with what to do
            raise _s3_error(exc, f"{self.url}: {what}", writing) from None

    def _get_with_etag(self, name: str) -> Tuple[Optional[bytes], Optional[str]]:
        from fsspec.asyn import sync

        async def get():
            try:
                resp = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self._key(name))
            except FileNotFoundError:
                return None, None
            try:
                return await resp["Body"].read(idx.MAX_INDEX_BYTES + 1), resp.get("ETag")
            finally:
                resp["Body"].close()

        with self._errors(f"reading {name}"):
            data, etag = sync(self.fs.loop, get)
        if data is not None and len(data) > idx.MAX_INDEX_BYTES:
            raise IntegrityError(f"{self.url}/{name} is over the {idx.MAX_INDEX_BYTES:,}-byte limit for a store index",
                                 hint="is the address right?")
        return data, etag

    def _read_index_bytes(self, missing_ok: bool = False) -> Optional[bytes]:
        return self._get_with_etag(idx.INDEX)[0]

    def update_index(self, fn: Updater) -> dict:
        where = f"{self.url}/{idx.INDEX}"
        for attempt in range(S3_INDEX_ATTEMPTS):
            data, etag = self._get_with_etag(idx.INDEX)
            current = idx.parse(data, where) if data is not None else idx.empty()
            new = fn(current)
            if new is None:
                return current
            cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
            try:
                self.fs.call_s3("put_object", Bucket=self.bucket, Key=self._key(idx.INDEX), Body=idx.dump(new),
                                ContentType="application/json", **cond)
                return new
            except Exception as exc:
                if not _precondition_failed(exc):
                    raise _s3_error(exc, f"{where}: writing", True) from None
            time.sleep(0.2 * (attempt + 1))  # another publisher won the race: re-read and try again
        raise OutputError(f"{where} kept changing while publishing ({S3_INDEX_ATTEMPTS} conditional writes refused)",
                          hint="another publisher is busy on this store; try again in a moment")

    def put(self, local: Path, name: str) -> None:
        with self._errors(f"uploading {name}", writing=True):
            if self.fs.exists(self._path(name)) and self.fs.size(self._path(name)) == Path(local).stat().st_size:
                return  # content-addressed name: already there
            self.fs.put_file(str(local), self._path(name))

    def delete(self, name: str) -> None:
        with self._errors(f"removing {name}", writing=True):
            if self.fs.exists(self._path(name)):
                self.fs.rm_file(self._path(name))

    def has(self, name: str) -> bool:
        with self._errors(f"looking for {name}"):
            return self.fs.exists(self._path(name))

    @contextlib.contextmanager
    def open(self, name: str):
        with self._errors(f"opening {name}"):
            # readahead in 8 MiB ranges (not one request per read call); s3fs pins the ETag across ranges
            f = self.fs.open(self._path(name), "rb", block_size=8 << 20, cache_type="readahead")
        with f:
            yield _S3Reader(f, self), f.size


class _S3Reader:
    """Wrap an s3fs file so errors mid-download come out as one clear line."""

    def __init__(self, f, store: S3Store):
        self.f, self.store = f, store

    def read(self, n: int = -1) -> bytes:
        with self.store._errors("downloading"):
            return self.f.read(n)


def _precondition_failed(exc: BaseException) -> bool:
    for e in (exc, exc.__cause__, exc.__context__):
        resp = getattr(e, "response", None)
        if isinstance(resp, dict):
            code = str(resp.get("Error", {}).get("Code", ""))
            status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
                return True
    return False


def _s3_error(exc: BaseException, what: str, writing: bool):
    name = type(exc).__name__
    text = str(exc).splitlines()[0] if str(exc) else name
    family = OutputError if writing else InputError
    if "NoCredentials" in name or "credentials" in text.lower():
        return family(f"{what}: no S3 credentials", hint="set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or an AWS profile")
    if isinstance(exc, FileNotFoundError):
        return family(f"{what}: not found ({text})", hint="check the bucket name and prefix")
    if isinstance(exc, PermissionError):
        return family(f"{what}: access denied ({text})", hint="check the credentials' permissions on the bucket")
    return family(f"{what}: {text}", hint="check the address (--s3-endpoint / AWS_ENDPOINT_URL) and the network")


def open_store(url: Optional[str] = None, *, endpoint_url: Optional[str] = None) -> Store:
    """``./folder`` or ``file://…`` -> local; ``http(s)://…`` -> HTTP (read-only); ``s3://bucket[/prefix]`` -> S3."""
    url = url or os.environ.get(ENV_STORE) or DEFAULT_STORE
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme in ("http", "https"):
        return HttpStore(url)
    if scheme == "s3":
        return S3Store(url, endpoint_url=endpoint_url)
    if scheme == "file":
        return LocalStore(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    if scheme and len(scheme) > 1:
        raise UsageError(f"unsupported store address {url!r}", hint="use a folder, http(s)://…, or s3://bucket/prefix")
    return LocalStore(url)
