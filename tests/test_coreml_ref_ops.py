"""Op-by-op check of the Core ML reference executor against PyTorch and against coremltools' own MIL semantics.

Each supported MIL op is put into a real ML Program with coremltools' MIL builder, saved as an
``.mlpackage`` (weights in weights/weight.bin), loaded back by the executor and compared with the
same computation done by torch, and, for the ops coremltools defines a ``value_inference`` for (its own NumPy
statement of the op), with that. Programs are FP32 so the comparison is tight; FP16 storage rounding
has its own test. The edge cases each test names are in its inputs: exact ties at thresholded_relu's alpha,
quantize inputs exactly halfway between two steps, max_pool windows that ceil mode cuts short. A program with
an op the executor does not implement must fail when loaded. The FP16-accumulation mode is checked against a
plain loop over the same chunks, and on a squeeze-excite-sized mean.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from exporters.coreml.export import import_coremltools
from exporters.coreml.mil_reference import CONSTEXPR_OPS, OPS, CoreMLProgram, UnsupportedOpError, supported_ops
from exporters.coreml.runner import to_pixels
from exporters.errors import UnsupportedOp

ct = import_coremltools()
from coremltools.converters.mil import Builder as mb  # noqa: E402
from coremltools.converters.mil.mil import types  # noqa: E402

RNG = np.random.default_rng(0)
X = RNG.standard_normal((1, 4, 9, 9)).astype(np.float32)          # NCHW feature map
V = RNG.standard_normal((2, 6)).astype(np.float32)                # a small matrix
W_CONV = RNG.standard_normal((6, 2, 3, 3)).astype(np.float32)     # groups=2
W_DW = RNG.standard_normal((4, 1, 3, 3)).astype(np.float32)
B6 = RNG.standard_normal(6).astype(np.float32)
W_LIN = RNG.standard_normal((5, 6)).astype(np.float32)
Q8 = RNG.integers(-128, 127, size=(6, 4), dtype=np.int8)
QSCALE = np.abs(RNG.standard_normal(6)).astype(np.float32) + 0.05
BW = RNG.integers(-128, 127, size=(4, 8), dtype=np.int8)
BW_SCALE = (np.abs(RNG.standard_normal((4, 2))) + 0.1).astype(np.float32)   # blocks of 4 along axis 1
BW_OFF = RNG.integers(-3, 3, size=(4, 2), dtype=np.int8)
MEAN, VAR, GAMMA, BETA = (RNG.standard_normal(4).astype(np.float32), (np.abs(RNG.standard_normal(4)) + .5).astype(np.float32),
                          RNG.standard_normal(4).astype(np.float32), RNG.standard_normal(4).astype(np.float32))

tx, tv = torch.from_numpy(X), torch.from_numpy(V)


def _dq_ref(q, scale, zp, axis_shape):
    return (q.astype(np.float32) - zp) * scale.reshape(axis_shape)


# op name -> (builder over (x, v) returning one var, torch/numpy reference)
CASES = {
    "conv": (lambda x, v: mb.conv(x=x, weight=W_CONV, bias=B6, strides=[2, 1], pad_type="custom", pad=[1, 0, 2, 1],
                                  dilations=[1, 2], groups=2),
             lambda: F.conv2d(F.pad(tx, (2, 1, 1, 0)), torch.from_numpy(W_CONV), torch.from_numpy(B6), stride=[2, 1],
                              dilation=[1, 2], groups=2)),
    "conv_same_depthwise": (lambda x, v: mb.conv(x=x, weight=W_DW, strides=[2, 2], pad_type="same", groups=4),
                            lambda: F.conv2d(F.pad(tx, (1, 1, 1, 1)), torch.from_numpy(W_DW), stride=2, groups=4)),
    "linear": (lambda x, v: mb.linear(x=v, weight=W_LIN, bias=B6[:5]),
               lambda: F.linear(tv, torch.from_numpy(W_LIN), torch.from_numpy(B6[:5]))),
    "matmul": (lambda x, v: mb.matmul(x=v, y=W_LIN, transpose_y=True), lambda: tv @ torch.from_numpy(W_LIN).T),
    "max_pool": (lambda x, v: mb.max_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="valid", ceil_mode=True),
                 lambda: F.max_pool2d(tx, 3, 2, ceil_mode=True)),
    "avg_pool": (lambda x, v: mb.avg_pool(x=x, kernel_sizes=[3, 3], strides=[2, 2], pad_type="custom", pad=[1, 1, 1, 1],
                                          exclude_padding_from_average=True),
                 lambda: F.avg_pool2d(tx, 3, 2, 1, count_include_pad=False)),
    "batch_norm": (lambda x, v: mb.batch_norm(x=x, mean=MEAN, variance=VAR, gamma=GAMMA, beta=BETA, epsilon=1e-3),
                   lambda: F.batch_norm(tx, torch.from_numpy(MEAN), torch.from_numpy(VAR), torch.from_numpy(GAMMA),
                                        torch.from_numpy(BETA), eps=1e-3)),
    "add": (lambda x, v: mb.add(x=x, y=np.float32(0.5) * np.ones((1, 4, 1, 1), np.float32)), lambda: tx + 0.5),
    "sub": (lambda x, v: mb.sub(x=x, y=MEAN.reshape(1, 4, 1, 1)), lambda: tx - torch.from_numpy(MEAN).view(1, 4, 1, 1)),
    "mul": (lambda x, v: mb.mul(x=x, y=x), lambda: tx * tx),
    "real_div": (lambda x, v: mb.real_div(x=x, y=VAR.reshape(1, 4, 1, 1)), lambda: tx / torch.from_numpy(VAR).view(1, 4, 1, 1)),
    "maximum": (lambda x, v: mb.maximum(x=x, y=np.float32(0.1)), lambda: torch.clamp(tx, min=0.1)),
    "minimum": (lambda x, v: mb.minimum(x=x, y=np.float32(0.1)), lambda: torch.clamp(tx, max=0.1)),
    "pow": (lambda x, v: mb.pow(x=mb.mul(x=x, y=x), y=np.float32(1.5)), lambda: (tx * tx) ** 1.5),
    "relu": (lambda x, v: mb.relu(x=x), lambda: F.relu(tx)),
    "relu6": (lambda x, v: mb.relu6(x=mb.mul(x=x, y=np.float32(5.0))), lambda: F.relu6(tx * 5)),
    "clip": (lambda x, v: mb.clip(x=x, alpha=np.float32(-0.5), beta=np.float32(0.7)), lambda: torch.clamp(tx, -0.5, 0.7)),
    "leaky_relu": (lambda x, v: mb.leaky_relu(x=x, alpha=np.float32(0.1)), lambda: F.leaky_relu(tx, 0.1)),
    "sigmoid": (lambda x, v: mb.sigmoid(x=x), lambda: torch.sigmoid(tx)),
    "silu": (lambda x, v: mb.silu(x=x), lambda: F.silu(tx)),
    "sigmoid_hard": (lambda x, v: mb.sigmoid_hard(x=x, alpha=np.float32(1 / 6), beta=np.float32(0.5)),
                     lambda: F.hardsigmoid(tx)),
    "thresholded_relu": (lambda x, v: mb.thresholded_relu(x=x, alpha=np.float32(0.3)),
                         lambda: torch.where(tx >= 0.3, tx, torch.zeros(()))),
    "tanh": (lambda x, v: mb.tanh(x=x), lambda: torch.tanh(tx)),
    "gelu": (lambda x, v: mb.gelu(x=x, mode="EXACT"), lambda: F.gelu(tx)),
    "exp": (lambda x, v: mb.exp(x=x), lambda: torch.exp(tx)),
    "sqrt": (lambda x, v: mb.sqrt(x=mb.mul(x=x, y=x)), lambda: torch.sqrt(tx * tx)),
    "rsqrt": (lambda x, v: mb.rsqrt(x=mb.mul(x=x, y=x), epsilon=np.float32(1e-3)), lambda: 1 / torch.sqrt(tx * tx + 1e-3)),
    "softmax": (lambda x, v: mb.softmax(x=x, axis=1), lambda: torch.softmax(tx, 1)),
    "reduce_mean": (lambda x, v: mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True), lambda: tx.mean((2, 3), keepdim=True)),
    "reduce_sum": (lambda x, v: mb.reduce_sum(x=x, axes=[1], keep_dims=False), lambda: tx.sum(1)),
    "reduce_max": (lambda x, v: mb.reduce_max(x=x, axes=[-1], keep_dims=True), lambda: tx.amax(-1, keepdim=True)),
    "reshape": (lambda x, v: mb.reshape(x=x, shape=[1, -1]), lambda: tx.reshape(1, -1)),
    "transpose": (lambda x, v: mb.transpose(x=x, perm=[0, 2, 3, 1]), lambda: tx.permute(0, 2, 3, 1)),
    "squeeze": (lambda x, v: mb.squeeze(x=mb.reduce_mean(x=x, axes=[2, 3], keep_dims=True), axes=[2, 3]),
                lambda: tx.mean((2, 3))),
    "expand_dims": (lambda x, v: mb.expand_dims(x=v, axes=[0]), lambda: tv[None]),
    "concat": (lambda x, v: mb.concat(values=[x, mb.mul(x=x, y=np.float32(2.0))], axis=1),
               lambda: torch.cat([tx, tx * 2], 1)),
    # a variable list mixing a variable and a constant (the executor converts the constant once, at load)
    "concat_same_list_with_constant": (lambda x, v: mb.concat(values=[x, np.full((1, 2, 9, 9), 0.25, np.float32)], axis=1),
                                       lambda: torch.cat([tx, torch.full((1, 2, 9, 9), 0.25)], 1)),
    "split": (lambda x, v: mb.split(x=x, split_sizes=[1, 3], axis=1)[1], lambda: tx[:, 1:]),
    "slice_by_index": (lambda x, v: mb.slice_by_index(x=x, begin=[0, 1, 2, 0], end=[1, 4, 8, 9], stride=[1, 2, 3, 1],
                                                      end_mask=[True, False, False, True]),
                       lambda: tx[:, 1:4:2, 2:8:3, :]),
    "slice_by_size": (lambda x, v: mb.slice_by_size(x=x, begin=[0, 1, 0, 2], size=[1, 2, -1, 4]), lambda: tx[:, 1:3, :, 2:6]),
    "identity": (lambda x, v: mb.identity(x=x), lambda: tx),
    "cast": (lambda x, v: mb.cast(x=mb.cast(x=mb.mul(x=x, y=np.float32(10.0)), dtype="int32"), dtype="fp32"),
             lambda: torch.trunc(tx * 10)),
    "quantize": (lambda x, v: mb.cast(x=mb.quantize(input=x, scale=np.float32(0.02), zero_point=np.int8(3),
                                                     output_dtype="int8"), dtype="fp32"),
                 lambda: torch.clamp(torch.round(tx / 0.02) + 3, -128, 127)),
    "dequantize": (lambda x, v: mb.dequantize(input=mb.quantize(input=x, scale=np.float32(0.05), output_dtype="uint8",
                                                                zero_point=np.uint8(128)),
                                              scale=np.float32(0.05), zero_point=np.uint8(128)),
                   lambda: (torch.clamp(torch.round(tx / 0.05) + 128, 0, 255) - 128) * 0.05),
    "constexpr_affine_dequantize": (
        lambda x, v: mb.linear(x=mb.slice_by_size(x=v, begin=[0, 0], size=[2, 4]),
                               weight=mb.constexpr_affine_dequantize(quantized_data=Q8, zero_point=np.int8(2),
                                                                     scale=QSCALE, axis=0)),
        lambda: tv[:, :4] @ torch.from_numpy(_dq_ref(Q8, QSCALE, 2, (6, 1))).T),
    "constexpr_blockwise_shift_scale": (
        lambda x, v: mb.linear(x=mb.concat(values=[v, mb.slice_by_size(x=v, begin=[0, 0], size=[2, 2])], axis=1),
                               weight=mb.constexpr_blockwise_shift_scale(data=BW, scale=BW_SCALE, offset=BW_OFF)),
        lambda: torch.cat([tv, tv[:, :2]], 1) @ torch.from_numpy(
            (BW.astype(np.float32) - np.repeat(BW_OFF, 4, 1)) * np.repeat(BW_SCALE, 4, 1)).T),
}
# ops whose check lives elsewhere: classify needs a classifier model, constexpr_lut_to_dense palettized weights
# (both in tests/test_coreml_exporter.py)
CHECKED_ELSEWHERE = {"classify", "constexpr_lut_to_dense"}
# the ops coremltools states a value_inference for: the executor must agree with coremltools' own semantics
VALUE_INFERENCE = ("linear", "matmul", "add", "sub", "mul", "real_div", "relu", "relu6", "clip", "sigmoid",
                   "sigmoid_hard", "thresholded_relu", "softmax", "reduce_mean", "reshape", "concat", "cast",
                   "quantize", "squeeze")
IOS18_ONLY = {"constexpr_blockwise_shift_scale"}


def _build(tmp_path_factory, names, target):
    @mb.program(input_specs=[mb.TensorSpec(shape=X.shape), mb.TensorSpec(shape=V.shape)], opset_version=target)
    def prog(x, v):
        outs = []
        for n in names:
            out = CASES[n][0](x, v)
            outs.append(mb.identity(x=out, name=f"out_{n}"))
        return tuple(outs)

    ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=target,
                    compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY)
    path = tmp_path_factory.mktemp("ops") / "ops.mlpackage"
    ml.save(str(path))
    return CoreMLProgram(path)


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    base = [n for n in CASES if n not in IOS18_ONLY and n != "constexpr_affine_dequantize"]
    p17 = _build(tmp_path_factory, base + ["constexpr_affine_dequantize"], ct.target.iOS17)
    p18 = _build(tmp_path_factory, sorted(IOS18_ONLY), ct.target.iOS18)
    out = {}
    for p in (p17, p18):
        res = p.run({"x": X, "v": V})
        out.update({k[len("out_"):]: (res[k], p) for k in res})
    return out


def test_every_supported_op_has_a_case():
    assert set(supported_ops()) - {"const"} == {c.split("_same")[0] for c in CASES} | CHECKED_ELSEWHERE


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_matches_torch(programs, op):
    got, prog = programs[op]
    op_type = op.split("_same")[0]
    assert op_type in prog.op_counts, f"{op_type} was rewritten away by coremltools: the case does not exercise it"
    want = CASES[op][1]().detach().numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def test_fp16_storage_is_rounded(tmp_path):
    """An FP16 op output must hold exactly the FP16-rounded value (what Core ML stores)."""
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 16))], opset_version=ct.target.iOS16)
    def prog(x):
        h = mb.cast(x=x, dtype="fp16")
        y = mb.mul(x=h, y=np.float16(3.0))
        return mb.cast(x=y, dtype="fp32", name="y")

    ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                    compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY)
    ml.save(str(tmp_path / "h.mlpackage"))
    x = (np.arange(16, dtype=np.float32) * 0.1001 + 1000.3)[None]
    got = CoreMLProgram(tmp_path / "h.mlpackage").run({"x": x})["y"]
    want = (x.astype(np.float16).astype(np.float32) * 3).astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(got, x * 3)  # the rounding is visible at this magnitude


def test_unknown_op_fails_clearly(tmp_path):
    @mb.program(input_specs=[mb.TensorSpec(shape=(1, 8))], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.sin(x=mb.relu(x=x), name="y")

    ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                    compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY)
    ml.save(str(tmp_path / "sin.mlpackage"))
    with pytest.raises(UnsupportedOpError, match=r"does not implement op 'sin'") as info:
        CoreMLProgram(tmp_path / "sin.mlpackage")
    assert isinstance(info.value, UnsupportedOp) and "macOS" in info.value.hint   # UnsupportedOp: exit 7 in the CLI


def test_to_pixels_round_trips_8bit_images():
    from calibration import InputSpec, normalize

    spec = InputSpec()
    pixels = RNG.integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    back = to_pixels(normalize(pixels, spec), spec)
    np.testing.assert_array_equal(back, pixels.transpose(0, 3, 1, 2).astype(np.float32))


# ------------------------------------------------------------------ coremltools' own semantics (value_inference)
def _value_inference(build, *consts, opset=None):
    """What coremltools' MIL computes for ``build(*consts)`` with constant inputs (its ``value_inference``)."""
    got = {}

    @mb.program(input_specs=[mb.TensorSpec(shape=(1,))], opset_version=opset or ct.target.iOS17)
    def prog(z):
        got["val"] = build(*[c.copy() for c in consts]).val   # copies: some value_inference writes in place
        return mb.identity(x=z)

    assert got["val"] is not None, "coremltools has no value_inference for this case"
    return np.asarray(got["val"])


