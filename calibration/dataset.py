"""CalibrationSet: a deterministic calibration split and a held-out evaluation split of real images.

Split by *group* (one photo and all its crops, or one file), so the validator never scores on a
picture the quantizer has seen. Sampling is seeded and file lists are sorted, so the same folder and
seed give the same sets on every machine. Preprocessed tensors are cached on disk, keyed by the
source bytes and the preprocessing, so re-running an export does not decode the folder again.
Images are loaded one at a time (``iter_batches``), so memory stays flat on large folders.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .errors import BadImageError, CalibrationError
from .imagefolder import labelled_items
from .images import preprocess_pil, to_pixels
from .sources import Item, items_from_path, sample_photo_items
from .spec import InputSpec

log = logging.getLogger(__name__)

DEFAULT_CALIB_SIZE = 256
DEFAULT_EVAL_SIZE = 96
SAMPLE_PHOTOS = "sample-photos"


def default_cache_dir() -> Path:
    return Path(os.environ.get("EDGECNN_CACHE", Path.home() / ".cache" / "edgecnn"))


def _spec_key(spec: InputSpec) -> str:
    return hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class CalibrationSet:
    """Calibration and evaluation items for one model input spec.

    Build with ``CalibrationSet.create(source, spec, ...)``; ``source`` is a folder, a ``.txt`` list of
    paths, an ``.npy/.npz`` array, or ``None`` / ``"sample-photos"`` for the bundled real photos.
    """

    spec: InputSpec
    source: str
    calib_items: List[Item]
    eval_items: List[Item]
    eval_source: Optional[str] = None     # the user's own evaluation set; None: the held-out split of ``source``
    seed: int = 0
    strict: bool = False
    cache_dir: Optional[Path] = None
    skipped: List[str] = field(default_factory=list)  # "path: reason" for every bad image met so far

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, source: Union[str, os.PathLike, None], spec: InputSpec, *, calib_size: int = DEFAULT_CALIB_SIZE,
               eval_size: int = DEFAULT_EVAL_SIZE, eval_fraction: float = 0.5, seed: int = 0, strict: bool = False,
               cache: bool = True, cache_dir: Optional[Union[str, Path]] = None,
               eval_source: Union[str, os.PathLike, None] = None,
               class_names: Optional[Sequence[str]] = None) -> "CalibrationSet":
        """``eval_source``: the user's own evaluation images (a folder, an ImageFolder tree of class folders,
        a .txt list, an .npy/.npz with ``labels``); all of ``source`` then calibrates, and no image of the
        evaluation set is calibrated on. ``class_names``: the model's labels, to read ImageFolder trees."""
        items, name = _items_of(source, spec, class_names, strict_labels=False)
        if eval_source is None:
            calib, evals = split_items(items, calib_size=calib_size, eval_size=eval_size,
                                       eval_fraction=eval_fraction, seed=seed)
        else:
            evals_all, eval_name = _items_of(eval_source, spec, class_names, strict_labels=True)
            evals = sample_items(evals_all, eval_size, seed)
            seen = {it.content_key for it in evals}
            calib = sample_items([it for it in items if it.content_key not in seen], calib_size, seed)
            if len(calib) < min(len(items), calib_size or len(items)):
                log.warning("%d image(s) of %s are also in the evaluation set %s: not calibrated on",
                            len([it for it in items if it.content_key in seen]), name, eval_name)
        if calib_size and len(calib) < calib_size and name != SAMPLE_PHOTOS:
            if strict:  # --strict-calib: a smaller set than asked is an error, not a warning
                raise CalibrationError(f"calibration set smaller than asked: {len(calib)} of {calib_size} images "
                                       f"available in {name} (the rest are held out for evaluation)",
                                       hint=f"add images, or ask for --calib-size {len(calib)}", path=name)
            log.warning("calibration set smaller than asked: %d of %d images available in %s (the rest are held out "
                        "for evaluation)", len(calib), calib_size, name)
        cdir = Path(cache_dir) if cache_dir else (default_cache_dir() / "calib" if cache else None)
        made = cls(spec=spec, source=name, calib_items=calib, eval_items=evals, seed=seed, strict=strict,
                   cache_dir=cdir if cache else None,
                   eval_source=None if eval_source is None else os.fspath(eval_source))
        if strict:
            made.check_readable()
        return made

    def check_readable(self) -> None:
        """Decode every selected image once (one at a time, filling the cache); raise on the first bad one.

        Strict mode needs this up front: an FP32 export of a net without BatchNorm never reads the
        calibration split, so a broken file there would otherwise pass unnoticed."""
        for item in self.calib_items + self.eval_items:
            self.load_item(item)

    # ------------------------------------------------------------------ loading
    def _cache_path(self, item: Item) -> Optional[Path]:
        if self.cache_dir is None or item.preprocessed or item.content_key.startswith("unreadable:"):
            return None
        return self.cache_dir / _spec_key(self.spec) / f"{hashlib.sha256(item.content_key.encode()).hexdigest()[:32]}.npy"

    def load_item(self, item: Item) -> Optional[np.ndarray]:
        """One preprocessed CHW array, or None when the image is bad and not ``strict``."""
        cache_path = self._cache_path(item)
        if cache_path is not None and cache_path.exists():
            try:
                return np.load(cache_path, allow_pickle=False)
            except (OSError, ValueError):
                pass  # a damaged cache entry is simply rebuilt
        try:
            loaded = item.load(self.spec.color)
        except BadImageError as exc:
            if self.strict:
                raise
            self.skipped.append(str(exc))
            log.warning("skipping %s", exc)
            return None
        arr = loaded if item.preprocessed else preprocess_pil(loaded, self.spec)
        if cache_path is not None:
            try:
                cache_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache_path.with_suffix(f".{os.getpid()}.tmp.npy")
                np.save(tmp, arr)
                os.replace(tmp, cache_path)
            except OSError:
                pass  # caching is an optimisation; a read-only home must not fail the export
        return arr

    def iter_batches(self, split: str = "calib", batch_size: int = 16, limit: Optional[int] = None) -> Iterator[np.ndarray]:
        """Stream N×C×H×W float32 batches, loading one image at a time (bounded memory)."""
        items = self._items(split)[: limit if limit is not None else None]
        batch: List[np.ndarray] = []
        for item in items:
            arr = self.load_item(item)
            if arr is None:
                continue
            batch.append(arr)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)

    def array(self, split: str = "calib", limit: Optional[int] = None) -> np.ndarray:
        """The whole split as one array (use ``iter_batches`` for large sets)."""
        batches = list(self.iter_batches(split, batch_size=64, limit=limit))
        if not batches:
            raise CalibrationError(
                f"no usable images in the {split} split of {self.source} ({len(self.skipped)} skipped: "
                + "; ".join(self.skipped[:3]) + ")",
                hint="fix or remove the files named, or pass a folder of readable images", path=self.source)
        return np.concatenate(batches)

    def pixels(self, split: str = "eval", limit: Optional[int] = None) -> tuple:
        """(ids, uint8 N×H×W×C) resized+cropped pixels, for self-contained reference files.

        ``normalize(pixels, spec)`` gives bit-identical inputs to ``array()`` for image sources.
        """
        ids, out = [], []
        for item in self._items(split):
            if limit is not None and len(out) >= limit:
                break
            if item.preprocessed:
                continue
            try:
                img = item.load(self.spec.color)
            except BadImageError:
                continue
            ids.append(item.id)
            out.append(to_pixels(img, self.spec))
        if not out:
            return ids, np.zeros((0, self.spec.height, self.spec.width, self.spec.channels), np.uint8)
        return ids, np.stack(out)

    def labels(self, split: str = "eval", limit: Optional[int] = None) -> Optional[np.ndarray]:
        """Class indices of the split's items, in ``iter_batches``/``array`` order; None unless every item
        is labelled (an .npz with ``labels`` or an ImageFolder tree). Bad images are skipped by ``array``, so callers check lengths."""
        items = self._items(split)[: limit if limit is not None else None]
        if not items or any(it.label is None for it in items):
            return None
        return np.asarray([it.label for it in items], dtype=np.int64)

    def split_calibration(self, probe_fraction: float = 0.5, max_probe: Optional[int] = None,
                          seed: Optional[int] = None) -> Tuple["CalibrationSet", "CalibrationSet"]:
        """(fit, probe): the calibration split divided again by group, for a search that needs its own
        unseen images — the INT8 fallback fits ranges on ``fit`` and measures on ``probe``, so its probe is
        scored as held-out images will be, on photos the ranges were not fitted on (measured on pretrained
        EfficientNet-Lite0: all-INT8 probe agreement 93.8% on 128 fitted images, 96.25% on 80 unseen ones —
        the unseen photos happen to have larger FP32 margins; what matters is that no probe image shaped the
        ranges). Both keep this set's evaluation split; ``probe`` has at most ``max_probe`` items; ``probe``
        is empty when the calibration split has a single item."""
        fit, probe = split_items(self.calib_items, calib_size=0, eval_size=max_probe or 0,
                                 eval_fraction=probe_fraction, seed=self.seed if seed is None else seed)
        return replace(self, calib_items=list(fit)), replace(self, calib_items=list(probe))

    def _items(self, split: str) -> List[Item]:
        if split == "calib":
            return self.calib_items
        if split == "eval":
            return self.eval_items
        raise ValueError(f"split must be 'calib' or 'eval', not {split!r}")

    # ------------------------------------------------------------------ description
    def fingerprint(self) -> str:
        """sha256 over the content keys of both splits, the preprocessing and the seed."""
        h = hashlib.sha256()
        h.update(json.dumps({"spec": self.spec.to_dict(), "seed": self.seed}, sort_keys=True).encode())
        for tag, items in (("calib", self.calib_items), ("eval", self.eval_items)):
            h.update(tag.encode())
            for it in items:
                h.update(it.content_key.encode())
        return h.hexdigest()

    def describe(self) -> dict:
        return {
            "source": self.source,
            "evaluation_source": self.eval_source or f"the held-out split of {self.source}",
            "calibration_images": len(self.calib_items),
            "evaluation_images": len(self.eval_items),
            "calibration_groups": len({i.group for i in self.calib_items}),
            "evaluation_groups": len({i.group for i in self.eval_items}),
            "seed": self.seed,
            "labelled": self.labels("eval") is not None,
            "fingerprint": self.fingerprint(),
            "skipped": list(self.skipped),
            "split": ("the evaluation set is the user's own; none of its images is calibrated on" if self.eval_source
                      else "by group (a photo and its crops, or one file): evaluation never sees a calibration image"),
        }


