"""bf16 dense 1x1 convolutions for x86 CPUs with AVX512_BF16, through a TVM tensor intrinsic.

``vdpbf16ps acc, w, x`` multiplies 32 pairs of bf16 numbers and adds each pair's two
products into one of 16 fp32 accumulators: twice the multiply-adds of an fp32 ``vfmadd``
in one instruction (Zen 4 issues one 512-bit ``vdpbf16ps`` per cycle, as it does fp32
FMAs). In the register-blocked GEMM of ``schedules/gemm.py`` (a block of output pixels x
``nr`` channels accumulated in registers across the whole reduction) one instruction
does, for one pixel and 16 output channels, two steps of the reduction::

    acc[f] += x[2k] * w[f, 2k] + x[2k+1] * w[f, 2k+1]        f = 0..15

with the pixel's pair ``(x[2k], x[2k+1])`` broadcast to the 16 lanes (one 32-bit
broadcast) and the 16 channels' weights stored pair-interleaved, ``w[f, 2k]`` next to
``w[f, 2k+1]`` (one 64-byte load). Accumulation, the epilogue (bias, residual,
activation) and the output stay fp32.

Who rounds what to bf16:

* weights: the graph (``graph.convolutions_in_bf16``: a numpy cast of the constants), and the
  schedule packs them (:func:`pack_weights`) in a block marked as a layout rewrite, which
  the build's ``SplitLayoutRewritePreproc`` + ``FoldConstant`` apply to the constants
  once, as they do for the fp32 kernels MetaSchedule's ``RewriteLayout`` packs;
* activations: either the graph (``astype`` before the convolution, which FuseOps puts
  in the producer's kernel or a kernel of its own; the convolution receives bf16) or the
  kernel itself (it receives fp32 and rounds each block of pixels before using it,
  :func:`round_activations`). Both are measured by ``check.py``.

Everything the schedule does is schedule instructions, so MetaSchedule can store the
trace in its database and replay it, and ``schedules.candidates`` / ``compile.build``
take it as they take ``gemm``'s (this module has the same ``match`` / ``variants`` /
``apply`` interface).

What TVM 0.27 does not do for us, and how this module gets around it:

1. *No LLVM type for bf16.* TVM's LLVM backend has no ``bfloat`` type (bf16 tensors are
   lowered to ``uint16`` storage by ``BF16StorageLegalize``), while the intrinsic in LLVM
   >= 17 (TVM bundles LLVM 22) takes ``<32 x bfloat>`` operands: a
   ``T.call_llvm_pure_intrin`` with ``<32 x i16>`` arguments fails LLVM's verifier. The
   intrinsic is called instead from a small LLVM IR function (:data:`LLVM_IR`, a bitcast
   and the call) that TVM parses and links into the kernel's module -- the
   ``pragma_import_llvm`` annotation, still honoured by CodeGenCPU -- and inlines (it
   marks imported functions ``alwaysinline``): the kernel holds a bare ``vdpbf16ps``.

2. *bf16 buffers allocated in a kernel silently become fp32.* ``BF16ComputeLegalize``
   (always run for CPU targets) re-types every bf16 buffer a kernel allocates to fp32 and
   drops the rounding on store, unless the kernel uses the buffer's data pointer
   directly. The kernel's bf16 copy of its activations is therefore written by a second
   intrinsic (:data:`ROUND_INTRIN`, ``vcvtneps2bf16``) that stores through a pointer.
   The products' operands, by contrast, are plain TIR vector loads: TVM tags every load
   and store with its buffer (TBAA), which is what lets LLVM keep the accumulators in
   registers; loads inside the IR function, untagged, made it store all 16 accumulators
   back to memory after every instruction.

3. *No bf16 weight packing.* ``RewriteLayout`` changes a weight's layout, not its type,
   and MetaSchedule's ``RemoveWeightLayoutRewriteBlock`` (used to build and measure
   candidates) accepts only pure copies as layout rewrites. The schedule packs the
   weights itself (``cache_read`` + ``transform_layout`` + the layout-rewrite mark); the
   cast must happen in the graph. (:func:`to_bf16` can also cast fp32 weights in the
   packing block: that form builds and runs through ``SplitLayoutRewritePreproc``, as
   ``check.py`` shows, but MetaSchedule cannot measure it.)

A consequence of 2 and 3: a bf16 kernel must be built with its weight packing split out
(as ``compile.build`` and MetaSchedule's builder do). Built whole, the packed weights
would be a bf16 buffer of the kernel's own, re-typed fp32, and LLVM rejects the
reinterpretation of its vectors ("Invalid bitcast"): a build error, never wrong numbers.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import gemm
from .common import (MARK, ConvShape, accumulate_locally, find_block, finish_epilogue, inline_around,
                     parallel_if_worth_it, work_of)

#: fp32 accumulators in one zmm register: output channels per instruction.
LANES = 16
#: bf16 products summed into each accumulator per instruction: reduction steps.
PAIR = 2
#: The dot-product tensor intrinsic (and the IR function implementing it).
INTRIN = "evit_bf16_dot_16x2_f32_avx512"
#: The rounding of 16 fp32 activations to bf16 (kernels that receive fp32).
ROUND_INTRIN = "evit_bf16_round_16_avx512"
#: Kernel class name, in the annotation schedules/ marks its schedules with.
KIND = "gemm_bf16"
#: Variants offered to the tuner (each costs a build).
MAX_VARIANTS = 8

#: The intrinsics' implementation in LLVM IR, linked into every module that uses them.
#: ``dot``: the bf16 operands arrive as <32 x i16> (what TVM lowers bf16 vectors to) and
#: are bitcast to the <32 x bfloat> LLVM types the intrinsic with. ``round``: fptrunc to
#: bfloat, which LLVM selects as vcvtneps2bf16 (round to nearest even), stored through
#: the pointer (point 2 above).
LLVM_IR = f"""
define <16 x float> @{INTRIN}(<16 x float> %acc, <32 x i16> %w, <32 x i16> %x) {{
  %wb = bitcast <32 x i16> %w to <32 x bfloat>
  %xb = bitcast <32 x i16> %x to <32 x bfloat>
  %r = call <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float> %acc, <32 x bfloat> %wb, <32 x bfloat> %xb)
  ret <16 x float> %r
}}
define void @{ROUND_INTRIN}(<16 x float> %x, ptr %out) {{
  %b = fptrunc <16 x float> %x to <16 x bfloat>
  store <16 x bfloat> %b, ptr %out, align 2
  ret void
}}
declare <16 x float> @llvm.x86.avx512bf16.dpbf16ps.512(<16 x float>, <32 x bfloat>, <32 x bfloat>)
"""


# -- the tensor intrinsics ----------------------------------------------------------------

# The operands' buffers promise no more than their element's alignment: a kernel may
# read a caller's array where it is (compile.read_inputs_in_place lowers the input's
# alignment to its element size), and a 64-byte promise then fails to match. LLVM still
# sees the real alignment of what it can prove aligned; on AVX-512 unaligned loads of
# aligned data cost nothing extra.

def _dot_intrinsic():
    # A tensor intrinsic is a pair of TVMScript functions, each declaring the same
    # buffers: the description (what it computes, for matching) and the implementation.
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(a: T.handle, w: T.handle, c: T.handle) -> None:
        # One instruction: C[f] += float(A[k]) * float(W[f, k]) for 16 channels and a
        # pair k, in the form TOPI's convolution takes once its inputs are bf16 and its
        # output fp32 (and the form unsafe_set_dtype leaves). The accumulators are the
        # schedule's local (register) block.
        A = T.match_buffer(a, (PAIR,), "bfloat16", offset_factor=1, align=2)
        W = T.match_buffer(w, (LANES, PAIR), "bfloat16", offset_factor=1, align=2)
        C = T.match_buffer(c, (LANES,), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:PAIR], W[0:LANES, 0:PAIR])
            T.writes(C[0:LANES])
            for i, k in T.grid(LANES, PAIR):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "float32") * T.cast(W[vi, vk], "float32")

    @T.prim_func(s_tir=True)
    def impl(a: T.handle, w: T.handle, c: T.handle) -> None:
        # The pair as one 32-bit value broadcast to 16 lanes (LLVM: vbroadcastss from
        # memory), 64 bytes of weights, the accumulators as a vector: all TIR loads, so
        # that LLVM knows they are distinct buffers (module doc, 2).
        A = T.match_buffer(a, (PAIR,), "bfloat16", offset_factor=1, align=2)
        W = T.match_buffer(w, (LANES, PAIR), "bfloat16", offset_factor=1, align=2)
        C = T.match_buffer(c, (LANES,), "float32", offset_factor=1, scope="local")
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:PAIR], W[0:LANES, 0:PAIR])
            T.writes(C[0:LANES])
            C[T.ramp(0, 1, LANES)] = T.call_pure_extern(
                "float32x16", INTRIN, C.vload([0], "float32x16"),
                T.reinterpret("int16x32", W.vload([0, 0], "bfloat16x32")),
                T.reinterpret("int16x32", T.broadcast(T.reinterpret("int32", A.vload([0], "bfloat16x2")), LANES)))

    return desc, impl


def _round_intrinsic():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(x: T.handle, y: T.handle) -> None:
        # What unsafe_set_dtype makes of TOPI's copy of the input (pad_temp).
        X = T.match_buffer(x, (LANES,), "float32", offset_factor=1, align=4)
        Y = T.match_buffer(y, (LANES,), "bfloat16", offset_factor=1, align=2)
        with T.sblock("root"):
            T.reads(X[0:LANES])
            T.writes(Y[0:LANES])
            for i in T.serial(LANES):
                with T.sblock("round"):
                    vi = T.axis.remap("S", [i])
                    Y[vi] = T.cast(X[vi], "bfloat16")

    @T.prim_func(s_tir=True)
    def impl(x: T.handle, y: T.handle) -> None:
        # Stored through a pointer: that keeps the kernel's bf16 scratch bf16 (module
        # doc, 2). The pointer's element type is uint16, what bf16 storage is lowered to
        # (BF16ComputeLegalize would re-type a bf16 annotation float32, and LowerIntrin
        # then finds it does not match the buffer).
        X = T.match_buffer(x, (LANES,), "float32", offset_factor=1, align=4)
        Y = T.match_buffer(y, (LANES,), "bfloat16", offset_factor=1, align=2)
        with T.sblock("root"):
            T.reads(X[0:LANES])
            T.writes(Y[0:LANES])
            T.evaluate(T.call_extern("void", ROUND_INTRIN, X.vload([0], "float32x16"),
                                     T.tvm_access_ptr(T.type_annotation("uint16"), Y.data, Y.elem_offset, LANES, 2)))

    return desc, impl


def register() -> str:
    """Register the tensor intrinsics (once per process); returns the dot product's name.
    Every process that applies or replays these schedules (MetaSchedule's database, the
    build) must have called it: importing this module does."""
    from tvm.s_tir import TensorIntrin

    for name, make in ((INTRIN, _dot_intrinsic), (ROUND_INTRIN, _round_intrinsic)):
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *make())
    return INTRIN


def supported(target) -> bool:
    """Whether ``target`` (an llvm target) has vdpbf16ps and AVX-512 registers (the
    target's features, not the compiling machine's)."""
    from tvm.target.codegen import llvm_get_cpu_features

    return {"avx512f", "avx512bf16"} <= set(llvm_get_cpu_features(target))


def require(target: dict) -> None:
    """Refuse bf16 for a CPU without the bf16 dot product (a canonical target dict; one
    line, exit code 2)."""
    from ....errors import BadInputError
    from ..target_string import to_classic, to_tvm

    if not supported(to_tvm(target)):
        raise BadInputError(f"--precision bf16 needs AVX512_BF16 (vdpbf16ps), which the target CPU "
                            f"'{to_classic(target)}' does not have; export fp32 for it")


# -- the kernel ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Conv(ConvShape):
    """The dense convolution of a kernel, with the types it reads."""
    input_dtype: str      # activations the convolution reads: "float32" or "bfloat16"
    weight_dtype: str


def _dtype(sch, block, index, kind="read"):
    regions = sch.get(block).reads if kind == "read" else sch.get(block).writes
    return str(regions[index].source.dtype)


def match(sch, *, fp32_weights: bool = False) -> Conv | None:
    """An unpadded 1x1 NHWC convolution with 16 | output channels and 2 | input
    channels, fp32 or bf16 activations, and bf16 weights (what ``graph.convolutions_in_bf16``
    makes of the graph: the graph decides which convolutions run in bf16, so fp32
    kernels are left to ``gemm``). ``fp32_weights`` accepts fp32 weights too (cast by
    :func:`to_bf16`, see the module doc, 3)."""
    conv = find_block(sch, ("conv2d_nhwc",))
    if conv is None:
        return None
    try:
        ext = [int(sch.get(loop).extent) for loop in sch.get_loops(conv)]
    except TypeError:                        # a symbolic (dynamic) extent
        return None
    if len(ext) != 7:
        return None
    n, h, w, f, kh, kw, c = ext
    if (kh, kw) != (1, 1) or f % LANES or c % PAIR:
        return None
    pad = find_block(sch, ("pad_temp",))
    if pad is not None and "if_then_else" in str(sch.get(pad).body):
        return None
    reads = sch.get(conv).reads
    conv_ = Conv(n, h, w, f, kh, kw, c, str(reads[0].source.dtype), str(reads[1].source.dtype))
    if conv_.input_dtype not in ("float32", "bfloat16") or conv_.weight_dtype not in ("float32", "bfloat16"):
        return None
    if conv_.weight_dtype == "float32" and not fp32_weights:
        return None
    if conv_.input_dtype == "float32" and pad is None:
        return None                          # nothing to round the activations in
    return conv_


def pack_weights(sch, conv_block, nr: int):
    """The weights in pair-interleaved bf16 panels of ``nr`` channels::

        packed[f // nr, ry, rx, c // 2, f % nr, c % 2] = w[f, ry, rx, c]

    For one panel and one reduction pair, the panel's ``nr`` channel pairs are
    ``4 * nr`` contiguous bytes (64 per instruction), and a whole panel is one stream.
    The packing block reads only the weight parameter and is marked as a layout rewrite:
    the build splits it out and applies it to the constants once. fp32 weights are
    rounded in it too (module doc, 3). Returns the packing block."""
    pack = sch.cache_read(conv_block, 1, "global")
    if _dtype(sch, pack, 0, "write") != "bfloat16":
        # The store rounds (to nearest even); the convolution reads float(bf16).
        sch.unsafe_set_dtype(pack, 0, "bfloat16")
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


def to_bf16(sch, nr: int):
    """The bf16 form of a dense 1x1 convolution kernel (as MetaSchedule extracts it:
    ``pad_temp`` -> ``conv2d_nhwc`` -> bias, residual, activation blocks), as schedule
    instructions on ``sch``: weights packed in bf16 panels of ``nr`` channels
    (:func:`pack_weights`), activations rounded to bf16 unless they are already
    (:func:`round_activations`); the convolution then reads ``float(x) * float(w)``
    into its fp32 result, and the epilogue and output are unchanged.
    Returns (convolution block, packing block, rounding block or None)."""
    conv = find_block(sch, ("conv2d_nhwc",))
    pack = pack_weights(sch, conv, nr)
    return conv, pack, round_activations(sch)


def variants(sch, facts, *, fp32_weights: bool = False) -> list[tuple]:
    """``("bf16", images, rows, cols, nr, order, convert)`` for :func:`apply`, best guess
    first. The block shapes are the fp32 template's (the accumulators are the same zmm
    registers), those whose channels are whole registers. The rest is measured (Zen 4, one
    core): pixel blocks outermost beat weight panels outermost by 3-20%, and the kernel
    rounding its fp32 input per pixel block costs 1-3% over receiving bf16."""
    conv = match(sch, fp32_weights=fp32_weights)
    if conv is None:
        return []
    shapes = [s for s in gemm.block_shapes(conv, facts) if s[3] % LANES == 0]
    if conv.input_dtype == "bfloat16":
        main, others = ("pixels", "none"), [("panels", "none")]
    else:
        main, others = ("pixels", "block"), [("pixels", "once"), ("panels", "once")]
    if not shapes:
        return []
    # The rule's block with each way of ordering/rounding, then the other blocks.
    out = [("bf16", *shapes[0], *way) for way in [main, *others]]
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
    _, images, rows, cols, nr, order, convert = variant
    if convert == "block" and order != "pixels":
        raise ValueError("rounding per pixel block needs the pixel blocks outermost")
    conv, pack, pad = to_bf16(sch, nr)
    if (pad is not None and _dtype(sch, pad, 0) == "bfloat16") != (convert == "none"):
        raise ValueError(f"convert={convert!r} does not fit this kernel's input")

    # Inline what lies between the convolution and the output block (the bias; with bf16
    # input the identity pad_temp too); the output block is the epilogue.
    epilogue = inline_around(sch, conv, keep=(pack, pad))
    if pad is not None and convert == "none":
        sch.compute_inline(pad)
        pad = None

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

    if pad is not None:
        if convert == "block":
            sch.compute_at(pad, outer)
        else:
            loops = sch.get_loops(pad)
            parallel_if_worth_it(sch, sch.fuse(*loops[:-1]), work_of(sch, pad), facts)
        sch.tensorize(sch.split(sch.get_loops(pad)[-1], [None, LANES])[-1], ROUND_INTRIN)

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
    # The IR functions behind the intrinsics, linked into the module (module doc, 1).
    sch.annotate(outer, "pragma_import_llvm", LLVM_IR)
    return sch


register()
