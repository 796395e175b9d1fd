"""The fallback's batch phase: when the SQNR phase leaves the probe's estimated accuracy drop above the bar,
ranked layers go float a batch at a time until the bar or the budget, for the ort and the trt recipe (whose
results must still pass TensorRT's Q/DQ rules). Real torch/onnxruntime on a random-init SqueezeNet 1.1
(100 classes, 64 px) on photo crops: its low-margin logits make INT8 flip top-1 on a few of 64 images,
the situation of pretrained EfficientNet-Lite0 at 224 px, in seconds."""
from __future__ import annotations

import numpy as np
import onnx
import pytest

from exporters import parity
from exporters.int8 import fallback
from exporters.tensorrt import qdq_check
from exporters.tensorrt import quant as trt

from int8_nets import export_module, images, minmax_ranges, ort_recipe, run

SIZE = 64


@pytest.fixture(scope="module")
def squeeze(tmp_path_factory):
    import torch
    import torchvision

    d = tmp_path_factory.mktemp("squeeze")
    torch.manual_seed(0)
    fp32 = export_module(torchvision.models.squeezenet1_1(num_classes=100), d / "fp32.onnx", size=SIZE)
    x = images(64, size=SIZE)
    return d, fp32, x, run(fp32, x)


def _kept_layers(res):
    return [n for s in res.steps if s["kept"] for n in ([s["layer"]] if s["phase"] == "sqnr" else s["layers"])]


def _check_batch_phase(res, base, out_path, fp32, x):
    assert res.before.estimated_drop > 0, "precondition: INT8 flips top-1 on some probe images"
    # min_gain_db is out of reach, as on EfficientNet-Lite0 where no single layer passes it: the SQNR phase
    # keeps nothing and only the batch phase can move the drop
    assert res.sqnr_phase["layers_float"] == 0
    batches = [s for s in res.steps if s["phase"] == "batch"]
    assert batches and all(s["images"] == len(x) for s in batches)
    extra = [n for n in res.excluded if n not in base]
    assert sorted(extra) == sorted(_kept_layers(res))
    assert all(res.excluded[n].startswith("batch phase") for n in extra)
    ranked = [r["node"] for r in res.sensitivity]
    order = [ranked.index(n) for s in batches for n in s["layers"]]
    assert order == sorted(order), "batches follow the sensitivity ranking"
    got = [res.before.estimated_drop] + [s["estimated_drop"] for s in batches if s["kept"]]
    assert got == sorted(got, reverse=True) and res.after.estimated_drop <= res.before.estimated_drop
    assert len(extra) <= res.budget_layers
    if res.passed:
        assert res.after.estimated_drop == 0 and res.stopped is None
    else:
        assert res.stopped in ("layer budget", "ranked layers exhausted", "time budget")
    # the written model is the one measured
    final = parity.compare(run(fp32, x), run(out_path, x))
    assert final.estimated_drop == pytest.approx(res.after.estimated_drop)
    assert final.sqnr_db == pytest.approx(res.after.sqnr_db, abs=1e-3)
    d = res.to_dict()
    assert d["after_sqnr_phase"]["layers_float"] == 0 and d["budget_layers"] == res.budget_layers
    return extra


def _space(squeeze, tmp_path, quantizer=None, speedup=None):
    """The engine's Q/DQ recipe (default: ort) on the squeeze fixture, prepared, with minmax ranges."""
    d, fp32, x, _ = squeeze
    recipe, base = ort_recipe(fp32, tmp_path, quantizer=quantizer)
    return recipe, base, recipe.space(minmax_ranges(recipe.prepared, x), base, speedup)


# min_gain_db is out of reach, as on EfficientNet-Lite0 where no single layer passes it
HALF = dict(max_float_fraction=0.5, min_gain_db=100.0, rank_images=32)
EXACT = fallback.Bar(max_drop=0.0)   # a bar the defaults miss: no flip at all


def test_ort_recipe_batch_phase_continues_past_the_sqnr_phase(squeeze, tmp_path):
    d, fp32, x, ref = squeeze
    recipe, base, sp = _space(squeeze, tmp_path)
    res = fallback.fallback(sp, x, ref, bar=EXACT, settings=fallback.Settings(**HALF, batch=3))
    assert all(s["images"] == 32 for s in res.steps if s["phase"] == "sqnr")
    _check_batch_phase(res, base, recipe.out, fp32, x)


def test_ort_recipe_without_the_batch_phase_stops_where_it_did(squeeze, tmp_path):
    d, fp32, x, ref = squeeze
    _, base, sp = _space(squeeze, tmp_path)
    res = fallback.fallback(sp, x, ref, bar=EXACT, settings=fallback.Settings(**HALF, batch_phase=False, max_seconds=15))
    assert not res.passed and res.excluded == base and res.after == res.before
    assert not [s for s in res.steps if s["phase"] == "batch"]


class _CheckedTrt(trt.TrtQuantizer):
    """The trt quantizer, recording whether every model it writes passes the Q/DQ rule checker."""

    def __init__(self):
        super().__init__()
        self.trials = []

    def quantize(self, src, dst, ranges, exclude):
        info = super().quantize(src, dst, ranges, exclude)   # proves the Q/DQ rules or raises
        self.trials.append(qdq_check.check_file(dst).ok)
        return info


