"""Depthwise convolutions (NHWC): every channel convolved with its own window.

The channels are innermost in NHWC, so a vector holds neighbouring channels and the
window's weights are one vector per tap. A block of output pixels along a row shares
those weight vectors: each tap's weights are loaded once per block and used by every
pixel of it, which is what keeps the kernel from being bound by weight loads (a
depthwise convolution does only KH x KW multiply-adds per output). The accumulators of
the block stay in registers across the window; the residual, bias and activation are
applied to them before they are stored.
"""

from __future__ import annotations

from .common import (ConvShape, block_row_by_channels, conv_shape, divisors, find_block, finish_register_block,
                     inline_around, parallel_if_worth_it, work_of)
from .facts import CpuFacts

KIND = "depthwise"
NAMES = ("group_conv2d_nhwc", "depthwise_conv2d_nhwc")
MAX_VARIANTS = 4


def match(sch) -> ConvShape | None:
    shape = conv_shape(sch, NAMES)
    return shape if shape is not None and shape.c == 1 else None      # one input channel per group


def variants(sch, facts: CpuFacts) -> list[tuple[int, int]]:
    """(columns, channels) blocks, best guess first: as many pixels of a row as leave
    half the registers to accumulate in, channels one or two vectors wide."""
    dw = match(sch)
    if dw is None:
        return []
    lanes = facts.lanes
    widths = [nr for nr in (lanes, 2 * lanes) if dw.f % nr == 0] or [dw.f]
    budget = facts.vector_registers // 2
    shapes = []
    for nr in widths:
        vectors = max(1, nr // lanes)
        for cols in sorted(divisors(dw.w), reverse=True):
            if cols * vectors <= budget:
                shapes.append((cols, nr))
    shapes.sort(key=lambda s: (-(s[0] * max(1, s[1] // lanes)), s[1]))
    return shapes[:MAX_VARIANTS]


def apply(sch, shape: tuple[int, int], facts: CpuFacts):
    cols, nr = shape
    lanes = min(facts.lanes, nr)
    conv = find_block(sch, NAMES)
    epilogue = inline_around(sch, conv)
    nn, yy, fo, xo, (_, rx, _), xi, fio, fii = block_row_by_channels(sch, conv, cols, nr, lanes)
    work = work_of(sch, conv)
    outer = sch.fuse(nn, yy, fo, xo)
    parallel_if_worth_it(sch, outer, work, facts)
    return finish_register_block(sch, conv, epilogue, at=outer, lanes=lanes, unrolled=(rx, xi, fio), vector=fii,
                                 kind=KIND)
