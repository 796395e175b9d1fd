"""The catalogue of bad inputs (docs/bad-inputs.md): one test per row, on the real CLI.

Each row of the table gives the input, a regular expression for the one line the CLI must print and
the exit code (its family: 2 usage, 3 input, 4 output, 5 gate, 6 integrity; 0 where the input is
odd but valid and must be read correctly). ``check`` asserts exactly that: the exit code, one error
line matching the pattern, no traceback. Most cases call ``edgecnn.cli.main`` in this process (fast);
the ones that need another user, a resource limit or a shell run ``python -m edgecnn`` as a subprocess.
Inputs are real: crops of real photos saved as JPEG/PNG/GIF, checkpoints written by torch.save,
ONNX files written by the exporter.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(__file__))
from reliability_util import (REPO, catalogue, corrupt_jpeg, error_lines, photo, run_cli, run_main,  # noqa: E402
                              truncated_png, write_photos)

CAT = catalogue()
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A module-wide scratch folder with a private calibration cache (never ~/.cache)."""
    root = tmp_path_factory.mktemp("badin")
    old = os.environ.get("EDGECNN_CACHE")
    os.environ["EDGECNN_CACHE"] = str(root / "cache")
    yield root
    if old is None:
        os.environ.pop("EDGECNN_CACHE", None)
    else:
        os.environ["EDGECNN_CACHE"] = old


@pytest.fixture(scope="module")
def photos(work):
    """Eight real-photo crops: a small valid calibration folder."""
    folder = work / "photos"
    write_photos(folder, 8)
    return folder


@pytest.fixture(scope="module")
def lenet_ckpt(work):
    from edgecnn.zoo.lenet import LeNet5

    torch.manual_seed(1)
    path = work / "lenet5.pt"
    torch.save(LeNet5().state_dict(), path)
    return path


@pytest.fixture(scope="module")
def good_bundle(work, photos):
    """A validated lenet5 ONNX FP32 bundle (copied by the tests that damage it)."""
    rc, out, err = run_main(["export", "lenet5", "--calib", str(photos), "--out", str(work / "good"), "-q",
                             "--no-latency"])
    assert rc == 0, err
    return work / "good" / "lenet5" / "onnx-fp32"


