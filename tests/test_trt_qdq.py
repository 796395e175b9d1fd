"""The ``trt`` Q/DQ recipe and the TensorRT rule checker, on real onnxruntime quantization.

A small network with every pattern the focus nets have (stem conv, a residual block, a squeeze-and-
excitation gate, a Linear classifier) keeps the default run fast; the focus nets run in ``slow``.
Negative tests break one rule at a time in a real recipe output and check that exactly that rule is named,
with its severity: an error (TensorRT's parser refuses the model) or a warning (slower than it could be).
"""
from __future__ import annotations

import json
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

from calibration import InputSpec
from calibration.ranges import compute_ranges
from exporters.errors import ExportError
from exporters.onnx.export import export_onnx
from exporters.tensorrt import qdq_check
from exporters.tensorrt.quant import default_float_layers, quantize_trt, se_gate_layers

torch = pytest.importorskip("torch")
nn = torch.nn

SPEC = InputSpec(height=32, width=32, resize=32)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1), nn.BatchNorm2d(32), nn.Hardswish())
        self.dw = nn.Sequential(nn.Conv2d(32, 32, 3, 1, 1, groups=32), nn.BatchNorm2d(32), nn.Hardswish())
        self.se_fc1, self.se_fc2 = nn.Conv2d(32, 8, 1), nn.Conv2d(8, 32, 1)
        self.project = nn.Sequential(nn.Conv2d(32, 16, 1), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        s = nn.functional.hardsigmoid(self.se_fc2(torch.relu(self.se_fc1(nn.functional.adaptive_avg_pool2d(y, 1)))))
        x = x + self.project(y * s)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    torch.manual_seed(0)
    model = Toy().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, as trained nets have
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    fp32 = d / "toy.onnx"
    export_onnx(model, SPEC, fp32, opset=17)
    rng = np.random.default_rng(0)
    calib = rng.standard_normal((24, 3, 32, 32)).astype(np.float32)
    evals = rng.standard_normal((16, 3, 32, 32)).astype(np.float32)
    out = d / "toy.trt.onnx"
    ranges = compute_ranges(fp32, [calib], method="minmax", cache_dir=False)
    info = quantize_trt(fp32, out, ranges)
    return {"dir": d, "fp32": fp32, "qdq": out, "info": info, "ranges": ranges, "calib": calib, "eval": evals}


def _run(path, x):
    return ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def _rules(model):
    return {v.rule for v in qdq_check.check_model(model).violations}


def _only(model, rule):
    """The findings of ``rule`` in ``model``; asserts the report's verdict follows that rule's severity."""
    report = qdq_check.check_model(model)
    found = [v for v in report.violations if v.rule == rule]
    assert found, report.summary()
    severity = qdq_check.RULES[rule].severity
    assert all(v.severity == severity for v in found)
    if severity == qdq_check.WARNING:
        assert report.ok or any(v.rule != rule for v in report.errors), report.summary()
    else:
        assert not report.ok and found[0] in report.errors
        assert found[0].to_dict()["cite"].startswith("TensorRT")
    return found


# ---------------------------------------------------------------------------------------------- positive
def test_recipe_output_passes_every_rule_and_runs(toy):
    report = qdq_check.check_file(toy["qdq"])
    assert report.ok, report.summary()
    assert report.stats["residual_adds"] == 1
    info = toy["info"]
    assert info["checker"]["passed"] and info["opset"] == 17
    assert info["fixes"]["residual_add_conv_branch_unquantized"] == 1     # what onnxruntime left, fixed
    # known-hard layers stay float by default: the SE gate's two convs and the Linear classifier
    assert len(info["float_layers"]) == 3 and report.stats["quantized_layers"] == 4
    ref, out = _run(toy["fp32"], toy["eval"]), _run(toy["qdq"], toy["eval"])
    sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum())
    assert np.isfinite(out).all() and sqnr > 15, sqnr


def test_recipe_model_properties_directly(toy):
    """Independent of the checker: INT8 zero points all 0, weights FP32 behind Q->DQ, only default-domain ops."""
    m = onnx.load(toy["qdq"])
    inits = {i.name: i for i in m.graph.initializer}
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear"]
    assert qs
    for q in qs:
        zp = inits[q.input[2]]
        assert zp.data_type == onnx.TensorProto.INT8 and not numpy_helper.to_array(zp).any()
    weight_qs = [q for q in qs if q.input[0] in inits]
    assert weight_qs and all(inits[q.input[0]].data_type == onnx.TensorProto.FLOAT for q in weight_qs)
    assert {o.domain for o in m.opset_import} <= {"", "ai.onnx"}
    assert all(n.domain in ("", "ai.onnx") for n in m.graph.node)