@pytest.mark.parametrize("op", VALUE_INFERENCE)
def test_op_matches_coremltools_value_inference(programs, op):
    got, _ = programs[op]
    want = _value_inference(CASES[op][0], X, V)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want.astype(np.float32), rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(want).max())))


def _single_op_program(tmp_path, build, shape, opset, name="y"):
    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=opset)
    def prog(x):
        return mb.identity(x=build(x), name=name)

    ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=opset,
                    compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY)
    path = tmp_path / f"{abs(hash((shape, name))) % 10**8}.mlpackage"
    ml.save(str(path))
    return CoreMLProgram(path)


def test_thresholded_relu_keeps_exact_ties_at_alpha(tmp_path):
    """MIL keeps x where x >= alpha; every HardSwish in our programs has alpha = -3, and inputs of exactly -3
    occur (FP16 values, ReLU6-style clips). torch's threshold (x > alpha) would zero them."""
    x = np.array([[-4.0, -3.0, -3.0, -2.5, 0.0, 3.0, -3.0001, 0.3]], np.float32)
    for alpha in (-3.0, 0.3):
        build = lambda t, a=alpha: mb.thresholded_relu(x=t, alpha=np.float32(a))   # noqa: E731
        want = np.where(x >= np.float32(alpha), x, 0)
        assert (want != np.where(x > np.float32(alpha), x, 0)).any()     # the case can tell >= from >
        np.testing.assert_array_equal(_value_inference(build, x), want)
        np.testing.assert_array_equal(_single_op_program(tmp_path, build, x.shape, ct.target.iOS16).run({"x": x})["y"], want)
        np.testing.assert_array_equal(OPS["thresholded_relu"](x, alpha=alpha), want)


