"""Fixtures for the artefact-store tests: real bundles from the pipeline, a real HTTP server and a real
S3-compatible server (moto's standalone server) on 127.0.0.1. Imported by tests/test_store_*.py."""
from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import tarfile
import threading
import uuid
from pathlib import Path

import pytest

from edgecnn import artefact
from edgecnn.store import archive, index as idx

TARGETS = ("onnx", "coreml", "trt")


def precision_for(target) -> str:
    """fp16 where the target has it and fp32 does not fit (Core ML's default), else fp32."""
    if "fp32" in target.precisions and target.name != "coreml":
        return "fp32"
    return "fp16" if "fp16" in target.precisions else target.precisions[0]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory):
    """target name -> a real lenet5 bundle exported by the pipeline (made on first use)."""
    from edgecnn import pipeline, targets
    from edgecnn.options import ExportOptions

    made = {}
    root = tmp_path_factory.mktemp("bundles")

    def get(name: str) -> Path:
        if name not in made:
            tgt = targets.get(name)
            res = pipeline.export("lenet5", name, precision_for(tgt), weights="none", out=root, quiet=True,
                                  options=ExportOptions(latency=False, calib_size=16, eval_size=8))
            made[name] = res.path
        return made[name]

    return get


@pytest.fixture
def onnx_bundle(bundles, tmp_path):
    """A private copy of the real ONNX bundle (tests may alter it)."""
    dst = tmp_path / "bundle" / "lenet5" / "onnx-fp32"
    shutil.copytree(bundles("onnx"), dst)
    return dst


def relabelled(bundle: Path, dest: Path) -> Path:
    """A valid bundle with different bytes: the same model with other label names, manifest re-hashed."""
    shutil.copytree(bundle, dest)
    labels = (dest / "labels.txt").read_text().splitlines()
    (dest / "labels.txt").write_text("\n".join(f"class-{i}" for i in range(len(labels))) + "\n")
    manifest = json.loads((dest / artefact.MANIFEST).read_text())
    artefact.write_manifest(dest, manifest)
    return dest


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def http_serve():
    """serve(folder) -> http://127.0.0.1:PORT/ : Python's http.server in a thread, stopped after the test."""
    servers = []

    def serve(folder: Path, handler=_QuietHandler) -> str:
        srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(folder)))
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/"

    yield serve
    for srv in servers:
        srv.shutdown()
        srv.server_close()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-compatible server (moto's ThreadedMotoServer) on 127.0.0.1, with throwaway credentials."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is not installed (pip install -e '.[dev]')")
    pytest.importorskip("s3fs", reason="s3fs is not installed (pip install -e '.[dev]')")
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def s3_store_url(s3_endpoint):
    """A fresh bucket on the loopback S3 server; returns s3://bucket/prefix."""
    import boto3

    bucket = f"edgecnn-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    return f"s3://{bucket}/models"


def leftovers(dest: Path) -> list:
    """Everything under ``dest`` except lock files: what a failed pull must not leave."""
    if not dest.exists():
        return []
    return sorted(str(p.relative_to(dest)) for p in dest.rglob("*")
                  if not (p.is_file() and p.name.endswith(".lock")) and not p.is_dir())


def staging_dirs(dest: Path) -> list:
    return sorted(str(p) for p in dest.rglob(".staging-*")) if dest.exists() else []


def plant(store_dir: Path, entry: dict, archive_path: Path) -> dict:
    """Replace ``entry``'s archive in a local store with ``archive_path`` and make the index agree with it
    (a store whose owner was compromised: the sha256 check passes, later checks must catch it)."""
    data = archive_path.read_bytes()
    (store_dir / entry["archive"]).write_bytes(data)
    index = json.loads((store_dir / idx.INDEX).read_text())
    for e in index["artefacts"]:
        if e["version"] == entry["version"] and idx.key_of(e) == idx.key_of(entry):
            e["sha256"] = artefact.sha256_file(store_dir / entry["archive"])
            e["bytes"] = len(data)
    (store_dir / idx.INDEX).write_bytes(idx.dump(index))
    return index


def evil_archive(path: Path, bundle: Path, extra: tarfile.TarInfo, payload: bytes = b"") -> Path:
    """A .tar.gz with the bundle's real files plus one hostile entry."""
    import io

    with tarfile.open(path, "w:gz") as tar:
        for rel in archive.bundle_files(bundle):
            tar.add(bundle / rel, arcname=rel)
        tar.addfile(extra, io.BytesIO(payload) if extra.isreg() else None)
    return path
