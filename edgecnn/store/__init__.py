"""The artefact store: publish validated bundles, pull them back exactly, pin them in a lock file.

Modules, one job each: ``archive`` (deterministic packing, refusing extraction), ``index`` (the
store's index.json), ``backends`` (local folder, HTTP(S) read-only, S3 via s3fs), ``publish``,
``pull``, ``lockfile``. Nothing here imports torch or onnx, so pulling works on a bare device.
"""
from __future__ import annotations

from .backends import DEFAULT_STORE, HttpStore, LocalStore, S3Store, Store, open_store
from .publish import PublishResult, publish
from .pull import PullResult, pull, pull_entry

__all__ = ["DEFAULT_STORE", "HttpStore", "LocalStore", "S3Store", "Store", "open_store", "publish", "PublishResult",
           "pull", "pull_entry", "PullResult"]
