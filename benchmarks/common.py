"""What the benchmark scripts share: a model with its calibration set, and writing a measured table into
``docs/results/`` with the commit, date, machine and load it was measured on (tables are never copied by hand)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "docs" / "results"
sys.path.insert(0, str(REPO))


def model_and_images(arch: str, calib_size: int, eval_size: int, weights: str = "auto", calib=None):
    """(entry, FP32 module, WeightsInfo, CalibrationSet): random-init nets get their BatchNorm statistics
    re-estimated on the calibration split, as the pipeline does."""
    from calibration import CalibrationSet
    from edgecnn import weights as weights_mod, zoo

    entry = zoo.resolve(arch)
    model, info = weights_mod.build(entry, weights)
    cs = CalibrationSet.create(calib, entry.spec, calib_size=calib_size, eval_size=eval_size)
    if info.source == "random":
        weights_mod.reestimate_batchnorm(model, cs.iter_batches("calib", batch_size=16))
    return entry, model, info, cs


def write_result(name: str, title: str, body: str, how: str) -> Path:
    """Write ``docs/results/<name>.md`` (title, provenance, how it was measured, the table) and print it."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    from edgecnn.versions import provenance

    text = (f"# {title}\n\nMeasured by `{how}` — {provenance()}. Written by the script; do not edit by hand.\n\n"
            f"{body.strip()}\n")
    tmp = path.with_suffix(f".md.tmp{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    print(text)
    return path
