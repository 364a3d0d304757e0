"""TVM target strings as users write them (classic, JSON, native) and their errors."""

from __future__ import annotations

import json

import pytest

from evit_deploy.errors import EXIT_BAD_INPUT, BadInputError

pytest.importorskip("tvm")

from evit_deploy.targets.tvm.target_string import (  # noqa: E402
    host_cpu_count, parse_target, resolve_target, slug, to_classic, to_tvm)


@pytest.mark.parametrize("text,expected", [
    ("llvm -mcpu=broadwell", {"kind": "llvm", "mcpu": "broadwell"}),
    ("llvm -mcpu=broadwell -num-cores=14", {"kind": "llvm", "mcpu": "broadwell", "num-cores": 14}),
    ("llvm -mtriple=x86_64-linux-gnu -mcpu=skylake-avx512 -mattr=+avx512f,-avx512bw",
     {"kind": "llvm", "mtriple": "x86_64-linux-gnu", "mcpu": "skylake-avx512", "mattr": ["+avx512f", "-avx512bw"]}),
    ("llvm -keys=cpu,x86 -mcpu haswell", {"kind": "llvm", "keys": ["cpu", "x86"], "mcpu": "haswell"}),
    ("llvm -mcpu=broadwell -fast-math", {"kind": "llvm", "mcpu": "broadwell", "fast-math": True}),
    ('{"kind": "llvm", "mcpu": "broadwell", "num-cores": 4}', {"kind": "llvm", "mcpu": "broadwell", "num-cores": 4}),
    ('{"kind": "llvm", "mattr": "+avx2,+fma"}', {"kind": "llvm", "mattr": ["+avx2", "+fma"]}),
    ("native", {"kind": "llvm", "mcpu": "native"}),
    ("host -num-cores=1", {"kind": "llvm", "mcpu": "native", "num-cores": 1}),
])
def test_parse_accepts_the_forms_users_write(text, expected):
    assert parse_target(text) == expected


def test_resolve_fills_num_cores_and_validates():
    target = resolve_target("llvm -mcpu=broadwell")
    assert target["num-cores"] == host_cpu_count()
    assert target["mcpu"] == "broadwell" and target["keys"] == ["cpu"]
    assert resolve_target("llvm -mcpu=broadwell -num-cores=14")["num-cores"] == 14
    assert resolve_target("llvm -mcpu=broadwell", threads=3)["num-cores"] == 3
    # TVM itself accepts what we produce (it rejects the classic string).
    tvm_target = to_tvm(target)
    assert tvm_target.kind.name == "llvm" and str(tvm_target.attrs["mcpu"]) == "broadwell"
    assert int(tvm_target.attrs["num-cores"]) == host_cpu_count()


def test_native_is_the_host_cpu():
    import tvm  # noqa: F401
    import tvm_ffi

    host = str(tvm_ffi.get_global_func("target.llvm_get_system_cpu")())
    for text in ("native", "host", '{"kind": "llvm", "mcpu": "native"}'):
        target = resolve_target(text)
        assert target["mcpu"] == host and target["num-cores"] == host_cpu_count()


def test_native_is_what_this_machine_exposes_whatever_llvm_names_it(monkeypatch):
    """A virtual machine may hide features of its CPU's model (AVX-512), or report an older
    model than its features (an Intel Xeon with AMX and BF16 reporting Rocket Lake's model
    number, which LLVM names ``rocketlake``): native compiles for what the machine exposes."""
    from evit_deploy import cpufeatures
    from evit_deploy.targets.tvm import target_string
    from evit_deploy.targets.tvm.target_string import LLVM_TO_LINUX_FLAGS, required_cpu_flags

    skylake = set(required_cpu_flags(resolve_target("llvm -mcpu=skylake-avx512")))
    assert {"avx512cd", "avx512bw"} <= skylake and not {"avx512_bf16", "avx512_vnni"} & skylake
    machine = frozenset(skylake - {"avx512cd"} | {"avx512_bf16", "avx512_vnni", "rdrand"})
    monkeypatch.setattr(target_string, "host_cpu_name", lambda: "skylake-avx512")
    monkeypatch.setattr(cpufeatures, "cpu_flags", lambda: machine)
    target = resolve_target("native")
    assert target["mcpu"] == "skylake-avx512"
    assert set(required_cpu_flags(target)) == machine & set(LLVM_TO_LINUX_FLAGS.values())
    # The user's -mattr may switch off what the machine adds, not switch on what it hides.
    target = resolve_target("native -mattr=-avx512vnni,+avx512cd")
    assert set(required_cpu_flags(target)) == machine & set(LLVM_TO_LINUX_FLAGS.values()) - {"avx512_vnni"}


