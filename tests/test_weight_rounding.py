"""Error-compensated INT8 weight rounding (``exporters.int8.rounding``, GPTQ) on real photo patches and a
real small net run by onnxruntime: the weights stay on the quantizer's own grid, the output error drops
below round-to-nearest, skipped layers are untouched, and a layer the fallback keeps float gets its
original weights back."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from exporters.onnx.runner import iter_tensors
from exporters import parity
from exporters.int8 import bias, rounding as weight_rounding
from exporters.int8.qdq import restore_originals
from exporters.onnx import quant as quant_ort
from exporters.onnx.runner import run_onnx

from int8_nets import export_module, images, se_net


def _patches(x: np.ndarray, k: int = 3) -> np.ndarray:
    """All k×k×C patches of NCHW images, one row each (what a 3x3 convolution multiplies its weights with)."""
    import torch
    import torch.nn.functional as F

    p = F.unfold(torch.from_numpy(x), k)            # N, C*k*k, L
    return p.transpose(1, 2).reshape(-1, p.shape[1]).double().numpy()


def test_gptq_round_stays_on_the_grid_and_beats_nearest_on_unseen_patches():
    x = images(24)
    fit, unseen = _patches(x[:16]), _patches(x[16:])
    rng = np.random.default_rng(0)
    w = rng.standard_normal((2, 8, fit.shape[1]))            # 2 groups of 8 output channels, 27 inputs each
    h = np.stack([fit.T @ fit] * 2)
    import torch

    q = weight_rounding.gptq_round(w, torch.from_numpy(h)).numpy()
    # the quantizer (symmetric per output channel, amax/127) reproduces every chosen integer
    flat = q.reshape(-1, q.shape[-1])
    np.testing.assert_allclose(bias.quantize_weight_like_ort(flat), flat, rtol=0, atol=1e-6 * np.abs(flat).max())
    nearest = bias.quantize_weight_like_ort(w.reshape(-1, w.shape[-1])).reshape(w.shape)

    def err(wq):
        return float(sum(((unseen @ (wq[g] - w[g]).T) ** 2).sum() for g in range(2)))

    assert err(q) < 0.5 * err(nearest), (err(q), err(nearest))


@pytest.fixture(scope="module")
def rounded(tmp_path_factory):
    d = tmp_path_factory.mktemp("rounding")
    fp32 = export_module(se_net(), d / "fp32.onnx")
    prep = d / "prep.onnx"
    quant_ort.prepare(fp32, prep)
    x = images(40)
    skip = quant_ort.default_exclusions(prep)
    report = weight_rounding.round_weights(prep, d / "rounded.onnx", lambda: [x[:16], x[16:32]], skip=skip)
    return d, prep, d / "rounded.onnx", report, skip, x


def _weights(path):
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.name: inits[n.input[1]] for n in model.graph.node
            if n.op_type in ("Conv", "Gemm", "MatMul") and len(n.input) > 1 and n.input[1] in inits}


def test_round_weights_rounds_every_eligible_layer_on_the_quantizers_grid(rounded):
    d, prep, out, report, skip, x = rounded
    before, after = _weights(prep), _weights(out)
    assert report.images == 32 and not report.nearest
    changed = [n for n in after if not np.array_equal(before[n], after[n])]
    assert sorted(changed) == sorted(n for n in before if n not in skip) and report.layers == len(changed)
    for n in skip:
        np.testing.assert_array_equal(after[n], before[n])
    rows_first = {n.name for n in onnx.load(str(out)).graph.node
                  if n.op_type == "Conv" or (n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute))}
    for n in changed:
        w = after[n] if n in rows_first else after[n].T   # one row per output channel, as the quantizer scales
        np.testing.assert_allclose(bias.quantize_weight_like_ort(w), w, rtol=0, atol=1e-6 * np.abs(w).max())
    assert report.to_dict()["method"] == "gptq"


def test_rounded_weights_cost_less_output_error_than_nearest_on_held_out_images(rounded, tmp_path):
    """Weights-only comparison (activations float): the rounded model against round-to-nearest of the same
    model, on 8 photo crops the statistics never saw."""
    d, prep, out, report, skip, x = rounded
    model = onnx.load(str(prep))
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Conv" and node.name not in skip and node.input[1] in inits:
            w = numpy_helper.to_array(inits[node.input[1]])
            inits[node.input[1]].CopyFrom(numpy_helper.from_array(bias.quantize_weight_like_ort(w), node.input[1]))
    nearest = tmp_path / "nearest.onnx"
    onnx.save(model, str(nearest))
    held_out = x[32:]
    ref = run_onnx(str(prep), held_out)
    # Gemm/MatMul are rounded too; compare the convolutions' part by keeping the classifier identical
    err_rounded = parity.compare(ref, run_onnx(str(_with_head_of(out, prep, tmp_path)), held_out))
    err_nearest = parity.compare(ref, run_onnx(str(nearest), held_out))
    assert err_rounded.sqnr_db > err_nearest.sqnr_db + 3.0, (err_rounded, err_nearest)


def _with_head_of(path, original, tmp_path):
    """``path`` with its Gemm/MatMul weights taken back from ``original`` (restore_originals does exactly that)."""
    heads = [n.name for n in onnx.load(str(original)).graph.node if n.op_type in ("Gemm", "MatMul")]
    dst = tmp_path / "rounded-convs.onnx"
    restore_originals(str(path), str(original), heads, str(dst))
    return dst


def test_layer_kept_float_gets_its_original_weights_back(rounded, tmp_path):
    d, prep, out, report, skip, x = rounded
    before = _weights(prep)
    conv = next(n for n in before if n not in skip and before[n].ndim == 4)
    dst = tmp_path / "restored.onnx"
    assert restore_originals(str(out), str(prep), [conv], str(dst)) == 1
    np.testing.assert_array_equal(_weights(dst)[conv], before[conv])


def test_iter_tensors_yields_named_intermediates_batch_by_batch(rounded):
    d, prep, out, report, skip, x = rounded
    conv_input = next(n.input[0] for n in onnx.load(str(prep)).graph.node if n.op_type == "Conv")
    seen = [(n, v[conv_input].shape) for n, v in iter_tensors(prep, [x[:5], x[5:12]], [conv_input], max_images=10)]
    assert seen == [(5, (5, 3, 32, 32)), (5, (5, 3, 32, 32))]


@pytest.mark.parametrize("scheme", ["affine", "symmetric"])
def test_torch_rounding_lands_on_the_grid_coremltools_w8a8_derives(scheme):
    """Core ML W8A8 (coremltools' LinearQuantizer): BatchNorm folded, weights rounded on the grid of PyTorch's
    per-channel min/max observer; after calibration the fake quantizer reproduces every rounded step, and
    the range-setting (pinned) weights are the only ones it still rounds itself."""
    import torch

    from exporters.coreml.w8a8 import W8A8Recipe

    from int8_nets import ArrayCalib, tiny_spec

    calib = ArrayCalib(images(32))
    recipe = W8A8Recipe(se_net(), tiny_spec(), scheme=scheme)
    recipe.prepare(lambda s: None)
    recipe.round_weights(calib, [], lambda s: None)
    prepared, info, originals = recipe.calibrate(calib, "minmax", lambda s: None).prepared, recipe.rounded, recipe.originals
    assert info["method"] == "gptq" and info["batchnorm_folded"] and info["layers"] == len(originals) >= 4
    checked = 0
    for name, mod in prepared.named_modules():
        fq = getattr(mod, "weight_fake_quant", None)
        if fq is None or name not in originals:
            continue
        w = mod.weight.detach()
        with torch.no_grad():
            fq.disable_observer()
            fq.enable_fake_quant()   # calibration ran with fake quantization off
            snapped = fq(w)
        moved = (snapped - w).abs() > 1e-6 * w.abs().amax()
        # per output channel at most the two range-setting weights (its min and max) are re-rounded
        assert int(moved.reshape(len(w), -1).sum(1).max()) <= 2, name
        assert not torch.equal(w, originals[name].to(w.dtype))   # the rounding did change the weights
        checked += 1
    assert checked == len(originals)
