"""Typed options: --target-option SECTION.NAME=VALUE parsed by the declared type of the dataclass field, the
CLI help derived from the fields (every option with its default), and a misspelt key refused with the
closest names instead of being silently ignored — on the CLI and in the Python API."""
from __future__ import annotations

import dataclasses
import json

import pytest

from edgecnn.cli import main
from edgecnn.errors import UsageError
from edgecnn.options import SECTIONS, ExportOptions, apply_target_options, target_options
from exporters.int8.options import Int8Options


def test_every_section_option_is_listed_with_its_default_and_help(capsys):
    keys = target_options()
    fields = {f"{s}.{f.name}" for s, cls in SECTIONS.items() for f in dataclasses.fields(cls)}
    assert set(keys) == fields and len(keys) >= 15
    assert all(help_text for _, _, help_text, _ in keys.values()), "every option says what it does"
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    for key, (_, default, _, _) in keys.items():
        line = next(ln for ln in text.splitlines() if ln.strip().startswith(key + " "))
        assert "default" in line, line


def test_values_are_parsed_by_their_declared_type():
    got = apply_target_options(ExportOptions(), [
        "coreml.ios=17", "int8.empirical_bias_correction=false", "int8.fallback=YES",
        "int8.keep_float=/a/Conv, /b/Conv,", "int8.min_speedup=1.2", "int8.ranges=mse", "int8.probe_images=64",
        "trt.version=10.3"])
    assert got.coreml.ios == 17 and got.int8.empirical_bias_correction is False and got.int8.fallback is True
    assert got.int8.keep_float == ("/a/Conv", "/b/Conv") and got.int8.min_speedup == 1.2
    assert got.int8.ranges == "mse" and got.int8.probe_images == 64 and got.trt.version == "10.3"
    assert ExportOptions().int8 == Int8Options(), "applying options never changes the defaults"


@pytest.mark.parametrize("item, message", [
    ("int8.empirical_bias_corection=false", r"unknown target option 'int8.empirical_bias_corection'; did you mean "
                                            r"int8.empirical_bias_correction"),
    ("int8.fallback=maybe", r"int8.fallback='maybe' is not true or false"),
    ("coreml.ios=seventeen", r"coreml.ios='seventeen' is not a whole number"),
    ("int8.probe_images=6.5", r"int8.probe_images='6.5' is not a whole number"),
    ("int8.min_speedup=fast", r"int8.min_speedup='fast' is not a number"),
    ("int8.min_speedup=inf", r"int8.min_speedup='inf' is not a finite number"),
    ("int8.ranges=kl", r"int8.ranges='kl' is not one of minmax, percentile, entropy, mse"),
    ("ios=17", r"unknown target option 'ios'"),
    ("coreml.ios", r"'coreml.ios' is not KEY=VALUE"),
    ("=3", r"'=3' is not KEY=VALUE"),
])
def test_bad_options_are_one_usage_error(item, message):
    with pytest.raises(UsageError, match=message):
        apply_target_options(ExportOptions(), [item])


def test_values_are_checked_after_parsing():
    with pytest.raises(UsageError, match=r"int8.min_agreement=1.5: a fraction in \[0, 1\]"):
        apply_target_options(ExportOptions(), ["int8.min_agreement=1.5"]).check()
    with pytest.raises(UsageError, match="coreml.ios=15"):
        apply_target_options(ExportOptions(), ["coreml.ios=15"]).check()


def test_a_misspelt_option_stops_export_and_matrix_before_any_work(tmp_path, capsys):
    for argv in (["export", "lenet5", "-o", str(tmp_path / "a"), "--target-option", "int8.falback=false"],
                 ["matrix", "--out", str(tmp_path / "m"), "--target-option", "int8.falback=false"]):
        assert main(argv) == 2
        assert "did you mean int8.fallback" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "m").exists()


def test_export_target_options_reach_the_recipe_and_win_over_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGECNN_CACHE", str(tmp_path / "cache"))
    rc = main(["export", "lenet5", "-p", "int8", "-w", "none", "-o", str(tmp_path / "a"), "--calib-size", "48",
               "--eval-size", "24", "--no-latency", "--json", "-q", "--weight-rounding", "gptq",
               "--target-option", "int8.empirical_bias_correction=false",
               "--target-option", "int8.weight_rounding=nearest"])
    assert rc == 0
    recipe = json.loads(capsys.readouterr().out)["recipe"]
    assert recipe["empirical_bias_correction"] is None           # on by default (test_empirical_bias.py)
    assert recipe["weight_rounding"] == {"method": "nearest"}    # the option wins over --weight-rounding


def test_options_round_trip_through_a_dict_and_refuse_unknown_keys():
    opts = apply_target_options(ExportOptions(seed=3), ["int8.keep_float=a,b", "coreml.ios=17"])
    assert ExportOptions.from_dict(json.loads(json.dumps(opts.to_dict()))) == opts
    with pytest.raises(UsageError, match="did you mean int8.min_speedup"):
        ExportOptions.from_dict({"int8": {"min_sppedup": 1.2}})
