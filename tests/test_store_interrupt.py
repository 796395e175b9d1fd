"""Killing `edgecnn pull` mid-download (from a deliberately slow local HTTP server) leaves no partial
artefact at the destination; and pulling needs neither torch nor onnx (it runs on a bare device)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import edgecnn
from edgecnn import artefact
from edgecnn.store import LocalStore, publish, pull, open_store

from store_helpers import _QuietHandler, bundles, http_serve, onnx_bundle, staging_dirs  # noqa: F401

ROOT = Path(edgecnn.__file__).resolve().parents[1]


class _Slow(_QuietHandler):
    """Serves archives 4 KiB every 50 ms and says when it has started."""
    started = threading.Event()

    def copyfile(self, source, outputfile):
        if not self.path.endswith(".tar.gz"):
            return super().copyfile(source, outputfile)
        while True:
            block = source.read(4096)
            if not block:
                return
            try:
                outputfile.write(block)
                outputfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                return
            type(self).started.set()
            time.sleep(0.05)


def _spawn_pull(url: str, dest: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "edgecnn", "pull", "lenet5", "--from", url, "--to", str(dest)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("sig", (signal.SIGTERM, signal.SIGKILL), ids=("SIGTERM", "SIGKILL"))
def test_killed_pull_leaves_no_partial_artefact(sig, onnx_bundle, tmp_path, http_serve):
    store = LocalStore(tmp_path / "store")
    entry = publish(onnx_bundle, store, "1").entry
    assert entry["bytes"] > 40 * 4096          # the slow server needs > 2 s for it
    _Slow.started.clear()
    url = http_serve(store.root, handler=_Slow)
    dest = tmp_path / "app"
    final = artefact.bundle_dir(dest, "lenet5", "onnx", "fp32")
    proc = _spawn_pull(url, dest)
    try:
        assert _Slow.started.wait(60), proc.communicate(timeout=5)
        deadline, size = time.monotonic() + 20, 0
        while size == 0 and time.monotonic() < deadline:   # wait until part of the archive is on disk
            time.sleep(0.1)
            partial = [p for d in staging_dirs(dest) for p in Path(d).iterdir()]
            size = partial[0].stat().st_size if partial else 0
        assert 0 < size < entry["bytes"] and proc.poll() is None   # really mid-download
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not final.exists()
    if sig == signal.SIGTERM:
        assert proc.returncode == 130 and "interrupted" in err
        assert staging_dirs(dest) == []            # cleaned up on the way out
    else:
        assert proc.returncode == -signal.SIGKILL
        # SIGKILL cannot be caught: hidden staging folders may stay; the next pull of the bundle removes them
        result = pull(LocalStore(store.root), "lenet5", "onnx", "fp32", to=dest, quiet=True)
        assert result.action == "pulled" and artefact.verify(final)
        assert staging_dirs(dest) == []


def test_pull_imports_neither_torch_nor_onnx(onnx_bundle, tmp_path, http_serve):
    store = LocalStore(tmp_path / "store")
    publish(onnx_bundle, store, "1")
    url = http_serve(store.root)
    code = ("import sys; from edgecnn.cli import main; "
            f"rc = main(['pull', 'lenet5', '--from', {url!r}, '--to', {str(tmp_path / 'app')!r}, '-q']); "
            "heavy = [m for m in ('torch', 'onnx', 'onnxruntime', 'coremltools') if m in sys.modules]; "
            "print(rc, heavy); sys.exit(rc or len(heavy))")
    res = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip().endswith("0 []")
