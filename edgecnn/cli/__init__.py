"""The ``edgecnn`` command line: ``main`` (export, validate, list, verify) and the subcommands of ``matrix``,
``store`` (publish, pull, ls) and ``trt`` (check-qdq, trt, merge-results)."""
from .main import build_parser, main

__all__ = ["build_parser", "main"]
