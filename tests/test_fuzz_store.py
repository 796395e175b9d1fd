"""Bounded property-based fuzzing of what others hand edgecnn: manifests, index entries, lock files, archives.

Each property takes a real, valid object (a LeNet-5 bundle exported by the pipeline, its published index entry,
a lock file pinning it, its archive), mutates it at random and feeds it to the commands that read it. What
must hold for every mutation: the command succeeds with a correct result, or it fails with exactly one line
of its error family — never another exception (a traceback, or "unexpected" from the CLI), never a hang (each
example has a deadline), never a file written outside the folder the command was given.

Reproducible in CI: ``derandomize=True`` (examples derived from the test, not the clock), no example database,
and a fixed small ``max_examples`` so the four properties together take well under a minute.
"""
from __future__ import annotations

import copy
import io
import json
import os
import shutil
import tarfile
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (pip install -e '.[dev]')")
from hypothesis import HealthCheck, event, given, settings, strategies as st  # noqa: E402

from edgecnn import artefact  # noqa: E402
from edgecnn.store import LocalStore, archive, index as idx, publish  # noqa: E402

from reliability_util import run_main  # noqa: E402
from store_helpers import bundles  # noqa: E402,F401

FUZZ = settings(max_examples=60, deadline=5000, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
FAMILIES = (2, 3, 4, 6)      # usage, input, output, integrity

# Text an attacker or a careless user would try where a name, a path or a version goes.
NASTY = ["", ".", "..", "../x", "../../escaped/lenet5", "/etc/passwd", "C:\\x", "a/../b", "a\\b", "2\n", " 1",
         "\x1b[2J", "\x1b]8;;http://evil\x07x", "\u202eexe.txt", "\udcff", "lenet5", "onnx", "fp32", "model.onnx",
         "labels.txt", "reference.npz", "manifest.json", "x" * 300, "1" * 5000, "NaN"]
text = st.one_of(st.sampled_from(NASTY), st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), text,
                    st.floats(allow_nan=False, allow_infinity=False))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                            st.dictionaries(text, inner, max_size=3)), max_leaves=8)


def mutate(data, value, depth: int = 0):
    """``value`` (parsed JSON) with one random change somewhere inside: a value replaced, a key dropped or added."""
    if isinstance(value, (dict, list)) and value and depth < 6 and data.draw(st.booleans(), label="descend"):
        keys = sorted(value) if isinstance(value, dict) else list(range(len(value)))
        key = data.draw(st.sampled_from(keys), label="key")
        out = copy.copy(value)
        action = data.draw(st.sampled_from(("descend", "replace", "drop")), label="action")
        if action == "drop":
            del out[key]
        else:
            out[key] = mutate(data, value[key], depth + 1) if action == "descend" else data.draw(json_values)
        return out
    if isinstance(value, dict) and data.draw(st.booleans(), label="add"):
        return {**value, data.draw(text, label="new key"): data.draw(json_values, label="new value")}
    return data.draw(json_values, label="replacement")


def encode(data, value) -> bytes:
    """JSON text of ``value``, sometimes damaged as raw bytes (cut, a byte flipped, NaN, deep nesting, a BOM)."""
    raw = json.dumps(value).encode()
    how = data.draw(st.sampled_from(("as is", "as is", "as is", "cut", "flip", "nan", "deep", "bom")), label="bytes")
    if how == "cut":
        return raw[: data.draw(st.integers(0, len(raw)), label="cut at")]
    if how == "flip":
        i = data.draw(st.integers(0, len(raw) - 1), label="flip at")
        return raw[:i] + bytes([raw[i] ^ data.draw(st.integers(1, 255), label="xor")]) + raw[i + 1:]
    if how == "nan":
        return raw.replace(b"0.", b"NaN", 1) if b"0." in raw else raw + b"NaN"
    if how == "deep":
        depth = data.draw(st.sampled_from((65, 2000, 100_000)), label="depth")
        return raw[:-1] + b', "deep": ' + b"[" * depth + b"]" * depth + b"}" if raw.endswith(b"}") else raw
    return b"\xef\xbb\xbf" + raw


