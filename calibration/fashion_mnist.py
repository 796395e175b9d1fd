"""Fashion-MNIST (Zalando, MIT): a real *labelled* image set that installs offline, read with NumPy only.

Why it is here: accuracy and INT8 agreement mean nothing on random-init weights, and no ImageNet
validation set can be had on these machines. Fashion-MNIST is small enough to train the zoo's small nets
on a CPU in minutes and gives labelled held-out images to judge exports with.

The data comes from Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``:
``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``); ``EDGECNN_FASHION_MNIST=<folder>`` points
elsewhere (the same four files, gzipped or not). Debian recompressed the ``.gz`` files, so their md5 differs
from upstream's: we check the IDX headers and sizes instead.

    images, labels = load("test")      # uint8 10000x28x28, uint8 10000 (class index, see CLASSES)
"""
from __future__ import annotations

import gzip
import math
import os
import zlib
from functools import lru_cache
from pathlib import Path
from typing import Tuple

import numpy as np

from .errors import BadImageError, CalibrationError
from .images import open_regular

ENV_VAR = "EDGECNN_FASHION_MNIST"
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
INSTALL_HINT = (f"install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, MIT licence), "
                f"or set {ENV_VAR}=<folder holding train-/t10k-{{images-idx3,labels-idx1}}-ubyte[.gz]>")
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Pixel statistics of the 60,000 training images (x / 255), used to normalise inputs of nets trained on them.
MEAN, STD = 0.2860, 0.3530
SIZES = {"train": 60_000, "test": 10_000}
MAX_IDX_BYTES = 256 << 20   # the largest file (train images) is 47 MB
_PREFIX = {"train": "train", "test": "t10k"}
# IDX type codes (http://yann.lecun.com/exdb/mnist/): only unsigned bytes are used by (Fashion-)MNIST.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def data_dir() -> Path:
    """The folder holding the IDX files; CalibrationError with the install hint when it is missing."""
    folder = Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)
    if not folder.is_dir():
        where = f"{ENV_VAR}={folder}" if os.environ.get(ENV_VAR) else str(folder)
        raise CalibrationError(f"Fashion-MNIST not found: {where} is not a folder", hint=INSTALL_HINT, path=str(folder))
    return folder


def available() -> bool:
    """True when all four files are present (for test skips with a reason)."""
    try:
        folder = data_dir()
    except CalibrationError:
        return False
    return all(_find(folder, split, kind) is not None for split in SIZES for kind in ("images", "labels"))


def _find(folder: Path, split: str, kind: str):
    stem = f"{_PREFIX[split]}-{kind}-idx{3 if kind == 'images' else 1}-ubyte"
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """One IDX file (gzipped or plain) -> ndarray of its type and shape; CalibrationError if malformed."""
    path = Path(path)
    try:
        with open_regular(str(path), "an IDX file") as raw:
            f = gzip.GzipFile(fileobj=raw, mode="rb") if path.suffix == ".gz" else raw
            data = f.read(MAX_IDX_BYTES + 1)   # bounded: a gzip bomb stops here
    except BadImageError as exc:
        raise CalibrationError(str(exc), hint=INSTALL_HINT, path=str(path)) from None
    except (OSError, EOFError, zlib.error) as exc:
        raise CalibrationError(f"{path}: cannot read IDX file ({exc})", hint=INSTALL_HINT, path=str(path)) from None
    if len(data) > MAX_IDX_BYTES:
        raise CalibrationError(f"{path}: over the {MAX_IDX_BYTES:,}-byte limit for an IDX file", hint=INSTALL_HINT,
                               path=str(path))
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise CalibrationError(f"{path}: not an IDX file (bad magic number)", hint=INSTALL_HINT, path=str(path))
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CalibrationError(f"{path}: truncated IDX header", hint=INSTALL_HINT, path=str(path))
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header + math.prod(shape) * dtype.itemsize
    if len(data) != expected:
        raise CalibrationError(f"{path}: IDX file holds {len(data)} bytes, its header promises {expected} "
                               f"(shape {shape})", hint="the file is truncated or damaged; reinstall it", path=str(path))
    arr = np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)
    return arr.astype(dtype.newbyteorder("="), copy=True)  # native byte order, writable


@lru_cache(maxsize=2)
def _load_cached(folder: str, split: str) -> Tuple[np.ndarray, np.ndarray]:
    paths = {kind: _find(Path(folder), split, kind) for kind in ("images", "labels")}
    for kind, p in paths.items():
        if p is None:
            raise CalibrationError(f"Fashion-MNIST {split} {kind} file missing in {folder}", hint=INSTALL_HINT,
                                   path=folder)
    images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise CalibrationError(f"{paths['images']}: expected uint8 Nx28x28 images, found {images.dtype} {images.shape}",
                               path=str(paths["images"]))
    if labels.shape != (len(images),) or labels.size and labels.max() >= len(CLASSES):
        raise CalibrationError(f"{paths['labels']}: {labels.shape} labels do not fit {len(images)} images of 10 classes",
                               path=str(paths["labels"]))
    images.flags.writeable = False  # shared by every caller through the cache
    labels.flags.writeable = False
    return images, labels


def load(split: str = "train") -> Tuple[np.ndarray, np.ndarray]:
    """(uint8 N×28×28 images, uint8 N labels) of ``split`` ("train": 60,000 or "test": 10,000), read-only."""
    if split not in SIZES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    return _load_cached(str(data_dir()), split)


def labels_text() -> str:
    """Contents of a labels.txt (one class name per line, in index order)."""
    return "\n".join(CLASSES) + "\n"


__all__ = ["CLASSES", "MEAN", "STD", "ENV_VAR", "DEFAULT_DIR", "INSTALL_HINT", "available", "data_dir", "load",
           "read_idx", "labels_text"]