def test_quantize_rounds_exact_halves_to_even(tmp_path):
    """Inputs exactly halfway between two steps (scale a power of two, so x / scale is exact): MIL rounds them to
    the even step (coremltools: np.around), as the executor must; rounding half up would differ on every one."""
    k = np.arange(-6, 6, dtype=np.float32)
    x = ((k + 0.5) * 0.25).reshape(1, -1)
    want = np.clip(np.rint(x / 0.25) + 3, -128, 127)
    assert (want != np.floor(x / 0.25 + 0.5) + 3).any()
    build = lambda t: mb.cast(x=mb.quantize(input=t, scale=np.float32(0.25), zero_point=np.int8(3),   # noqa: E731
                                            output_dtype="int8"), dtype="fp32")
    np.testing.assert_array_equal(_value_inference(build, x), want)
    np.testing.assert_array_equal(_single_op_program(tmp_path, build, x.shape, ct.target.iOS17).run({"x": x})["y"], want)
    np.testing.assert_array_equal(OPS["quantize"](x, np.float32(0.25), "int8", np.int8(3)).astype(np.float32), want)


def _ceil_max_pool(x, k, s):
    """MIL max_pool with ceil_mode and no padding, written out: windows start at i * s and stop at the edge."""
    n, c, h, w = x.shape
    oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
    out = np.empty((n, c, oh, ow), x.dtype)
    for i in range(oh):
        for j in range(ow):
            out[:, :, i, j] = x[:, :, i * s:min(i * s + k, h), j * s:min(j * s + k, w)].max(axis=(2, 3))
    return out


