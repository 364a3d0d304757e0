"""Per-operator times of a ``.pte`` from ExecuTorch's ETDump, for ``evit-deploy profile``.

ExecuTorch's Python runtime records an ETDump when a program is loaded with
``enable_etdump``, and its XNNPACK backend adds one event per XNNPACK operator inside the
delegate call ("Convolution (NHWC, F32) DWConv #2", "Fully Connected (NC, F32) GEMM #3"),
read back with ``executorch.devtools.Inspector``. Here:

* the warm-up run is dropped from every event (ETDump keeps one time per run);
* the instance number (``#3``) is dropped, so that operators of one kind add up;
* what the delegate call spent outside its operators (XNNPACK's own bookkeeping between
  them) is one more entry, so the operators add up to the delegate's time;
* operators outside the delegate (ExecuTorch's portable kernels) are kept as they are.

XNNPACK's operator names do not say which PyTorch module an operator came from, so no
operator is attributed to a block of the network.
"""

from __future__ import annotations

import re
import tempfile
import warnings
from pathlib import Path

import numpy as np

from ...errors import BadInputError
from ...native_output import captured
from ..base import OpTime
from .runtime import Session

#: ETDump's own events: the program's loading and the spans that contain the operators.
FRAMEWORK_EVENTS = {"Method::init", "Program::load_method", "Method::execute"}
DELEGATE_EVENT = "DELEGATE_CALL"
OUTSIDE_OPERATORS = "XNNPACK delegate, between operators"
_INSTANCE = re.compile(r"\s+#\d+$")


def profile_ops(path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                blocks: dict[str, str]) -> list[OpTime]:
    session = Session(path, threads=threads, etdump=True)
    for _ in range(1 + iterations):                      # the first run is the warm-up
        session(inputs)
    with tempfile.TemporaryDirectory(prefix="evit-etdump-") as tmp:
        etdump = Path(tmp) / "profile.etdp"
        session.program.write_etdump_result_to_file(str(etdump), str(Path(tmp) / "debug.bin"))
        # The Inspector's import announces torchao kernels; without a debug buffer it
        # warns that no tensor data is available (none is asked for).
        with captured(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from executorch.devtools import Inspector

            inspector = Inspector(etdump_path=str(etdump))
    return operator_times(inspector.event_blocks)


def operator_times(event_blocks) -> list[OpTime]:
    """OpTimes (seconds summed over the runs after the first) from an Inspector's blocks."""
    ops, delegate, inside = [], 0.0, 0.0
    for block in event_blocks:
        for event in block.events:
            runs = list(event.perf_data.raw)[1:] if event.perf_data is not None else []
            if not runs or event.name in FRAMEWORK_EVENTS:
                continue
            seconds = sum(runs) / 1000.0                 # the Inspector reports milliseconds
            if event.name == DELEGATE_EVENT:
                delegate += seconds
                continue
            if event.is_delegated_op:
                inside += seconds
            ops.append(OpTime(_INSTANCE.sub("", event.name), seconds))
    if not ops:
        raise BadInputError("the ExecuTorch runtime recorded no operator times (ETDump without XNNPACK events)")
    if delegate > inside:
        ops.append(OpTime(OUTSIDE_OPERATORS, delegate - inside))
    return ops
