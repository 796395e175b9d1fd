"""Decode one image file and turn it into a model input, with PIL and NumPy only.

Only PIL + NumPy so the same code runs on a Jetson (no torch there). Decoding is defensive because
calibration folders come from the field: EXIF-rotated phone photos, CMYK JPEGs, 16-bit PNGs,
palette/alpha images and animated GIFs must all come out as the RGB (or grey) picture a person sees.
"""
from __future__ import annotations

import io
import os
import stat
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import BadImageError
from .spec import InputSpec

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".ppm", ".pgm")
MAX_PIXELS = 50_000_000  # a "huge" image beyond this is refused rather than exhausting memory
# A 1 x 49,000,000 strip is under MAX_PIXELS, but resizing its short side to 256 px makes it 12.5 Gpx. The widest
# real photos (panoramas) are about 10:1; 100:1 keeps every resize under 256 x 25,600 px.
MAX_ASPECT = 100
_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file of ``mode`` is that is not a regular file, in words."""
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is an error, not a half-grey picture

_RESAMPLE = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}


def _to_8bit_rgb_or_grey(img: Image.Image, color: str) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB or L the way a viewer would show it."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit grey: scale the full range to 8 bits instead of clipping at 255.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) if hi > lo else arr * 0
        img = Image.fromarray((arr * 255 + 0.5).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite transparency on white, as browsers and photo viewers do.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB" if color == "RGB" else "L")


def open_regular(path: str, what: str = "an image file") -> io.BufferedReader:
    """``path`` opened for reading once it is known to be a regular file: opened without blocking (a FIFO would
    block ``open`` forever) and checked with ``fstat`` (``/dev/zero`` would never end). BadImageError otherwise;
    OSError (missing, permissions, a link loop) passes through."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise BadImageError(f"{path}: {file_kind(mode)}, not {what}", hint="leave it out of the calibration set", path=path)
    os.set_blocking(fd, True)
    raw = io.FileIO(fd, "rb")
    raw.name = path   # what PIL and error messages show
    return io.BufferedReader(raw)


def _check_size(img: Image.Image, path: str) -> None:
    if img.width * img.height > MAX_PIXELS:
        raise BadImageError(f"{path}: image is {img.width}x{img.height}, over the {MAX_PIXELS:,}-pixel limit",
                            hint="downscale it or leave it out of the calibration set", path=path)
    if max(img.width, img.height) > MAX_ASPECT * min(img.width, img.height):
        raise BadImageError(f"{path}: image is {img.width}x{img.height}, more than {MAX_ASPECT}:1 (resizing its "
                            f"short side would make it enormous)", hint="crop it or leave it out of the "
                            "calibration set", path=path)


def load_image(path: str | os.PathLike, color: str = "RGB") -> Image.Image:
    """Read ``path`` as an upright 8-bit RGB (or L) image; raise BadImageError naming the path."""
    path = os.fspath(path)
    try:
        with warnings.catch_warnings(), open_regular(path) as f:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                _check_size(img, path)
                img.seek(0)  # animated GIF/WebP: the first frame
                img.load()
                img = ImageOps.exif_transpose(img)  # phone photos: honour the EXIF orientation
                return _to_8bit_rgb_or_grey(img, color)
    except BadImageError:
        raise
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise BadImageError(f"{path}: image too large ({exc})", hint="downscale it or leave it out of the calibration set",
                            path=path) from None
    except FileNotFoundError:
        raise BadImageError(f"{path}: file not found", path=path) from None
    except PermissionError:
        raise BadImageError(f"{path}: permission denied", hint="make it readable", path=path) from None
    except (OSError, SyntaxError, ValueError, MemoryError) as exc:
        reason = ("empty file" if os.path.isfile(path) and os.path.getsize(path) == 0 else
                  "not an image format PIL can read" if isinstance(exc, UnidentifiedImageError) else
                  str(exc) or type(exc).__name__)
        raise BadImageError(f"{path}: cannot decode image ({reason})",
                            hint="re-save or remove it (without --strict-calib bad files are skipped)", path=path) from None


def resize_crop(img: Image.Image, spec: InputSpec) -> Image.Image:
    """The geometric part of ``spec``: resize the shorter side, then centre-crop (still 8-bit pixels)."""
    img = img.convert("RGB" if spec.color == "RGB" else "L")
    w, h = img.size
    short = min(w, h)
    if short != spec.resize:
        ratio = spec.resize / short
        img = img.resize((max(1, round(w * ratio)), max(1, round(h * ratio))), _RESAMPLE[spec.interpolation])
    w, h = img.size
    if w < spec.width or h < spec.height:  # crop larger than the resized image: scale up to fit
        ratio = max(spec.width / w, spec.height / h)
        img = img.resize((max(spec.width, round(w * ratio)), max(spec.height, round(h * ratio))),
                         _RESAMPLE[spec.interpolation])
        w, h = img.size
    left = int(round((w - spec.width) / 2.0))
    top = int(round((h - spec.height) / 2.0))
    return img.crop((left, top, left + spec.width, top + spec.height))


def normalize(pixels: np.ndarray, spec: InputSpec) -> np.ndarray:
    """8-bit pixels (H×W×C or H×W, or N×H×W×C) -> float32 (N×)C×H×W in model space."""
    arr = np.asarray(pixels, dtype=np.float32) * np.float32(spec.scale)
    batched = arr.ndim == 4 or (arr.ndim == 3 and spec.channels == 1 and arr.shape[-1] != 1)
    if not batched:
        arr = arr[None]
    if arr.ndim == 3:
        arr = arr[..., None]
    arr = arr.transpose(0, 3, 1, 2)
    mean = np.asarray(spec.mean, dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec.std, dtype=np.float32)[None, :, None, None]
    out = np.ascontiguousarray((arr - mean) / std, dtype=np.float32)
    return out if batched else out[0]


def to_pixels(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Resized and cropped 8-bit pixels, H×W×C (C=1 for grey, or the grey channel repeated C times)."""
    arr = np.asarray(resize_crop(img, spec), dtype=np.uint8)
    arr = arr[:, :, None] if arr.ndim == 2 else arr
    if arr.shape[2] != spec.channels:  # grey replicated to a multi-channel input (spec.grey_replicated)
        arr = np.repeat(arr, spec.channels, axis=2)
    return arr


def preprocess_pil(img: Image.Image, spec: InputSpec) -> np.ndarray:
    """Apply ``spec`` (resize shorter side, centre-crop, scale, normalise) -> float32 CHW array."""
    return normalize(to_pixels(img, spec), spec)


def preprocess_file(path: str | os.PathLike, spec: InputSpec) -> np.ndarray:
    return preprocess_pil(load_image(path, spec.color), spec)
