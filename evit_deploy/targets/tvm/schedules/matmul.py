"""Matrix products: the attention's batched ones (``q^T k`` with the scale and the position
bias fused after it, ``attention x v``: one small product per window and head) and the
classifier head's (pooled features x weights + bias).

A block of output rows x columns is accumulated in registers across the whole
reduction, the output's last axis in vectors: whole registers where it is a multiple
of their width, else its largest divisor that fits (7 for the 49 positions of a window:
LLVM masks the rest of the register). The attention's products are small (49 x 16 by
16 x 49 for a 7x7 window), so a block spans all their columns; the head's 1000 columns
are cut into blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

from .common import (divisors, extents, find_block, finish_register_block, inline_around, parallel_if_worth_it,
                     vector_width, work_of)
from .facts import CpuFacts

KIND = "matmul"
NAMES = ("matmul", "NT_matmul")
MAX_VARIANTS = 3


@dataclass(frozen=True)
class Matmul:
    b: int | None        # None: one product (the head's)
    m: int
    n: int
    k: int


def match(sch) -> Matmul | None:
    block = find_block(sch, NAMES)
    if block is None:
        return None
    ext = extents(sch, block)
    if ext is None or len(ext) not in (3, 4):      # ([batch,] rows, columns, reduction)
        return None
    return Matmul(*ext) if len(ext) == 4 else Matmul(None, *ext)


def variants(sch, facts: CpuFacts) -> list[tuple[int, int]]:
    mm = match(sch)
    return [] if mm is None else block_shapes(mm, facts)


def block_shapes(mm: Matmul, facts: CpuFacts) -> list[tuple[int, int]]:
    """(rows, columns) blocks, best guess first: at most half the registers accumulate,
    columns as many vectors as the output has up to four; the most accumulators first,
    then the most rows (a block of one row and seven vectors of a window's 49 columns
    ran 3x slower than seven rows of one vector, M0 on an AMD EPYC)."""
    width = vector_width(mm.n, facts.lanes)
    budget = facts.vector_registers // 2
    shapes = set()
    for vectors in (v for v in (4, 2, 1, mm.n // width) if v <= mm.n // width and (mm.n // width) % v == 0):
        rows = [d for d in sorted(divisors(mm.m), reverse=True) if d * vectors <= budget]
        if rows:
            shapes.add((rows[0], vectors))
    # A block wider than the registers (the head's 1000 columns in one) spills: 5x slower.
    shapes = sorted(shapes or {(1, 1)}, key=lambda s: (-s[0] * s[1], -s[0]))
    return [(rows, vectors * width) for rows, vectors in shapes[:MAX_VARIANTS]]


def apply(sch, shape: tuple[int, int], facts: CpuFacts):
    rows, cols = shape
    width = vector_width(cols, facts.lanes)
    block = find_block(sch, NAMES)
    epilogue = inline_around(sch, block)
    loops = sch.get_loops(block)
    batch, (i, j, k) = loops[:-3], loops[-3:]
    io, ii = sch.split(i, [None, rows])
    jo, jm, ji = sch.split(j, [None, cols // width, width])
    sch.reorder(*batch, io, jo, k, ii, jm, ji)
    work = work_of(sch, block)
    outer = sch.fuse(*batch, io, jo)
    parallel_if_worth_it(sch, outer, work, facts)
    return finish_register_block(sch, block, epilogue, at=outer, lanes=width, unrolled=(ii, jm), vector=ji, kind=KIND)
