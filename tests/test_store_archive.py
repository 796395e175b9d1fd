"""Archives: byte-identical for identical bundles; extraction refuses every hostile entry before writing."""
from __future__ import annotations

import os
import shutil
import tarfile

import pytest

from edgecnn import artefact
from edgecnn.errors import IntegrityError
from edgecnn.store import archive, index as idx

from store_helpers import bundles, evil_archive, onnx_bundle  # noqa: F401  (fixtures)


def test_identical_bundles_pack_to_identical_bytes(onnx_bundle, tmp_path):
    a = archive.pack(onnx_bundle, tmp_path / "a.tar.gz")
    copy = tmp_path / "elsewhere" / "b"
    shutil.copytree(onnx_bundle, copy)
    for p in copy.iterdir():  # other mtimes, other folder: still the same bytes
        os.utime(p, (1_700_000_000, 1_700_000_000))
    b = archive.pack(copy, tmp_path / "b.tar.gz")
    assert a == b and (tmp_path / "a.tar.gz").read_bytes() == (tmp_path / "b.tar.gz").read_bytes()
    with tarfile.open(tmp_path / "a.tar.gz") as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {m.name for m in members} == set(artefact.read_manifest(onnx_bundle)["files"]) | {"manifest.json"}
    assert all(m.mtime == archive.FIXED_MTIME and m.uid == 0 and m.uname == "" and m.mode == 0o644 for m in members)
    (copy / "labels.txt").write_text("changed\n")
    assert archive.pack(copy, tmp_path / "c.tar.gz")["sha256"] != a["sha256"]


def test_round_trip_extract_verifies(onnx_bundle, tmp_path):
    archive.pack(onnx_bundle, tmp_path / "a.tar.gz")
    out = tmp_path / "out"
    out.mkdir()
    archive.safe_extract(tmp_path / "a.tar.gz", out)
    assert artefact.verify(out)["arch"] == "lenet5"


def _link(name, target, kind=tarfile.SYMTYPE):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _file(name, size):
    info = tarfile.TarInfo(name)
    info.size = size
    return info


HOSTILE = {
    "dotdot": (lambda: _file("../escaped.txt", 5), "climbs out of the folder with '..'"),
    "nested-dotdot": (lambda: _file("sub/../../escaped.txt", 5), "climbs out of the folder with '..'"),
    "absolute": (lambda: _file("/tmp/edgecnn-escaped.txt", 5), "has an absolute path"),
    "absolute-symlink": (lambda: _link("model.link", "/etc/passwd"), "is a symbolic link to '/etc/passwd'"),
    "relative-symlink-out": (lambda: _link("model.link", "../../outside"), "is a symbolic link"),
    "hardlink": (lambda: _link("model.hard", "/etc/passwd", tarfile.LNKTYPE), "is a hard link"),
    "device": (lambda: _link("dev0", "", tarfile.CHRTYPE), "is a device file"),
    "fifo": (lambda: _link("pipe", "", tarfile.FIFOTYPE), "is a FIFO"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_entries_are_refused_before_anything_is_written(case, onnx_bundle, tmp_path):
    make, message = HOSTILE[case]
    evil = evil_archive(tmp_path / "evil.tar.gz", onnx_bundle, make(), b"owned" if make().isreg() else b"")
    out = tmp_path / "deep" / "out"
    out.mkdir(parents=True)
    with pytest.raises(IntegrityError) as err:
        archive.safe_extract(evil, out)
    assert message in err.value.message and "nothing was extracted" in err.value.hint
    assert list(out.iterdir()) == []                       # not even the legitimate files
    assert not (tmp_path / "deep" / "escaped.txt").exists() and not (tmp_path / "escaped.txt").exists()


def test_corrupt_archive_is_refused(onnx_bundle, tmp_path):
    data = bytearray(archive.pack(onnx_bundle, tmp_path / "a.tar.gz") and (tmp_path / "a.tar.gz").read_bytes())
    (tmp_path / "cut.tar.gz").write_bytes(bytes(data[: len(data) // 2]))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(IntegrityError, match="not a readable .tar.gz"):
        archive.safe_extract(tmp_path / "cut.tar.gz", out)


def test_versions_order_and_next():
    es = [{"version": v, "created": c} for v, c in (("1.9", "a"), ("1.10", "b"), ("1.2.0", "c"))]
    assert max(es, key=idx.version_key)["version"] == "1.10"
    assert idx.next_version(es) == "1.11" and idx.next_version([]) == "1"
    for bad in ("", "../x", "a/b", "-1", "x" * 65):
        with pytest.raises(Exception, match="invalid version"):
            idx.check_version(bad)


def test_nested_files_round_trip_and_links_in_a_bundle_are_refused(onnx_bundle, tmp_path):
    # Core ML bundles hold a .mlpackage folder tree: nested files must survive packing and extraction
    nested = onnx_bundle / "model.mlpackage" / "Data" / "com.apple.CoreML"
    nested.mkdir(parents=True)
    (nested / "model.mlmodel").write_bytes(b"\x08\x09" * 100)
    artefact.write_manifest(onnx_bundle, artefact.read_manifest(onnx_bundle))
    archive.pack(onnx_bundle, tmp_path / "a.tar.gz")
    out = tmp_path / "out"
    out.mkdir()
    archive.safe_extract(tmp_path / "a.tar.gz", out)
    assert artefact.verify(out)["files"]["model.mlpackage/Data/com.apple.CoreML/model.mlmodel"]["bytes"] == 200
    # a symbolic link inside a bundle would be packed as the file it points to: refused instead
    (tmp_path / "outside.txt").write_text("secret\n")
    (onnx_bundle / "model.mlpackage" / "Data" / "link.txt").symlink_to(tmp_path / "outside.txt")
    artefact.write_manifest(onnx_bundle, artefact.read_manifest(onnx_bundle))
    with pytest.raises(IntegrityError, match="link.txt is \\(inside\\) a symbolic link"):
        archive.pack(onnx_bundle, tmp_path / "b.tar.gz")
