"""Dense convolutions (1x1, and the stem's 3x3) as register-blocked matrix products.

Most of EfficientViT's time is in 1x1 convolutions (the FFNs and projections), which in
NHWC are matrix products ``[N*H*W, C] x [C, F]`` with an element-wise epilogue (bias,
residual, ReLU). MetaSchedule's fp32 design space accumulates into a full-size buffer and
on the small 7x7 and 4x4 maps settles on one vector of output channels per row tile;
measured on an AVX-512 Xeon, most of M0's best tuned 1x1 kernels ran 1.1-1.8x slower than
the classic register-blocked kernel (as in onnxruntime's MLAS): a block of output pixels x
``nr`` channels held in registers across the whole reduction, weights packed into
``nr``-wide panels (MetaSchedule's layout-rewrite post-processor does the packing), the
epilogue applied while the block is still in registers.

The same kernel serves the stem's dense 3x3 convolutions (a matrix product whose
reduction runs over the 3x3 window too), in two forms. An *image block* holds the same
output position of several images: the zero padding, inlined into the loads, then tests
one position per step for the whole block (a block along a row with the padding inlined
tests every pixel: 1.6-2.2x slower, measured on M4's stem). A *row tile* first copies the
input rows one output row reads into a small padded buffer (for the first convolution,
transposed from the NCHW image as well), then runs blocks along the row on it with no
test at all: the first convolution, which reads 3 channels of 16 images 600 KB apart,
ran 7x faster that way than as image blocks (M0, AMD EPYC).
"""

from __future__ import annotations

from .common import (ConvShape, block_row_by_channels, conv_shape, divisors, find_block, finish_register_block,
                     inline_around, parallel_if_worth_it, work_of)
from .facts import CpuFacts

KIND = "gemm"
#: Accumulators below this leave the FMA units idle (latency 4 cycles, 2 units).
MIN_ACCUMULATORS = 6
#: Registers kept free of accumulators: the broadcast input and weight vectors.
SPARE_REGISTERS = 4
#: Block shapes offered to the tuner per kernel; more rarely win and each costs a build.
MAX_VARIANTS = 6


Conv = ConvShape


def match(sch) -> Conv | None:
    """A dense (not grouped) NHWC convolution, with static shapes."""
    return conv_shape(sch, ("conv2d_nhwc",))


def lanes_for(nr: int, facts: CpuFacts) -> int:
    """The vector width a block of ``nr`` channels is computed in: whole registers, or
    half ones for channel counts that are not a multiple of a register (the stem's first
    convolution: 8 channels in M0, 24 in M5)."""
    return facts.lanes if nr % facts.lanes == 0 else facts.lanes // 2