@pytest.mark.parametrize("size", [10, 54])   # 54 -> 27: SqueezeNet 1.0's pools need ceil mode
def test_max_pool_ceil_mode_partial_windows(tmp_path, size):
    x = RNG.standard_normal((1, 2, size, size)).astype(np.float32)
    build = lambda t: mb.max_pool(x=t, kernel_sizes=[3, 3], strides=[2, 2], pad_type="valid", ceil_mode=True)  # noqa: E731
    got = _single_op_program(tmp_path, build, x.shape, ct.target.iOS16).run({"x": x})["y"]
    want = _ceil_max_pool(x, 3, 2)
    floor_size = (size - 3) // 2 + 1
    assert want.shape[-1] == floor_size + 1           # the last window is partial: ceil and floor differ here
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want[..., -1], want[..., -2])   # the partial window's own values, not a copy


# ------------------------------------------------------------------ FP16 accumulation (Neural-Engine-like)
def _fp16(a):
    return np.asarray(a, np.float32).astype(np.float16).astype(np.float32)


def _fp16_sum(terms, chunk):
    """The model written as a loop: exact sums of ``chunk`` terms, each rounded to FP16, added in FP16 in order."""
    acc = None
    for j in range(0, len(terms), chunk):
        part = _fp16(np.sum(terms[j:j + chunk], dtype=np.float64))
        acc = part if acc is None else _fp16(acc + part)
    return acc


