"""Shared helpers for the reliability tests (bad inputs, interruption, integrity, reproducibility).

Everything here drives the real CLI (in-process through ``edgecnn.cli.main`` or as a subprocess of
``python -m edgecnn``) on real files: real photos cut into JPEG/PNG files, real checkpoints, real ONNX.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "bad-inputs.md"


# ------------------------------------------------------------------------------------------ the CLI
def cli_env(cache: Path, extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment for a CLI subprocess: this checkout first on the path, a private calibration cache."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["EDGECNN_CACHE"] = str(cache)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def run_cli(args: Sequence[str], *, cache: Path, timeout: float = 300, env: Optional[Dict[str, str]] = None,
            preexec_fn=None, cwd: Optional[Path] = None) -> Tuple[int, str, str]:
    """``python -m edgecnn ARGS`` in a subprocess: (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "edgecnn", *args], capture_output=True, text=True, timeout=timeout,
                          env=cli_env(cache, env), preexec_fn=preexec_fn, cwd=str(cwd or cache.parent))
    return proc.returncode, proc.stdout, proc.stderr


def run_main(args: Sequence[str]) -> Tuple[int, str, str]:
    """``edgecnn.cli.main(ARGS)`` in this process, capturing stdout/stderr (log warnings go to caplog)."""
    from edgecnn import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main(list(args))
        except SystemExit as exc:  # argparse
            rc = exc.code if isinstance(exc.code, int) else 1
    return rc, out.getvalue(), err.getvalue()


def error_lines(stderr: str) -> List[str]:
    """The lines of stderr that are not warnings or progress: the error report itself."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and not ln.startswith("warning:") and not re.match(r"^\[\s*[\d.]+s\]", ln)]


# ------------------------------------------------------------------------------------------ the catalogue
def catalogue() -> Dict[str, dict]:
    """Rows of the table in docs/bad-inputs.md: {id: {input, pattern, exit}}."""
    rows = {}
    for line in DOC.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if len(cells) != 5 or not cells[0].isdigit():
            continue
        _, case_id, what, pattern, code = cells
        rows[case_id.strip("`")] = {"input": what, "pattern": pattern.strip("`").replace("\\|", "|"),
                                    "exit": int(code.split()[0])}
    return rows


# ------------------------------------------------------------------------------------------ images
def photo(size: Tuple[int, int] = (96, 64), index: int = 0) -> Image.Image:
    """A crop of a real photo (scikit-image's bundled astronaut/coffee/chelsea) at ``size`` (w, h)."""
    import skimage.data

    names = ("astronaut", "coffee", "chelsea", "rocket")
    arr = getattr(skimage.data, names[index % len(names)])()
    img = Image.fromarray(arr).convert("RGB")
    w, h = img.size
    k = index // len(names)
    box = (k * 7 % (w // 3), k * 5 % (h // 3), w - k * 3 % (w // 3), h - k * 11 % (h // 3))
    return img.crop(box).resize(size, Image.BILINEAR)


def write_photos(folder: Path, n: int, *, size: Tuple[int, int] = (96, 64), fmt: str = "jpg") -> List[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:05d}.{fmt}"
        photo(size, i).save(p, quality=90) if fmt == "jpg" else photo(size, i).save(p)
        paths.append(p)
    return paths


def corrupt_jpeg(path: Path) -> Path:
    """A JPEG whose entropy-coded data is garbage after the header (decoders fail)."""
    buf = io.BytesIO()
    photo((64, 64)).save(buf, "JPEG")
    data = bytearray(buf.getvalue())
    sos = data.find(b"\xff\xda")
    data[sos + 20:] = b"\xff\xd0" * ((len(data) - sos - 20) // 2) + b"\x00" * ((len(data) - sos - 20) % 2)
    path.write_bytes(bytes(data[: sos + 20]) + b"\xff\xff\xff\xff garbage")
    return path


def truncated_png(path: Path) -> Path:
    buf = io.BytesIO()
    photo((64, 64)).save(buf, "PNG")
    data = buf.getvalue()
    path.write_bytes(data[: len(data) // 2])
    return path


def pixel_digest(img: Image.Image) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(img).tobytes()).hexdigest()
