"""benchmarks/cpu_throughput.py: the goal verdict from benchmark records (timing itself is
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


def _record(model, backend, ips, tuned=True, noisy=False):
    return BenchRecord(model, backend, 16, 1, ips, {"median": 16e3 / ips}, 10, 5, noisy,
                       notes=[] if tuned else ["70 of 70 kernels untuned"])


def test_paper_ratios_come_from_the_profile():
    ratios = _load().paper_ratios()
    assert set(ratios) == {f"m{i}" for i in range(6)}
    assert all(1.3 < r < 1.8 for r in ratios.values())      # the paper's +38% .. +71%


@pytest.mark.parametrize("tvm,torch,ort,tuned,met", [
    (400, 228, 350, True, True),      # beats both, by more than the paper's M0 ratio (1.61)
    (350, 228, 300, True, False),     # beats onnxruntime, but only 1.54x PyTorch
    (400, 228, 420, True, False),     # onnxruntime is faster
    (400, 228, 350, False, False),    # an untuned build never counts
])
def test_goal_needs_the_papers_ratio_and_onnxruntime_beaten(tvm, torch, ort, tuned, met):
    script = _load()
    records = [_record("efficientvit_m0", "tvm", tvm, tuned), _record("efficientvit_m0", "torch-jit", torch),
               _record("efficientvit_m0", "onnxruntime", ort, noisy=True)]
    [row] = script.verdicts(records, script.paper_ratios())
    assert row["goal_met"] is met and row["noisy"]
    assert row["tvm_vs_torch"] == pytest.approx(tvm / torch) and row["tvm_vs_onnxruntime"] == pytest.approx(tvm / ort)