def test_se_gate_and_classifier_detection(toy):
    m = onnx.load(toy["fp32"])
    se = se_gate_layers(m)
    assert len(se) == 2 and all(n.endswith("Conv") for n in se)
    assert sum(1 for r in default_float_layers(m).values() if "classifier" in r) == 1


def test_precomputed_ranges_reproduce_the_model_and_exclusions_stay_valid(toy, tmp_path):
    ranges = toy["ranges"]
    again = tmp_path / "again.onnx"
    quantize_trt(toy["fp32"], again, ranges)
    a, b = onnx.load(toy["qdq"]), onnx.load(again)
    assert [n.op_type for n in a.graph.node] == [n.op_type for n in b.graph.node]
    np.testing.assert_array_equal(_run(toy["qdq"], toy["eval"]), _run(again, toy["eval"]))
    # excluding the first conv of the residual block (its input is also the quantized skip): onnxruntime routes
    # it through the skip's Q/DQ pair, which would leave it half quantized; the recipe feeds it in float
    m = onnx.load(toy["fp32"])
    expand = next(n.name for n in m.graph.node if n.op_type == "Conv" and "expand" in n.name)
    excl = tmp_path / "excl.onnx"
    info = quantize_trt(toy["fp32"], excl, ranges, [expand])
    assert expand in info["float_layers"] and qdq_check.check_file(excl).ok
    with pytest.raises(ExportError, match="not in the model"):
        quantize_trt(toy["fp32"], tmp_path / "x.onnx", ranges, ["no_such_node"])


