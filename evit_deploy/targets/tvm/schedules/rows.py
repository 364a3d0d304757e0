"""Row-wise reductions followed by element-wise work on the same rows: the attention's
softmax (max, exp, sum, divide along each row of scores).

Each row is done while it is in L1: its maximum and its sum of exponentials are
reduced in vectors (``rfactor``: one partial per lane, then the lanes), the
exponentials computed and the row divided in vectors. TVM's own CPU rule
(``dlight.cpu.Reduction``) reduces each row in one scalar, a chain of dependent
additions as long as the row, which took most of the softmax's time; it stays as the
last variant, for rows no vector width divides (a prime length).
"""

from __future__ import annotations

from .common import MIN_PARALLEL_WORK, divisors, mark, parallel_if_worth_it, work_of
from .facts import CpuFacts

KIND = "rows"
#: Vector widths offered to the tuner per kernel (the widest divisors of the row).
MAX_WIDTHS = 2
#: An element of a softmax costs about ten multiply-adds (exp and a division).
WORK_PER_ELEMENT = 10
DLIGHT = ("dlight",)


def _blocks(sch) -> dict:
    return {sch.get(b).name_hint: b for b in sch.get_child_blocks(sch.get_sblock("root"))}


def _is_reduction(sch, block) -> bool:
    from tvm.tirx import IterVar

    return any(v.iter_type == IterVar.CommReduce for v in sch.get(block).iter_vars)


def match(sch) -> bool | None:
    return True if any("softmax" in name for name in _blocks(sch)) else None


def _row_length(sch) -> int:
    last = sch.get_child_blocks(sch.get_sblock("root"))[-1]
    return int(sch.get(sch.get_loops(last)[-1]).extent)


def variants(sch, facts: CpuFacts) -> list[tuple]:
    """("vectors", width) for the widest divisors of the row that fit a register, best
    first, then TVM's rule."""
    if not match(sch):
        return []
    length = _row_length(sch)
    widths = sorted((d for d in divisors(length) if 1 < d <= facts.lanes), reverse=True)[:MAX_WIDTHS]
    return [("vectors", width) for width in widths] + [DLIGHT]


def apply(sch, variant: tuple, facts: CpuFacts):
    if variant == DLIGHT:
        return _apply_dlight(sch)
    _, width = variant
    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    last = blocks[-1]
    reductions = [b for b in blocks if _is_reduction(sch, b)]
    # Element-wise blocks read by one block only (x - max) are inlined into it; the
    # exponentials, read by the sum and the division, stay a buffer of one row.
    for block in blocks[:-1]:
        if not _is_reduction(sch, block) and len(sch.get_consumers(block)) == 1:
            sch.compute_inline(block)
    partials = set()
    for block in reductions:
        _, lane = sch.split(sch.get_loops(block)[-1], [None, width])
        partials.add(sch.get(sch.rfactor(lane, 0)).name_hint)
    elements = work_of(sch, last)
    *outer, axis = sch.get_loops(last)
    row = sch.fuse(*outer)
    sch.vectorize(sch.split(axis, [None, width])[1])
    for block in reversed(sch.get_child_blocks(sch.get_sblock("root"))[:-1]):
        sch.compute_at(block, row)
    for block in sch.get_child_blocks(row)[:-1]:
        loops = sch.get_loops(block)[1:]
        if sch.get(block).name_hint in partials:
            if len(loops) == 2:             # (lane, step) -> (step, lane): the lanes are the vector
                sch.reorder(loops[1], loops[0])
            sch.vectorize(sch.get_loops(block)[-1])
        elif not _is_reduction(sch, block):
            sch.vectorize(sch.split(loops[-1], [None, width])[1])
    parallel_if_worth_it(sch, row, elements * WORK_PER_ELEMENT, facts)
    mark(sch, last, KIND)
    return sch


def _rule():
    from tvm.s_tir.dlight.cpu import Reduction
    return Reduction()


def _apply_dlight(sch):
    import tvm

    elements = work_of(sch, sch.get_child_blocks(sch.get_sblock("root"))[-1])
    scheduled = None
    # At batch 1 the rule's parallel loop costs more than a small softmax takes (6 us
    # against 1 us, M0 on an AMD EPYC): small ones stay as they are.
    if elements >= MIN_PARALLEL_WORK // WORK_PER_ELEMENT:
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