def test_trt_recipe_batch_phase_keeps_layers_float_within_the_qdq_rules(squeeze, tmp_path):
    d, fp32, x, ref = squeeze
    quantizer = _CheckedTrt()
    recipe, base, sp = _space(squeeze, tmp_path, quantizer=quantizer)
    assert base == trt.default_float_layers(onnx.load(str(fp32)))
    res = fallback.fallback(sp, x, ref, bar=EXACT, settings=fallback.Settings(**HALF, batch=4))
    extra = _check_batch_phase(res, base, recipe.out, fp32, x)
    assert quantizer.trials and all(quantizer.trials), "every model the fallback tried passes the TensorRT Q/DQ rules"
    report = qdq_check.check_file(recipe.out)
    assert report.ok, report.violations
    assert set(extra) <= set(report.stats["float_layers"]) and set(extra) <= set(res.info["float_layers"])
    model = onnx.load(str(fp32))
    assert res.info["quantized_layers"] == len([n for n in model.graph.node if n.op_type in trt.QUANTIZED_OPS]) \
        - len(res.info["float_layers"])


def test_fallback_stops_at_the_speed_floor(squeeze, tmp_path):
    """Float layers cost speed (EfficientNet-Lite0: 20 of 59 float made INT8 0.78x FP32): a step that would
    take the model below ``min_speedup`` is not kept and the search stops. The speed model here is the
    share of tensors still quantized (deterministic, so the test checks the loop, not the busy box)."""
    d, fp32, x, ref = squeeze
    seen = []
    n_q = []

    def speedup(path):
        s = 2.0 * sum(n.op_type == "QuantizeLinear" for n in onnx.load(str(path)).graph.node) / n_q[0]
        seen.append(s)
        return s

    recipe, base, sp = _space(squeeze, tmp_path, speedup=speedup)
    sp.write(list(base))
    n_q.append(sum(n.op_type == "QuantizeLinear" for n in onnx.load(recipe.out).graph.node))
    res = fallback.fallback(sp, x, ref, bar=EXACT, settings=fallback.Settings(**HALF, batch=3, min_speedup=1.999))
    assert seen and all(s < 1.999 for s in seen), "every float layer removes Q/DQ pairs"
    assert res.stopped == "speed floor" and res.excluded == base
    last = res.steps[-1]
    assert not last["kept"] and last["speedup_vs_fp32"] < 1.999
    assert len([s for s in res.steps if "speedup_vs_fp32" in s]) == 1, "the search stops at the first too-slow step"


def test_near_tie_flips_are_counted_and_named_in_the_int8_reason():
    """A flip whose FP32 top-1/top-2 gap is under twice the image's logit error is a near-tie; a flip on a
    clear winner is not. Both count against the gate; the reason says how many were near-ties."""
    ref = np.zeros((4, 10))
    ref[:, 0] = 5.0
    ref[0, 1] = 4.99   # image 0: a near-tie between classes 0 and 1
    out = ref.copy()
    out[0, 1] += 0.05  # a small error flips it
    out[1, 3] = 5.5    # image 1: an error on one logit flips a clear winner (gap 5 > 2 x RMS error 1.74)
    assert parity.near_tie_flips(ref, out).tolist() == [True, False, False, False]
    p = parity.apply_gate(parity.compare(ref, out), "int8", trained=True, gate=parity.Gate(min_agreement=0.99))
    assert (p.flips, p.flips_near_tie, p.passed) == (2, 1, False)
    assert "2 flips, 1 of them near-ties" in p.reason
    assert fallback.probe_record(parity.compare(ref, out))["flips_near_tie"] == 1
    clean = parity.apply_gate(parity.compare(ref, ref), "int8", trained=True, gate=parity.Gate(min_agreement=0.99))
    assert (clean.flips, clean.flips_near_tie, clean.passed) == (0, 0, True)


def test_agreement_carries_its_wilson_interval_on_both_sides():
    """92 of 96 is "95.8%", but the count is as likely from ~90-98%: the manifest and the reason say so."""
    from scipy.stats import binomtest

    for hits, n in ((92, 96), (96, 96), (0, 10), (1, 1)):
        ours = parity.wilson_interval(hits, n)
        scipy_ci = binomtest(hits, n).proportion_ci(confidence_level=0.95, method="wilson")
        assert ours == pytest.approx([scipy_ci.low, scipy_ci.high], abs=2e-4), (hits, n)
    rng = np.random.default_rng(3)
    ref = rng.standard_normal((96, 10))
    out = ref.copy()
    out[:4] = ref[:4] * -1                                        # 4 flips
    p = parity.apply_gate(parity.compare(ref, out), "int8", trained=True, gate=parity.Gate(min_agreement=0.99))
    assert p.flips == 4 and p.top1_agreement_ci95 == pytest.approx([0.8977, 0.9837], abs=1e-4)
    assert "of 96 images (95% interval 89.8%–98.4%" in p.reason
    assert p.to_dict()["top1_agreement_ci95"] == [0.8977, 0.9837]