def _items_of(source, spec: InputSpec, class_names, *, strict_labels: bool) -> tuple:
    """(items, name) of a source; a folder laid out as an ImageFolder tree of ``class_names`` is labelled."""
    if source is None or str(source) == SAMPLE_PHOTOS:
        items, name = sample_photo_items(), SAMPLE_PHOTOS
    else:
        name = os.fspath(source)
        items = labelled_items(name, class_names, strict=strict_labels) if class_names and os.path.isdir(name) else None
        if items is None:
            items = items_from_path(source, spec.shape)
    if not items:
        raise CalibrationError(f"no images found in {name}",
                               hint="supported: " + ", ".join(e.lstrip('.') for e in (
                                   ".jpg", ".png", ".webp", ".bmp", ".tiff", ".gif")) + ", or .npy/.npz arrays",
                               path=name)
    return items, name


def sample_items(items: Sequence[Item], n: int, seed: int) -> List[Item]:
    """Up to ``n`` items (all when ``n`` is 0), seeded, spread evenly over classes when labelled (over groups
    otherwise), so a small evaluation sample of a large labelled set still covers every class."""
    groups: dict = {}
    for it in items:
        groups.setdefault(str(it.label) if it.label is not None else it.group, []).append(it)
    return _round_robin(groups, sorted(groups), n, random.Random(seed))


