"""Row-wise reductions followed by element-wise work on the same rows: the attention's
softmax (max, exp, sum, divide along each row of scores).

TVM's own CPU rule for this pattern (``dlight.cpu.Reduction``) is what is used: each
row's blocks computed together under one parallel loop over rows, the element-wise
ones vectorized. Measured on M0's softmaxes (AMD EPYC, one thread): 2x faster than
TVM's unscheduled code at batch 16; at batch 1 the rule's parallel loop costs more than
a small softmax takes (6 us against 1 us), so small ones stay as they are.
"""

from __future__ import annotations

from .common import MIN_PARALLEL_WORK, mark
from .facts import CpuFacts

KIND = "rows"


def _rule():
    from tvm.s_tir.dlight.cpu import Reduction
    return Reduction()


def match(sch) -> bool | None:
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    return True if any("softmax" in n for n in names) else None


def variants(sch, facts: CpuFacts) -> list[None]:
    return [None] if match(sch) else []


def apply(sch, _variant, facts: CpuFacts):
    import tvm

    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    elements = 1
    for loop in sch.get_loops(blocks[-1]):
        elements *= int(sch.get(loop).extent)
    scheduled = None
    if elements >= MIN_PARALLEL_WORK // 10:        # exp and a division per element: ~10x a multiply-add
        with tvm.target.Target({"kind": "llvm"}) as target:
            scheduled = _rule().apply(sch.mod["main"], target, False)
    # dlight returns a schedule of its own: replay its trace onto ours, so that what is
    # stored in a tuning database is one trace from the kernel's unscheduled form. Rows
    # of one element (the attention of a 1x1 map) it declines: they stay as they are.
    if scheduled is not None:
        scheduled = scheduled[0] if isinstance(scheduled, list) else scheduled
        scheduled.trace.apply_to_schedule(sch, remove_postproc=False)
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    mark(sch, blocks[-1], KIND)
    return sch
