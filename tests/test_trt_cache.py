"""TensorRT calibration cache: text format, exact float32 bits both ways, header versions."""
from __future__ import annotations

import struct

import numpy as np
import pytest

from calibration import trt_cache
from calibration.errors import CalibrationError


def test_known_values_are_float32_bits_of_amax_over_127():
    c = trt_cache.from_ranges({"a": 127.0, "b": (-63.5, 10.0), "c": (0.0, 0.0)}, trt_version="8.6.1")
    lines = c.text().splitlines()
    assert lines[0] == "TRT-8601-EntropyCalibration2"
    assert lines[1] == "a: 3f800000"                     # 127/127 = 1.0
    assert lines[2] == "b: 3f000000"                     # max(|-63.5|, 10)/127 = 0.5
    assert lines[3].startswith("c: ") and trt_cache.bits_scale(lines[3][3:]) > 0   # all-zero tensor: tiny scale


@pytest.mark.parametrize("version,number", [("8.5.2", 8502), ("8.5.2.2", 8502), ("8.6.1", 8601), ("10.3.0", 100300),
                                            ("10.13.2", 101302), (8601, 8601), ("11.0", 110000)])
def test_header_versions(version, number):
    assert trt_cache.header_version(version) == number
    assert trt_cache.header_version(trt_cache.version_from_header(number)) == number


def test_round_trip_exact_bits(tmp_path):
    rng = np.random.default_rng(0)
    names = ["input", "onnx::Conv_402", "/features/features.0/features.0.0/Conv_output_0", "weird: name", "x" * 200]
    amax = np.abs(rng.standard_normal(len(names)) * 10 ** rng.uniform(-6, 4, len(names)))
    ranges = {n: (-float(a), float(a) / 2) for n, a in zip(names, amax)}
    path = tmp_path / "calibration.cache"
    written = trt_cache.write_cache(path, ranges, trt_version="10.3.0")
    back = trt_cache.read_cache(path)
    assert back.header == "TRT-100300-EntropyCalibration2" and back.trt_version == "10.3.0"
    assert list(back.scales) == names
    for n, a in zip(names, amax):
        expect = np.float32(a / 127.0)
        got = back.scales[n]
        assert got.dtype == np.float32
        assert struct.pack(">f", got) == struct.pack(">f", expect) == struct.pack(">f", written.scales[n])
    # and byte-identical when written again from what was read
    again = tmp_path / "again.cache"
    trt_cache.write_cache(again, back)
    assert again.read_bytes() == path.read_bytes()


def test_parse_errors_name_the_line(tmp_path):
    with pytest.raises(CalibrationError, match="header"):
        trt_cache.parse_cache("not a cache\nx: 3f800000\n")
    with pytest.raises(CalibrationError, match=":3:"):
        trt_cache.parse_cache("TRT-8502-EntropyCalibration2\nx: 3f800000\ny: 12345\n")
    with pytest.raises(CalibrationError, match="empty"):
        trt_cache.parse_cache("")
    with pytest.raises(CalibrationError, match="not finite"):
        trt_cache.from_ranges({"x": (0.0, float("nan"))})
    with pytest.raises(CalibrationError, match="algorithm"):
        trt_cache.from_ranges({"x": 1.0}, algorithm="Magic")
    with pytest.raises(CalibrationError, match="cannot read"):
        trt_cache.read_cache(tmp_path / "missing.cache")


def test_device_tool_reheader_keeps_values():
    """edgecnn_trt.py rewrites the header to the device's TensorRT; the scales must be untouched."""
    from exporters.tensorrt import device as trt_device

    c = trt_cache.from_ranges({"a": 1.5, "b": 3.0}, trt_version="8.5.2")
    new = trt_device.reheader_cache(c.text().encode(), (10, 3, 0)).decode()
    back = trt_cache.parse_cache(new)
    assert back.version == 100300 and back.scales.keys() == c.scales.keys()
    assert all(back.scales[k] == c.scales[k] for k in c.scales)
    assert trt_device.cache_header_version((8, 6, 1)) == trt_cache.header_version("8.6.1")