def snapshot(root: Path) -> set:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def assert_one_line(rc: int, out: str, err: str) -> None:
    """A command's outcome: 0, or one error line of a known family without control characters."""
    event(f"exit {rc}")   # the spread of outcomes, shown by --hypothesis-show-statistics
    assert "Traceback" not in err and "unexpected" not in err, err
    if rc == 0:
        return
    lines = [ln for ln in err.splitlines() if ln.strip() and not ln.startswith("warning:")]
    assert rc in FAMILIES and len(lines) == 1 and lines[0].startswith("error: "), (rc, lines)
    assert lines[0].isprintable(), lines[0]


@pytest.fixture(scope="module")
def sandbox(bundles, tmp_path_factory):
    """A folder holding a copy of the real bundle, a store it is published to, and a lock file pinning it."""
    root = tmp_path_factory.mktemp("fuzz")
    bundle = root / "work" / "lenet5" / "onnx-fp32"
    shutil.copytree(bundles("onnx"), bundle)
    store = LocalStore(root / "store")
    entry = publish(bundle, store, "1").entry
    return {"root": root, "bundle": bundle, "store": store, "entry": entry,
            "manifest": json.loads((bundle / "manifest.json").read_text()),
            "index": json.loads((store.root / idx.INDEX).read_text())}


def _fresh(parent: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=parent))


# -------------------------------------------------------------------------------------------------- manifests
@FUZZ
@given(data=st.data())
def test_fuzzed_manifests_verify_or_fail_in_one_line(sandbox, data):
    """verify, then publish: a mutated manifest is accepted only when it still describes the bundle; publishing
    writes only into the store it was given."""
    work = _fresh(sandbox["root"] / "work")
    try:
        bundle = work / "b"
        shutil.copytree(sandbox["bundle"], bundle)
        (bundle / "manifest.json").write_bytes(encode(data, mutate(data, sandbox["manifest"])))
        before = snapshot(sandbox["root"])
        rc, out, err = run_main(["publish", str(bundle), "--to", str(work / "store")])
        assert_one_line(rc, out, err)
        assert {p for p in snapshot(sandbox["root"]) - before if not p.startswith(str(work.relative_to(
            sandbox["root"])))} == set(), "publish wrote outside its store"
        if rc == 0:   # what was accepted verifies and is a plain-named entry inside that store
            manifest = artefact.verify(bundle)
            entry = LocalStore(work / "store").read_index()["artefacts"][0]
            assert (entry["arch"], entry["target"]) == (manifest["arch"], manifest["target"])
            assert (work / "store" / entry["archive"]).is_file()
    finally:
        shutil.rmtree(work)


# --------------------------------------------------------------------------------------------- index entries
@FUZZ
@given(data=st.data())
def test_fuzzed_index_entries_list_and_pull_or_fail_in_one_line(sandbox, data):
    store = sandbox["store"]
    index = copy.deepcopy(sandbox["index"])
    index["artefacts"][0] = mutate(data, index["artefacts"][0])
    if data.draw(st.booleans(), label="whole index"):
        index = mutate(data, index)
    (store.root / idx.INDEX).write_bytes(encode(data, index))
    app = _fresh(sandbox["root"])
    before = snapshot(sandbox["root"])
    try:
        assert_one_line(*run_main(["ls", "--from", str(store.root)]))
        rc, out, err = run_main(["pull", "lenet5", "--from", str(store.root), "--to", str(app), "-q",
                                 "--allow-pending"])
        assert_one_line(rc, out, err)
        outside = {p for p in snapshot(sandbox["root"]) - before if not p.startswith(app.name)}
        assert outside == set(), f"pull wrote outside its destination: {outside}"
        if rc == 0:
            assert artefact.verify(artefact.bundle_dir(app, "lenet5", "onnx", "fp32"))
    finally:
        (store.root / idx.INDEX).write_bytes(idx.dump(sandbox["index"]))
        shutil.rmtree(app)


