"""What the store refuses: damaged or hostile archives on pull (nothing left behind), changed bytes under
an existing version, unvalidated or modified bundles on publish, lock files whose sha256 does not match,
and index races between publishers (a folder's lock, S3's conditional writes)."""
from __future__ import annotations

import json
import tarfile
import threading

import pytest

from edgecnn import artefact
from edgecnn.cli import main
from edgecnn.errors import EXIT_INTEGRITY, EXIT_USAGE, IntegrityError, OutputError, UsageError
from edgecnn.store import LocalStore, archive, open_store, publish, pull

from store_helpers import (bundles, evil_archive, http_serve, leftovers, onnx_bundle, plant,  # noqa: F401
                           relabelled, s3_endpoint, s3_store_url, staging_dirs)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def published(onnx_bundle, tmp_path):
    store = LocalStore(tmp_path / "store")
    res = publish(onnx_bundle, store, "1")
    return store, res.entry


def _pull_fails(capsys, store, dest, needle):
    code, out, err = run(capsys, "pull", "lenet5", "--from", str(store.root), "--to", str(dest), "-q")
    assert code == EXIT_INTEGRITY, (out, err)
    assert needle in err and "the download was deleted and nothing was written" in err
    assert err.count("\n") == 1                      # one clear line
    assert not artefact.bundle_dir(dest, "lenet5", "onnx", "fp32").exists()
    assert leftovers(dest) == [] and staging_dirs(dest) == []
    return err


def test_tampered_archive_is_refused_and_deleted(published, tmp_path, capsys):
    store, entry = published
    path = store.root / entry["archive"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    _pull_fails(capsys, store, tmp_path / "app", "archive sha256 mismatch")


def test_tampered_file_inside_is_refused(published, onnx_bundle, tmp_path, capsys):
    store, entry = published
    work = tmp_path / "work"
    work.mkdir()
    archive.safe_extract(store.root / entry["archive"], work)
    (work / "labels.txt").write_text("cat\n" * 10)               # manifest.json left as it was
    archive.pack(work, tmp_path / "tampered.tar.gz")
    plant(store.root, entry, tmp_path / "tampered.tar.gz")       # the index even agrees with the new archive
    _pull_fails(capsys, store, tmp_path / "app", "labels.txt: sha256 mismatch")


@pytest.mark.parametrize("case", ("dotdot", "absolute-symlink"))
def test_hostile_archive_in_store_is_refused(case, published, onnx_bundle, tmp_path, capsys):
    store, entry = published
    if case == "dotdot":
        bad = tarfile.TarInfo("../../escaped.txt")
        bad.size = 5
        needle = "climbs out of the folder"
    else:
        bad = tarfile.TarInfo("model.onnx.link")
        bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
        needle = "symbolic link to '/etc/passwd'"
    plant(store.root, entry, evil_archive(tmp_path / "evil.tar.gz", onnx_bundle, bad, b"owned"))
    _pull_fails(capsys, store, tmp_path / "app", needle)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "app" / "escaped.txt").exists()


def test_failed_pull_keeps_the_previous_copy(published, onnx_bundle, tmp_path):
    store, entry = published
    dest = tmp_path / "app"
    pull(store, "lenet5", "onnx", "fp32", to=dest, quiet=True)
    other = relabelled(onnx_bundle, tmp_path / "v2" / "lenet5" / "onnx-fp32")
    e2 = publish(other, store, "2").entry
    (store.root / e2["archive"]).write_bytes(b"\x1f\x8b" + b"j" * (e2["bytes"] - 2))   # same size, other bytes
    with pytest.raises(IntegrityError, match="archive sha256 mismatch"):
        pull(store, "lenet5", "onnx", "fp32", to=dest, quiet=True)
    got = artefact.bundle_dir(dest, "lenet5", "onnx", "fp32")
    assert artefact.verify(got) and (got / "labels.txt").read_bytes() == (onnx_bundle / "labels.txt").read_bytes()
    assert staging_dirs(dest) == []


def test_versions_are_immutable(published, onnx_bundle, tmp_path, capsys):
    store, entry = published
    before = (store.root / "index.json").read_bytes()
    code, out, err = run(capsys, "publish", str(onnx_bundle), "--to", str(store.root), "--version", "1")
    assert code == 0 and "already published (same bytes): nothing to do" in out
    code, out, err = run(capsys, "publish", str(onnx_bundle), "--to", str(store.root))   # no version: same bytes
    assert code == 0 and "version 1 " in out and "nothing to do" in out
    other = relabelled(onnx_bundle, tmp_path / "v2" / "lenet5" / "onnx-fp32")
    code, out, err = run(capsys, "publish", str(other), "--to", str(store.root), "--version", "1")
    assert code == EXIT_USAGE
    assert "already published with different content" in err and "versions are immutable" in err
    assert (store.root / "index.json").read_bytes() == before


