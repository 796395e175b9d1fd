"""Stores, lock files and bundles that someone else controls (docs/reliability.md, "Threat model").

The four serious cases first — a planted lock file, a manifest naming a path outside the store, a version with
a trailing newline, a gzip bomb — then the classes around them: what a refused pull leaves, stalled servers,
publish races, --write-lock checked first, index and lock entries of the wrong shape, terminal escapes, and
the bundle lock's own protocol (it removes its file on the way out, so waiters must re-check what they hold).
All on real bundles, real archives, a real HTTP server on loopback; each asserts one clear line and that
nothing was written where it must not be.
"""
from __future__ import annotations

import io
import json
import os
import resource
import tarfile
import threading
import time

import pytest

from edgecnn import artefact
from edgecnn.cli import main
from edgecnn.errors import EXIT_INPUT, EXIT_INTEGRITY, EXIT_OUTPUT, EXIT_USAGE, OutputError, UsageError
from edgecnn.store import LocalStore, archive, index as idx, publish, pull

from store_helpers import (_QuietHandler, bundles, evil_archive, http_serve, onnx_bundle, plant,  # noqa: F401
                           relabelled, staging_dirs)

BUNDLE = ("lenet5", "onnx", "fp32")


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "unexpected" not in lines[0] and "\x1b" not in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def published(onnx_bundle, tmp_path):
    store = LocalStore(tmp_path / "store")
    return store, publish(onnx_bundle, store, "1").entry


def store_files(store: LocalStore) -> list:
    return sorted(p.name for p in store.root.iterdir())


def recorded(store: LocalStore) -> list:
    entries = store.read_index()["artefacts"]
    return sorted({e[k] for e in entries for k in ("archive", "manifest")} | {idx.INDEX})


