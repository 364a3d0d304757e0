"""Element-wise and copying kernels: additions, and the reshapes, splits and concatenations
the attention's heads and windows leave as kernels of their own.

All loops are fused into one, cut into vectors where the output's last axis allows it
(whole vectors only: a copy with a ragged vector is slower than a scalar one) and shared
among the threads.
"""

from __future__ import annotations

from .common import mark, parallel_if_worth_it
from .facts import CpuFacts

KIND = "injective"


def match(sch) -> bool | None:
    from tvm.tirx import IterVar

    blocks = sch.get_child_blocks(sch.get_sblock("root"))
    if not blocks:
        return None
    for block in blocks:
        if any(iv.iter_type != IterVar.DataPar for iv in sch.get(block).iter_vars):
            return None
    try:
        [int(sch.get(loop).extent) for loop in sch.get_loops(blocks[-1])]
    except TypeError:
        return None
    return True


def variants(sch, facts: CpuFacts) -> list[None]:
    return [None] if match(sch) else []


def apply(sch, _variant, facts: CpuFacts):
    outputs = []
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get_consumers(block):
            sch.compute_inline(block)
        else:
            outputs.append(block)      # a split writes one output per part
    for block in outputs:
        loops = sch.get_loops(block)
        inner_extent = int(sch.get(loops[-1]).extent)
        width = facts.lanes if inner_extent % facts.lanes == 0 else (
            facts.lanes // 2 if inner_extent % (facts.lanes // 2) == 0 else 1)
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        total = int(sch.get(fused).extent)
        outer = fused
        if width > 1:
            outer, vector = sch.split(fused, [None, width])
            sch.vectorize(vector)
        parallel_if_worth_it(sch, outer, total, facts)
    mark(sch, outputs[-1], KIND)
    return sch
