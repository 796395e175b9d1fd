"""Labelled image folders in the ImageFolder layout: one sub-folder per class, images inside.

A folder name is matched to the model's labels exactly, then ignoring case and the difference between
spaces, underscores, hyphens and slashes ("tabby_cat" is "tabby cat", "T-shirt_top" is "T-shirt/top"), then
as a class index ("281"). A folder that matches no label is an error naming it and the closest labels: a
mislabelled evaluation set must not silently score as garbage.
"""
from __future__ import annotations

import difflib
import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from .errors import CalibrationError
from .images import IMAGE_EXTENSIONS
from .sources import Item, folder_items


def _norm(name: str) -> str:
    return re.sub(r"[\s_\-/]+", " ", name.strip().lower())


def class_folders(folder: str) -> List[str]:
    """The sub-folders of ``folder`` when it is laid out as an ImageFolder (sub-folders and no images at its
    top level), sorted; else an empty list."""
    try:
        entries = sorted(os.listdir(folder))
    except OSError:
        return []
    subdirs = [e for e in entries if not e.startswith(".") and os.path.isdir(os.path.join(folder, e))]
    images = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS) and not e.startswith(".")]
    return subdirs if subdirs and not images else []


def match_classes(names: Sequence[str], labels: Sequence[str]) -> Tuple[Dict[str, int], List[str]]:
    """({folder name: class index} for the names that match a label, [names that match none])."""
    exact = {lab: i for i, lab in enumerate(labels)}
    loose: Dict[str, int] = {}
    for i, lab in enumerate(labels):
        loose.setdefault(_norm(lab), i)
    found, unmatched = {}, []
    for name in names:
        if name in exact:
            found[name] = exact[name]
        elif _norm(name) in loose:
            found[name] = loose[_norm(name)]
        elif name.isdigit() and int(name) < len(labels):
            found[name] = int(name)
        else:
            unmatched.append(name)
    return found, unmatched


def unmatched_error(folder: str, unmatched: Sequence[str], labels: Sequence[str]) -> CalibrationError:
    first = unmatched[0]
    close = difflib.get_close_matches(first, list(labels), n=3, cutoff=0.4) or \
        difflib.get_close_matches(_norm(first), [_norm(lab) for lab in labels], n=3, cutoff=0.4)
    more = f" (and {len(unmatched) - 1} more: {', '.join(unmatched[1:4])})" if len(unmatched) > 1 else ""
    return CalibrationError(
        f"{folder}: sub-folder {first!r} is not one of the model's {len(labels)} labels{more}"
        + (f"; closest labels: {', '.join(repr(c) for c in close)}" if close else ""),
        hint="name each class folder after a label (labels.txt / --labels) or its class index", path=folder)


def labelled_items(folder: str, labels: Sequence[str], *, strict: bool) -> Optional[List[Item]]:
    """Items of an ImageFolder tree with their class indices; None when ``folder`` is not laid out as one.

    ``strict`` (an evaluation set): every sub-folder must be a label. Otherwise (a calibration folder, whose
    sub-folders may be anything, e.g. dates) the tree is labelled only when every sub-folder matches a label,
    unlabelled when none does, and an error when some do and some do not."""
    names = class_folders(folder)
    if not names:
        return None
    found, unmatched = match_classes(names, labels)
    if unmatched and (strict or found):
        raise unmatched_error(folder, unmatched, labels)
    if unmatched:
        return None
    items: List[Item] = []
    for name in names:
        for item in folder_items(os.path.join(folder, name)):
            items.append(Item(id=item.id, group=item.group, load=item.load, label=found[name],
                              content_key=f"{item.content_key}:label{found[name]}"))
    return items
