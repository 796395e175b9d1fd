"""W8A8 sensitivity fallback (exporters.coreml_fallback) on a small real net: units are real module
paths, the search records its curve, and the chosen units really stay float in the Core ML program."""
from __future__ import annotations

import numpy as np

from calibration import CalibrationSet
from edgecnn import weights as weights_mod
from edgecnn import zoo
from edgecnn.validate import torch_reference
from exporters import coreml as ce
from exporters.coreml_fallback import w8a8_fallback


def test_fallback_search_and_keep_float_reach_the_program(tmp_path):
    entry = zoo.resolve("lenet5")
    model, _ = weights_mod.build(entry, "none")
    cs = CalibrationSet.create(None, entry.spec, calib_size=32, eval_size=8)
    probe = cs.array("calib", limit=16)
    ref = torch_reference(model, probe)
    # a bar no INT8 model can reach (> 100%) forces the search through its whole budget
    res = w8a8_fallback(model, entry.spec, cs.iter_batches("calib", batch_size=16), probe, ref,
                        min_agreement=1.01, max_float_fraction=0.5, rank_images=8, unit_depth=2)
    names = {n for n, _ in model.named_modules()}
    assert res["units"] >= 3 and res["probe_images"] == 16
    assert len(res["sensitivity"]) == res["units"] and all(u["unit"] in names for u in res["sensitivity"])
    assert len(res["keep_float"]) == max(1, int(0.5 * res["units"])) == len(res["curve"]) - 1
    assert [c["float_units"] for c in res["curve"]] == list(range(len(res["curve"])))
    assert res["keep_float"] == [u["unit"] for u in res["sensitivity"][:len(res["keep_float"])]]
    # all units float in simulation: closer to FP32 than the full W8A8 (the input quantizer has no owner unit)
    everything = w8a8_fallback(model, entry.spec, cs.iter_batches("calib", batch_size=16), probe, ref,
                               min_agreement=1.01, max_float_fraction=1.0, rank_images=8, unit_depth=2)
    assert everything["after"]["sqnr_db"] > everything["before"]["sqnr_db"], everything["curve"]
    # the kept units leave quantize ops out of the program
    full, _ = ce.export_coreml(model, entry.spec, tmp_path / "full", precision="int8", labels=zoo.labels_for(entry),
                               calib_batches=cs.iter_batches("calib", batch_size=16), variants=("tensor",))
    kept, recipe = ce.export_coreml(model, entry.spec, tmp_path / "kept", precision="int8",
                                    labels=zoo.labels_for(entry), calib_batches=cs.iter_batches("calib", batch_size=16),
                                    variants=("tensor",), keep_float=res["keep_float"])
    assert recipe["kept_float"] == res["keep_float"]
    q_full = full["tensor"].ops.get("quantize", 0) + full["tensor"].ops.get("constexpr_affine_dequantize", 0)
    q_kept = kept["tensor"].ops.get("quantize", 0) + kept["tensor"].ops.get("constexpr_affine_dequantize", 0)
    assert q_kept < q_full, (full["tensor"].ops, kept["tensor"].ops)
    assert np.isfinite(res["after"]["sqnr_db"])
