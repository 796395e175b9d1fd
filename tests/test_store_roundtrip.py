"""publish -> ls -> pull round trips through the CLI for ONNX, Core ML and TensorRT bundles, on a local
folder, a static HTTP server (http.server on 127.0.0.1) and an S3-compatible server (moto, loopback)."""
from __future__ import annotations

import json

import pytest

from edgecnn import artefact
from edgecnn.cli import main
from edgecnn.store import index as idx

from store_helpers import TARGETS, bundles, http_serve, s3_endpoint, s3_store_url  # noqa: F401  (fixtures)


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _stores(kind, tmp_path, http_serve, request):
    """(publish address, read address, extra CLI args) for a store kind."""
    if kind == "local":
        return str(tmp_path / "store"), str(tmp_path / "store"), []
    if kind == "http":  # publish into a folder, serve that folder as static files, read over HTTP
        folder = tmp_path / "site"
        folder.mkdir()
        return str(folder), http_serve(folder), []
    url = request.getfixturevalue("s3_store_url")
    endpoint = request.getfixturevalue("s3_endpoint")
    return url, url, ["--s3-endpoint", endpoint]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("kind", ("local", "http", "s3"))
def test_publish_ls_pull_round_trip(kind, target, bundles, tmp_path, http_serve, request, capsys):
    bundle = bundles(target)
    manifest = artefact.read_manifest(bundle)
    status, precision = manifest["status"], manifest["precision"]
    write, read, extra = _stores(kind, tmp_path, http_serve, request)

    code, out, err = run(capsys, "publish", str(bundle), "--to", write, "--version", "1.0.0", *extra)
    assert code == 0, err
    assert f"version 1.0.0 ({status}): published" in out

    code, out, err = run(capsys, "ls", "--from", read, *extra)
    assert code == 0, err
    header, rule, row = out.splitlines()[:3]
    assert header.split()[:5] == ["arch", "target", "precision", "version", "status"]
    assert row.split()[:5] == ["lenet5", target, precision, "1.0.0", status]

    code, out, err = run(capsys, "ls", "--from", read, "--json", *extra)
    (entry,) = json.loads(out)
    assert entry["status"] == status and entry["edgecnn_version"] == manifest["edgecnn_version"]
    assert entry["bytes"] > 0 and len(entry["sha256"]) == 64 and entry["created"].endswith("Z")
    if status == "validated":
        assert entry["parity"]["passed"] is True

    dest = tmp_path / "app"
    pending = [] if status == "validated" else ["--allow-pending"]
    code, out, err = run(capsys, "pull", "lenet5", "--target", target, "--precision", precision, "--from", read,
                         "--to", str(dest), "--quiet", *pending, *extra)
    assert code == 0, err
    assert "pulled and verified" in out
    got = artefact.bundle_dir(dest, "lenet5", target, precision)
    assert artefact.verify(got)["files"] == manifest["files"]            # every file, same sha256
    assert (got / "manifest.json").read_bytes() == (bundle / "manifest.json").read_bytes()
    if target == "onnx":   # the pulled model runs and still matches its PyTorch reference
        from edgecnn.pipeline import validate

        assert validate(got, latency=False)["status"] == "validated"

    code, out, err = run(capsys, "pull", "lenet5", "--target", target, "--precision", precision, "--from", read,
                         "--to", str(dest), "--quiet", *pending, *extra)
    assert code == 0 and "already up to date" in out


def test_default_pull_takes_latest_validated_and_lock_pins_it(bundles, tmp_path, capsys, monkeypatch):
    from store_helpers import relabelled

    bundle = bundles("onnx")
    store = str(tmp_path / "store")
    other = relabelled(bundle, tmp_path / "v2" / "lenet5" / "onnx-fp32")
    assert run(capsys, "publish", str(bundle), "--to", store)[0] == 0             # version 1 (automatic)
    code, out, _ = run(capsys, "publish", str(other), "--to", store)              # version 2 (automatic)
    assert code == 0 and "version 2 (validated): published" in out
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "pull", "lenet5", "--from", store, "--to", "app", "-q", "--write-lock")
    assert code == 0, err
    assert "version 2" in out
    lock = json.loads((tmp_path / "edgecnn.lock").read_text())
    (pin,) = lock["artefacts"]
    index = json.loads((tmp_path / "store" / "index.json").read_text())
    v2 = [e for e in index["artefacts"] if e["version"] == "2"][0]
    assert pin == {"arch": "lenet5", "target": "onnx", "precision": "fp32", "version": "2", "sha256": v2["sha256"],
                   "manifest_sha256": v2["manifest_sha256"], "status": "validated"}
    # pin version 1 instead, then a CI-style pull from the lock file alone
    code, out, _ = run(capsys, "lock", "add", "lenet5", "--version", "1", "--from", store, "--lock", "app.lock")
    assert code == 0 and "version 1" in out
    assert json.loads((tmp_path / "app.lock").read_text())["store"] == "store"   # relative to the lock file
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")                                      # CI may run from anywhere
    code, out, err = run(capsys, "pull", "--lock", str(tmp_path / "app.lock"), "--to", str(tmp_path / "ci"), "-q")
    assert code == 0, err
    got = artefact.bundle_dir(tmp_path / "ci", "lenet5", "onnx", "fp32")
    assert (got / "labels.txt").read_bytes() == (bundle / "labels.txt").read_bytes()   # v1, not v2
    assert idx.find(index, "lenet5", "onnx", "fp32", "1")[0]["sha256"] == json.loads(
        (tmp_path / "app.lock").read_text())["artefacts"][0]["sha256"]
