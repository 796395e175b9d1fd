"""Where calibration/evaluation images come from: folders, file lists, arrays, the bundled sample photos.

Every source yields ``Item``s in a deterministic order (sorted paths), each with a stable ``id``, a
``group`` (items of one group never straddle the calibration/evaluation split: crops of one photo
stay together) and a loader that returns a PIL image or an already preprocessed array.
"""
from __future__ import annotations

import hashlib
import math
import os
import zipfile
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Union

import numpy as np
from PIL import Image, ImageOps

from .errors import BadImageError, CalibrationError
from .images import IMAGE_EXTENSIONS, MAX_ASPECT, MAX_PIXELS, file_kind, load_image, open_regular


@dataclass(frozen=True)
class Item:
    id: str                       # stable name: a path, or "skimage:astronaut#3"
    group: str                    # split unit: items of one group are all calibration or all evaluation
    load: Callable[[str], Union[Image.Image, np.ndarray]]  # color -> PIL image or preprocessed CHW array
    content_key: str              # hash of the source bytes + transform, for caches and fingerprints
    preprocessed: bool = False    # True: load() returns a CHW float32 array already in model space
    label: Optional[int] = None   # class index, when the source is labelled (an .npz with a ``labels`` array)


MAX_LIST_BYTES = 64 << 20         # a .txt list or a labels file: a million paths or labels
MAX_ARRAY_BYTES = 8 << 30         # an .npy/.npz array is loaded whole: 8 GiB is ~40,000 preprocessed 224x224 images


