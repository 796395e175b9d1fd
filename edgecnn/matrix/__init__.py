"""The export matrix: every architecture x target x precision exported, validated and scored in one run.

    from edgecnn.matrix import MatrixConfig, run_matrix
    run = run_matrix(MatrixConfig(archs=["squeezenet1_1"], targets=["onnx"], precisions=["fp32", "fp16"]))
    print(run.summary_line())

Modules: ``plan`` (cells, input keys), ``state`` (resume), ``scheduler`` + ``worker`` (parallel cells in
fresh processes), ``results`` (a cell's record, from its manifest), ``scorecard`` (the CI gate),
``display`` (rich progress), ``run`` (the whole run); the report is ``edgecnn.report``.
Kept light at import: the worker processes import this package before configuring threads.
"""
from __future__ import annotations


def run_matrix(config):
    from .run import run_matrix as _run

    return _run(config)


def __getattr__(name):
    if name in ("MatrixConfig", "MatrixRun"):
        from . import run

        return getattr(run, name)
    raise AttributeError(name)


__all__ = ["run_matrix", "MatrixConfig", "MatrixRun"]