def copy_bundle(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rehash(bundle: Path) -> None:
    """Rewrite the manifest's hashes, as someone who replaced a file and covered their tracks would."""
    from edgecnn import artefact

    manifest = json.loads((bundle / "manifest.json").read_text())
    artefact.write_manifest(bundle, manifest)


def export_args(work: Path, *extra: str, arch: str = "lenet5", calib=None) -> list:
    args = ["export", arch, "--out", str(work / "out"), "-q", "--no-latency"]
    if calib is not None:
        args += ["--calib", str(calib)]
    return args + list(extra)


def check(case_id: str, rc: int, out: str, err: str, also: str = "") -> None:
    """The row's exit code; for errors exactly one error line matching its pattern and no traceback."""
    row = CAT[case_id]
    assert rc == row["exit"], f"{case_id}: exit {rc}, expected {row['exit']}\nstdout: {out}\nstderr: {err}"
    assert "Traceback" not in err, f"{case_id}: traceback without --debug:\n{err}"
    if row["exit"] == 0:
        assert re.search(row["pattern"], out + "\n" + err + "\n" + also), (case_id, row["pattern"], out, err, also)
        return
    lines = error_lines(err)
    assert len(lines) == 1, f"{case_id}: expected one error line, got {lines}"
    assert lines[0].startswith("error: "), lines[0]
    assert re.search(row["pattern"], lines[0]), f"{case_id}: {lines[0]!r} !~ {row['pattern']!r}"


def calib_folder(work: Path, name: str, photos_dir: Path, n_good: int = 6) -> Path:
    folder = work / name
    folder.mkdir()
    for p in sorted(photos_dir.iterdir())[:n_good]:
        shutil.copy(p, folder / p.name)
    return folder


# ------------------------------------------------------------------------------------------ the table itself
def test_catalogue_has_30_rows_and_a_test_for_each():
    assert len(CAT) >= 30, f"only {len(CAT)} catalogue rows"
    tests = {name[5:] for name in globals() if name.startswith("test_")}  # test_<id> (more may exist)
    missing = sorted(set(CAT) - tests)
    assert not missing, f"catalogue rows without a test: {missing}"
    for case_id, row in CAT.items():
        re.compile(row["pattern"])
        assert row["exit"] in (0, 2, 3, 4, 5, 6, 7), (case_id, row["exit"])


# ------------------------------------------------------------------------------------------ usage (exit 2)
def test_arch_misspelt(work):
    check("arch_misspelt", *run_main(export_args(work, arch="mobilenet_v3_smal")))


def test_arch_unknown(work):
    check("arch_unknown", *run_main(export_args(work, arch="qqqq")))


def test_arch_shell_chars(work):
    """The ARCH value goes through the CLI, and through bash exactly as a user's script would quote it."""
    canary = work / "PWNED"
    arch = f'lenet5`touch {canary}1`";touch {canary}2;"$(touch {canary}3)'
    check("arch_shell_chars", *run_main(["export", arch, "--out", str(work / "out"), "-q"]))
    proc = subprocess.run(["bash", "-c", f'"{sys.executable}" -m edgecnn export "$ARCH" --out "$OUT" -q'],
                          env={**os.environ, "ARCH": arch, "OUT": str(work / "out"), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=120)
    check("arch_shell_chars", proc.returncode, proc.stdout, proc.stderr)
    assert not list(work.glob("PWNED*")), "a shell-special ARCH ran a command"


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_arch_shell_chars_make(work):
    """`make export ARCH=...` used to paste ARCH into a double-quoted recipe: backticks and `";cmd;"` ran."""
    canary = work / "PWNED_MAKE"
    stamp = work / "stamp"  # an up-to-date install stamp: `make export` must not build a venv here
    stamp.touch()
    for value in (f'lenet5`touch {canary}1`";touch {canary}2;"\'; touch {canary}3', f"x$(shell touch {canary}4)"):
        proc = subprocess.run(["make", "-s", "-C", str(REPO), "export", f"STAMP={stamp}", f"PY={sys.executable}",
                               f"OUT={work / 'out'}", "EXTRA=-q", f"ARCH={value}"],
                              env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0
        assert "unknown architecture" in proc.stderr, proc.stderr
    assert not list(work.glob("PWNED*")), "a shell-special ARCH ran a command through make"


def test_arch_control_chars(work):
    rc, out, err = run_main(export_args(work, arch="lenet5\n\x1b[31mred"))
    check("arch_control_chars", rc, out, err)
    assert "\x1b" not in err


def test_target_unknown(work):
    check("target_unknown", *run_main(export_args(work, "--target", "tflite")))


def test_target_misspelt(work):
    check("target_misspelt", *run_main(export_args(work, "--target", "onxx")))


def test_precision_unknown(work):
    check("precision_unknown", *run_main(export_args(work, "--precision", "fp8")))


def test_precision_combination(work):
    """A known precision that a registered target does not support (found, not hard-coded: targets grow)."""
    from edgecnn import targets

    known = ("fp32", "fp16", "int8", "int8-weights")
    pairs = [(name, p) for name, t in sorted(targets._TARGETS.items()) for p in known if p not in t.precisions]
    assert pairs, "every registered target supports every precision: the row needs another example"
    name, p = pairs[0]
    check("precision_combination", *run_main(export_args(work, "--target", name, "--precision", p)))


def test_option_not_a_number(work):
    check("option_not_a_number", *run_main(export_args(work, "--calib-size", "abc")))


def test_option_negative(work):
    check("option_negative", *run_main(export_args(work, "--calib-size", "-3")))


def test_option_zero_threads(work):
    check("option_zero_threads", *run_main(export_args(work, "--threads", "0")))


def test_target_option_misspelt(work):
    check("target_option_misspelt", *run_main(export_args(work, "--target-option", "int8.empirical_bias_corection=false")))


def test_target_option_not_bool(work):
    check("target_option_not_bool", *run_main(export_args(work, "--target-option", "int8.fallback=maybe")))


def test_target_option_not_number(work):
    check("target_option_not_number", *run_main(export_args(work, "--target-option", "coreml.ios=seventeen")))


def test_opset_out_of_range(work):
    check("opset_out_of_range", *run_main(export_args(work, "--opset", "99")))


def test_unknown_subcommand(work):
    check("unknown_subcommand", *run_main(["exprot", "lenet5"]))


def test_weights_url(work):
    check("weights_url", *run_main(export_args(work, "--weights", "https://example.com/w.pt")))


# ------------------------------------------------------------------------------------------ output (exit 4)
def test_out_is_file(work, photos):
    f = work / "out_file"
    f.write_text("not a folder")
    check("out_is_file", *run_main(["export", "lenet5", "--calib", str(photos), "--out", str(f), "-q"]))
    assert f.read_text() == "not a folder"


def test_out_through_file(work, photos):
    f = work / "out_file2"
    f.write_text("x")
    check("out_through_file", *run_main(["export", "lenet5", "--calib", str(photos), "--out", str(f / "sub"), "-q"]))


def test_bundle_path_is_file(work, photos):
    out = work / "out_bf"
    (out / "lenet5").mkdir(parents=True)
    (out / "lenet5" / "onnx-fp32").write_text("my notes")
    check("bundle_path_is_file", *run_main(["export", "lenet5", "--calib", str(photos), "--out", str(out), "-q",
                                            "--no-latency"]))
    assert (out / "lenet5" / "onnx-fp32").read_text() == "my notes"
    assert [p.name for p in (out / "lenet5").iterdir() if p.name.startswith(".staging")] == []


def test_bundle_path_foreign_folder(work, photos):
    out = work / "out_ff"
    own = out / "lenet5" / "onnx-fp32"
    own.mkdir(parents=True)
    (own / "thesis.tex").write_text("years of work")
    check("bundle_path_foreign_folder", *run_main(["export", "lenet5", "--calib", str(photos), "--out", str(out),
                                                   "-q", "--no-latency"]))
    assert (own / "thesis.tex").read_text() == "years of work"


CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, PR_CAPBSET_DROP = 1, 2, 24


def _unprivileged():
    """preexec_fn making file permissions bite: root ignores them (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH),
    so as root the child drops both from its bounding set before exec (the exec'd root process then
    never gets them) and stays uid 0 — it can still run the root-owned interpreter, but a mode-000
    file or a mode-555 folder refuses it like any user. Not root: permissions already apply."""
    if not IS_ROOT:
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def drop():
        for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")
    return drop


def _can_drop_caps() -> bool:
    if not IS_ROOT:
        return True
    probe = subprocess.run([sys.executable, "-c", "open('/proc/self/status').read()"], preexec_fn=_unprivileged(),
                           capture_output=True)
    return probe.returncode == 0


@pytest.fixture
def public_tmp(tmp_path):
    """A scratch folder for the permission tests; restores modes so pytest can delete it."""
    (tmp_path / "cache").mkdir()
    if not _can_drop_caps():
        pytest.skip("running as root without CAP_SETPCAP: cannot drop CAP_DAC_OVERRIDE, so permissions never bite")
    yield tmp_path
    for p in tmp_path.rglob("*"):
        if not p.is_symlink():
            os.chmod(p, 0o755 if p.is_dir() else 0o644)


def test_out_not_writable(public_tmp, photos):
    """Permissions, for real: as root the CLI runs as 'nobody' (setuid in the child), else as ourselves."""
    calib = public_tmp / "calib"
    shutil.copytree(photos, calib)
    locked = public_tmp / "readonly"
    locked.mkdir(mode=0o555)
    os.chmod(locked, 0o555)
    rc, out, err = run_cli(["export", "lenet5", "--calib", str(calib), "--out", str(locked / "out"), "-q",
                            "--no-latency"], cache=public_tmp / "cache", preexec_fn=_unprivileged(), cwd=public_tmp)
    check("out_not_writable", rc, out, err)


def _mount_tmpfs(where: Path, options: str) -> bool:
    if not IS_ROOT or not shutil.which("mount"):
        return False
    where.mkdir(parents=True, exist_ok=True)
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def test_out_read_only_fs(work, photos):
    mnt = work / "ro"
    if not _mount_tmpfs(mnt, "ro,size=1m"):
        pytest.skip("cannot mount a read-only tmpfs here (needs root with CAP_SYS_ADMIN)")
    try:
        check("out_read_only_fs", *run_main(["export", "lenet5", "--calib", str(photos), "--out", str(mnt / "o"),
                                             "-q"]))
    finally:
        _umount(mnt)


def test_disk_full(work, photos):
    """A real 100 KiB tmpfs: the 250 KB LeNet-5 model cannot fit; nothing half-written may stay."""
    mnt = work / "full"
    if not _mount_tmpfs(mnt, "size=100k"):
        pytest.skip("cannot mount a small tmpfs here (needs root with CAP_SYS_ADMIN); "
                    "test_file_size_limit covers the same path with RLIMIT_FSIZE")
    try:
        rc, out, err = run_main(["export", "lenet5", "--calib", str(photos), "--out", str(mnt), "-q",
                                 "--no-latency"])
        check("disk_full", rc, out, err)
        assert not (mnt / "lenet5").exists(), list(mnt.rglob("*"))  # no lock file, staging, bundle or folder
    finally:
        _umount(mnt)


def test_file_size_limit(work, photos):
    """RLIMIT_FSIZE in the child: writes past 100 kB fail with EFBIG (Python ignores SIGXFSZ)."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))

    out_dir = work / "fsize"
    rc, out, err = run_cli(["export", "lenet5", "--calib", str(photos), "--out", str(out_dir), "-q", "--no-latency"],
                           cache=work / "cache", preexec_fn=limit)
    check("file_size_limit", rc, out, err)
    assert not (out_dir / "lenet5").exists(), list(out_dir.rglob("*"))   # not even the lock file or the folder


def test_locked_by_another_export(work, photos):
    import fcntl

    out = work / "out_lock"
    (out / "lenet5").mkdir(parents=True)
    lock = out / "lenet5" / ".onnx-fp32.lock"
    with open(lock, "w") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        holder.write("pid 4242 (test holder)\n")
        holder.flush()
        check("locked_by_another_export", *run_main(["export", "lenet5", "--calib", str(photos), "--out", str(out),
                                                     "-q", "--lock-timeout", "0.5"]))


# ------------------------------------------------------------------------------------------ weights (exit 3)
def test_ckpt_missing(work):
    check("ckpt_missing", *run_main(export_args(work, "--weights", str(work / "nope.pt"))))


def test_ckpt_is_folder(work):
    check("ckpt_is_folder", *run_main(export_args(work, "--weights", str(work))))


def test_ckpt_truncated(work, lenet_ckpt):
    cut = work / "cut.pt"
    data = lenet_ckpt.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    check("ckpt_truncated", *run_main(export_args(work, "--weights", str(cut))))


def test_ckpt_empty(work):
    empty = work / "empty.pt"
    empty.write_bytes(b"")
    check("ckpt_empty", *run_main(export_args(work, "--weights", str(empty))))


def test_ckpt_not_pytorch(work):
    text = work / "notes.pt"
    text.write_text("hello, this is not a checkpoint\n")
    check("ckpt_not_pytorch", *run_main(export_args(work, "--weights", str(text))))


def test_ckpt_other_arch(work, lenet_ckpt):
    check("ckpt_other_arch", *run_main(export_args(work, "--weights", str(lenet_ckpt), arch="squeezenet1_1")))


class _Payload:
    """A pickle that would run a command when loaded without weights_only."""

    def __init__(self, canary: str):
        self.canary = canary

    def __reduce__(self):
        return (os.system, (f"touch {self.canary}",))


def test_ckpt_code_pickle(work):
    canary = work / "PAYLOAD_RAN"
    evil = work / "evil.pt"
    torch.save({"state_dict": _Payload(str(canary))}, evil)
    rc, out, err = run_main(export_args(work, "--weights", str(evil)))
    check("ckpt_code_pickle", rc, out, err)
    assert not canary.exists(), "the pickle's payload ran"
    assert "--trust-checkpoint" not in err, "the flag that would run the payload was suggested"


def test_ckpt_full_model(work):
    from edgecnn.zoo.lenet import LeNet5

    full = work / "full_model.pt"
    torch.save(LeNet5(), full)
    check("ckpt_full_model", *run_main(export_args(work, "--weights", str(full))))


def test_ckpt_full_model_trusted(work, photos):
    """Opt-in: the full pickle loads, and the user is told (on the real stderr) that it ran code."""
    from edgecnn.zoo.lenet import LeNet5

    torch.manual_seed(3)
    full = work / "full_model_t.pt"
    torch.save(LeNet5(), full)
    out = work / "out_trusted"
    rc, stdout, err = run_cli(["export", "lenet5", "--weights", str(full), "--trust-checkpoint", "--calib", str(photos),
                               "--out", str(out), "-q", "--no-latency"], cache=work / "cache")
    check("ckpt_full_model_trusted", rc, stdout, err)
    manifest = json.loads((out / "lenet5" / "onnx-fp32" / "manifest.json").read_text())
    assert manifest["weights"]["source"].startswith("checkpoint:") and manifest["weights"]["pretrained"]


def test_ckpt_no_state_dict(work):
    lst = work / "list.pt"
    torch.save([1, 2, 3], lst)
    check("ckpt_no_state_dict", *run_main(export_args(work, "--weights", str(lst))))


def test_labels_count_mismatch(work):
    labels = work / "labels3.txt"
    labels.write_text("cat\ndog\nbird\n")
    check("labels_count_mismatch", *run_main(export_args(work, "--num-classes", "5", "--labels", str(labels))))


def test_labels_missing(work):
    check("labels_missing", *run_main(export_args(work, "--labels", str(work / "no-labels.txt"))))


def test_num_classes_vs_checkpoint(work):
    from edgecnn.zoo.lenet import LeNet5

    seven = work / "lenet7.pt"
    torch.save(LeNet5(num_classes=7).state_dict(), seven)
    check("num_classes_vs_checkpoint", *run_main(export_args(work, "--weights", str(seven), "--num-classes", "10")))


def _poisoned_ckpt(work: Path, value: float, name: str) -> Path:
    from edgecnn.zoo.lenet import LeNet5

    state = LeNet5().state_dict()
    state["features.0.weight"][0, 0, 2, 2] = value
    path = work / name
    torch.save(state, path)
    return path


def test_nan_checkpoint(work, photos):
    bad = _poisoned_ckpt(work, float("nan"), "nan.pt")
    check("nan_checkpoint", *run_main(export_args(work, "--weights", str(bad), calib=photos)))


def test_inf_checkpoint(work, photos):
    bad = _poisoned_ckpt(work, float("inf"), "inf.pt")
    check("inf_checkpoint", *run_main(export_args(work, "--weights", str(bad), calib=photos)))


def test_model_outputs_inf(work, photos):
    """Finite weights whose FP32 outputs overflow to Inf: caught on the PyTorch reference, before any export."""
    from edgecnn.zoo.lenet import LeNet5

    model = LeNet5()
    with torch.no_grad():
        model.classifier[3].weight.zero_()
        model.classifier[3].bias.fill_(5.0)
        model.classifier[5].weight.fill_(1e38)  # 84 x ~1e38 > 3.4e38 (FP32 max)
    path = work / "overflow32.pt"
    torch.save(model.state_dict(), path)
    check("model_outputs_inf", *run_main(export_args(work, "--weights", str(path), calib=photos)))


def test_fp16_weight_out_of_range(work, photos):
    """Weights beyond FP16's 65504: the FP16 converter clamps them, the logits change, and the FP16 cosine
    gate fails the artefact (exit 5; kept as onnx-fp16.failed, never swapped into place)."""
    from edgecnn.zoo.lenet import LeNet5

    model = LeNet5()
    with torch.no_grad():
        model.classifier[3].weight.zero_()     # fc84 -> tanh(5) ~ 1 for every unit
        model.classifier[3].bias.fill_(5.0)
        model.classifier[5].weight[0].fill_(1e5)  # beyond FP16 (clamped)
        model.classifier[5].weight[1].fill_(6e4)  # within FP16
    path = work / "fp16range.pt"
    torch.save(model.state_dict(), path)
    out = work / "out_fp16"
    rc, stdout, err = run_main(["export", "lenet5", "--weights", str(path), "--calib", str(photos), "--precision",
                                "fp16", "--out", str(out), "-q", "--no-latency"])
    check("fp16_weight_out_of_range", rc, stdout, err)
    failed = json.loads((out / "lenet5" / "onnx-fp16.failed" / "manifest.json").read_text())
    assert failed["status"] == "failed" and not failed["parity"]["passed"]
    assert not (out / "lenet5" / "onnx-fp16").exists()


# ------------------------------------------------------------------------------------------ calibration (exit 3)
def test_calib_missing(work):
    check("calib_missing", *run_main(export_args(work, calib=work / "no-such-folder")))


def test_calib_not_folder(work, photos):
    check("calib_not_folder", *run_main(export_args(work, calib=sorted(photos.iterdir())[0])))


def test_calib_empty(work):
    empty = work / "empty_calib"
    empty.mkdir()
    check("calib_empty", *run_main(export_args(work, calib=empty)))


def test_calib_non_images(work):
    folder = work / "non_images"
    folder.mkdir()
    (folder / "readme.txt").write_text("no pictures here")
    (folder / "data.csv").write_text("1,2,3\n")
    (folder / ".hidden.jpg").write_bytes(b"")
    check("calib_non_images", *run_main(export_args(work, calib=folder)))


def test_calib_all_bad(work):
    folder = work / "all_bad"
    folder.mkdir()
    corrupt_jpeg(folder / "a.jpg")
    truncated_png(folder / "b.png")
    (folder / "c.jpg").write_bytes(b"")
    check("calib_all_bad", *run_main(export_args(work, calib=folder)))


def test_calib_corrupt_jpeg(work, photos):
    folder = calib_folder(work, "c_jpeg", photos)
    corrupt_jpeg(folder / "broken.jpg")
    check("calib_corrupt_jpeg", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


def test_calib_corrupt_skipped(work, photos, caplog):
    """Without --strict-calib a bad file is skipped with a warning and recorded in the manifest."""
    caplog.set_level(logging.WARNING, logger="calibration")  # (a conftest may have raised caplog's level)
    folder = calib_folder(work, "c_skip", photos)
    corrupt_jpeg(folder / "broken.jpg")
    out = work / "out_skip"
    rc, stdout, err = run_main(["export", "lenet5", "--calib", str(folder), "--out", str(out), "-q", "--no-latency"])
    check("calib_corrupt_skipped", rc, stdout, err, also=caplog.text)
    manifest = json.loads((out / "lenet5" / "onnx-fp32" / "manifest.json").read_text())
    assert any("broken.jpg" in s for s in manifest["calibration"]["skipped"]), manifest["calibration"]


def test_calib_truncated_png(work, photos):
    folder = calib_folder(work, "c_png", photos)
    truncated_png(folder / "cut.png")
    check("calib_truncated_png", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


def test_calib_zero_byte(work, photos):
    folder = calib_folder(work, "c_zero", photos)
    (folder / "zero.jpg").write_bytes(b"")
    check("calib_zero_byte", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


def test_calib_huge_image(work, photos):
    """8000x7000 = 56 Mpx, over the 50 Mpx limit: refused from the header, before decoding."""
    folder = calib_folder(work, "c_huge", photos)
    Image.new("L", (8000, 7000), 128).save(folder / "huge.png")
    check("calib_huge_image", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


def test_calib_animated_gif(work, photos):
    from calibration import load_image

    folder = calib_folder(work, "c_gif", photos)
    frames = [Image.new("RGB", (40, 30), c) for c in ((200, 10, 10), (10, 200, 10), (10, 10, 200))]
    frames[0].save(folder / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = np.asarray(load_image(folder / "anim.gif"))
    assert first.shape == (30, 40, 3) and tuple(first[5, 5]) == (200, 10, 10)  # the first frame, in RGB
    check("calib_animated_gif", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


def test_calib_16bit_png(work, photos):
    from calibration import load_image

    folder = calib_folder(work, "c_16", photos)
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "sixteen.png")
    assert Image.open(folder / "sixteen.png").mode == "I;16"
    got = np.asarray(load_image(folder / "sixteen.png", "L")).astype(int)
    expect = np.clip(ramp / 65535.0 * 255 + 0.5, 0, 255).astype(int)
    assert np.abs(got - expect).max() <= 1 and got.min() == 0 and got.max() == 255  # scaled, not clipped at 255
    check("calib_16bit_png", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


def test_calib_cmyk(work, photos):
    from calibration import load_image

    folder = calib_folder(work, "c_cmyk", photos)
    rgb = photo((64, 48), 1)
    rgb.convert("CMYK").save(folder / "cmyk.jpg", quality=95)
    assert Image.open(folder / "cmyk.jpg").mode == "CMYK"
    got = np.asarray(load_image(folder / "cmyk.jpg")).astype(int)
    assert got.shape == (48, 64, 3)
    assert np.abs(got - np.asarray(rgb).astype(int)).mean() < 12  # the same picture, not inverted channels
    check("calib_cmyk", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


def test_calib_exif_rotated(work, photos):
    """A phone photo stored sideways with EXIF orientation 6 (rotate 90 CW) comes out upright."""
    from calibration import load_image

    folder = calib_folder(work, "c_exif", photos)
    upright = photo((40, 80), 2)                    # portrait: 40 wide, 80 tall
    stored = upright.transpose(Image.ROTATE_90)     # what the sensor wrote: landscape, rotated CCW
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(folder / "phone.jpg", exif=exif, quality=95)
    got = load_image(folder / "phone.jpg")
    assert got.size == (40, 80)
    assert np.abs(np.asarray(got).astype(int) - np.asarray(upright).astype(int)).mean() < 8
    check("calib_exif_rotated", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


def test_calib_symlink_loop_dir(work, photos):
    from calibration.sources import list_image_files

    folder = calib_folder(work, "c_loopdir", photos)
    (folder / "sub").mkdir()
    os.symlink("..", folder / "sub" / "up")        # sub/up -> the folder itself: an infinite tree
    os.symlink(str(folder), folder / "again")
    files = list_image_files(folder)
    assert len(files) == len({os.path.realpath(f) for f in files}) == 6
    check("calib_symlink_loop_dir", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


def test_calib_symlink_loop_file(work, photos):
    folder = calib_folder(work, "c_loopfile", photos)
    os.symlink("loop.jpg", folder / "loop.jpg")
    check("calib_symlink_loop_file", *run_main(export_args(work, "--strict-calib", "--calib-size", "0",
                                                           calib=folder)))


def test_calib_unreadable_file(public_tmp, photos):
    calib = public_tmp / "calib"
    shutil.copytree(photos, calib)
    os.chmod(sorted(calib.iterdir())[0], 0o000)
    out = public_tmp / "out"
    rc, stdout, err = run_cli(["export", "lenet5", "--calib", str(calib), "--out", str(out), "-q", "--no-latency",
                               "--strict-calib", "--calib-size", "0"], cache=public_tmp / "cache",
                              preexec_fn=_unprivileged(), cwd=public_tmp)
    check("calib_unreadable_file", rc, stdout, err)


def test_calib_unreadable_folder(public_tmp, photos):
    calib = public_tmp / "calib"
    shutil.copytree(photos, calib)
    os.chmod(calib, 0o000)
    rc, stdout, err = run_cli(["export", "lenet5", "--calib", str(calib), "--out", str(public_tmp / "out"), "-q"],
                              cache=public_tmp / "cache", preexec_fn=_unprivileged(), cwd=public_tmp)
    os.chmod(calib, 0o755)
    check("calib_unreadable_folder", rc, stdout, err)


def test_calib_smaller_than_asked(work, photos, caplog):
    caplog.set_level(logging.WARNING, logger="calibration")
    rc, out, err = run_main(export_args(work, "--calib-size", "50", calib=photos))
    check("calib_smaller_than_asked", rc, out, err, also=caplog.text)


def test_calib_smaller_than_asked_strict(work, photos):
    check("calib_smaller_than_asked_strict", *run_main(export_args(work, "--calib-size", "50", "--strict-calib",
                                                                   calib=photos)))


def test_calib_single_image(work, photos):
    folder = calib_folder(work, "c_one", photos, n_good=1)
    check("calib_single_image", *run_main(export_args(work, calib=folder)))


def test_calib_bad_array(work):
    arr = work / "calib.npy"
    np.save(arr, np.zeros((3, 5), np.float32))
    check("calib_bad_array", *run_main(export_args(work, calib=arr)))


def test_calib_list_missing_files(work):
    lst = work / "list.txt"
    lst.write_text(f"{work}/gone1.jpg\n{work}/gone2.jpg\n")
    check("calib_list_missing_files", *run_main(export_args(work, calib=lst)))


# ------------------------------------------------------------------------------------------ artefacts (exit 3/5/6)
def test_not_onnx_model(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_notonnx")
    (b / "model.onnx").write_bytes(b"PK\x03\x04 this is a zip, not an ONNX protobuf" * 20)
    rehash(b)  # hashes match: only onnxruntime can tell it is not a model
    check("not_onnx_model", *run_main(["validate", str(b), "--no-latency"]))


def test_nan_from_artefact(work, good_bundle):
    """An ONNX model whose weights hold NaN (hashes rewritten so verify passes): the validator fails it."""
    import onnx
    from onnx import numpy_helper

    b = copy_bundle(good_bundle, work / "b_nan")
    model = onnx.load(b / "model.onnx")
    init = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    arr = numpy_helper.to_array(init).copy()
    arr.flat[0] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(model, b / "model.onnx")
    rehash(b)
    rc, out, err = run_main(["validate", str(b), "--no-latency"])
    check("nan_from_artefact", rc, out, err)
    assert "FAILED" in out and "PASS" not in out


def test_manifest_unknown_schema(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_schema")
    m = json.loads((b / "manifest.json").read_text())
    m["schema_version"] = 99
    (b / "manifest.json").write_text(json.dumps(m))
    check("manifest_unknown_schema", *run_main(["verify", str(b)]))


def test_manifest_not_json(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_json")
    (b / "manifest.json").write_text("{ not json")
    check("manifest_not_json", *run_main(["verify", str(b)]))


def test_manifest_missing(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_nomani")
    (b / "manifest.json").unlink()
    check("manifest_missing", *run_main(["validate", str(b)]))


def test_manifest_missing_field(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_field")
    m = json.loads((b / "manifest.json").read_text())
    del m["files"]
    (b / "manifest.json").write_text(json.dumps(m))
    check("manifest_missing_field", *run_main(["verify", str(b)]))


def test_tampered_model_byte(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_tamper")
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (b / "model.onnx").write_bytes(bytes(data))
    check("tampered_model_byte", *run_main(["verify", str(b)]))
    rc, out, err = run_main(["validate", str(b), "--no-latency"])  # the validator refuses before running it
    check("tampered_model_byte", rc, out, err)


def test_extra_file_in_bundle(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_extra")
    (b / "payload.so").write_bytes(b"\x7fELF")
    check("extra_file_in_bundle", *run_main(["verify", str(b)]))


def test_verify_not_a_folder(work):
    check("verify_not_a_folder", *run_main(["verify", str(work / "nothing-here")]))


def test_manifest_bad_types(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_types")
    m = json.loads((b / "manifest.json").read_text())
    m["files"] = [{"path": "model.onnx"}]          # a list where an object of hashes belongs
    (b / "manifest.json").write_text(json.dumps(m))
    check("manifest_bad_types", *run_main(["verify", str(b)]))


def test_manifest_path_outside(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_escape")
    m = json.loads((b / "manifest.json").read_text())
    m["files"]["../../etc/passwd"] = dict(m["files"]["labels.txt"])
    (b / "manifest.json").write_text(json.dumps(m))
    check("manifest_path_outside", *run_main(["verify", str(b)]))


def test_truncated_model_file(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_cut")
    data = (b / "model.onnx").read_bytes()
    (b / "model.onnx").write_bytes(data[:-100])
    check("truncated_model_file", *run_main(["verify", str(b)]))


def test_bundle_symlink(work, good_bundle):
    """A bundle whose model is a link to a file elsewhere (same bytes: hashes match) is refused."""
    b = copy_bundle(good_bundle, work / "b_link")
    outside = work / "elsewhere.onnx"
    shutil.move(b / "model.onnx", outside)
    os.symlink(outside, b / "model.onnx")
    check("bundle_symlink", *run_main(["verify", str(b)]))


# ------------------------------------------------------------------------------------------ hangs: not a file
@pytest.mark.timeout(60)
def test_ckpt_fifo(work):
    """A FIFO as --weights: torch.load would block on open forever."""
    fifo = work / "weights.fifo"
    os.mkfifo(fifo)
    check("ckpt_fifo", *run_main(export_args(work, "--weights", str(fifo))))


@pytest.mark.timeout(60)
def test_ckpt_dev_zero(work):
    check("ckpt_dev_zero", *run_main(export_args(work, "--weights", "/dev/zero")))


@pytest.mark.timeout(120)
def test_calib_fifo_image(work, photos):
    """A FIFO named like a photo in the calibration folder: listing (which hashes every file) must not block."""
    folder = calib_folder(work, "c_fifo", photos)
    os.mkfifo(folder / "pipe.jpg")
    check("calib_fifo_image", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


@pytest.mark.timeout(120)
def test_calib_list_dev_zero(work, photos):
    lst = work / "list_zero.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted(photos.iterdir())[:4]) + "/dev/zero\n")
    check("calib_list_dev_zero", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=lst)))


@pytest.mark.timeout(60)
def test_manifest_fifo(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_fifo")
    (b / "manifest.json").unlink()
    os.mkfifo(b / "manifest.json")
    check("manifest_fifo", *run_main(["verify", str(b)]))


def test_manifest_is_folder(work, good_bundle):
    b = copy_bundle(good_bundle, work / "b_mdir")
    (b / "manifest.json").unlink()
    (b / "manifest.json").mkdir()
    check("manifest_is_folder", *run_main(["validate", str(b), "--no-latency"]))


# ------------------------------------------------------------------------------------------ misdiagnoses
def test_ckpt_onnx(work, good_bundle):
    rc, out, err = run_main(export_args(work, "--weights", str(good_bundle / "model.onnx")))
    check("ckpt_onnx", rc, out, err)
    assert "--trust-checkpoint" not in err


def test_mean_nan(work):
    check("mean_nan", *run_main(export_args(work, "--mean", "nan")))


def test_calib_array_nan(work):
    arr = np.random.default_rng(0).standard_normal((6, 1, 28, 28)).astype(np.float32)
    arr[2, 0, 3, 4] = np.nan
    np.save(work / "calib_nan.npy", arr)
    check("calib_array_nan", *run_main(export_args(work, calib=work / "calib_nan.npy")))


def test_out_not_utf8(work):
    """An output folder whose name holds a byte that is not UTF-8 (as a shell passes it: surrogate-escaped)."""
    out = os.fsdecode(os.fsencode(str(work)) + b"/out\xff")
    rc, stdout, err = run_main(["export", "lenet5", "--out", out, "-q", "--no-latency"])
    check("out_not_utf8", rc, stdout, err)
    assert not os.path.lexists(os.fsencode(out))


# ------------------------------------------------------------------------------------------ silent acceptance
def test_weights_empty(work):
    """`make export WEIGHTS=` with the variable unset passes --weights '': never a silent random init."""
    check("weights_empty", *run_main(export_args(work, "--weights", "")))


def test_labels_bom(work, photos):
    labels = work / "labels_bom.txt"
    labels.write_bytes("\ufeff".encode() + "".join(f"class{i}\n" for i in range(10)).encode())
    out = work / "out_bom"
    rc, stdout, err = run_main(["export", "lenet5", "--labels", str(labels), "--calib", str(photos), "--out", str(out),
                                "-q", "--no-latency"])
    check("labels_bom", rc, stdout, err)
    written = (out / "lenet5" / "onnx-fp32" / "labels.txt").read_text(encoding="utf-8").splitlines()
    assert written[0] == "class0" and len(written) == 10


def test_std_inf(work):
    check("std_inf", *run_main(export_args(work, "--std", "inf")))


def test_std_zero(work):
    check("std_zero", *run_main(export_args(work, "--std", "0")))


def test_ckpt_complex(work):
    from edgecnn.zoo.lenet import LeNet5

    state = LeNet5().state_dict()
    state["features.0.weight"] = torch.complex(state["features.0.weight"], torch.ones_like(state["features.0.weight"]))
    torch.save(state, work / "complex.pt")
    check("ckpt_complex", *run_main(export_args(work, "--weights", str(work / "complex.pt"))))


def test_int8_min_agreement_negative(work):
    check("int8_min_agreement_negative", *run_main(export_args(work, "--int8-min-agreement", "-1")))


def test_int8_min_agreement_nan(work):
    check("int8_min_agreement_nan", *run_main(export_args(work, "--int8-min-agreement", "nan")))


def test_threads_too_many(work):
    check("threads_too_many", *run_main(export_args(work, "--threads", "4000")))
    check("threads_too_many", *run_main(["validate", str(work), "--threads", "4000"]))


def test_target_option_nan(work):
    check("target_option_nan", *run_main(export_args(work, "--target-option", "int8.max_float_fraction=nan")))


# ------------------------------------------------------------------------------------------ crashes -> one line
def test_labels_not_utf8(work):
    labels = work / "labels_latin1.txt"
    labels.write_bytes(b"cat\ncaf\xe9\nbird\n")
    check("labels_not_utf8", *run_main(export_args(work, "--num-classes", "3", "--labels", str(labels))))


def test_calib_list_not_utf8(work, photos):
    lst = work / "list_latin1.txt"
    lst.write_bytes(f"{sorted(photos.iterdir())[0]}\n".encode() + b"/photos/caf\xe9.jpg\n")
    check("calib_list_not_utf8", *run_main(export_args(work, calib=lst)))


def test_calib_npy_huge_header(work):
    """An .npy whose header claims 285 TiB of float32 images (the file holds 128 bytes)."""
    path = work / "huge_header.npy"
    with open(path, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False,
                                                 "shape": (520_000_000, 3, 224, 224)})
        f.write(b"\0" * 128)
    check("calib_npy_huge_header", *run_main(export_args(work, calib=path)))


def test_calib_strip_image(work, photos):
    """49,000,000 x 1 pixels: under the 50 Mpx limit, but resizing its short side to LeNet's 28 px would make
    1.4 Gpx."""
    folder = calib_folder(work, "c_strip", photos)
    Image.new("L", (49_000_000, 1), 128).save(folder / "strip.png")
    check("calib_strip_image", *run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=folder)))


def test_calib_array_5_channels(work):
    np.save(work / "five.npy", np.zeros((4, 28, 28, 5), np.uint8))
    check("calib_array_5_channels", *run_main(export_args(work, calib=work / "five.npy")))


def test_calib_array_zero_pixels(work):
    np.save(work / "empty_px.npy", np.zeros((4, 0, 0), np.uint8))
    check("calib_array_zero_pixels", *run_main(export_args(work, calib=work / "empty_px.npy")))


def _edited(work: Path, good_bundle: Path, name: str, edit) -> Path:
    """A copy of the good bundle whose manifest.json text is ``edit(manifest dict)`` (str: written as is)."""
    b = copy_bundle(good_bundle, work / name)
    text = edit(json.loads((b / "manifest.json").read_text()))
    (b / "manifest.json").write_text(text if isinstance(text, str) else json.dumps(text))
    return b


def test_manifest_deep_nesting(work, good_bundle):
    b = _edited(work, good_bundle, "b_deep", lambda m: json.dumps(m)[:-1] + ', "x": ' + "[" * 5000 + "]" * 5000 + "}")
    check("manifest_deep_nesting", *run_main(["verify", str(b)]))


def test_manifest_lacks_input(work, good_bundle):
    b = _edited(work, good_bundle, "b_noinput", lambda m: {k: v for k, v in m.items() if k not in ("input", "weights")})
    check("manifest_lacks_input", *run_main(["validate", str(b), "--no-latency"]))


def test_manifest_reference_outside(work, good_bundle):
    """reference_file pointing outside the bundle is refused before anything reads it."""
    b = _edited(work, good_bundle, "b_refout", lambda m: {**m, "reference_file": "../../etc/passwd"})
    check("manifest_reference_outside", *run_main(["validate", str(b), "--no-latency"]))


def test_manifest_arch_path(work, good_bundle):
    b = _edited(work, good_bundle, "b_archpath", lambda m: {**m, "arch": "../../escaped/lenet5"})
    check("manifest_arch_path", *run_main(["verify", str(b)]))


def test_manifest_infinity(work, good_bundle):
    b = _edited(work, good_bundle, "b_inf", lambda m: json.dumps(m).replace('"std": [', '"std": [Infinity, '))
    check("manifest_infinity", *run_main(["verify", str(b)]))


def test_manifest_bad_input_values(work, good_bundle):
    b = _edited(work, good_bundle, "b_std0", lambda m: {**m, "input": {**m["input"], "std": [0.0]}})
    check("manifest_bad_input_values", *run_main(["validate", str(b), "--no-latency"]))


def test_manifest_gate_malformed(work, good_bundle):
    b = _edited(work, good_bundle, "b_gate", lambda m: {**m, "recipe": {**m["recipe"], "gate": {"max_drop": "abc"}}})
    check("manifest_gate_malformed", *run_main(["validate", str(b), "--no-latency"]))


def test_manifest_colour_channels(work, good_bundle):
    b = _edited(work, good_bundle, "b_rgb1", lambda m: {**m, "input": {**m["input"], "channels": 1, "mean": [0.5],
                                                                          "std": [0.5], "color_order": "RGB"}})
    check("manifest_colour_channels", *run_main(["verify", str(b)]))


# ------------------------------------------------------------------------------------------ stores and locks
def test_publish_version_newline(work, good_bundle):
    store = work / "store_nl"
    check("publish_version_newline", *run_main(["publish", str(good_bundle), "--to", str(store), "--version", "2\n"]))
    assert not (store / "index.json").exists()


def test_ls_index_wrong_type(work, good_bundle):
    store = work / "store_types"
    assert run_main(["publish", str(good_bundle), "--to", str(store)])[0] == 0
    index = json.loads((store / "index.json").read_text())
    index["artefacts"][0]["bytes"] = "237086"
    (store / "index.json").write_text(json.dumps(index))
    check("ls_index_wrong_type", *run_main(["ls", "--from", str(store)]))


def test_export_lock_symlink(work, photos):
    """OUT/<arch>/.onnx-fp32.lock planted as a link to a user's file: refused, the file untouched."""
    victim = work / "victim.txt"
    victim.write_text("years of work\n")
    out = work / "out_locklink"
    (out / "lenet5").mkdir(parents=True)
    os.symlink(victim, out / "lenet5" / ".onnx-fp32.lock")
    check("export_lock_symlink", *run_main(["export", "lenet5", "--calib", str(photos), "--out", str(out), "-q",
                                            "--no-latency"]))
    assert victim.read_text() == "years of work\n"


# ------------------------------------------------------------------------------------------ terminal injection
def test_error_line_escapes(work, photos):
    """A path read from a .txt list, with an ANSI sequence in its name, shown escaped in the error line."""
    lst = work / "list_ansi.txt"
    lst.write_text("".join(f"{p}\n" for p in sorted(photos.iterdir())[:4]) + f"{work}/gone\x1b[31mred.jpg\n")
    rc, out, err = run_main(export_args(work, "--strict-calib", "--calib-size", "0", calib=lst))
    check("error_line_escapes", rc, out, err)
    assert "\x1b" not in err


def test_ls_escapes(work, good_bundle):
    store = work / "store_ansi"
    assert run_main(["publish", str(good_bundle), "--to", str(store)])[0] == 0
    index = json.loads((store / "index.json").read_text())
    index["artefacts"][0]["created"] = "\x1b[2J\x1b[31m2026"
    (store / "index.json").write_text(json.dumps(index))
    rc, out, err = run_main(["ls", "--from", str(store)])
    check("ls_escapes", rc, out, err)
    assert "\x1b" not in out
