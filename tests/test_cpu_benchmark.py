"""benchmarks/cpu_throughput.py: the goal verdicts from benchmark records (timing itself is
`evit-deploy bench`'s, tested there; speed is for the benchmark, not tests)."""

from __future__ import annotations

import importlib.util

import pytest

from conftest import ROOT
from evit_deploy.bench import BenchRecord


def _load(name="cpu_throughput"):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
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


def test_convergence_table_reads_the_curves_tune_records():
    """benchmarks/tune_convergence.py: the estimate each run had reached at fractions of the
    budget, and when each reached the from-nothing run's final estimate."""
    convergence = _load("tune_convergence")
    scratch = {"curve": [[30, 40, 120.0], [90, 120, 105.0], [200, 300, 100.5], [240, 360, 100.0]]}
    sooner = convergence.compare(scratch, {"curve": [[40, 50, 104.0], [80, 100, 99.8]]}, 240)
    assert sooner["final_from_nothing_ms"] == 100.0
    assert sooner["seconds_to_reach_it"] == {"from_nothing": 240, "from_other_db": 80}
    assert [r["from_nothing_ms"] for r in sooner["rows"]] == [120.0, 105.0, 105.0, 100.0]   # at 60, 120, 180, 240 s
    assert [r["from_other_db_ms"] for r in sooner["rows"]] == [104.0, 99.8, 99.8, 99.8]
    never = convergence.compare(scratch, {"curve": [[70, 50, 130.0], [240, 300, 101.5]]}, 240)
    assert never["seconds_to_reach_it"]["from_other_db"] is None and never["rows"][0]["from_other_db_ms"] is None