def _fp16_program(tmp_path, build, shape, chunks=None):
    from exporters.coreml.fp16_accumulation import Chunks

    @mb.program(input_specs=[mb.TensorSpec(shape=shape)], opset_version=ct.target.iOS16)
    def prog(x):
        return mb.cast(x=build(mb.cast(x=x, dtype="fp16")), dtype="fp32", name="y")

    ml = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS16,
                    compute_precision=ct.precision.FLOAT32, pass_pipeline=ct.PassPipeline.EMPTY)
    path = tmp_path / f"acc{abs(hash(shape)) % 10**6}.mlpackage"
    ml.save(str(path))
    return CoreMLProgram(path), CoreMLProgram(path, accumulation="fp16", chunks=chunks or Chunks())


def test_fp16_accumulation_of_linear_and_conv_follows_the_chunk_model(tmp_path):
    from exporters.coreml.fp16_accumulation import Chunks

    x = _fp16(RNG.standard_normal((1, 6, 5, 5)) * 3)
    w = _fp16(RNG.standard_normal((4, 3, 3, 3)))           # groups=2: 3 input channels a group, 27 products a sum
    cpu, ne = _fp16_program(tmp_path, lambda t: mb.conv(x=t, weight=w.astype(np.float16), groups=2), x.shape,
                            Chunks(products=9, reduction=4))  # 1 input channel (9 products) per FP16 partial
    y32, y16 = cpu.run({"x": x})["y"], ne.run({"x": x})["y"]
    for o in range(4):
        g = o // 2
        for i in range(3):
            for j in range(3):
                patch = x[0, 3 * g:3 * g + 3, i:i + 3, j:j + 3]
                terms = (patch * w[o]).reshape(3, 9)              # channel by channel: the chunk order
                assert y16[0, o, i, j] == _fp16_sum(terms.reshape(-1), 9), (o, i, j)
                assert y32[0, o, i, j] == _fp16(np.sum(terms, dtype=np.float64))
    v = _fp16(RNG.standard_normal((2, 70)))
    wl = _fp16(RNG.standard_normal((3, 70)))
    _, ne = _fp16_program(tmp_path, lambda t: mb.linear(x=t, weight=wl.astype(np.float16)), v.shape)
    got = ne.run({"x": v})["y"]
    want = np.array([[_fp16_sum(v[r] * wl[c], 32) for c in range(3)] for r in range(2)])
    np.testing.assert_array_equal(got, want)