# ------------------------------------------------------------------------------------------------ lock files
@FUZZ
@given(data=st.data())
def test_fuzzed_lock_files_pull_or_fail_in_one_line(sandbox, data):
    e = sandbox["entry"]
    lock = {"edgecnn_lock": 1, "store": "ignored: --from wins",
            "artefacts": [{k: e[k] for k in ("arch", "target", "precision", "version", "sha256", "manifest_sha256")}]}
    work = _fresh(sandbox["root"])
    before = snapshot(sandbox["root"])
    try:
        (work / "edgecnn.lock").write_bytes(encode(data, mutate(data, lock)))
        rc, out, err = run_main(["pull", "--lock", str(work / "edgecnn.lock"), "--from", str(sandbox["store"].root),
                                 "--to", str(work / "app"), "-q"])
        assert_one_line(rc, out, err)
        outside = {p for p in snapshot(sandbox["root"]) - before if not p.startswith(work.name)}
        assert outside == set(), f"pull --lock wrote outside its destination: {outside}"
    finally:
        shutil.rmtree(work)


# ------------------------------------------------------------------------------------------- archive members
MEMBER_NAMES = st.one_of(st.sampled_from(["model.onnx", "labels.txt", "reference.npz", "manifest.json", "extra.bin",
                                          "sub/x.txt", "../escaped.txt", "/tmp/edgecnn-fuzz-escaped.txt", "a/../../b",
                                          "./model.onnx", "C:\\x", "sub\\..\\x", "\x1b[2J", "", "sub", "sub/"]),
                         st.text(min_size=1, max_size=12))
MEMBER_TYPES = st.sampled_from([tarfile.REGTYPE, tarfile.REGTYPE, tarfile.DIRTYPE, tarfile.SYMTYPE, tarfile.LNKTYPE,
                                tarfile.CHRTYPE, tarfile.FIFOTYPE])


@st.composite
def archives(draw) -> list:
    """[(TarInfo, payload)] : the real bundle's members with random changes, then random extra members."""
    members = []
    for name in draw(st.lists(MEMBER_NAMES, max_size=4)):
        info = tarfile.TarInfo(name)
        info.type = draw(MEMBER_TYPES)
        info.linkname = draw(st.sampled_from(["/etc/passwd", "../../outside", "model.onnx", ""]))
        payload = draw(st.binary(max_size=64)) if info.type == tarfile.REGTYPE else b""
        info.size = len(payload)
        info.mode = draw(st.sampled_from([0o644, 0o755, 0o4755, 0o777]))
        members.append((info, payload))
    return members


@FUZZ
@given(extra=archives(), keep=st.lists(st.booleans(), min_size=4, max_size=4), data=st.data())
def test_fuzzed_archives_extract_inside_or_fail_in_one_line(sandbox, extra, keep, data):
    """An archive in the store (its sha256 recorded in the index, as a compromised store would) holding some of
    the bundle's files and random others: pull refuses it in one line or gives a bundle that verifies; nothing
    is written outside the destination."""
    store, entry = sandbox["store"], sandbox["entry"]
    bundle = sandbox["bundle"]
    work = _fresh(sandbox["root"])
    evil = work / "evil.tar.gz"
    with tarfile.open(evil, "w:gz") as tar:
        for rel, kept in zip(archive.bundle_files(bundle), keep):
            if kept:
                tar.add(bundle / rel, arcname=rel)
        for info, payload in extra:
            tar.addfile(info, io.BytesIO(payload) if info.type == tarfile.REGTYPE else None)
    index = copy.deepcopy(sandbox["index"])
    index["artefacts"][0].update(sha256=artefact.sha256_file(evil), bytes=evil.stat().st_size)
    original = (store.root / entry["archive"]).read_bytes()
    (store.root / entry["archive"]).write_bytes(evil.read_bytes())
    (store.root / idx.INDEX).write_bytes(idx.dump(index))
    before = snapshot(sandbox["root"])
    try:
        rc, out, err = run_main(["pull", "lenet5", "--from", str(store.root), "--to", str(work / "app"), "-q"])
        assert_one_line(rc, out, err)
        outside = {p for p in snapshot(sandbox["root"]) - before if not p.startswith(work.name)}
        assert outside == set() and not os.path.lexists("/tmp/edgecnn-fuzz-escaped.txt"), outside
        if rc == 0:
            assert artefact.verify(artefact.bundle_dir(work / "app", "lenet5", "onnx", "fp32"))
    finally:
        (store.root / entry["archive"]).write_bytes(original)
        (store.root / idx.INDEX).write_bytes(idx.dump(sandbox["index"]))
        shutil.rmtree(work)
