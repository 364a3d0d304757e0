"""Reductions over the spatial axes of an NHWC map: the global average pools (before the
classifier, and the squeeze-excite's mean).

The reduced axes (H, W) are outside the channels, which are innermost in NHWC and so go
in vectors: the sum of a block of channels accumulates over the map in registers, and
the division that makes it a mean is applied on the way out.
"""

from __future__ import annotations

from .common import accumulate_locally, finish_epilogue, inline_around, mark, parallel_if_worth_it, work_of
from .facts import CpuFacts

KIND = "reduction"


def _reduction_block(sch):
    """The kernel's one reduction block whose innermost loop is spatial and comes after
    all its reduction loops in the data (NHWC: channels last), or None."""
    from tvm.tirx import IterVar

    found = []
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        kinds = [iv.iter_type for iv in sch.get(block).iter_vars]
        if IterVar.CommReduce in kinds:
            found.append((block, kinds))
    if len(found) != 1:
        return None
    block, kinds = found[0]
    spatial = [i for i, k in enumerate(kinds) if k == IterVar.DataPar]
    if not spatial or kinds[-1] == IterVar.DataPar or any(k not in (IterVar.DataPar, IterVar.CommReduce) for k in kinds):
        return None
    return block, spatial


def match(sch) -> bool | None:
    names = [sch.get(b).name_hint for b in sch.get_child_blocks(sch.get_sblock("root"))]
    if any("softmax" in n for n in names) or any(n in ("matmul", "NT_matmul") or "conv" in n for n in names):
        return None
    try:
        return True if _reduction_block(sch) is not None else None
    except TypeError:
        return None


def variants(sch, facts: CpuFacts) -> list[None]:
    return [None] if match(sch) else []


def apply(sch, _variant, facts: CpuFacts):
    block, spatial = _reduction_block(sch)
    epilogue = inline_around(sch, block)
    loops = sch.get_loops(block)
    inner = loops[spatial[-1]]
    reduce = [loop for i, loop in enumerate(loops) if i not in spatial]
    outer_spatial = [loops[i] for i in spatial[:-1]]
    extent = int(sch.get(inner).extent)
    width = facts.lanes if extent % facts.lanes == 0 else 1
    io, ii = sch.split(inner, [None, width])
    sch.reorder(*outer_spatial, io, *reduce, ii)
    work = work_of(sch, block)
    outer = sch.fuse(*outer_spatial, io) if outer_spatial else io
    parallel_if_worth_it(sch, outer, work, facts)
    epilogue = accumulate_locally(sch, block, epilogue)
    finish_epilogue(sch, epilogue, outer, width)
    if width > 1:
        sch.vectorize(ii)
    mark(sch, block, KIND)
    return sch
