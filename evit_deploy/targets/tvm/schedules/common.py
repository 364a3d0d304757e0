"""What every kernel class's schedule does the same way.

A fused kernel is one *main* block (the convolution or matrix product, or for
element-wise kernels simply the last block) with element-wise blocks before it (padding,
the transposed read of the image) and after it (bias, residual, activation). Schedules
here inline the ones before into the main block's loads and place the last one under the
main block's outer loop, so the main block's result is consumed while still in
registers or L1.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Block annotation that marks a schedule written here, and which kernel class wrote it
#: (read back from database traces; the key predates this package and stays, so that
#: existing databases still say which of their records are hand-written).
MARK = "evit_deploy.template"


#: Multiply-adds (or elements) per thread below which a kernel runs on the calling thread:
#: waking TVM's thread pool costs about 5 us even for one thread, more than a small
#: kernel takes (measured on M0 at batch 1: 70 kernels, most of them a few us).
MIN_PARALLEL_WORK = 200_000


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def vector_width(n: int, lanes: int) -> int:
    """The widest vector an axis of ``n`` elements splits into whole: ``lanes`` or its
    largest divisor below (7 for a window's 49 positions: LLVM masks the rest of the
    register). Never a split with a remainder: its predicate is slower, and in a
    reduction split for ``rfactor`` TVM 0.27 gets it wrong."""
    return max(d for d in divisors(n) if d <= lanes)


def extents(sch, block) -> list[int] | None:
    """The loop extents of a block, or None when one is symbolic (a dynamic batch)."""
    try:
        return [int(sch.get(loop).extent) for loop in sch.get_loops(block)]
    except TypeError:
        return None


def find_block(sch, names: tuple[str, ...]):
    """The root block's child named one of ``names`` (the first found), or None."""
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(block).name_hint in names:
            return block
    return None


def inline_around(sch, main, keep=()):
    """Inline every block but ``main``, those in ``keep`` and the kernel's output block
    into its consumers; returns the output block (None when ``main`` writes the output
    itself)."""
    kept = [b for b in (main, *keep) if b is not None]
    epilogue = None
    for block in sch.get_child_blocks(sch.get_sblock("root")):
        # (Looked up each time: inlining a producer gives its consumer a new node.)
        if any(sch.get(block).same_as(sch.get(k)) for k in kept):
            continue
        if sch.get_consumers(block):
            sch.compute_inline(block)
        elif epilogue is None:
            epilogue = block
        else:
            raise ValueError("more than one output")
    return epilogue


def accumulate_locally(sch, block, epilogue):
    """Give ``block`` a local accumulator (registers, once its loops are unrolled) and return
    the block that must be placed after it: the kernel's output block, which then reads the
    accumulator directly, or (when ``block`` writes the output itself) the copy out of it."""
    copy = sch.cache_write(block, 0, "local")
    if epilogue is None:
        return copy
    sch.compute_inline(copy)
    return epilogue


def finish_epilogue(sch, epilogue, at, lanes: int) -> None:
    """Compute the output block under loop ``at`` of the main block, vectorized along its
    innermost axis where that splits into whole vectors."""
    if epilogue is None:
        return
    sch.reverse_compute_at(epilogue, at)
    inner = sch.get_loops(epilogue)[-1]
    extent = int(sch.get(inner).extent)
    width = lanes if extent % lanes == 0 else (extent if extent <= 2 * lanes else 1)
    if width > 1:
        sch.vectorize(sch.split(inner, [None, width])[-1])


@dataclass(frozen=True)
class ConvShape:
    """An NHWC convolution's loop extents: output (n, h, w, f), window (kh, kw), and the
    input channels each output reads (c: 1 for a depthwise convolution)."""

    n: int
    h: int
    w: int
    f: int
    kh: int
    kw: int
    c: int

    @property
    def window(self) -> bool:
        return (self.kh, self.kw) != (1, 1)


def conv_shape(sch, names: tuple[str, ...]) -> ConvShape | None:
    """The shape of the kernel's convolution block (named one of ``names``), static only."""
    block = find_block(sch, names)
    if block is None:
        return None
    ext = extents(sch, block)
    return ConvShape(*ext) if ext is not None and len(ext) == 7 else None


def finish_register_block(sch, block, epilogue, *, at, lanes: int, unrolled, vector, kind: str):
    """The end every micro-kernel shares: accumulate ``block`` in registers, place the
    output block under loop ``at``, unroll the register block's loops, vectorize the
    innermost one, and mark the schedule as written here."""
    epilogue = accumulate_locally(sch, block, epilogue)
    finish_epilogue(sch, epilogue, at, lanes)
    for loop in unrolled:
        sch.unroll(loop)
    sch.vectorize(vector)
    mark(sch, block, kind)
    return sch


def block_row_by_channels(sch, conv, cols: int, nr: int, lanes: int):
    """Split an NHWC convolution's loops into a block of ``cols`` pixels of a row by ``nr``
    channels (vectors of ``lanes``), the reduction between the block's outer loops and its
    register block: (n, y, channel blocks, pixel blocks, pixels, vectors, lanes) with the
    reduction loops (ry, rx, rc) in the middle."""
    nn, yy, xx, ff, ry, rx, rc = sch.get_loops(conv)
    xo, xi = sch.split(xx, [None, cols])
    fo, fi = sch.split(ff, [None, nr])
    fio, fii = sch.split(fi, [None, lanes])
    sch.reorder(nn, yy, fo, xo, ry, rx, rc, xi, fio, fii)
    return nn, yy, fo, xo, (ry, rx, rc), xi, fio, fii


def parallel_if_worth_it(sch, loop, work: int, facts) -> None:
    """Share ``loop`` among the target's cores when the kernel has ``work`` (multiply-adds or
    elements) enough for each of them; on one core, never (it only adds the launch)."""
    if facts.cores > 1 and work >= MIN_PARALLEL_WORK * facts.cores:
        sch.parallel(loop)


def work_of(sch, block) -> int:
    """The iterations of ``block``'s loop nest (its multiply-adds, for a reduction)."""
    total = 1
    for extent in extents(sch, block) or []:
        total *= extent
    return total


def mark(sch, block, kind: str) -> None:
    sch.annotate(block, MARK, kind)


def is_hand_written(trace) -> bool:
    """Whether a database trace was written by this package."""
    return any(inst.kind.name == "Annotate" and str(inst.attrs[0]) == MARK for inst in trace.insts)
