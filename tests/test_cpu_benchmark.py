"""benchmarks/cpu_throughput.py: engines take turns, and every figure is a rate of calls
the engine really made (no timing assertions: speed is for the benchmark, not tests)."""

from __future__ import annotations

import importlib.util

from conftest import ROOT


def _load():
    spec = importlib.util.spec_from_file_location("cpu_throughput", ROOT / "benchmarks" / "cpu_throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rounds_interleave_engines_and_count_images():
    bench = _load()
    calls = []

    def engine(name):
        def run():
            calls.append(name)
        return run

    results = bench.timed_rounds({"a": engine("a"), "b": engine("b")}, rounds=3, min_seconds=0.01, batch=16)
    assert list(results) == ["a", "b"] and all(len(v) == 3 for v in results.values())
    # Each round runs a to completion, then b: the sequence switches engine 2 x 3 - 1 times.
    switches = sum(1 for x, y in zip(calls, calls[1:]) if x != y)
    assert switches == 5
    assert all(rate > 0 for v in results.values() for rate in v)


def test_paper_figures_come_from_the_profile():
    bench = _load()
    figures = bench.paper_figures()
    assert set(figures) == {f"m{i}" for i in range(6)}
    assert all(tvm > torch for torch, tvm in figures.values())     # TVM was faster in every row
