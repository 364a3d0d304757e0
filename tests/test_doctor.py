"""``evit-deploy doctor``: versions, host facts, target health, actionable advice."""

from __future__ import annotations

import json
import sys

import pytest

from evit_deploy.errors import EXIT_BAD_INPUT, EXIT_MISSING_DEPENDENCY
from evit_deploy.hostinfo import cpu_info
from evit_deploy.targets.onnx import OnnxTarget


def test_doctor_reports_versions_host_and_targets(cli):
    code, out, _ = cli("doctor", "--json", "-")
    assert code == 0
    report = json.loads(out)
    assert report["versions"]["torch"].startswith("2.") and report["versions"]["evit-deploy"]
    assert report["host"]["logical_cores"] >= 1
    flags = open("/proc/cpuinfo").read()
    assert ("avx2" in report["host"]["vector_extensions"]) == (" avx2" in flags)
    onnx = next(t for t in report["targets"] if t["name"] == "onnx")
    assert onnx["usable"] and onnx["findings"][0]["level"] == "ok"
    code, out, _ = cli("doctor")
    assert code == 0 and "vector extensions" in out and "onnx" in out


def test_doctor_fails_for_a_requested_unusable_target(cli, monkeypatch):
    monkeypatch.setattr(OnnxTarget, "requires", {"onnx": "onnx", "no_such_module_xyz": "no-such-package"})
    code, out, err = cli("doctor", "--target", "onnx", "--json", "-")
    assert code == EXIT_MISSING_DEPENDENCY and "not usable here: onnx" in err
    onnx = next(t for t in json.loads(out)["targets"] if t["name"] == "onnx")
    assert not onnx["usable"] and onnx["findings"][0]["advice"] == "pip install no-such-package"
    # Not requested: reported, but not fatal.
    code, _, _ = cli("doctor")
    assert code == 0


def test_doctor_rejects_unknown_target_names(cli):
    code, _, err = cli("doctor", "--target", "onnxx")
    assert code == EXIT_BAD_INPUT and "did you mean 'onnx'" in err


def test_cpu_info_reads_the_model_name():
    info = cpu_info()
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    if names:
        assert info["model"] == names[0]


def test_doctor_flags_the_tvm_ffi_release_that_crashes_tuning(cli, monkeypatch):
    pytest.importorskip("tvm")
    import evit_deploy.hostinfo as hostinfo

    real = hostinfo.package_version
    monkeypatch.setattr(hostinfo, "package_version",
                        lambda name: "0.1.15.post2" if name == "apache-tvm-ffi" else real(name))
    code, out, err = cli("doctor", "--target", "tvm", "--json", "-")
    tvm = next(t for t in json.loads(out)["targets"] if t["name"] == "tvm")
    crash = [f for f in tvm["findings"] if "ToJSONGraph" in f["message"]]
    assert code != 0 and not tvm["usable"] and crash and "<0.1.15" in crash[0]["advice"]
    monkeypatch.setattr(hostinfo, "package_version", real)
    code, out, _ = cli("doctor", "--target", "tvm", "--json", "-")
    tvm = next(t for t in json.loads(out)["targets"] if t["name"] == "tvm")
    host = [f["message"] for f in tvm["findings"] if f["message"].startswith("host target: llvm ")]
    assert code == 0 and tvm["usable"] and host and "-mcpu=" in host[0]


def test_doctor_says_how_core_ml_artifacts_are_checked_here(cli):
    pytest.importorskip("coremltools")
    code, out, err = cli("doctor", "--target", "coreml", "--json", "-")
    coreml = next(t for t in json.loads(out)["targets"] if t["name"] == "coreml")
    assert code == 0 and "Failed to load" not in err
    if sys.platform != "darwin":
        assert any("reference executor" in f["message"] for f in coreml["findings"])