# ------------------------------------------------------------------------------------ 1. planted lock files
def _plant(path, victim, how: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(victim, path) if how == "symlink" else os.link(victim, path)


@pytest.mark.parametrize("how", ("symlink", "hardlink"))
def test_a_planted_bundle_lock_is_refused_not_written_through(how, tmp_path):
    """The lock every export and pull of a bundle takes (OUT/<arch>/.<target>-<precision>.lock)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("years of work\n")
    final = artefact.bundle_dir(tmp_path / "out", *BUNDLE)
    _plant(final.parent / ".onnx-fp32.lock", victim, how)
    with pytest.raises(OutputError, match="symbolic link; refusing to write through it" if how == "symlink" else
                       "a file with 2 hard links, not a lock file"):
        with artefact.locked(final):
            pass
    assert victim.read_text() == "years of work\n"


def test_a_planted_lock_in_a_pull_destination_or_a_store_is_refused(published, onnx_bundle, tmp_path, capsys):
    store, _ = published
    victim = tmp_path / "victim.txt"
    victim.write_text("years of work\n")
    app = tmp_path / "app"
    _plant(app / "lenet5" / ".onnx-fp32.lock", victim, "symlink")
    code, _, err = run(capsys, "pull", "lenet5", "--from", str(store.root), "--to", str(app), "-q")
    assert code == EXIT_OUTPUT and "is a symbolic link; refusing to write through it" in one_error(err)
    before = store_files(store)
    _plant(store.root / ".index.json.lock", victim, "symlink")
    other = relabelled(onnx_bundle, tmp_path / "v2" / "lenet5" / "onnx-fp32")
    code, _, err = run(capsys, "publish", str(other), "--to", str(store.root))
    assert code == EXIT_OUTPUT and "is a symbolic link; refusing to write through it" in one_error(err)
    assert victim.read_text() == "years of work\n"
    assert store_files(store) == sorted(before + [".index.json.lock"])   # refused before uploading anything


def test_a_bundle_folder_that_is_a_link_is_refused(tmp_path):
    elsewhere = tmp_path / "etc"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(elsewhere, tmp_path / "out" / "lenet5")
    with pytest.raises(OutputError, match="is a symbolic link; edgecnn writes bundles into real folders only"):
        with artefact.locked(artefact.bundle_dir(tmp_path / "out", *BUNDLE)):
            pass
    assert list(elsewhere.iterdir()) == []


def test_the_lock_is_removed_and_still_serialises_waiters(tmp_path):
    """A holder removes the lock file on the way out; a waiter that then gets the lock on the removed file
    notices and locks the new one, so two writers never overlap."""
    final = artefact.bundle_dir(tmp_path / "out", *BUNDLE)
    inside, overlaps, order = [], [], []

    def writer(name: str, hold: float) -> None:
        with artefact.locked(final, timeout=20):
            if inside:
                overlaps.append((name, list(inside)))
            inside.append(name)
            order.append(name)
            time.sleep(hold)
            inside.remove(name)

    threads = [threading.Thread(target=writer, args=(f"w{i}", 0.15)) for i in range(5)]
    for t in threads:
        t.start()
        time.sleep(0.02)
    for t in threads:
        t.join()
    assert overlaps == [] and sorted(order) == [f"w{i}" for i in range(5)]
    assert not (tmp_path / "out" / "lenet5").exists()     # the lock file and the folder it made are gone


# ------------------------------------------------------------------------ 2. publish never writes outside
def test_a_manifest_naming_a_path_outside_the_store_is_refused(onnx_bundle, tmp_path, capsys):
    """manifest.json is not among its own hashes, so changing its arch keeps every file hash valid."""
    good = json.loads((onnx_bundle / "manifest.json").read_text())
    (onnx_bundle / "manifest.json").write_text(json.dumps({**good, "arch": "../../escaped/lenet5"}))
    store = tmp_path / "sub" / "store"
    code, _, err = run(capsys, "verify", str(onnx_bundle))
    assert code == EXIT_INTEGRITY and "arch '../../escaped/lenet5' is not a plain name" in one_error(err)
    code, _, err = run(capsys, "publish", str(onnx_bundle), "--to", str(store))
    assert code == EXIT_INTEGRITY and "is not a plain name" in one_error(err)
    assert not (tmp_path / "escaped").exists() and not store.exists()
    (onnx_bundle / "manifest.json").write_text(json.dumps(good))          # the store stays usable
    assert run(capsys, "publish", str(onnx_bundle), "--to", str(store))[0] == 0
    assert run(capsys, "ls", "--from", str(store))[0] == 0


def test_the_manifest_in_an_archive_must_be_the_one_the_index_records(published, tmp_path, capsys):
    """A valid bundle whose manifest was edited (its file hashes still true) and an index updated for the new
    archive, but not for the manifest: the manifest's own sha256 in the index refuses it."""
    store, entry = published
    work = tmp_path / "work"
    work.mkdir()
    archive.safe_extract(store.root / entry["archive"], work)
    manifest = json.loads((work / "manifest.json").read_text())
    manifest["weights"]["notes"] = manifest["weights"]["notes"] + ["trust me"]
    (work / "manifest.json").write_text(json.dumps(manifest, indent=2))
    assert artefact.verify(work)
    archive.pack(work, tmp_path / "edited.tar.gz")
    plant(store.root, entry, tmp_path / "edited.tar.gz")
    app = tmp_path / "app"
    code, _, err = run(capsys, "pull", "lenet5", "--from", str(store.root), "--to", str(app), "-q")
    assert code == EXIT_INTEGRITY and "manifest.json has sha256" in one_error(err) and "the index records" in err
    assert not app.exists()


# ------------------------------------------------------------------------------- 3. version strings
def test_a_version_with_a_trailing_newline_is_refused(published, onnx_bundle, tmp_path, capsys):
    store, entry = published
    other = relabelled(onnx_bundle, tmp_path / "v2" / "lenet5" / "onnx-fp32")
    before = (store.root / idx.INDEX).read_bytes()
    code, _, err = run(capsys, "publish", str(other), "--to", str(store.root), "--version", "2\n")
    assert code == EXIT_USAGE and "invalid version '2\\n'" in one_error(err)
    assert (store.root / idx.INDEX).read_bytes() == before and store_files(store) == recorded(store)
    # an index that holds such a version (written by hand, or by an older edgecnn) is named, not crashed on
    index = json.loads(before)
    index["artefacts"][0]["version"] = "2\n"
    (store.root / idx.INDEX).write_text(json.dumps(index))
    code, _, err = run(capsys, "ls", "--from", str(store.root))
    assert code == EXIT_INTEGRITY and "entry 0 has version '2\\n'" in one_error(err)


# ------------------------------------------------------------------------------------- 4. gzip bomb
class _Zeros(io.RawIOBase):
    def __init__(self, n: int):
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


def _bomb(path, bundle, size: int, lie: bool = False):
    """The bundle's real files plus one entry of ``size`` zero bytes (or a header claiming them, ``lie``)."""
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for rel in archive.bundle_files(bundle):
            tar.add(bundle / rel, arcname=rel)
        info = tarfile.TarInfo("padding.bin")
        info.size = size
        if lie:
            tar.fileobj.write(info.tobuf())
        else:
            tar.addfile(info, io.BufferedReader(_Zeros(size)))
    return path


@pytest.mark.parametrize("lie", (False, True), ids=("64MiB-of-zeros", "header-claims-2GiB"))
def test_a_gzip_bomb_is_refused_before_anything_is_written(lie, published, onnx_bundle, tmp_path, capsys):
    """64 MiB of zeros gzip to 64 kB (1000x): refused after reading the headers, with a 4 MiB file-size limit
    on this process to show that nothing was written first."""
    store, entry = published
    bomb = _bomb(tmp_path / "bomb.tar.gz", onnx_bundle, (2 << 30) if lie else (64 << 20), lie=lie)
    assert bomb.stat().st_size < 1 << 20
    plant(store.root, entry, bomb)
    app = tmp_path / "app"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, hard))
    try:
        code, _, err = run(capsys, "pull", "lenet5", "--from", str(store.root), "--to", str(app), "-q")
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert code == EXIT_INTEGRITY and "refusing a decompression bomb" in one_error(err)
    assert not app.exists()


