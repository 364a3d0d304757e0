"""Export options (evit_deploy/targets/options.py), in-process: how a target declares them,
how mappings and command-line words become its Options dataclass, and time budgets."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from evit_deploy.errors import BadInputError
from evit_deploy.targets.options import (INT8_KERNELS, calibration_option, describe_options, int8_kernels_option,
                                         option, options_to_dict, parse_cli_values, parse_duration, parse_options,
                                         path_options, precision_option)


@dataclass
class Demo:
    level: int = option(1, "a level")
    ratio: float = option(0.5, "a ratio")
    fast: bool = option(False, "go fast")
    mode: str = option("a", "a mode", choices=("a", "b"))
    db: str | None = option(None, "a database", flag="--db", path=True)
    precision: str = precision_option("fp32", ("fp32", "int8"))
    calibration: str | None = calibration_option()
    int8_kernels: str = int8_kernels_option()


def parse(values):
    return parse_options(Demo, values, target="demo", source="here")


def test_values_are_coerced_to_the_declared_types():
    opts = parse({"level": "3", "ratio": "2", "fast": "yes", "mode": "b", "db": 7, "int8-kernels": "vnni"})
    assert (opts.level, opts.ratio, opts.fast, opts.mode, opts.db, opts.int8_kernels) == (3, 2.0, True, "b", "7", "vnni")
    assert parse({"fast": "0", "level": 4.0}).fast is False and parse({"level": 4.0}).level == 4
    assert parse({}) == Demo() and options_to_dict(parse({})) == {
        "level": 1, "ratio": 0.5, "fast": False, "mode": "a", "db": None, "precision": "fp32", "calibration": None,
        "int8_kernels": INT8_KERNELS[0]}
    assert options_to_dict(None) == {}


@pytest.mark.parametrize("values,message", [
    ({"level": "high"}, "here: option 'level' of target 'demo' must be int, got 'high'"),
    ({"level": 2.5}, "must be int, got 2.5"),
    ({"level": True}, "must be int, got True"),
    ({"fast": "maybe"}, "option 'fast' of target 'demo' must be bool"),
    ({"fast": 1}, "must be bool, got 1"),
    ({"mode": "c"}, "unknown value for here: option 'mode' of target 'demo' 'c'"),
    ({"precision": "bf16"}, "here: target 'demo' does not support precision 'bf16' (it supports fp32, int8)"),
    ({"precision": "int4"}, "unknown value"),
    ({"levle": 2}, "unknown option for target 'demo' in here 'levle' (did you mean 'level'?)"),
])
def test_bad_values_are_one_line_errors(values, message):
    with pytest.raises(BadInputError) as info:
        parse(values)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_target_without_options():
    assert parse_options(None, {}, target="bare", source="s") is None
    assert parse_options(None, {"precision": "fp32"}, target="bare", source="s") is None
    with pytest.raises(BadInputError, match="target 'bare' takes no options, got level"):
        parse_options(None, {"level": 1}, target="bare", source="s")
    with pytest.raises(BadInputError, match=r"does not support precision 'fp16' \(it supports fp32\)"):
        parse_options(None, {"precision": "fp16"}, target="bare", source="s")


def test_a_precision_declaration_must_name_known_precisions():
    with pytest.raises(ValueError, match="int4"):
        precision_option("fp32", ("fp32", "int4"))
    with pytest.raises(ValueError):
        precision_option("fp16", ("fp32",))


def test_command_line_words_set_only_what_they_name():
    assert parse_cli_values(Demo, [], target="demo") == {}
    assert parse_cli_values(Demo, ["--level", "3", "--fast", "--mode=b", "--db", "x"], target="demo") == \
        {"level": "3", "fast": True, "mode": "b", "db": "x"}
    assert parse_cli_values(Demo, ["--no-fast", "--int8-kernels", "vnni"], target="demo") == \
        {"fast": False, "int8_kernels": "vnni"}
    assert parse_cli_values(Demo, ["--fast=false"], target="demo") == {"fast": "false"}
    assert parse_options(Demo, parse_cli_values(Demo, ["--fast=false"], target="demo"), target="demo",
                         source="s").fast is False


@pytest.mark.parametrize("args,message", [
    (["--levl", "3"], "unknown option for target 'demo' '--levl' (did you mean '--level'?)"),
    (["--level"], "option --level of target 'demo' needs a value"),
    (["level"], "unknown option for target 'demo' 'level'"),
])
def test_bad_command_line_words(args, message):
    with pytest.raises(BadInputError) as info:
        parse_cli_values(Demo, args, target="demo")
    assert message in str(info.value)


def test_options_that_name_files_say_so():
    assert path_options(Demo) == ("db", "calibration")
    assert path_options(None) == ()
    from evit_deploy.targets import available_targets
    declared = {name: path_options(cls.Options) for name, cls in available_targets().items()}
    assert declared["tvm"] == ("db",) and "calibration" in declared["onnx"]
    assert all("precision" not in found for found in declared.values())


def test_help_rows():
    rows = {flag: (default, text) for flag, default, text in describe_options(Demo)}
    assert rows["--db"] == ("None", "a database") and rows["--mode"] == ("'a'", "a mode [a|b]")
    assert rows["--precision"][1].endswith("[fp32|int8]") and rows["--int8-kernels"][1].endswith("[portable|vnni]")
    assert describe_options(None) == []


@pytest.mark.parametrize("text,seconds", [("90", 90), ("90s", 90), ("90sec", 90), ("30m", 1800), ("30min", 1800),
                                          ("1h30m", 5400), ("1.5h", 5400), (" 1h 30m ", 5400), ("2H", 7200),
                                          (45, 45), (0.5, 0.5)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text,message", [
    ("", "empty time budget"), ("ten minutes", "must look like 30m, 1h30m or 90s"), ("30x", "must look like"),
    ("0", "must be positive"), (-3, "must be positive"), ("0m", "must be positive"),
])
def test_bad_durations_are_one_line_errors(text, message):
    with pytest.raises(BadInputError, match=message):
        parse_duration(text)
