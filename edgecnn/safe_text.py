"""Text read from outside (a store's index, a bundle's manifest, a file name, a lock file), made safe to print.

A terminal obeys control characters: an index entry holding ``ESC [ 2 J`` clears the screen, one holding
``ESC ] 8`` plants a link, a carriage return overwrites the line that says FAILED, a right-to-left override
reverses what follows. ``printable`` writes every such character as a visible escape (``\\x1b``, ``\\n``,
``\\u202e``), and bytes that were not UTF-8 (kept by Python as surrogates) as ``\\xff``, so what edgecnn
prints is exactly what the file holds and nothing more.
"""
from __future__ import annotations

import unicodedata

_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_UNSAFE = ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")   # controls, format (bidi, zero-width), surrogates, unassigned


def _escape(ch: str) -> str:
    if ch in _SHORT:
        return _SHORT[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:            # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: object) -> str:
    """``text`` (anything, as ``str()``) with every control, format or non-UTF-8 character escaped."""
    s = text if isinstance(text, str) else str(text)
    if s.isprintable():                       # the common case: nothing to do (space counts as printable)
        return s
    return "".join(_escape(ch) if ch != " " and unicodedata.category(ch) in _UNSAFE else ch for ch in s)