def test_equal_targets_are_equal_however_written():
    a = resolve_target("llvm -mcpu=broadwell -num-cores=14")
    b = resolve_target(json.dumps({"num-cores": 14, "mcpu": "broadwell", "kind": "llvm"}))
    assert a == b and to_classic(a) == "llvm -mcpu=broadwell -num-cores=14"
    assert resolve_target(to_classic(a)) == a
    assert slug(a) == "llvm-broadwell-14c"


@pytest.mark.parametrize("text,fragment", [
    ("llvm -mcpu=brodwell", "close valid names: broadwell"),
    ("llvm -mcpu=skylake-avx51", "skylake-avx512"),
    ("cuda", "must be 'llvm'"),
    ("llvm -mcpux=broadwell", "did you mean -mcpu?"),
    ("llvm -num-cores=0", "at least 1"),
    ("llvm -num-cores=two", "must be an integer"),
    ("llvm -mattr=avx2", "start with + or -"),
    ("llvm mcpu=broadwell", "expected an option"),
    ("{not json", "not valid JSON"),
    ('["llvm"]', "must be an object"),
    ("", "empty TVM target"),
])
def test_bad_targets_are_one_line_errors(text, fragment):
    with pytest.raises(BadInputError) as info:
        resolve_target(text)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_threads_must_agree_with_num_cores():
    with pytest.raises(BadInputError, match="contradicts -num-cores=4"):
        resolve_target("llvm -mcpu=broadwell -num-cores=4", threads=2)


def test_cli_rejects_an_unknown_cpu_before_tracing(cli, tmp_path):
    code, out, err = cli("export", "m0", "--target", "tvm", "--tvm-target", "llvm -mcpu=brodwell", "--out", tmp_path)
    assert code == EXIT_BAD_INPUT
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "unknown CPU 'brodwell'" in lines[0] and "broadwell" in lines[0]
    assert "Traceback" not in err
    code, _, err = cli("tune", "m0", "--tvm-target", "llvm -mcpu=sky", "--db", tmp_path / "db")
    assert code == EXIT_BAD_INPUT and "unknown CPU 'sky'" in err


def test_tune_takes_the_tvm_target_as_tvm_target_and_its_old_name(cli, tmp_path):
    """``--target`` (and ``-t``) named the TVM target in ``tune`` but the evit-deploy
    target in ``export``: ``--tvm-target`` now, the old names kept for one release."""
    code, _, err = cli("tune", "m0", "--tvm-target", "llvm -mcpu=sky", "--db", tmp_path / "db")
    assert code == EXIT_BAD_INPUT and "unknown CPU 'sky'" in err and "deprecated" not in err
    for old in ("--target", "-t"):
        code, _, err = cli("tune", "m0", old, "llvm -mcpu=sky", "--db", tmp_path / "db")
        assert code == EXIT_BAD_INPUT and "unknown CPU 'sky'" in err
        assert "--target is deprecated" in err and "--tvm-target" in err
    code, _, err = cli("tune", "m0", "--tvm-target", "native", "--target", "native", "--db", tmp_path / "db")
    assert code == EXIT_BAD_INPUT and "give the TVM target once" in err
    assert not (tmp_path / "db").exists()
    code, out, _ = cli("tune", "--help")
    assert code == 0 and "--tvm-target" in out and "deprecated alias" in out
