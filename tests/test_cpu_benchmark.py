"""benchmarks/cpu_throughput.py: the goal verdicts from benchmark records (timing itself is
`evit-deploy bench`'s, tested there; speed is for the benchmark, not tests)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT
from evit_deploy.bench import BenchRecord


def _load():
    spec = importlib.util.spec_from_file_location("cpu_throughput", ROOT / "benchmarks" / "cpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(backend, ips, notes=(), noisy=False):
    return BenchRecord("efficientvit_m0", backend, 16, 1, ips, {"median": 16e3 / ips}, 10, 5, noisy,
                       notes=list(notes))


def test_paper_ratios_come_from_the_profile():
    ratios = _load().paper_ratios()
    assert set(ratios) == {f"m{i}" for i in range(6)}
    assert all(1.3 < r < 1.8 for r in ratios.values())      # the paper's +38% .. +71%


def _verdict(backend, ips, *, torch=228, ort=350, batch=16, threads=1, notes=()):
    script = _load()
    records = [_record(backend, ips, notes), _record("torch-jit", torch), _record("onnxruntime", ort, noisy=True)]
    [row] = script.verdicts(records, script.paper_ratios(), batch=batch, threads=threads)
    assert row["noisy"] and row["vs_onnxruntime"] == pytest.approx(ips / ort)
    return row


@pytest.mark.parametrize("ips,notes,met", [
    (250, (), True),                             # 0.71x onnxruntime
    (240, (), False),                            # 0.69x
    (400, ("3 kernels have no schedule",), False),   # a library with health warnings never counts
])
def test_defaults_need_seven_tenths_of_onnxruntime(ips, notes, met):
    assert _verdict("tvm", ips, notes=notes)["goal_met"] is met


@pytest.mark.parametrize("ips,torch,ort,batch,met", [
    (430, 228, 350, 16, True),      # 1.23x onnxruntime, 1.89x PyTorch (paper M0: 1.61)
    (430, 300, 350, 16, False),     # beats onnxruntime by 1.2x but only 1.43x PyTorch
    (400, 228, 350, 16, False),     # 1.14x onnxruntime: not the 1.2x asked at batch 16
    (360, 300, 350, 1, True),       # batch 1: ahead of onnxruntime is enough
    (340, 100, 350, 1, False),
])
def test_tuned_goal_depends_on_the_shape(ips, torch, ort, batch, met):
    row = _verdict("tvm@tuned", ips, torch=torch, ort=ort, batch=batch)
    assert row["goal_met"] is met
    assert (row["goal_vs_torch_jit"] is None) == (batch != 16)


def test_bf16_is_reported_not_judged():
    row = _verdict("tvm:bf16", 900)
    assert row["goal_met"] is None and row["vs_torch_jit"] == pytest.approx(900 / 228)


def test_backends_include_installed_peers_only():
    script = _load()
    assert script.choose_backends(tuned=True, bf16=False, bf16_tuned=False, available=["onnxruntime", "tvm"]) == \
        ["torch-jit", "onnxruntime", "tvm", "tvm@tuned"]
    assert script.choose_backends(tuned=False, bf16=True, bf16_tuned=False,
                                  available=["onnxruntime", "tvm", "openvino"])[-3:] == \
        ["tvm:bf16", "openvino", "openvino:bf16"]
