"""Shared test helpers. Tests use the real exporters and runtimes on real images; nothing is mocked."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _quiet_random_init_warnings(caplog):
    caplog.set_level(logging.ERROR, logger="edgecnn.weights")
    yield


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m edgecnn ARGS`` as a user would; returns the completed process (text)."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {})}
    return subprocess.run([sys.executable, "-m", "edgecnn", *args], cwd=cwd or REPO, capture_output=True, text=True,
                          timeout=timeout, env=full_env)


@pytest.fixture
def cli():
    return run_cli