def test_calibration_writes_nothing_into_the_current_folder(toy, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for method in ("minmax", "percentile", "entropy"):
        batches = [toy["calib"][:4], toy["calib"][4:8]]
        ranges = compute_ranges(toy["fp32"], batches, method=method, cache_dir=False)
        assert ranges.images == 8 and "input" in ranges.ranges
        assert all(np.isfinite(v).all() for v in ranges.ranges.values())
    quantize_trt(toy["fp32"], tmp_path / "sub" / "q.onnx", toy["ranges"])
    assert sorted(os.listdir(tmp_path)) == ["sub"]


# ---------------------------------------------------------------------------------------------- negative
def _load(toy):
    return onnx.load(toy["qdq"])


def _first(m, op, pred=lambda n: True):
    return next(n for n in m.graph.node if n.op_type == op and pred(n))


def _init(m, name):
    return next(i for i in m.graph.initializer if i.name == name)


def _activation_q(m):
    inits = {i.name for i in m.graph.initializer}
    return _first(m, "QuantizeLinear", lambda n: n.input[0] not in inits)


def _weight_dq(m):
    inits = {i.name for i in m.graph.initializer}
    qw = {n.output[0] for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits}
    return _first(m, "DequantizeLinear", lambda n: n.input[0] in qw)


def test_onnxruntime_alone_breaks_the_residual_rule(toy, tmp_path):
    """The motivation, measured: quantize_static with TensorRT-style options still quantizes both Add inputs."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    class Reader:
        def __init__(self):
            self.it = iter([{"input": toy["calib"][i:i + 8]} for i in range(0, 24, 8)])

        def get_next(self):
            return next(self.it, None)

    raw = tmp_path / "raw.onnx"
    quantize_static(toy["fp32"], raw, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "Gemm", "Add"],
                    per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                    extra_options={"ActivationSymmetric": True, "DedicatedQDQPair": True, "AddQDQPairToWeight": True,
                                   "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm", "Add"], "QuantizeBias": False})
    report = qdq_check.check_file(raw)
    bad = [v for v in report.violations if v.rule == "residual-add"]
    assert len(bad) == 1 and "Add" in bad[0].node and bad[0].tensor
    assert bad[0].severity == qdq_check.WARNING and bad[0] in report.warnings     # slower, not refused


def test_uint8_zero_point_is_named(toy):
    m = _load(toy)
    q = _activation_q(m)
    zp = _init(m, q.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.array(3, dtype=np.uint8), zp.name))
    vs = qdq_check.check_model(m).violations
    assert any(v.rule == "int8-only" and v.node == q.name and v.tensor == zp.name for v in vs)


def test_missing_zero_point_means_uint8(toy):
    m = _load(toy)
    q = _activation_q(m)
    del q.input[2]
    assert "int8-only" in _rules(m)


def test_nonzero_zero_point(toy):
    m = _load(toy)
    q = _activation_q(m)
    zp = _init(m, q.input[2])
    zp.CopyFrom(numpy_helper.from_array(np.array(5, dtype=np.int8), zp.name))
    assert "zero-point-zero" in _rules(m)


def test_per_channel_activation(toy):
    m = _load(toy)
    q = _activation_q(m)
    sc = _init(m, q.input[1])
    sc.CopyFrom(numpy_helper.from_array(np.full(3, numpy_helper.to_array(sc), np.float32), sc.name))
    assert "activation-per-tensor" in _rules(m)


def test_per_channel_scale_count_must_match_its_axis(toy):
    m = _load(toy)
    dq = _weight_dq(m)
    for a in dq.attribute:
        if a.name == "axis":
            a.i = 1                                   # the scales are for axis 0: wrong count for axis 1
    vs = _only(m, "scale-count")
    assert vs[0].node == dq.name


def test_per_channel_weights_on_another_axis_are_a_warning():
    """Per-channel scales on axis 1 with one scale per element of that axis: TensorRT imports it (valid),
    but its INT8 kernels fuse output-channel (axis 0) scales."""
    w = np.random.default_rng(0).standard_normal((4, 6, 1, 1)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.full(6, 0.01, np.float32), "ws"),
             numpy_helper.from_array(np.zeros(6, np.int8), "wz"), numpy_helper.from_array(np.float32(0.02), "xs"),
             numpy_helper.from_array(np.int8(0), "xz")]
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"], name="qx"),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"], name="dqx"),
             helper.make_node("QuantizeLinear", ["w", "ws", "wz"], ["wq"], name="qw", axis=1),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], name="dqw", axis=1),
             helper.make_node("Conv", ["xd", "wd"], ["y"], name="conv")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 6, 4, 4])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4, 4, 4])], inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    vs = _only(m, "weight-axis0")
    assert {v.node for v in vs} == {"qw", "dqw"} and qdq_check.check_model(m).ok


def test_int8_weight_initializer_instead_of_fp32_behind_qdq(toy):
    m = _load(toy)
    dq = _weight_dq(m)
    q = _first(m, "QuantizeLinear", lambda n: n.output[0] == dq.input[0])
    w = numpy_helper.to_array(_init(m, q.input[0]))
    scale = numpy_helper.to_array(_init(m, q.input[1])).reshape(-1, *([1] * (w.ndim - 1)))
    m.graph.initializer.append(numpy_helper.from_array(np.round(w / scale).astype(np.int8), "w_int8"))
    dq.input[0] = "w_int8"
    vs = _only(m, "weight-fp32-qdq")                   # valid; what TensorRT 8.x folds is the FP32 form
    assert vs[0].node == dq.name and vs[0].tensor == "w_int8"


def test_shared_dq_output(toy):
    m = _load(toy)
    g = qdq_check.Graph(m)
    dq = _weight_dq(m)
    user = g.consumers[dq.output[0]][0]
    other = _first(m, "Conv", lambda n: n is not user)
    other.input[1] = dq.output[0]
    vs = _only(m, "dedicated-dq")
    assert vs[0].node == dq.name


def test_stray_opset_import_foreign_op_and_opset(toy):
    m = _load(toy)
    m.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _only(m, "opset-imports")                          # unused: a warning
    relu = _first(m, "Relu")
    relu.domain = "com.microsoft"                      # now used by a node TensorRT has no importer for
    _only(m, "foreign-op")
    m2 = _load(toy)
    m2.opset_import[0].version = 19
    _only(m2, "opset")


def test_half_quantized_conv_and_int32_bias(toy):
    m = _load(toy)
    g = qdq_check.Graph(m)
    conv = _first(m, "Conv", lambda n: g.is_dequantized(n.input[1]))
    conv.input[1] = g.source(conv.input[1])
    vs = _only(m, "half-quantized")                    # builds: that layer runs in float
    assert vs[0].node == conv.name
    m = _load(toy)
    g = qdq_check.Graph(m)
    conv = _first(m, "Conv", lambda n: g.is_dequantized(n.input[1]) and len(n.input) > 2)
    b = numpy_helper.to_array(_init(m, conv.input[2]))
    m.graph.initializer.extend([numpy_helper.from_array(np.zeros_like(b, dtype=np.int32), "b_i32"),
                                numpy_helper.from_array(np.float32(1e-3), "b_scale")])
    m.graph.node.append(helper.make_node("DequantizeLinear", ["b_i32", "b_scale"], ["b_deq"], name="bias_dq"))
    conv.input[2] = "b_deq"
    _only(m, "bias-fp32")
    assert "int8-only" in _rules(m)


def test_q_dq_scale_mismatch_and_no_int8_at_all(toy):
    m = _load(toy)
    q = _activation_q(m)
    dq = qdq_check.Graph(m).consumers[q.output[0]][0]
    sc = _init(m, dq.input[1])
    m.graph.initializer.append(numpy_helper.from_array(numpy_helper.to_array(sc) * 2, "other_scale"))
    dq.input[1] = "other_scale"
    _only(m, "qdq-same-params")                       # TensorRT requantizes: slower, not refused
    _only(onnx.load(toy["fp32"]), "has-int8")         # a float model builds as a float engine


def test_severities_are_declared_and_errors_cite_tensorrt():
    errors = {k for k, r in qdq_check.RULES.items() if r.severity == qdq_check.ERROR}
    warnings = {k for k, r in qdq_check.RULES.items() if r.severity == qdq_check.WARNING}
    assert errors == {"opset", "foreign-op", "onnx-ops", "int8-only", "zero-point-zero", "scale",
                      "activation-per-tensor", "scale-count", "qdq-pair", "bias-fp32"}
    assert warnings == {"opset-imports", "weight-axis0", "weight-fp32-qdq", "qdq-same-params", "dedicated-dq",
                        "half-quantized", "residual-add", "has-int8"}
    assert all(qdq_check.RULES[k].cite.startswith("TensorRT") for k in errors)
    text = qdq_check.rules_text()
    assert text.index("errors (refused by TensorRT's ONNX parser)") < text.index("warnings (builds, but slower")


def test_check_qdq_cli(toy, tmp_path, capsys):
    from edgecnn.cli import main

    assert main(["check-qdq", str(toy["qdq"])]) == 0
    assert "PASS" in capsys.readouterr().out
    m = _load(toy)
    _activation_q(m).input.pop()   # drop a zero point: an error
    bad = tmp_path / "bad.onnx"
    onnx.save(m, bad)
    assert main(["check-qdq", str(bad)]) == 5
    out = capsys.readouterr()
    assert "errors:\n  [int8-only]" in out.out and "INT8 quantization only" in out.out and "refuse" in out.err
    slow = _load(toy)
    g = qdq_check.Graph(slow)
    dq = _weight_dq(slow)
    _first(slow, "Conv", lambda n: n is not g.consumers[dq.output[0]][0]).input[1] = dq.output[0]   # shared DQ
    warned = tmp_path / "slow.onnx"
    onnx.save(slow, warned)
    assert main(["check-qdq", str(warned), "--json"]) == 0           # warnings only: TensorRT builds it
    report = json.loads(capsys.readouterr().out)
    assert report["passed"] and not report["errors"] and report["warnings"][0]["rule"] == "dedicated-dq"
    assert report["warnings"][0]["severity"] == "warning"


# ---------------------------------------------------------------------------------------------- focus nets
FOCUS = ["squeezenet1_0", "squeezenet1_1", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small",
         "mobilenet_v3_large", "efficientnet_b0", "efficientnet_lite0"]


@pytest.mark.slow
@pytest.mark.parametrize("arch", FOCUS)
def test_focus_net_trt_recipe_passes_the_checker_and_runs(arch, tmp_path):
    from calibration import CalibrationSet
    from edgecnn import weights, zoo

    entry = zoo.resolve(arch)
    model, info = weights.build(entry, "auto")
    cs = CalibrationSet.create(None, entry.spec, calib_size=32, eval_size=16)
    if info.source == "random":
        weights.reestimate_batchnorm(model, cs.iter_batches("calib", batch_size=16))
    fp32, qdq = tmp_path / "m.onnx", tmp_path / "m.trt.onnx"
    export_onnx(model, entry.spec, fp32, opset=17)
    qinfo = quantize_trt(fp32, qdq, compute_ranges(fp32, [cs.array("calib")], method="minmax", cache_dir=False))
    report = qdq_check.check_file(qdq)
    assert report.ok, report.summary()
    assert report.stats["quantized_layers"] >= 10
    x = cs.array("eval")
    out = _run(qdq, x)
    assert out.shape == (len(x), 1000) and np.isfinite(out).all()
    assert qinfo["opset"] == 17
