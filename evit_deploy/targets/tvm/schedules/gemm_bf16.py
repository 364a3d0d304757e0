"""bf16 dense 1x1 convolutions for x86 CPUs with AVX512_BF16, through a TVM tensor intrinsic
(and, on CPUs with AMX, through AMX tiles: :mod:`.amx_intrinsics`, :func:`_apply_amx`).

``vdpbf16ps`` (:mod:`.bf16_intrinsics`) does twice the multiply-adds of an fp32 ``vfmadd``
in one instruction (Zen 4 issues one 512-bit ``vdpbf16ps`` per cycle, as it does fp32
FMAs). In the register-blocked GEMM of ``schedules/gemm.py`` (a block of output pixels x
``nr`` channels accumulated in registers across the whole reduction) one instruction
does, for one pixel and 16 output channels, two steps of the reduction. Accumulation,
the epilogue (bias, residual, activation) and the output stay fp32.

Who rounds what to bf16:

* weights: the graph (``graph.convolutions_in_bf16``: a numpy cast of the constants), and
  the schedule packs them (:func:`pack_weights`) in a block marked as a layout rewrite,
  which the build's ``SplitLayoutRewritePreproc`` + ``FoldConstant`` apply to the
  constants once, as they do for the fp32 kernels MetaSchedule's ``RewriteLayout`` packs.
  (``RewriteLayout`` changes a weight's layout, not its type, and MetaSchedule's
  ``RemoveWeightLayoutRewriteBlock``, used to build and measure candidates, accepts only
  pure copies as layout rewrites: the cast must happen in the graph.)
* activations: either the graph (``astype`` before the convolution, which FuseOps puts
  in the producer's kernel or a kernel of its own; the convolution receives bf16) or the
  kernel itself (it receives fp32 and rounds each block of pixels before using it,
  :func:`round_activations`).

Everything the schedule does is schedule instructions, so MetaSchedule can store the
trace in its database and replay it, and ``schedules.candidates`` / ``compile.build``
take it as they take ``gemm``'s (this module has the same ``match`` / ``variants`` /
``apply`` interface).

A bf16 kernel must be built with its weight packing split out (as ``compile.build`` and
MetaSchedule's builder do). Built whole, the packed weights would be a bf16 buffer of the
kernel's own, which TVM re-types fp32 (:mod:`.bf16_intrinsics`, point 2), and LLVM
rejects the reinterpretation of its vectors ("Invalid bitcast"): a build error, never
wrong numbers.
"""

from __future__ import annotations

from dataclasses import astuple, dataclass

from . import amx_intrinsics, gemm
from .bf16_intrinsics import INTRIN, LANES, LLVM_IR, PAIR, ROUND_INTRIN, register
from .common import (MARK, ConvShape, accumulate_locally, conv_shape, find_block, finish_epilogue, inline_around,
                     parallel_if_worth_it, work_of)

#: Kernel class name, in the annotation schedules/ marks its schedules with.
KIND = "gemm_bf16"
#: Variants offered to the tuner (each costs a build).
MAX_VARIANTS = 8


# -- the kernel ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Conv(ConvShape):
    """The dense convolution of a kernel, with the types it reads."""
    input_dtype: str      # activations the convolution reads: "float32" or "bfloat16"
    weight_dtype: str


def _dtype(sch, block, index, kind="read"):
    regions = sch.get(block).reads if kind == "read" else sch.get(block).writes
    return str(regions[index].source.dtype)