def split_items(items: Sequence[Item], *, calib_size: int, eval_size: int, eval_fraction: float = 0.5,
                seed: int = 0) -> tuple:
    """Split by group, deterministically (seeded shuffle of sorted group names).

    ``eval_fraction`` of the groups (at least one, and at least one left for calibration when there are
    two or more) go to evaluation; then each side is sampled down to its size, spreading picks evenly
    over groups so one large photo cannot dominate.
    """
    groups: dict = {}
    for it in items:
        groups.setdefault(it.group, []).append(it)
    names = sorted(groups)
    rng = random.Random(seed)
    rng.shuffle(names)
    if len(names) == 1:
        # One group only (e.g. one array or one image): split its items instead, still without overlap.
        only = list(groups[names[0]])
        rng.shuffle(only)
        n_eval = max(1, int(round(len(only) * eval_fraction))) if len(only) > 1 else 0
        return _take(only[n_eval:], calib_size, rng), _take(only[:n_eval], eval_size, rng)
    n_eval_groups = min(len(names) - 1, max(1, int(round(len(names) * eval_fraction))))
    eval_names, calib_names = names[:n_eval_groups], names[n_eval_groups:]
    return (_round_robin(groups, sorted(calib_names), calib_size, rng),
            _round_robin(groups, sorted(eval_names), eval_size, rng))


def _take(items: List[Item], n: int, rng: random.Random) -> List[Item]:
    return list(items) if not n or len(items) <= n else sorted(rng.sample(items, n), key=lambda i: i.id)


def _round_robin(groups: dict, names: List[str], n: int, rng: random.Random) -> List[Item]:
    pools = {name: rng.sample(groups[name], len(groups[name])) for name in names}
    out: List[Item] = []
    while (not n or len(out) < n) and any(pools.values()):
        for name in names:
            if pools[name] and (not n or len(out) < n):
                out.append(pools[name].pop())
    return out
