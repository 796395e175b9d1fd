"""A layer the fallback keeps float is really float in the ort recipe: no Q/DQ on its activation inputs
and outputs (onnxruntime's ``nodes_to_exclude`` alone leaves them quantized by the neighbours), the
ReLU6/ReLU the quantizer had folded into the QuantizeLinear is put back, and in the limit (every layer
float) the INT8 model's logit error all but vanishes. Real torch/onnxruntime on a small MobileNetV2 (ReLU6
= Clip, depthwise, residual Add) on photo crops, in seconds."""
from __future__ import annotations

import os

import numpy as np
import onnx
import pytest

from calibration.ranges import compute_ranges
from exporters import parity
from exporters.onnx import quant as quant_ort
from exporters.onnx.runner import run_onnx

from int8_nets import export_module, images

SIZE = 32


@pytest.fixture(scope="module")
def mnv2(tmp_path_factory):
    import torch
    import torchvision

    d = tmp_path_factory.mktemp("floatlayers")
    torch.manual_seed(0)
    net = torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35)
    fp32 = export_module(net, d / "fp32.onnx", size=SIZE)
    prep = d / "prep.onnx"
    quant_ort.prepare(fp32, prep)
    x = images(32, size=SIZE)
    ranges = compute_ranges(prep, [x[i:i + 16] for i in range(0, len(x), 16)], "minmax")
    return d, fp32, prep, x, ranges, run_onnx(fp32, x)


def _quantized_tensors(path):
    return {n.input[0] for n in onnx.load(os.fspath(path)).graph.node if n.op_type == "QuantizeLinear"}


def test_float_layer_has_float_inputs_and_outputs_and_keeps_its_relu6(mnv2):
    d, fp32, prep, x, ranges, ref = mnv2
    model = onnx.load(os.fspath(prep))
    cons = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    # a Conv -> Clip (ReLU6) in the middle of the net whose input is also a Clip output
    prod = {o: n for n in model.graph.node for o in n.output}
    layer = next(n for n in model.graph.node if n.op_type == "Conv" and prod.get(n.input[0]) is not None
                 and prod[n.input[0]].op_type == "Clip" and [u.op_type for u in cons[n.output[0]]] == ["Clip"])
    clip_out = cons[layer.output[0]][0].output[0]
    plain = d / "plain.onnx"
    quant_ort.quantize(prep, plain, ranges, [], float_tensors=False)
    assert {layer.input[0], clip_out} <= _quantized_tensors(plain)
    # onnxruntime's node exclusion alone: the node's weights are float, its activations still quantized
    excl = d / "excluded.onnx"
    quant_ort.quantize(prep, excl, ranges, [layer.name], float_tensors=False)
    assert {layer.input[0], clip_out} <= _quantized_tensors(excl)
    # a float layer: no Q/DQ on its input nor on its (ReLU6) output, and the ReLU6 is back in the graph
    out = d / "float.onnx"
    info = quant_ort.quantize(prep, out, ranges, [layer.name])
    assert layer.input[0] in info["float_tensors"] and clip_out in info["float_tensors"]
    assert not ({layer.input[0], clip_out} & _quantized_tensors(out))
    q = onnx.load(os.fspath(out))
    clips = [n for n in q.graph.node if n.op_type == "Clip" and n.output[0] == clip_out]
    assert len(clips) == 1
    qprod = {o: n for n in q.graph.node for o in n.output}
    assert qprod[clips[0].input[0]].name == layer.name
    onnx.checker.check_model(q)
    # and the float layer does not make the model worse (a lost ReLU6 would: unbounded activations)
    m_plain = parity.compare(ref, run_onnx(plain, x))
    m_float = parity.compare(ref, run_onnx(out, x))
    assert m_float.sqnr_db > m_plain.sqnr_db - 1.0, (m_plain, m_float)


def test_in_the_limit_float_layers_remove_the_int8_error(mnv2):
    """All layers float must give (almost) the FP32 model: the fallback can always reach its gate at some
    speed cost. With node exclusion only (weights float, activations still rounded) it cannot."""
    d, fp32, prep, x, ranges, ref = mnv2
    cands = quant_ort.quantizable_nodes(prep)
    int8 = parity.compare(ref, run_onnx(_q(d, prep, ranges, [], True), x))
    nodes_only = parity.compare(ref, run_onnx(_q(d, prep, ranges, cands, False), x))
    half = parity.compare(ref, run_onnx(_q(d, prep, ranges, cands[: len(cands) // 2], True), x))
    every = parity.compare(ref, run_onnx(_q(d, prep, ranges, cands, True), x))
    assert every.sqnr_db > 45 and every.top1_agreement == 1.0, every
    assert every.sqnr_db > nodes_only.sqnr_db + 10, (nodes_only, every)
    assert int8.sqnr_db < half.sqnr_db < every.sqnr_db, (int8, half, every)


def _q(d, prep, ranges, exclude, float_tensors):
    out = d / f"q{len(exclude)}-{int(float_tensors)}.onnx"
    quant_ort.quantize(prep, out, ranges, exclude, float_tensors=float_tensors)
    return out


def _requantized_by_onnxruntime(path, layer):
    """Whether onnxruntime's session-time graph optimizer puts INT8 weights back on ``layer``: a Conv that
    reads a DequantizeLinear and writes a QuantizeLinear with float weights gets its weights quantized by
    onnxruntime itself (measured on EfficientNet-Lite0: logit SQNR 14.4 dB with optimizations off, 4.5 dB
    at ORT_ENABLE_BASIC, with identical weights)."""
    import tempfile

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        opts.optimized_model_filepath = os.path.join(tmp, "basic.onnx")
        opts.log_severity_level = 3
        ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
        g = onnx.load(opts.optimized_model_filepath).graph
    prod = {o: n for n in g.node for o in n.output}
    node = next(n for n in g.node if n.name == layer)
    return node.op_type == "Conv" and prod.get(node.input[1]) is not None \
        and prod[node.input[1]].op_type == "DequantizeLinear"


def test_onnxruntime_does_not_requantize_a_float_layer(mnv2):
    """Why node exclusion alone never made EfficientNet-Lite0 better: between a DequantizeLinear and a
    QuantizeLinear, the excluded Conv's float weights are quantized again by onnxruntime at session time.
    A float layer without Q/DQ around it stays float."""
    d, fp32, prep, x, ranges, ref = mnv2
    model = onnx.load(os.fspath(prep))
    excl, flt = d / "excl.onnx", d / "float.onnx"
    # a Conv whose weights and bias both stay float initializers when excluded (the simplifier shares some
    # zero biases between Convs, and a shared bias keeps its DequantizeLinear, which stops the rewrite)
    for conv in [n for n in model.graph.node if n.op_type == "Conv"][1:]:
        quant_ort.quantize(prep, excl, ranges, [conv.name], float_tensors=False)
        g = onnx.load(os.fspath(excl)).graph
        inits = {i.name for i in g.initializer}
        node = next(n for n in g.node if n.name == conv.name)
        if len(node.input) > 2 and node.input[1] in inits and node.input[2] in inits:
            break
    else:
        pytest.fail("no Conv with a float bias of its own in the test net")
    quant_ort.quantize(prep, flt, ranges, [conv.name])
    assert _requantized_by_onnxruntime(excl, conv.name)
    assert not _requantized_by_onnxruntime(flt, conv.name)