def _file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open_regular(path) as f:   # a FIFO or /dev/zero in the folder must not hang the listing
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def read_text_lines(path: Union[str, os.PathLike], what: str) -> List[str]:
    """The lines of a UTF-8 text file (a leading BOM dropped, line ends stripped); CalibrationError naming the
    file — and, for bytes that are not UTF-8, the line — when it is missing, not a file, too large or not UTF-8."""
    path = os.fspath(path)
    try:
        with open_regular(path, f"a text file ({what})") as f:
            data = f.read(MAX_LIST_BYTES + 1)
    except BadImageError as exc:   # a folder, FIFO or device: not a bad *image*, so not skipped
        raise CalibrationError(str(exc), hint="pass a text file with one entry per line", path=path) from None
    except OSError as exc:
        raise CalibrationError(f"cannot read {what} {path} ({exc.strerror or exc})",
                               hint="pass a text file with one entry per line", path=path) from None
    if len(data) > MAX_LIST_BYTES:
        raise CalibrationError(f"{what} {path} is over the {MAX_LIST_BYTES:,}-byte limit", path=path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise CalibrationError(f"{what} {path}: line {line} is not UTF-8 (byte {data[exc.start]:#04x})",
                               hint="save the file as UTF-8", path=path) from None
    return [ln.rstrip("\r") for ln in text.split("\n")] if text else []


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
    except (OSError, BadImageError):
        key = "unreadable:" + path  # reported by path when loaded
    return Item(id=path, group=path, load=lambda color, p=path: load_image(p, color), content_key=key)


def folder_items(folder: Union[str, os.PathLike]) -> List[Item]:
    return [_file_item(p) for p in list_image_files(folder)]


def list_file_items(list_path: Union[str, os.PathLike]) -> List[Item]:
    """A text file with one image path per line (relative paths are relative to the list file)."""
    list_path = os.fspath(list_path)
    base = os.path.dirname(os.path.abspath(list_path))
    lines = [ln.strip() for ln in read_text_lines(list_path, "image list") if ln.strip() and not ln.lstrip().startswith("#")]
    paths = [ln if os.path.isabs(ln) else os.path.join(base, ln) for ln in lines]
    return [_file_item(p) for p in paths]


def _npy_size(f, where: str) -> int:
    """Bytes of data an .npy header promises (read from the header, without loading the array)."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(f)
        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, _, dtype = reader(f)
    except (ValueError, OSError, EOFError) as exc:
        raise CalibrationError(f"{where}: not an .npy array ({exc})", path=where) from None
    if dtype.hasobject:
        raise CalibrationError(f"{where}: array of Python objects (a pickle), not numbers", path=where)
    return math.prod(shape) * dtype.itemsize


def _check_array_sizes(path: str) -> None:
    """Refuse, from the headers alone, an array that claims more bytes than its file holds or than the limit."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            members = [i for i in z.infolist() if i.filename.endswith(".npy")]
            if sum(i.file_size for i in members) > MAX_ARRAY_BYTES:
                raise CalibrationError(f"{path}: its arrays unpack to {sum(i.file_size for i in members):,} bytes, "
                                       f"over the {MAX_ARRAY_BYTES:,}-byte limit", path=path)
            for info in members:
                with z.open(info) as f:
                    claimed, room = _npy_size(f, f"{path}:{info.filename}"), info.file_size - f.tell()
                if claimed > room:
                    raise CalibrationError(f"{path}: {info.filename} claims {claimed:,} bytes of data, it holds "
                                           f"{room:,}", hint="the file is damaged or was not written by numpy", path=path)
        return
    with open_regular(path, "an .npy file") as f:
        claimed = _npy_size(f, path)
        room = os.fstat(f.fileno()).st_size - f.tell()
    if claimed > min(room, MAX_ARRAY_BYTES):
        raise CalibrationError(f"{path}: its header claims {claimed:,} bytes of data, "
                               + (f"the file holds {room:,}" if claimed > room else
                                  f"over the {MAX_ARRAY_BYTES:,}-byte limit"),
                               hint="the file is damaged or not a calibration array", path=path)


def _load_array(array_path: str):
    """(images array, labels array or None) of an .npy/.npz, its sizes checked before anything is loaded."""
    labels = None
    try:
        _check_array_sizes(array_path)
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
    except BadImageError as exc:
        raise CalibrationError(str(exc), path=array_path) from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise CalibrationError(f"{array_path}: cannot read array ({exc})", path=array_path) from None
    except MemoryError:
        raise CalibrationError(f"{array_path}: the array does not fit in memory", path=array_path) from None
    return arr, labels


def _array_problem(arr: np.ndarray, spec_shape: Sequence[int]) -> Optional[str]:
    """Why ``arr`` cannot be calibration images (None: it can)."""
    if arr.ndim >= 1 and arr.shape[0] == 0:
        return "holds no images (N = 0)"
    if arr.dtype == np.uint8 and arr.ndim in (3, 4):
        h, w = arr.shape[1:3]
        if arr.ndim == 4 and arr.shape[3] not in (1, 3, 4):
            return f"has {arr.shape[3]} channels per pixel; raw images have 1 (grey), 3 (RGB) or 4 (RGBA)"
        if min(h, w) == 0 or max(h, w) > MAX_ASPECT * min(h, w) or h * w > MAX_PIXELS:
            return f"holds {h}x{w}-pixel images (at least 1x1, at most {MAX_ASPECT}:1 and {MAX_PIXELS:,} pixels)"
        return None
    if arr.ndim == 4 and tuple(arr.shape[1:]) == tuple(spec_shape):
        if arr.dtype.kind not in "fiu":
            return f"has dtype {arr.dtype}; preprocessed inputs are real numbers (float32)"
        return None
    return (f"array of shape {arr.shape} and dtype {arr.dtype} fits neither raw images (uint8 N×H×W×C) nor "
            f"preprocessed inputs (float N×{'×'.join(map(str, spec_shape))})")


def array_items(array_path: Union[str, os.PathLike], spec_shape: Sequence[int]) -> List[Item]:
    """Items from an .npy/.npz: float32 N×C×H×W already preprocessed, or uint8 N×H×W(×C) raw pixels.

    An .npz may be *labelled*: an ``images`` array plus a ``labels`` array of N class indices (e.g.
    ``np.savez(path, images=x, labels=y)``). Each item then carries its label, and the validator reports
    the labelled accuracy of the reference and of the artefact. Without an ``images`` key the first
    array (sorted by name) is used. Sizes are checked from the headers before anything is loaded; NaN or
    Inf in preprocessed inputs is refused, naming how many and where.
    """
    array_path = os.fspath(array_path)
    arr, labels = _load_array(array_path)
    problem = _array_problem(arr, spec_shape)
    if problem:
        raise CalibrationError(f"{array_path}: {problem}", path=array_path)
    if labels is not None:
        if labels.ndim != 1 or len(labels) != len(arr) or not np.issubdtype(labels.dtype, np.integer) \
                or (labels.size and labels.min() < 0):
            raise CalibrationError(
                f"{array_path}: 'labels' must be {len(arr)} non-negative class indices (one per image), found "
                f"{labels.dtype} {labels.shape}", hint="np.savez(path, images=uint8 N×H×W[×C], labels=int N)",
                path=array_path)
        labels = [int(v) for v in labels]
    if arr.dtype != np.uint8 or arr.ndim not in (3, 4):
        arr = arr.astype(np.float32, copy=False)
        bad = ~np.isfinite(arr)
        if bad.any():
            first = int(np.argmax(bad.reshape(len(arr), -1).any(axis=1)))
            raise CalibrationError(f"{array_path}: {int(bad.sum()):,} NaN/Inf values in the preprocessed inputs "
                                   f"(first in image {first}) — after conversion to float32",
                                   hint="fix the array; the inputs of a model must be finite", path=array_path)
    return _array_item_list(array_path, arr, labels)


def _array_item_list(array_path: str, arr: np.ndarray, labels: Optional[list]) -> List[Item]:
    digest = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()[:16]

    def label(i: int) -> Optional[int]:
        return None if labels is None else labels[i]

    def key(i: int) -> str:  # labels are part of the content: they change what the validator reports
        return f"{digest}:{i}" if labels is None else f"{digest}:{i}:label{labels[i]}"

    items: List[Item] = []
    if arr.dtype == np.uint8:
        for i in range(arr.shape[0]):
            img = arr[i] if arr.ndim == 3 or arr.shape[3] != 1 else arr[i, :, :, 0]
            items.append(Item(id=f"{array_path}[{i}]", group=f"{array_path}[{i}]",
                              load=lambda color, a=img: Image.fromarray(a).convert("RGB" if color == "RGB" else "L"),
                              content_key=key(i), label=label(i)))
        return items
    for i in range(arr.shape[0]):
        items.append(Item(id=f"{array_path}[{i}]", group=f"{array_path}[{i}]",
                          load=lambda color, a=arr[i]: np.ascontiguousarray(a, dtype=np.float32),
                          content_key=key(i), preprocessed=True, label=label(i)))
    return items


def items_from_path(path: Union[str, os.PathLike], spec_shape: Sequence[int]) -> List[Item]:
    """Dispatch on what ``path`` is: folder, .txt list, .npy/.npz array."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return folder_items(p)
    if os.path.exists(p) and not os.path.isfile(p):
        raise CalibrationError(f"calibration path {p} is {file_kind(os.stat(p).st_mode)}", path=p,
                               hint="pass a folder of images, a .txt list of paths or an .npy/.npz array")
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