def test_fp16_accumulation_shows_the_long_mean_gap(tmp_path):
    """A squeeze-excite mean over 112 x 112 FP16 values (B0's first): with FP32 accumulation it is the FP16
    rounding of the exact mean; with FP16 accumulation the running sum reaches thousands, where FP16's step is
    4 to 8, and it is visibly off, exactly as the chunk model says."""
    x = _fp16(np.abs(RNG.standard_normal((1, 8, 112, 112))) * 0.6)
    cpu, ne = _fp16_program(tmp_path, lambda t: mb.reduce_mean(x=t, axes=[2, 3], keep_dims=False), x.shape)
    y32, y16 = cpu.run({"x": x})["y"], ne.run({"x": x})["y"]
    exact = x.reshape(8, -1).astype(np.float64).mean(1)
    np.testing.assert_array_equal(y32[0], _fp16(exact))
    np.testing.assert_array_equal(y16[0], [_fp16(_fp16_sum(x[0, c].reshape(-1), 4) / (112 * 112)) for c in range(8)])
    rel = np.abs(y16[0] - exact) / exact
    assert rel.max() > 20 * np.abs(y32[0] - exact).max() / exact.min(), (rel, y32[0], exact)


def test_fp16_accumulation_leaves_fp32_typed_ops_alone(tmp_path):
    """An FP32-typed op cannot run on the Neural Engine: the mode changes nothing for it."""
    x = RNG.standard_normal((1, 8, 30, 30)).astype(np.float32)
    build = lambda t: mb.reduce_mean(x=t, axes=[2, 3], keep_dims=False)   # noqa: E731
    path = _single_op_program(tmp_path, build, x.shape, ct.target.iOS16).path
    a = CoreMLProgram(path).run({"x": x})["y"]
    b = CoreMLProgram(path, accumulation="fp16").run({"x": x})["y"]
    np.testing.assert_array_equal(a, b)
