"""Hand-written schedules measured beside MetaSchedule's, for kernels its design space serves badly.

Most of EfficientViT's time is in 1x1 convolutions (the FFNs and projections), which in
NHWC are matrix products ``[N*H*W, C] x [C, F]`` with an element-wise epilogue (bias,
residual, ReLU). MetaSchedule's fp32 design space accumulates into a full-size buffer and
on the small 7x7 and 4x4 maps settles on one vector of output channels per row tile;
measured on an AVX-512 Xeon, most of M0's best tuned 1x1 kernels ran 1.1-1.8x slower than
the classic register-blocked kernel (as in onnxruntime's MLAS): a block of output rows x ``NR``
channels held in registers across the whole reduction, weights packed into
``NR``-wide panels, the epilogue applied while the block is still in registers.

:func:`candidates` writes that kernel for a task in a few block shapes. The tuner measures
them with the same builder and runner as MetaSchedule's candidates and stores them in
the same database, so compilation simply picks whichever schedule measured fastest.

The same kernel serves the stem's dense 3x3 convolutions (a matrix product whose
reduction runs over the 3x3 window too), with one difference: its block holds the same
output position of several images. The zero padding, inlined into the loads, then tests
one position per step for the whole block; a block along an image row tests every pixel
and ran 1.6-2.2x slower than MetaSchedule's schedules (measured on M4's stem), while
the image block ran 1.1-1.4x faster than them.
"""

from __future__ import annotations

#: Block annotation that marks a schedule written here (read back from database traces;
#: the value predates the module's name and stays, so that existing databases still say
#: which of their records are hand-written).
MARK = "evit_deploy.template"
GEMM = "gemm"

#: SIMD width the kernel's inner loop is written for, in floats (one AVX-512 register;
#: LLVM splits it in two on AVX2 CPUs).
LANES = 16
#: Channel counts that are not a multiple of LANES (the stem's first convolution: 8 in
#: M0, 24 in M5) are written as vectors of this many: one AVX2 register.
HALF_LANES = LANES // 2
#: The register block holds at most this many accumulator vectors (AVX-512 has 32
#: registers; the rest hold weights and the broadcast input).
MAX_ACCUMULATORS = 28
MIN_ACCUMULATORS = 6
#: Block shapes tried per kernel; more rarely win and each costs a build and a run.
MAX_CANDIDATES = 6