def test_only_validated_or_pending_bundles_publish(onnx_bundle, tmp_path, capsys):
    manifest = json.loads((onnx_bundle / "manifest.json").read_text())
    manifest["status"] = "failed"
    artefact.write_manifest(onnx_bundle, manifest)
    store = tmp_path / "store"
    code, _, err = run(capsys, "publish", str(onnx_bundle), "--to", str(store))
    assert code == EXIT_USAGE and "'failed', not validated: refusing to publish" in err and not store.exists()
    code, out, err = run(capsys, "publish", str(onnx_bundle), "--to", str(store), "--allow-unvalidated")
    assert code == 0 and "(failed): published" in out
    # never pulled by default, even though it is there
    code, _, err = run(capsys, "pull", "lenet5", "--from", str(store), "--to", str(tmp_path / "app"))
    assert code == EXIT_USAGE and "no validated version" in err


def test_modified_bundle_does_not_publish(onnx_bundle, tmp_path, capsys):
    (onnx_bundle / "model.onnx").write_bytes((onnx_bundle / "model.onnx").read_bytes() + b"\0")
    code, _, err = run(capsys, "publish", str(onnx_bundle), "--to", str(tmp_path / "store"))
    assert code == EXIT_INTEGRITY and "model.onnx: sha256 mismatch" in err


def test_lock_file_sha_mismatch_fails(published, tmp_path, capsys):
    store, entry = published
    lock = {"edgecnn_lock": 1, "store": str(store.root),
            "artefacts": [{"arch": "lenet5", "target": "onnx", "precision": "fp32", "version": "1",
                           "sha256": "0" * 64}]}
    (tmp_path / "edgecnn.lock").write_text(json.dumps(lock))
    code, _, err = run(capsys, "pull", "--lock", str(tmp_path / "edgecnn.lock"), "--to", str(tmp_path / "app"), "-q")
    assert code == EXIT_INTEGRITY and "the lock file pins" in err and "nothing was downloaded" in err
    assert not (tmp_path / "app" / "lenet5" / "onnx-fp32").exists()
    # the right pin pulls
    lock["artefacts"][0]["sha256"] = entry["sha256"]
    (tmp_path / "edgecnn.lock").write_text(json.dumps(lock))
    code, out, err = run(capsys, "pull", "--lock", str(tmp_path / "edgecnn.lock"), "--to", str(tmp_path / "app"), "-q")
    assert code == 0, err


def test_http_store_is_read_only(published, http_serve, onnx_bundle, capsys):
    store, _ = published
    url = http_serve(store.root)
    code, _, err = run(capsys, "publish", str(onnx_bundle), "--to", url)
    assert code == EXIT_USAGE and "read-only HTTP store" in err
    code, _, err = run(capsys, "ls", "--from", url + "nowhere/")
    assert code == 3 and "no index.json at" in err


def test_concurrent_publishers_on_a_folder_lose_nothing(onnx_bundle, tmp_path):
    store = LocalStore(tmp_path / "store")
    versions = [str(v) for v in range(1, 7)]
    bundles_ = [relabelled(onnx_bundle, tmp_path / f"b{v}" / "lenet5" / "onnx-fp32") if v != "1" else onnx_bundle
                for v in versions]
    errors = []

    def go(b, v):
        try:
            publish(b, LocalStore(store.root), v)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=go, args=(b, v)) for b, v in zip(bundles_, versions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(e["version"] for e in store.read_index()["artefacts"]) == versions


def test_s3_index_write_is_conditional(onnx_bundle, tmp_path, s3_store_url, s3_endpoint):
    """Another publisher updates index.json between our read and our write: the conditional PUT is refused,
    we re-read, and both entries survive. When it keeps happening, a clear error."""
    store = open_store(s3_store_url, endpoint_url=s3_endpoint)
    other = relabelled(onnx_bundle, tmp_path / "v2" / "lenet5" / "onnx-fp32")
    publish(onnx_bundle, store, "1")
    calls = []

    def racing_update(current):
        calls.append(len(current["artefacts"]))
        if len(calls) == 1:   # a rival publisher slips in after our read
            publish(other, open_store(s3_store_url, endpoint_url=s3_endpoint), "2")
        return {**current, "artefacts": current["artefacts"] + [dict(current["artefacts"][0], version="3")]}

    store.update_index(racing_update)
    assert calls == [1, 2]                                     # first write refused, second on the fresh index
    assert sorted(e["version"] for e in store.read_index()["artefacts"]) == ["1", "2", "3"]

    n = [0]

    def always_raced(current):
        n[0] += 1
        rival = open_store(s3_store_url, endpoint_url=s3_endpoint)
        rival.update_index(lambda c: {**c, "artefacts": c["artefacts"] + [dict(c["artefacts"][0], version=f"r{n[0]}")]})
        return {**current, "artefacts": current["artefacts"] + [dict(current["artefacts"][0], version="never")]}

    with pytest.raises(OutputError, match="kept changing while publishing"):
        store.update_index(always_raced)
    versions = {e["version"] for e in store.read_index()["artefacts"]}
    assert "never" not in versions and {"r1", "r5"} <= versions


def test_s3_same_version_different_bytes_refused(onnx_bundle, tmp_path, s3_store_url, s3_endpoint):
    store = open_store(s3_store_url, endpoint_url=s3_endpoint)
    publish(onnx_bundle, store, "1")
    other = relabelled(onnx_bundle, tmp_path / "v2" / "lenet5" / "onnx-fp32")
    with pytest.raises(UsageError, match="versions are immutable"):
        publish(other, store, "1")
    assert publish(onnx_bundle, store, "1").action == "unchanged"