def block_shapes(conv: Conv, facts: CpuFacts) -> list[tuple[int, int, int, int]]:
    """(images, rows, columns, channels) register blocks for the output, best guess first.

    A block's pixels come either from the same position in several images (any map size)
    or from consecutive pixels of one image (whole rows when it spans more than one), so
    its output is always a rectangle the epilogue can be placed under. A convolution with
    a window larger than 1x1 gets image blocks here (and row tiles: :func:`row_tiles`).
    """
    lanes = facts.lanes
    most = facts.vector_registers - SPARE_REGISTERS
    widths = [nr for nr in (2 * lanes, lanes, 4 * lanes) if conv.f % nr == 0]
    if not widths and conv.f % (lanes // 2) == 0 and conv.f <= 2 * lanes:
        widths = [conv.f]                # all the channels, in half-width vectors
    pixel_blocks: list[tuple[int, int, int]] = [(images, 1, 1) for images in divisors(conv.n)]
    for cols in sorted(divisors(conv.w), reverse=True) if not conv.window else []:
        for rows in divisors(conv.h):
            if rows > 1 and cols != conv.w:
                continue
            pixel_blocks.append((1, rows, cols))

    def accumulators(shape):
        images, rows, cols, nr = shape
        return images * rows * cols * nr // lanes_for(nr, facts)

    shapes = [(images, rows, cols, nr) for nr in widths for images, rows, cols in pixel_blocks
              if accumulators((images, rows, cols, nr)) <= most]
    # Measured best on M0-M5 (AVX-512): half the registers hold accumulators (16 of 32),
    # two vectors of channels wide. Blocks too small to keep the FMA units busy only
    # where nothing larger fits (a tiny map of a small batch).
    shapes.sort(key=lambda s: (accumulators(s) < MIN_ACCUMULATORS, abs(accumulators(s) - facts.vector_registers // 2),
                               widths.index(s[3])))
    return shapes[:MAX_VARIANTS]


def row_tiles(conv: Conv, facts: CpuFacts) -> list[tuple[int, int]]:
    """(columns, channels) blocks along an output row, for a windowed convolution computed
    from a padded copy of the rows it reads; best guess first (as for block_shapes)."""
    if not conv.window:
        return []
    lanes = facts.lanes
    widths = [nr for nr in (lanes, 2 * lanes) if conv.f % nr == 0]
    if not widths and conv.f % (lanes // 2) == 0 and conv.f <= 2 * lanes:
        widths = [conv.f]
    most = facts.vector_registers - SPARE_REGISTERS
    tiles = [(cols, nr) for nr in widths for cols in divisors(conv.w)
             if MIN_ACCUMULATORS <= cols * nr // lanes_for(nr, facts) <= most]
    tiles.sort(key=lambda t: (abs(t[0] * t[1] // lanes_for(t[1], facts) - facts.vector_registers // 2),
                              widths.index(t[1])))
    return tiles[:MAX_VARIANTS // 2]


def split_block(sch, conv, block: tuple[int, int, int, int], lanes: int):
    """Split a convolution's output loops into a register block of (images, rows,
    columns, channels), the channels into vectors of ``lanes``: returns the (outer, inner)
    loop pairs of the images, rows and columns, (outer, vector index, lane) of the
    channels, and the reduction loops (window rows, columns, input channels)."""
    images, rows, cols, nr = block
    nn, yy, xx, ff, ry, rx, rc = sch.get_loops(conv)
    fo, fi = sch.split(ff, [None, nr])
    return (sch.split(nn, [None, images]), sch.split(yy, [None, rows]), sch.split(xx, [None, cols]),
            (fo, *sch.split(fi, [None, lanes])), (ry, rx, rc))


def variants(sch, facts: CpuFacts) -> list:
    """Register blocks and, for windowed convolutions, row tiles (:func:`row_tiles`). Row
    tiles come first when the input has fewer channels than a vector holds (the stem's
    first two convolutions: 3 and 8 in M0): an image block then spends more on the
    padding tests of its loads than on multiply-adds (M0, AMD EPYC: 10x and 2x slower),
    while from 16 channels on it is as fast or faster (1.5x and 0.9x)."""
    conv = match(sch)
    if conv is None:
        return []
    rows = [("rows", *t) for t in row_tiles(conv, facts)]
    blocks = [("block", *b) for b in block_shapes(conv, facts)]
    return rows + blocks if conv.c < facts.lanes else blocks + rows


def apply(sch, variant: tuple, facts: CpuFacts):
    """The micro-kernel schedule, before MetaSchedule's post-processors (which add the
    weight packing and the reduction init)."""
    if variant[0] == "rows":
        return _apply_row_tile(sch, *variant[1:], facts)
    images, rows, cols, nr = variant[1:]
    lanes = lanes_for(nr, facts)
    conv = find_block(sch, ("conv2d_nhwc",))
    epilogue = inline_around(sch, conv)      # padding, bias, intermediate element-wise ops
    (no, ni), (yo, yi), (xo, xi), (fo, fio, fii), (ry, rx, rc) = split_block(sch, conv, (images, rows, cols, nr), lanes)
    sch.reorder(fo, no, yo, xo, ry, rx, rc, ni, yi, xi, fio, fii)
    work = work_of(sch, conv)
    outer = sch.fuse(fo, no, yo, xo)
    parallel_if_worth_it(sch, outer, work, facts)
    # The accumulators live in a local block (registers once unrolled); the epilogue
    # reads them straight back, so the conv result never goes to memory.
    return finish_register_block(sch, conv, epilogue, at=outer, lanes=lanes, unrolled=(ni, yi, xi, fio),
                                 vector=fii, kind=KIND)


def _apply_row_tile(sch, cols: int, nr: int, facts: CpuFacts):
    lanes = lanes_for(nr, facts)
    conv = find_block(sch, ("conv2d_nhwc",))
    pad = find_block(sch, ("pad_temp",))
    epilogue = inline_around(sch, conv, keep=(pad,))     # the image's transpose (into the padding), bias
    nn, yy, fo, xo, _, xi, fio, fii = block_row_by_channels(sch, conv, cols, nr, lanes)
    work = work_of(sch, conv)
    row = sch.fuse(nn, yy)
    parallel_if_worth_it(sch, row, work, facts)
    if pad is not None:
        # The rows of padded input this output row reads, computed once per row (and kept
        # small: the buffer shrinks to that region when the kernel is lowered).
        sch.compute_at(pad, row)
    return finish_register_block(sch, conv, epilogue, at=xo, lanes=lanes, unrolled=(xi, fio), vector=fii, kind=KIND)
