"""TensorRT bundles exported once per test session and shared by the TensorRT test modules.

Random-init ``mobilenet_v3`` (MobileNetV3-Large, the net of the TensorRT issues), exported by the real
pipeline with small calibration and held-out sets and the cheap INT8 settings (no fallback search, nearest
rounding), so the default suite stays fast; ``slow`` tests export with the defaults users run.
Each module asks for the bundles it needs; a bundle already exported in this session is reused from disk.
"""
from __future__ import annotations

from pathlib import Path

ARCH = "mobilenet_v3"
CHEAP = dict(latency=False, calib_size=48, eval_size=16)
CHEAP_INT8 = dict(fallback=False, empirical_bias_correction=False, weight_rounding="nearest")


def export_bundle(base: Path, precision: str, *, arch: str = ARCH, cheap: bool = True) -> Path:
    """The ``trt-<precision>`` bundle of ``arch`` under ``base`` (exported on first use); returns its folder."""
    from edgecnn import zoo
    from edgecnn.options import ExportOptions
    from edgecnn.pipeline import export
    from exporters.int8.options import Int8Options

    folder = base / zoo.resolve(arch).name / f"trt-{precision}"
    if not (folder / "manifest.json").is_file():
        options = ExportOptions(**CHEAP, int8=Int8Options(**CHEAP_INT8)) if cheap else ExportOptions(latency=False)
        export(arch, "trt", precision, out=base, options=options, quiet=True)
    return folder


def session_bundles(tmp_path_factory, precisions=("fp32", "fp16", "int8")) -> dict:
    """{precision: bundle folder}, exported once per session under the session's base temporary folder."""
    base = tmp_path_factory.getbasetemp() / "trt-bundles"
    base.mkdir(exist_ok=True)
    return {p: export_bundle(base, p) for p in precisions}
