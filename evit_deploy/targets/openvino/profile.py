"""Per-operation times from OpenVINO's performance counters (``PERF_COUNT``), for
``evit-deploy profile``.

The CPU plug-in reports every executed operation of its compiled graph (after its own
fusions: a convolution with its bias and ReLU is one entry) with the type it ran as. Two
things are done here by hand:

* types whose name says nothing to ``profile``'s categories are given the operator they
  compute (``FullyConnected`` is a matrix multiply, ``Subgraph`` a fused run of
  element-wise operations, ``PowerStatic`` a multiply-add, ``FakeQuantize`` a clamp
  onto the int8 grid), keeping the plug-in's own type name first;
* an operation is attributed to a block of the network through the PyTorch module its
  FX node ran in, recorded in the IR's rt_info at export (``<fx node>/<aten op>/<type>``
  is how the converter names operations; the plug-in's reorders take the name of the
  operation they feed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..base import OpTime
from .runtime import MODULE_PATHS, load

#: Plug-in operation types -> what they compute, in the words ``profile``'s categories know.
COMPUTES = {
    "FullyConnected": "matmul",
    "Subgraph": "fused element-wise add/mul",
    "Eltwise": "element-wise add/mul",
    "PowerStatic": "mul/add",
    "FakeQuantize": "quantize: mul/add/clamp",
    "Convert": "cast",
    "MVN": "layer_norm",
    "Interpolate": "resize copy",
    "ShapeOf": "shape",
}

#: Entries that did no work (the plug-in lists inputs, outputs and fused-away operations).
SKIPPED_STATUS = "NOT_RUN"


def operation_name(node_type: str) -> str:
    """The name ``profile`` shows and categorises: the plug-in's type, with what it
    computes where the type alone does not say."""
    return f"{node_type} ({COMPUTES[node_type]})" if node_type in COMPUTES else node_type


def block_of(node_name: str, paths: dict[str, str], blocks: dict[str, str]) -> str | None:
    """The block of the innermost module (or its nearest enclosing one) that the FX node
    named at the start of ``node_name`` ran in."""
    path = paths.get(node_name.split("/")[0])
    while path:
        if path in blocks:
            return blocks[path]
        path = path.rpartition(".")[0]
    return None


def profile_ops(path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                blocks: dict[str, str]) -> list[OpTime]:
    model = load(path, threads=threads, profile=True)
    key = list(MODULE_PATHS)
    paths = json.loads(model.model.get_rt_info(key).astype(str)) if model.model.has_rt_info(key) else {}
    model.run_named(inputs)                                  # warm-up
    ops = []
    for _ in range(iterations):
        model.run_named(inputs)
        for entry in model.request.get_profiling_info():
            if entry.status.name == SKIPPED_STATUS:
                continue
            ops.append(OpTime(operation_name(entry.node_type), entry.real_time.total_seconds(),
                              block_of(entry.node_name, paths, blocks)))
    return ops
