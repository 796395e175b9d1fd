"""Where calibration/evaluation images come from: folders, file lists, arrays, the bundled sample photos.

Every source yields ``Item``s in a deterministic order (sorted paths), each with a stable ``id``, a
``group`` (items of one group never straddle the calibration/evaluation split: crops of one photo
stay together) and a loader that returns a PIL image or an already preprocessed array.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from .errors import CalibrationError
from .images import IMAGE_EXTENSIONS, load_image


@dataclass(frozen=True)
class Item:
    id: str                       # stable name: a path, or "skimage:astronaut#3"
    group: str                    # split unit: items of one group are all calibration or all evaluation
    load: Callable[[str], Union[Image.Image, np.ndarray]]  # color -> PIL image or preprocessed CHW array
    content_key: str              # hash of the source bytes + transform, for caches and fingerprints
    preprocessed: bool = False    # True: load() returns a CHW float32 array already in model space
    label: Optional[int] = None   # class index, when the source is labelled (an .npz with a ``labels`` array)


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def list_image_files(folder: Union[str, os.PathLike]) -> List[str]:
    """All image files under ``folder`` (recursive, sorted, symlinked folders visited once)."""
    folder = os.fspath(folder)
    if not os.path.exists(folder):
        raise CalibrationError(f"calibration folder not found: {folder}", hint="pass CALIB=<folder of images>", path=folder)
    if not os.path.isdir(folder):
        raise CalibrationError(f"calibration path is not a folder: {folder}",
                               hint="pass a folder of images, a .txt list of paths or an .npy/.npz array", path=folder)
    if not os.access(folder, os.R_OK | os.X_OK):
        raise CalibrationError(f"calibration folder is not readable: {folder}", hint="check its permissions", path=folder)
    found: List[str] = []
    seen_dirs = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen_dirs:  # a symlink loop or a second link to the same folder
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith("."):
                found.append(os.path.join(root, name))
    return sorted(found)


def _file_item(path: str) -> Item:
    try:
        key = _file_sha256(path)
    except OSError:
        key = "unreadable:" + path  # reported by path when loaded
    return Item(id=path, group=path, load=lambda color, p=path: load_image(p, color), content_key=key)


def folder_items(folder: Union[str, os.PathLike]) -> List[Item]:
    return [_file_item(p) for p in list_image_files(folder)]


def list_file_items(list_path: Union[str, os.PathLike]) -> List[Item]:
    """A text file with one image path per line (relative paths are relative to the list file)."""
    list_path = os.fspath(list_path)
    base = os.path.dirname(os.path.abspath(list_path))
    with open(list_path, encoding="utf-8") as f:
        lines = [ln.strip() for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
    paths = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]
    return [_file_item(p) for p in paths]


def array_items(array_path: Union[str, os.PathLike], spec_shape: Sequence[int]) -> List[Item]:
    """Items from an .npy/.npz: float32 N×C×H×W already preprocessed, or uint8 N×H×W(×C) raw pixels.

    An .npz may be *labelled*: an ``images`` array plus a ``labels`` array of N class indices (e.g.
    ``np.savez(path, images=x, labels=y)``). Each item then carries its label, and the validator reports
    the labelled accuracy of the reference and of the artefact. Without an ``images`` key the first
    array (sorted by name) is used, as before.
    """
    array_path = os.fspath(array_path)
    labels = None
    try:
        data = np.load(array_path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            keys = sorted(data.files)
            if not keys:
                raise CalibrationError(f"{array_path}: the .npz holds no array", path=array_path)
            arr = data["images"] if "images" in keys else data[keys[0]]
            if "labels" in keys and "images" in keys:
                labels = data["labels"]
        else:
            arr = data
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{array_path}: cannot read array ({exc})", path=array_path) from None
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(arr) or not np.issubdtype(labels.dtype, np.integer) \
                or (labels.size and labels.min() < 0):
            raise CalibrationError(
                f"{array_path}: 'labels' must be {len(arr)} non-negative class indices (one per image), found "
                f"{labels.dtype} {labels.shape}", hint="np.savez(path, images=uint8 N×H×W[×C], labels=int N)",
                path=array_path)
        labels = [int(v) for v in labels]
    digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]

    def label(i: int) -> Optional[int]:
        return None if labels is None else labels[i]

    def key(i: int) -> str:  # labels are part of the content: they change what the validator reports
        return f"{digest}:{i}" if labels is None else f"{digest}:{i}:label{labels[i]}"

    items: List[Item] = []
    if arr.dtype == np.uint8 and arr.ndim in (3, 4):
        for i in range(arr.shape[0]):
            img = arr[i]
            items.append(Item(id=f"{array_path}[{i}]", group=f"{array_path}[{i}]",
                              load=lambda color, a=img: Image.fromarray(a).convert("RGB" if color == "RGB" else "L"),
                              content_key=key(i), label=label(i)))
        return items
    if arr.ndim == 4 and tuple(arr.shape[1:]) == tuple(spec_shape):
        arr = arr.astype(np.float32, copy=False)
        for i in range(arr.shape[0]):
            items.append(Item(id=f"{array_path}[{i}]", group=f"{array_path}[{i}]",
                              load=lambda color, a=arr[i]: np.ascontiguousarray(a, dtype=np.float32),
                              content_key=key(i), preprocessed=True, label=label(i)))
        return items
    raise CalibrationError(
        f"{array_path}: array of shape {arr.shape} and dtype {arr.dtype} fits neither raw images "
        f"(uint8 N×H×W×C) nor preprocessed inputs (float N×{'×'.join(map(str, spec_shape))})", path=array_path)


def items_from_path(path: Union[str, os.PathLike], spec_shape: Sequence[int]) -> List[Item]:
    """Dispatch on what ``path`` is: folder, .txt list, .npy/.npz array."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return folder_items(p)
    if p.endswith((".npy", ".npz")) and os.path.isfile(p):
        return array_items(p, spec_shape)
    if p.endswith(".txt") and os.path.isfile(p):
        return list_file_items(p)
    return folder_items(p)  # raises the right "not found / not a folder" error