# -------------------------------------------------------------------- a refused pull leaves nothing
def test_a_refused_pull_leaves_nothing_in_the_destination(published, tmp_path, capsys):
    store, entry = published
    data = bytearray((store.root / entry["archive"]).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (store.root / entry["archive"]).write_bytes(bytes(data))
    fresh, shared = tmp_path / "fresh", tmp_path / "models"
    (shared / "other").mkdir(parents=True)
    (shared / "other" / "model.bin").write_bytes(b"an app's own file")
    for dest in (fresh, shared):
        code, _, err = run(capsys, "pull", "lenet5", "--from", str(store.root), "--to", str(dest), "-q")
        assert code == EXIT_INTEGRITY and "archive sha256 mismatch" in one_error(err)
    assert not fresh.exists()                                            # no lock file, no empty folder
    assert sorted(str(p.relative_to(shared)) for p in shared.rglob("*")) == ["other", "other/model.bin"]


# ----------------------------------------------------------------------------------------- network
class _Stall(_QuietHandler):
    """Sends half of every archive, then stops (until the test ends); counts the archive requests."""
    requests = 0
    release = threading.Event()

    def copyfile(self, source, outputfile):
        if not self.path.endswith(".tar.gz"):
            return super().copyfile(source, outputfile)
        type(self).requests += 1
        data = source.read()
        try:
            outputfile.write(data[: len(data) // 2])
            outputfile.flush()
            type(self).release.wait(10)
        except OSError:
            pass


def test_a_stalled_download_is_retried_then_named_in_one_line(published, tmp_path, http_serve, capsys, monkeypatch):
    store, _ = published
    monkeypatch.setenv("EDGECNN_HTTP_TIMEOUT", "0.3")
    _Stall.requests = 0
    _Stall.release.clear()
    url = http_serve(store.root, handler=_Stall)
    app = tmp_path / "app"
    try:
        code, _, err = run(capsys, "pull", "lenet5", "--from", url, "--to", str(app), "-q")
    finally:
        _Stall.release.set()
    line = one_error(err)
    assert code == EXIT_INPUT and url in line and "the server stopped sending after" in line
    assert "tried 3 times" in line and "pull again" in line and "EDGECNN_HTTP_TIMEOUT" in line
    assert _Stall.requests == 3 and not app.exists()


def test_an_unreachable_store_is_retried_then_named(tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:      # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/"
    code, _, err = run(capsys, "ls", "--from", url)
    line = one_error(err)
    assert code == EXIT_INPUT and f"cannot reach {url}index.json" in line and "tried 3 times" in line


# ------------------------------------------------------------------------------------- concurrency
def test_the_loser_of_a_publish_race_leaves_no_orphan(onnx_bundle, tmp_path):
    """Two `publish --version 7` of different bytes: the rival records its entry between our upload and our
    index update. We lose with a clear error and take our archive and manifest away again."""
    store = LocalStore(tmp_path / "store")
    rival = relabelled(onnx_bundle, tmp_path / "rival" / "lenet5" / "onnx-fp32")
    real_update = store.update_index

    def racing(fn):
        if getattr(fn, "__name__", "") == "add" and not store.root.joinpath(idx.INDEX).exists():
            publish(rival, LocalStore(store.root), "7")
        return real_update(fn)

    store.update_index = racing
    with pytest.raises(UsageError, match="version 7 of lenet5 onnx fp32 is already published with different content"):
        publish(onnx_bundle, store, "7")
    assert store_files(LocalStore(store.root)) == recorded(LocalStore(store.root))     # no orphan
    assert [e["version"] for e in LocalStore(store.root).read_index()["artefacts"]] == ["7"]


def test_write_lock_is_checked_before_the_pull_replaces_anything(published, onnx_bundle, tmp_path, capsys):
    store, _ = published
    app = tmp_path / "app"
    pull(store, *BUNDLE, to=app, quiet=True)
    v1 = (artefact.bundle_dir(app, *BUNDLE) / "labels.txt").read_bytes()
    publish(relabelled(onnx_bundle, tmp_path / "v2" / "lenet5" / "onnx-fp32"), store, "2")
    folder = tmp_path / "locks"
    folder.mkdir()
    code, _, err = run(capsys, "pull", "lenet5", "--version", "2", "--from", str(store.root), "--to", str(app), "-q",
                       "--write-lock", str(folder))
    assert code == EXIT_USAGE and "is a folder or a special file, not a lock file" in one_error(err)
    assert (artefact.bundle_dir(app, *BUNDLE) / "labels.txt").read_bytes() == v1      # v1 still in place
    (tmp_path / "broken.lock").write_text("{ not json")
    code, _, err = run(capsys, "pull", "lenet5", "--version", "2", "--from", str(store.root), "--to", str(app), "-q",
                       "--write-lock", str(tmp_path / "broken.lock"))
    assert code == EXIT_INPUT and "is not valid JSON" in one_error(err)
    assert (artefact.bundle_dir(app, *BUNDLE) / "labels.txt").read_bytes() == v1


# ----------------------------------------------------------------- index and lock entries of the wrong shape
WRONG_ENTRIES = {
    "bytes-as-text": ({"bytes": "237086"}, "has bytes '237086', not a whole number >= 0"),
    "version-as-number": ({"version": 3}, "has version 3"),
    "arch-as-list": ({"arch": ["lenet5"]}, "has arch ['lenet5'], not a plain name"),
    "arch-with-a-path": ({"arch": "../lenet5"}, "has arch '../lenet5', not a plain name"),
    "archive-outside": ({"archive": "../../x.tar.gz"}, "not a plain file name in the store"),
    "no-manifest-sha": ({"manifest_sha256": None}, "has a malformed manifest_sha256"),
    "parity-as-text": ({"parity": "PASS"}, "has parity of type str"),
}


@pytest.mark.parametrize("case", sorted(WRONG_ENTRIES))
def test_an_index_entry_of_the_wrong_shape_is_one_line(case, published, capsys):
    store, _ = published
    change, needle = WRONG_ENTRIES[case]
    index = json.loads((store.root / idx.INDEX).read_text())
    index["artefacts"][0].update(change)
    (store.root / idx.INDEX).write_text(json.dumps(index))
    code, _, err = run(capsys, "ls", "--from", str(store.root))
    assert code == EXIT_INTEGRITY and needle in one_error(err)


def test_deeply_nested_index_and_lock_files_are_one_line(published, tmp_path, capsys):
    store, entry = published
    deep = "[" * 5000 + "]" * 5000
    lock = tmp_path / "edgecnn.lock"
    lock.write_text('{"edgecnn_lock": 1, "artefacts": [], "x": ' + deep + "}")
    code, _, err = run(capsys, "pull", "--lock", str(lock), "--from", str(store.root), "--to", str(tmp_path / "a"))
    assert code == EXIT_INPUT and "nests" in one_error(err)
    (store.root / idx.INDEX).write_text('{"schema_version": 1, "artefacts": ' + deep + "}")
    code, _, err = run(capsys, "ls", "--from", str(store.root))
    assert code == EXIT_INTEGRITY and "nests" in one_error(err)


def test_escape_sequences_from_a_store_are_shown_not_obeyed(published, onnx_bundle, tmp_path, capsys):
    """Free text in an index (created) and in a manifest (pending): printed escaped by ls and pull."""
    store, _ = published
    index = json.loads((store.root / idx.INDEX).read_text())
    index["artefacts"][0]["created"] = "\x1b[2J\x1b]8;;http://evil\x07click\x1b]8;;\x07\r"
    (store.root / idx.INDEX).write_text(json.dumps(index))
    code, out, _ = run(capsys, "ls", "--from", str(store.root))
    assert code == 0 and "\x1b" not in out and "\\x1b[2J" in out and "\r" not in out
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    manifest.update(status="pending", pending="\x1b[32mvalidated\x1b[0m on the device")
    artefact.write_manifest(onnx_bundle, manifest)
    publish(onnx_bundle, store, "2")
    code, out, _ = run(capsys, "pull", "lenet5", "--version", "2", "--from", str(store.root), "--to",
                       str(tmp_path / "app"), "-q")
    assert code == 0 and "\x1b" not in out and "\\x1b[32mvalidated" in out
