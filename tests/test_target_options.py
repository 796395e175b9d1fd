"""--target-option: one registry of the keys the targets read, checked against the code; parsed by kind;
a misspelt key refused with the closest names instead of being silently ignored."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from edgecnn.cli import main
from edgecnn.errors import UsageError
from edgecnn.target_options import TARGET_OPTIONS, parse_target_options

ROOT = Path(__file__).resolve().parents[1]
# how the targets read ExportOptions.extra: ctx.options.extra.get("k"), extra.get("k") / extra_opts.get("k") /
# x.get("k") on that dict, ctx.options.number("k")
READS = re.compile(r"\b(?:extra|extra_opts|x)\.get\(\s*\"(\w+)\"|\.number\(\s*\"(\w+)\"")


def _keys_read_by_the_targets():
    keys = set()
    for path in sorted((ROOT / "edgecnn" / "targets").glob("*.py")):
        for m in READS.finditer(path.read_text()):
            keys.add(m.group(1) or m.group(2))
    return keys


def test_every_option_the_targets_read_is_registered_and_every_registered_one_is_read():
    read = _keys_read_by_the_targets()
    assert len(read) >= 15, read   # the scan itself still finds the reads
    assert read - set(TARGET_OPTIONS) == set(), "read by a target but missing from TARGET_OPTIONS"
    assert set(TARGET_OPTIONS) - read == set(), "registered but read by no target"


def test_values_are_parsed_by_their_kind():
    got = parse_target_options(["ios=17", "empirical_bias_correction=false", "int8_fallback=YES",
                                "nodes_to_exclude=/a/Conv, /b/Conv,", "int8_min_speedup=1.2", "calib_method=mse",
                                "int8_probe_images=64"])
    assert got == {"ios": 17, "empirical_bias_correction": False, "int8_fallback": True,
                   "nodes_to_exclude": ["/a/Conv", "/b/Conv"], "int8_min_speedup": 1.2, "calib_method": "mse",
                   "int8_probe_images": 64}


@pytest.mark.parametrize("item, message", [
    ("empirical_bias_corection=false", r"unknown target option 'empirical_bias_corection'; did you mean "
                                       r"empirical_bias_correction"),
    ("int8_fallback=maybe", r"int8_fallback='maybe' is not true or false"),
    ("ios=seventeen", r"ios='seventeen' is not a whole number"),
    ("int8_probe_images=6.5", r"int8_probe_images='6.5' is not a whole number"),
    ("int8_min_speedup=fast", r"int8_min_speedup='fast' is not a number"),
    ("ios", r"'ios' is not KEY=VALUE"),
    ("=3", r"'=3' is not KEY=VALUE"),
])
def test_bad_options_are_one_usage_error(item, message):
    with pytest.raises(UsageError, match=message) as err:
        parse_target_options([item])
    assert err.value.hint


def test_a_misspelt_option_stops_export_and_matrix_before_any_work(tmp_path, capsys):
    for argv in (["export", "lenet5", "-o", str(tmp_path / "a"), "--target-option", "int8_falback=false"],
                 ["matrix", "--out", str(tmp_path / "m"), "--target-option", "int8_falback=false"]):
        assert main(argv) == 2
        assert "did you mean int8_fallback" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()


def test_export_target_options_reach_the_recipe_and_win_over_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGECNN_CACHE", str(tmp_path / "cache"))
    rc = main(["export", "lenet5", "-p", "int8", "-w", "none", "-o", str(tmp_path / "a"), "--calib-size", "48",
               "--eval-size", "24", "--no-latency", "--json", "-q", "--weight-rounding", "gptq",
               "--target-option", "empirical_bias_correction=false", "--target-option", "weight_rounding=nearest"])
    assert rc == 0
    recipe = json.loads(capsys.readouterr().out)["recipe"]
    assert recipe["empirical_bias_correction"] is None           # on by default (test_empirical_bias.py)
    assert recipe["weight_rounding"] == {"method": "nearest"}    # the option wins over --weight-rounding


def test_the_python_api_refuses_an_unknown_option_too(tmp_path):
    from edgecnn import pipeline
    from edgecnn.targets import ExportOptions

    with pytest.raises(UsageError, match="did you mean int8_min_speedup"):
        pipeline.export("lenet5", "onnx", "int8", "none", None, tmp_path / "a", quiet=True,
                        options=ExportOptions(extra={"int8_min_sppedup": 1.2}))
    assert not (tmp_path / "a").exists()
