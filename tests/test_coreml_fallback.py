"""The W8A8 recipe's fallback space (exporters.coreml.w8a8.UnitSpace) on a small real net: units are real
module paths, the search through the INT8 engine's fallback records its steps, and the units it keeps float
really stay float in the Core ML program."""
from __future__ import annotations

import numpy as np

from calibration import CalibrationSet
from edgecnn import weights as weights_mod
from edgecnn import zoo
from exporters.coreml import export as ce
from exporters.coreml.w8a8 import W8A8Recipe
from exporters.int8 import fallback as fb


def _quantize_ops(info) -> int:
    return info.ops.get("quantize", 0) + info.ops.get("constexpr_affine_dequantize", 0)


def test_fallback_search_and_float_units_reach_the_program(tmp_path):
    entry = zoo.resolve("lenet5")
    model, _ = weights_mod.build(entry, "none")
    cs = CalibrationSet.create(None, entry.spec, calib_size=32, eval_size=8)
    probe = cs.array("calib", limit=16)
    recipe = W8A8Recipe(model, entry.spec, rounding="nearest")
    recipe.prepare(lambda s: None)
    ranges = recipe.calibrate(cs, "minmax", lambda s: None)
    space = recipe.space(ranges, {}, None)
    names = {n for n, _ in recipe.model.named_modules()}
    assert len(space.candidates) >= 3 and set(space.candidates) <= names
    # a bar no INT8 model can reach forces the search through its whole budget
    result = fb.fallback(space, probe, recipe.reference(probe), bar=fb.Bar(min_agreement=1.0, min_sqnr_db=999.0),
                         settings=fb.Settings(max_float_fraction=0.5, rank_images=8, max_seconds=60))
    assert not result.passed and result.budget_layers == max(1, int(0.5 * len(space.candidates)))
    assert len(result.sensitivity) == len(space.candidates)
    assert {row["node"] for row in result.sensitivity} == set(space.candidates)
    assert 0 < len(result.excluded) <= result.budget_layers and set(result.excluded) <= set(space.candidates)
    assert result.after.sqnr_db > result.before.sqnr_db, result.steps
    # the float units leave quantize ops out of the program
    labels = zoo.labels_for(entry)
    full, _ = ce.export_coreml(model, entry.spec, tmp_path / "full", precision="int8", labels=labels,
                               quantized=recipe.finalize([])[0], variants=("tensor",))
    kept_module, info = recipe.finalize(list(result.excluded))
    kept, record = ce.export_coreml(model, entry.spec, tmp_path / "kept", precision="int8", labels=labels,
                                    quantized=kept_module, quantized_info=info, variants=("tensor",))
    assert record["kept_float"] == list(result.excluded)
    assert _quantize_ops(kept["tensor"]) < _quantize_ops(full["tensor"]), (full["tensor"].ops, kept["tensor"].ops)
    assert np.isfinite(result.after.sqnr_db)
