"""User-facing errors and their exit-code families.

Every failure a user can cause or meet ends as one line: what went wrong, where, and what to do
(``hint``), with an exit code from its family so scripts can tell them apart. Tracebacks only with
``--debug``. The line is escaped for the terminal (``edgecnn.safe_text``): messages quote file names, index
entries and manifest fields that someone else may have written.
"""
from __future__ import annotations

from .safe_text import printable

# Exit-code families (documented in README "Exit codes").
EXIT_USAGE = 2         # unknown arch/target/precision, bad option or combination
EXIT_INPUT = 3         # a checkpoint, calibration set, ONNX file or weights that cannot be used
EXIT_OUTPUT = 4        # the output location cannot be written (not a folder, not writable, disk full, locked)
EXIT_GATE = 5          # the artefact was built but failed its parity gate (marked failed in its manifest)
EXIT_INTEGRITY = 6     # a bundle's hashes or manifest do not check out
EXIT_TOOLCHAIN = 7     # an exporter or runtime failed, or one needed here is not installed
EXIT_INTERRUPTED = 130  # SIGINT/SIGTERM: nothing half-written was left behind


class EdgeError(Exception):
    exit_code = 1
    family = "error"

    def __init__(self, message: str, hint: str = ""):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def one_line(self) -> str:
        return printable(f"error: {self.message}" + (f" — {self.hint}" if self.hint else ""))


class UsageError(EdgeError):
    exit_code, family = EXIT_USAGE, "usage"


class InputError(EdgeError):
    exit_code, family = EXIT_INPUT, "input"


class NetworkError(InputError):
    """A store could not be reached or stopped sending: worth retrying (a bounded number of times)."""


class OutputError(EdgeError):
    exit_code, family = EXIT_OUTPUT, "output"


class GateFailed(EdgeError):
    exit_code, family = EXIT_GATE, "gate"


class IntegrityError(EdgeError):
    exit_code, family = EXIT_INTEGRITY, "integrity"


class ToolchainError(EdgeError):
    exit_code, family = EXIT_TOOLCHAIN, "toolchain"


class Interrupted(EdgeError):
    exit_code, family = EXIT_INTERRUPTED, "interrupted"
