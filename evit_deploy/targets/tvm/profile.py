"""Per-kernel times of a TVM library, for ``evit-deploy profile``.

The Relax VM calls an instrument around each of its call instructions. A kernel returns
only when its thread pool is done, so the wall time between the two calls is the
kernel's. TVM fuses operators into kernels named after them (``fused_conv2d_add_relu``)
and keeps no module paths, so kernels are categorised by name and not attributed to
blocks.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..base import OpTime
from .runtime import CompiledModel, load


class KernelTimer:
    """Times the kernel calls of a loaded library's runs (instruments its VM)."""

    def __init__(self, model: CompiledModel):
        self.model = model
        self._timings: list[tuple[str, float]] | None = None
        self._started = 0.0
        model.vm.set_instrument(self._time_call)

    def _time_call(self, func, symbol, before_run, ret_value, *args):
        if self._timings is not None and not str(symbol).startswith("vm.builtin."):
            if before_run:
                self._started = time.perf_counter()
            else:
                self._timings.append((str(symbol), time.perf_counter() - self._started))
        return 0

    def run(self, x) -> list[tuple[str, float]]:
        """(kernel name, seconds) for each kernel call of one run on ``x`` (a device tensor)."""
        self._timings = []
        try:
            self.model.run_device(x)
            return self._timings
        finally:
            self._timings = None


def profile_ops(path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                blocks: dict[str, str]) -> list[OpTime]:
    """Every kernel call of ``iterations`` runs on ``inputs``, after a warm-up run
    (``blocks`` unused: kernels are named after fused operators, not modules)."""
    model = load(path, threads=threads)
    timer = KernelTimer(model)
    x = model.to_device(inputs[model.description.input.name])
    model.run_device(x)                                # warm-up
    return [OpTime(name, seconds, None) for _ in range(iterations) for name, seconds in timer.run(x)]