# ---------------------------------------------------------------------------------------------
# Bundled sample photos: real, licence-clean colour photos that ship inside PyPI packages.
# ---------------------------------------------------------------------------------------------
SKIMAGE_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field",
                  "immunohistochemistry", "retina", "stereo_motorcycle",
                  # real grey photographs (camera, coins, moon, clock, micrographs, textures): more scenes
                  # for calibration and evaluation; shown to colour models as grey RGB
                  "camera", "coins", "moon", "clock", "cell", "brick", "grass", "gravel")
SKLEARN_PHOTOS = ("china.jpg", "flower.jpg")
# Deterministic views of each photo: (left, top, right, bottom) as fractions, then an optional mirror.
_VIEWS = [(0, 0, 1, 1), (0.1, 0.1, 0.9, 0.9), (0.2, 0.2, 0.8, 0.8), (0, 0, 0.7, 0.7), (0.3, 0, 1, 0.7),
          (0, 0.3, 0.7, 1), (0.3, 0.3, 1, 1), (0.15, 0, 0.85, 0.7), (0.15, 0.3, 0.85, 1), (0.25, 0.1, 0.75, 0.6)]


def _load_skimage(name: str) -> List[Image.Image]:
    import skimage.data  # the photos ship inside the scikit-image wheel

    data = getattr(skimage.data, name)()
    arrays = list(data[:2]) if name == "stereo_motorcycle" else [data]  # its third array is a disparity map
    out = []
    for a in arrays:
        if a.dtype != np.uint8:
            a = np.clip(a * (255.0 if a.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        out.append(Image.fromarray(a).convert("RGB"))
    return out


def _load_sklearn(name: str) -> List[Image.Image]:
    from sklearn.datasets import load_sample_image

    return [Image.fromarray(load_sample_image(name)).convert("RGB")]


def _base_photos() -> List[tuple]:
    """[(photo_name, PIL image)] for every sample photo that is installed, in a fixed order."""
    photos = []
    missing = []
    try:
        for name in SKIMAGE_PHOTOS:
            for k, img in enumerate(_load_skimage(name)):
                photos.append((f"skimage:{name}" + (f"_{k}" if name == "stereo_motorcycle" else ""), img))
    except ImportError:
        missing.append("scikit-image")
    try:
        for name in SKLEARN_PHOTOS:
            for img in _load_sklearn(name):
                photos.append((f"sklearn:{name.split('.')[0]}", img))
    except ImportError:
        missing.append("scikit-learn")
    if not photos:
        raise CalibrationError("no sample photos available: " + " and ".join(missing) + " not installed",
                               hint="pip install scikit-image scikit-learn, or pass CALIB=<folder of images>")
    return photos


_PHOTO_CACHE: Optional[List[tuple]] = None


def sample_photo_names() -> List[str]:
    return [name for name, _ in _photos()]


def _photos() -> List[tuple]:
    global _PHOTO_CACHE
    if _PHOTO_CACHE is None:
        _PHOTO_CACHE = _base_photos()
    return _PHOTO_CACHE


def _view(img: Image.Image, view: int) -> Image.Image:
    box = _VIEWS[view % len(_VIEWS)]
    w, h = img.size
    out = img.crop((int(box[0] * w), int(box[1] * h), int(box[2] * w), int(box[3] * h)))
    return ImageOps.mirror(out) if view >= len(_VIEWS) else out


def sample_photo_items(views_per_photo: int = 2 * len(_VIEWS)) -> List[Item]:
    """Crops and mirrors of the bundled sample photos; each photo is one split group."""
    items = []
    for name, img in _photos():
        photo_key = hashlib.sha256(img.tobytes()).hexdigest()[:16]
        for v in range(views_per_photo):
            group = name.rsplit("_", 1)[0] if name.startswith("skimage:stereo_motorcycle") else name  # L/R pair
            items.append(Item(id=f"{name}#{v}", group=group,
                              load=lambda color, im=img, vv=v: _view(im, vv).convert("RGB" if color == "RGB" else "L"),
                              content_key=f"{photo_key}:view{v}"))
    return items