def lanes(nr: int) -> int:
    """The vector width a block of ``nr`` channels is computed in."""
    return LANES if nr % LANES == 0 else HALF_LANES


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def block_shapes(batch: int, height: int, width: int, channels_out: int, *,
                 window: bool = False) -> list[tuple[int, int, int, int]]:
    """(images, rows, columns, channels) register blocks for an NHWC output, best guesses first.

    A block's pixels come either from the same position in several images (any map size)
    or from consecutive pixels of one image (whole rows when it spans more than one), so
    its output is always a rectangle the epilogue can be placed under. A convolution with
    a ``window`` larger than 1x1 gets image blocks only (see the module's docstring).
    """
    widths = [nr for nr in (2 * LANES, LANES, 4 * LANES) if channels_out % nr == 0]
    if not widths and channels_out % HALF_LANES == 0 and channels_out <= 2 * LANES:
        widths = [channels_out]          # all the channels, in half-width vectors
    pixel_blocks: list[tuple[int, int, int]] = []
    for images in _divisors(batch):
        pixel_blocks.append((images, 1, 1))
    for cols in sorted(_divisors(width), reverse=True) if not window else []:
        for rows in _divisors(height):
            if rows > 1 and cols != width:
                continue
            pixel_blocks.append((1, rows, cols))
    shapes = [(images, rows, cols, nr) for nr in widths for images, rows, cols in pixel_blocks
              if MIN_ACCUMULATORS <= images * rows * cols * nr // lanes(nr) <= MAX_ACCUMULATORS]
    # Measured best on M0-M5: about 16 accumulators, 32 channels wide.
    shapes.sort(key=lambda s: (abs(s[0] * s[1] * s[2] * s[3] // lanes(s[3]) - 16), widths.index(s[3])))
    return shapes[:MAX_CANDIDATES]


def conv_extents(mod) -> tuple[int, int, int, int, int, int, int] | None:
    """(N, H, W, F, KH, KW, C) when the task's kernel is a dense (not grouped) NHWC
    convolution, else None."""
    from tvm import s_tir

    sch = s_tir.Schedule(mod)
    try:
        conv = sch.get_sblock("conv2d_nhwc")
    except Exception:       # no such block: not a dense NHWC convolution
        return None
    loops = sch.get_loops(conv)
    if len(loops) != 7:
        return None
    try:
        return tuple(int(sch.get(loop).extent) for loop in loops)
    except TypeError:       # symbolic extents (dynamic batch)
        return None


def schedule_gemm(mod, block: tuple[int, int, int, int]):
    """The micro-kernel schedule of a convolution task, before MetaSchedule's
    post-processors (which add the weight packing and the reduction init)."""
    from tvm import s_tir

    images, rows, cols, nr = block
    sch = s_tir.Schedule(mod)
    conv = sch.get_sblock("conv2d_nhwc")
    epilogue = None
    for b in sch.get_child_blocks(sch.get_sblock("root")):
        if sch.get(b).name_hint == "conv2d_nhwc":
            continue
        if sch.get_consumers(b):
            sch.compute_inline(b)          # padding copy, bias, intermediate element-wise ops
        elif epilogue is None:
            epilogue = b
        else:
            raise ValueError("more than one output")
    nn, yy, xx, ff, ry, rx, rc = sch.get_loops(conv)
    no, ni = sch.split(nn, [None, images])
    yo, yi = sch.split(yy, [None, rows])
    xo, xi = sch.split(xx, [None, cols])
    fo, fi = sch.split(ff, [None, nr])
    fio, fii = sch.split(fi, [None, lanes(nr)])
    sch.reorder(fo, no, yo, xo, ry, rx, rc, ni, yi, xi, fio, fii)
    outer = sch.fuse(fo, no, yo, xo)
    sch.parallel(outer)
    # The accumulators live in a local block (registers once unrolled); the epilogue
    # reads them straight back, so the conv result never goes to memory.
    sch.compute_inline(sch.cache_write(conv, 0, "local"))
    if epilogue is not None:
        sch.reverse_compute_at(epilogue, outer)
        sch.vectorize(sch.split(sch.get_loops(epilogue)[-1], [None, lanes(nr)])[-1])
    for loop in (ni, yi, xi, fio):
        sch.unroll(loop)
    sch.vectorize(fii)
    sch.annotate(conv, MARK, GEMM)
    return sch


def _schedules(mod):
    extents = conv_extents(mod)
    if extents is not None:
        n, h, w, f, kh, kw, _ = extents
        for block in block_shapes(n, h, w, f, window=(kh, kw) != (1, 1)):
            yield lambda block=block: schedule_gemm(mod, block)


def applies(mod) -> bool:
    """Whether this module has a hand-written kernel for the task."""
    return conv_extents(mod) is not None


def candidates(mod, postprocs) -> list:
    """Measure candidates (MetaSchedule ``MeasureCandidate``) of the hand-written kernels
    for a task, one per variant; empty when none applies or its schedule does not."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate

    out = []
    for make in _schedules(mod):
        try:
            sch = make()
            sch.enter_postproc()
            if not all(p.apply(sch) for p in postprocs):
                continue
        except Exception:   # a schedule primitive refused this kernel's shape: skip it
            continue
        # The runner feeds the kernel as built: weights already packed.
        out.append(MeasureCandidate(sch, ArgInfo.from_entry_func(sch.mod, remove_preproc=True)))
    return out


def is_hand_written(trace) -> bool:
    """Whether a database trace was written by this module."""
    return any(inst.kind.name == "Annotate" and str(inst.attrs[0]) == MARK for inst in trace.insts)