def match(sch) -> Conv | None:
    """An unpadded 1x1 NHWC convolution with 16 | output channels and 2 | input
    channels, fp32 or bf16 activations, and bf16 weights (what ``graph.convolutions_in_bf16``
    makes of the graph: the graph decides which convolutions run in bf16, so fp32
    kernels are left to ``gemm``)."""
    shape = conv_shape(sch, ("conv2d_nhwc",))
    if shape is None or shape.window or shape.f % LANES or shape.c % PAIR:
        return None
    pad = find_block(sch, ("pad_temp",))
    if pad is not None and "if_then_else" in str(sch.get(pad).body):
        return None
    reads = sch.get(find_block(sch, ("conv2d_nhwc",))).reads
    conv_ = Conv(*astuple(shape), str(reads[0].source.dtype), str(reads[1].source.dtype))
    if conv_.input_dtype not in ("float32", "bfloat16") or conv_.weight_dtype != "bfloat16":
        return None
    if conv_.input_dtype == "float32" and pad is None:
        return None                          # nothing to round the activations in
    return conv_


def pack_weights(sch, conv_block, nr: int, *, window_first: bool = False):
    """The weights in pair-interleaved bf16 panels of ``nr`` channels::

        packed[f // nr, ry, rx, c // 2, f % nr, c % 2] = w[f, ry, rx, c]

    (``window_first``: ``packed[ry, rx, f // nr, ...]``, so that consecutive panels of one
    window position are one region: the same bytes for a 1x1 convolution.)

    For one panel and one reduction pair, the panel's ``nr`` channel pairs are
    ``4 * nr`` contiguous bytes (64 per instruction), and a whole panel is one stream.
    The packing block reads only the weight parameter and is marked as a layout rewrite:
    the build splits it out and applies it to the constants once. Returns the packing
    block."""
    pack = sch.cache_read(conv_block, 1, "global")
    if window_first:
        sch.transform_layout(pack, ("write", 0),
                             lambda f, ry, rx, c: (ry, rx, f // nr, c // PAIR, f % nr, c % PAIR))
    else:
        sch.transform_layout(pack, ("write", 0),
                             lambda f, ry, rx, c: (f // nr, ry, rx, c // PAIR, f % nr, c % PAIR))
    sch.annotate(pack, "meta_schedule.layout_rewrite_preproc", 1)
    return pack


def round_activations(sch):
    """Make the convolution read bf16 activations: TOPI's ``pad_temp`` copy of the input
    (an identity for an unpadded convolution) becomes the bf16 rounding of it, which
    :func:`apply` computes into a scratch with :data:`ROUND_INTRIN`. A kernel that
    receives bf16 needs nothing. Returns the block (None when there is none)."""
    pad = find_block(sch, ("pad_temp",))
    if pad is not None and _dtype(sch, pad, 0, "write") != "bfloat16":
        sch.unsafe_set_dtype(pad, 0, "bfloat16")
    return pad


def to_bf16(sch, nr: int, *, window_first: bool = False):
    """The bf16 form of a dense 1x1 convolution kernel (as MetaSchedule extracts it:
    ``pad_temp`` -> ``conv2d_nhwc`` -> bias, residual, activation blocks), as schedule
    instructions on ``sch``: weights packed in bf16 panels of ``nr`` channels
    (:func:`pack_weights`), activations rounded to bf16 unless they are already
    (:func:`round_activations`); the convolution then reads ``float(x) * float(w)``
    into its fp32 result, and the epilogue and output are unchanged.
    Returns (convolution block, packing block, rounding block or None)."""
    conv = find_block(sch, ("conv2d_nhwc",))
    pack = pack_weights(sch, conv, nr, window_first=window_first)
    return conv, pack, round_activations(sch)


def variants(sch, facts) -> list[tuple]:
    """``("bf16", images, rows, cols, nr, order, convert)``, ``("amx", rows, convert)`` or
    ``("amx_pixels", convert, panels)`` for :func:`apply`, best guess first. The block
    shapes are the fp32 template's (the accumulators are the same zmm registers), those
    whose channels are whole registers. The rest is measured (Zen 4, one core): pixel
    blocks outermost beat weight panels outermost by 3-20%, and the kernel rounding its
    fp32 input per pixel block costs 1-3% over receiving bf16."""
    conv = match(sch)
    if conv is None:
        return []
    shapes = [s for s in gemm.block_shapes(conv, facts) if s[3] % LANES == 0]
    if conv.input_dtype == "bfloat16":
        main, others = ("pixels", "none"), [("panels", "none")]
    else:
        main, others = ("pixels", "block"), [("pixels", "once"), ("panels", "once")]
    # AMX first where the target has it (README, "bf16": several times the vdpbf16ps
    # kernels), each row's activations rounded just before its products (measured faster
    # than rounding the whole input first).
    out = []
    rows = amx_intrinsics.rows_per_tile(conv.h, conv.w)
    if facts.amx_bf16 and conv.f % amx_intrinsics.CHANNELS == 0:
        ways = ["none"] if conv.input_dtype == "bfloat16" else ["block", "once"]
        # Measured alone (benchmarks/bf16_kernels.py, M4): where whole rows leave a tile part
        # empty, 16 pixels across rows are faster (7x7 maps: 1.1-1.7x); two panels are
        # faster again over short reductions (up to 256: mostly 1.1-1.5x), slower over long
        # ones (0.85-0.94x); where whole rows fill a tile, they and two panels are alike.
        full = rows * conv.w == amx_intrinsics.MAX_PIXELS
        panels = (2, 1) if conv.c <= 256 else (1, 2)
        pixels = [("amx_pixels", ways[0], p) for p in panels
                  if _pixel_tiles_fit(sch, conv, p) and not (full and p == 1)]
        whole_rows = [("amx", rows, way) for way in ways] + [("amx", 1, way) for way in ways[:1] if rows > 1] \
            if amx_intrinsics.fits(rows, conv.w, conv.c) else []
        out = whole_rows + pixels if full else pixels + whole_rows
    if not shapes:
        return out
    # The rule's block with each way of ordering/rounding, then the other blocks.
    out += [("bf16", *shapes[0], *way) for way in [main, *others]]
    out += [("bf16", *shape, *main) for shape in shapes[1:]]
    return out[:MAX_VARIANTS]


def apply(sch, variant: tuple, facts):
    """The register-blocked micro-kernel of ``schedules/gemm.py`` on the bf16 form
    (:func:`to_bf16`), its reduction done by :data:`INTRIN` two steps at a time, before
    MetaSchedule's post-processors (which find nothing left to do but the bias's
    layout).

    ``variant`` is ``("bf16", images, rows, cols, nr, order, convert)``:

    * ``order``: ``"pixels"`` runs the pixel blocks outermost (a block's activations stay
      in L1 while all the weights stream from L2: measured faster here); ``"panels"`` the
      weight panels outermost, as the fp32 template (a panel stays in L1 while the pixel
      blocks stream past it).
    * ``convert``, where fp32 activations are rounded in the kernel: ``"block"``
      (``"pixels"`` order only) each pixel block's, just before the panels that use them
      (a one-block scratch); ``"once"`` the whole input in a parallel pass before the
      products (a scratch the size of the input); ``"none"`` the kernel receives bf16.
    """
    register()
    if variant[0] == "amx":
        return _apply_amx(sch, variant, facts)
    if variant[0] == "amx_pixels":
        return _apply_amx_pixels(sch, variant, facts)
    _, images, rows, cols, nr, order, convert = variant
    if convert == "block" and order != "pixels":
        raise ValueError("rounding per pixel block needs the pixel blocks outermost")
    conv, pad, epilogue = _bf16_blocks(sch, nr, convert)
    (no, ni), (yo, yi), (xo, xi), (fo, fio, fii), (ry, rx, rc) = gemm.split_block(
        sch, conv, (images, rows, cols, nr), LANES)
    rco, rci = sch.split(rc, [None, PAIR])
    work = work_of(sch, conv)
    if order == "pixels":
        sch.reorder(no, yo, xo, fo, ry, rx, rco, ni, yi, xi, fio, fii, rci)
        outer = sch.fuse(no, yo, xo)
        block_loop = fo                      # one output block per iteration
    else:
        sch.reorder(fo, no, yo, xo, ry, rx, rco, ni, yi, xi, fio, fii, rci)
        outer = sch.fuse(fo, no, yo, xo)
        block_loop = outer
    parallel_if_worth_it(sch, outer, work, facts)
    # fp32 accumulators in registers, read by the epilogue while still there.
    epilogue = accumulate_locally(sch, conv, epilogue)
    finish_epilogue(sch, epilogue, block_loop, LANES)
    _round_input(sch, pad, convert, outer, facts)

    # Zero the accumulators before the reduction (vectors, unrolled), then replace the
    # innermost 16 channels x 2 reduction steps by the instruction.
    init = sch.decompose_reduction(conv, ry)
    init_loops = sch.get_loops(init)
    sch.vectorize(init_loops[-1])
    for loop in init_loops[-5:-1]:
        sch.unroll(loop)
    # Marked on the initialisation: tensorize rebuilds the update block without it.
    sch.annotate(init, MARK, KIND)
    sch.tensorize(fii, INTRIN)
    for loop in (ni, yi, xi, fio):
        sch.unroll(loop)
    # The IR functions behind the intrinsics, linked into the module (bf16_intrinsics, 1).
    sch.annotate(outer, "pragma_import_llvm", LLVM_IR)
    return sch


def _bf16_blocks(sch, nr: int, convert: str, *, window_first: bool = False):
    """The bf16 form (:func:`to_bf16`) with what lies between the convolution and the
    output block inlined (the bias; with bf16 input the identity ``pad_temp`` too): the
    convolution, the rounding block (None when the kernel receives bf16) and the epilogue."""
    conv, pack, pad = to_bf16(sch, nr, window_first=window_first)
    if (pad is not None and _dtype(sch, pad, 0) == "bfloat16") != (convert == "none"):
        raise ValueError(f"convert={convert!r} does not fit this kernel's input")
    epilogue = inline_around(sch, conv, keep=(pack, pad))
    if pad is not None and convert == "none":
        sch.compute_inline(pad)
        pad = None
    return conv, pad, epilogue


def _round_input(sch, pad, convert: str, outer, facts) -> None:
    """Round the fp32 input to bf16 (:data:`ROUND_INTRIN`): per block of the ``outer``
    loop (``convert="block"``) or all of it first, in parallel (``"once"``)."""
    if pad is None:
        return
    if convert == "block":
        sch.compute_at(pad, outer)
    else:
        loops = sch.get_loops(pad)
        parallel_if_worth_it(sch, sch.fuse(*loops[:-1]), work_of(sch, pad), facts)
    sch.tensorize(sch.split(sch.get_loops(pad)[-1], [None, LANES])[-1], ROUND_INTRIN)


def _apply_amx(sch, variant: tuple, facts):
    """``("amx", rows, convert)``: ``rows`` whole rows of the feature map (up to 16 pixels)
    times 16 output channels per tile, the whole reduction in :mod:`.amx_intrinsics`'
    function, then the epilogue on those sums; ``convert`` as in :func:`apply`
    (``"block"``: each tile's activations rounded just before its products)."""
    _, rows, convert = variant
    conv_ = match(sch)
    intrin = amx_intrinsics.register(rows, conv_.w, conv_.c)
    conv, pad, epilogue = _bf16_blocks(sch, amx_intrinsics.CHANNELS, convert)
    (no, ni), (yo, yi), (xo, xi), (fo, fio, fii), (ry, rx, rc) = gemm.split_block(
        sch, conv, (1, rows, conv_.w, amx_intrinsics.CHANNELS), amx_intrinsics.CHANNELS)
    sch.reorder(no, yo, xo, fo, ni, fio, ry, rx, yi, xi, fii, rc)
    outer = sch.fuse(no, yo, xo)
    parallel_if_worth_it(sch, outer, work_of(sch, conv), facts)
    epilogue = accumulate_locally(sch, conv, epilogue)
    finish_epilogue(sch, epilogue, fo, LANES)
    _round_input(sch, pad, convert, outer, facts)
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.annotate(init, MARK, KIND)
    sch.tensorize(yi if rows > 1 else xi, intrin)
    sch.annotate(outer, "pragma_import_llvm", amx_intrinsics.LLVM_IR + (LLVM_IR if pad is not None else ""))
    return sch


def _pixel_tiles_fit(sch, conv: Conv, panels: int) -> bool:
    """Whether :func:`_apply_amx_pixels` applies with ``panels`` panels: 16 | the pixels,
    32 | the input channels, 16 x ``panels`` | the output channels, the kernel rounds its
    input (a scratch it may lay out) and writes its sums to an epilogue (likewise)."""
    tile = amx_intrinsics.MAX_PIXELS
    if (conv.n * conv.h * conv.w) % tile or not amx_intrinsics.fits(1, tile, conv.c) \
            or conv.f % (amx_intrinsics.CHANNELS * panels):
        return False
    sums = sch.get(find_block(sch, ("conv2d_nhwc",))).writes[0].source
    scratch = any(b.same_as(sums) for b in sch.get(sch.get_sblock("root")).alloc_buffers)
    return conv.input_dtype == "float32" and scratch


def _apply_amx_pixels(sch, variant: tuple, facts):
    """``("amx_pixels", convert, panels)``: 16 consecutive pixels per tile, whichever rows
    they are in (whole rows of a 7x7 map fill 7 of a tile's 16 rows, of a 14x14 map 14). In NHWC,
    pixel ``p = (n * H + y) * W + x`` starts ``p * C`` values in: the convolution, the
    rounding and the epilogue are rewritten over ``p``, and the rounded input and the sums
    (the kernel's own scratches) laid out ``[p, channel]``, so that a tile's 16 pixels are
    one 2-D region of them. ``convert`` as in :func:`_apply_amx`; ``panels``: 16 or 32
    output channels per call (two: the pixels loaded once for two tiles of sums)."""
    _, convert, panels = variant
    conv_ = match(sch)
    tile = amx_intrinsics.MAX_PIXELS
    intrin = amx_intrinsics.register(1, tile, conv_.c, panels)
    conv, pad, epilogue = _bf16_blocks(sch, amx_intrinsics.CHANNELS, convert, window_first=panels == 2)

    def pixel(n, y, x):
        return (n * conv_.h + y) * conv_.w + x

    sch.transform_layout(conv, ("write", 0), lambda n, y, x, f: (pixel(n, y, x), f))
    sch.transform_block_layout(conv, lambda n, y, x, f, ry, rx, rc: (pixel(n, y, x), f, ry, rx, rc))
    sch.transform_layout(pad, ("write", 0), lambda n, y, x, c: (pixel(n, y, x), c))
    sch.transform_block_layout(pad, lambda n, y, x, c: (pixel(n, y, x), c))
    p, f, ry, rx, rc = sch.get_loops(conv)
    po, pi = sch.split(p, [None, tile])
    fo, fi = sch.split(f, [None, amx_intrinsics.CHANNELS * panels])
    sch.reorder(po, fo, ry, rx, pi, fi, rc)
    parallel_if_worth_it(sch, po, work_of(sch, conv), facts)
    epilogue = accumulate_locally(sch, conv, epilogue)
    sch.transform_block_layout(epilogue, lambda n, y, x, f: (pixel(n, y, x), f))
    finish_epilogue(sch, epilogue, fo, LANES)
    _round_input(sch, pad, convert, po, facts)
    init = sch.decompose_reduction(conv, ry)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.annotate(init, MARK, KIND)
    sch.tensorize(pi, intrin)
    sch.annotate(po, "pragma_import_llvm", amx_intrinsics.LLVM_IR + LLVM_IR)
    return sch


register()
