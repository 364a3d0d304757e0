"""The two AVX512_BF16 tensor intrinsics of :mod:`.gemm_bf16`, and the LLVM IR behind them.

``dot`` (:data:`INTRIN`): ``vdpbf16ps acc, w, x`` multiplies 32 pairs of bf16 numbers
and adds each pair's two products into one of 16 fp32 accumulators::

    acc[f] += x[2k] * w[f, 2k] + x[2k+1] * w[f, 2k+1]        f = 0..15

with the pixel's pair ``(x[2k], x[2k+1])`` broadcast to the 16 lanes (one 32-bit
broadcast) and the 16 channels' weights stored pair-interleaved, ``w[f, 2k]`` next to
``w[f, 2k+1]`` (one 64-byte load). ``round`` (:data:`ROUND_INTRIN`): 16 fp32 activations
rounded to bf16 (``vcvtneps2bf16``, to nearest even), for kernels that receive fp32.

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
   directly. The kernel's bf16 copy of its activations is therefore written by the
   ``round`` intrinsic, which stores through a pointer. The products' operands, by
   contrast, are plain TIR vector loads: TVM tags every load and store with its buffer
   (TBAA), which is what lets LLVM keep the accumulators in registers; loads inside the
   IR function, untagged, made it store all 16 accumulators back to memory after every
   instruction.

A tensor intrinsic is a pair of TVMScript functions declaring the same buffers: the
description (what it computes, for matching) and the implementation. The operands'
buffers promise no more than their element's alignment: a kernel may read a caller's
array where it is (compile.read_inputs_in_place lowers the input's alignment to its
element size), and a 64-byte promise then fails to match. LLVM still sees the real
alignment of what it can prove aligned; on AVX-512 unaligned loads of aligned data cost
nothing extra.
"""

from __future__ import annotations

#: fp32 accumulators in one zmm register: output channels per instruction.
LANES = 16
#: bf16 products summed into each accumulator per instruction: reduction steps.
PAIR = 2
#: The dot-product tensor intrinsic (and the IR function implementing it).
INTRIN = "evit_bf16_dot_16x2_f32_avx512"
#: The rounding of 16 fp32 activations to bf16 (kernels that receive fp32).
ROUND_INTRIN = "evit_bf16_round_16_avx512"

#: The intrinsics' implementation in LLVM IR, linked into every module that uses them.
#: ``dot``: the bf16 operands arrive as <32 x i16> (what TVM lowers bf16 vectors to) and
#: are bitcast to the <32 x bfloat> LLVM types the intrinsic takes. ``round``: fptrunc
#: to bfloat, which LLVM selects as vcvtneps2bf16, stored through the pointer (point 2).
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


# The operands, declared once for both functions of an intrinsic (evaluated by the
# TVMScript parser as parameter types).

def _bf16_pair():
    from tvm.script import tirx as T
    return T.Buffer((PAIR,), "bfloat16", offset_factor=1, align=2)


def _bf16_panel():
    from tvm.script import tirx as T
    return T.Buffer((LANES, PAIR), "bfloat16", offset_factor=1, align=2)


def _accumulators():
    # The schedule's local (register) block.
    from tvm.script import tirx as T
    return T.Buffer((LANES,), "float32", offset_factor=1, scope="local")


def _fp32_vector():
    from tvm.script import tirx as T
    return T.Buffer((LANES,), "float32", offset_factor=1, align=4)


def _bf16_vector():
    from tvm.script import tirx as T
    return T.Buffer((LANES,), "bfloat16", offset_factor=1, align=2)


def _dot_intrinsic():
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def desc(A: _bf16_pair(), W: _bf16_panel(), C: _accumulators()) -> None:
        # C[f] += float(A[k]) * float(W[f, k]) for 16 channels and a pair k, in the form
        # TOPI's convolution takes once its inputs are bf16 and its output fp32 (and the
        # form unsafe_set_dtype leaves).
        with T.sblock("root"):
            T.reads(C[0:LANES], A[0:PAIR], W[0:LANES, 0:PAIR])
            T.writes(C[0:LANES])
            for i, k in T.grid(LANES, PAIR):
                with T.sblock("update"):
                    vi, vk = T.axis.remap("SR", [i, k])
                    C[vi] = C[vi] + T.cast(A[vk], "float32") * T.cast(W[vi, vk], "float32")

    @T.prim_func(s_tir=True)
    def impl(A: _bf16_pair(), W: _bf16_panel(), C: _accumulators()) -> None:
        # The pair as one 32-bit value broadcast to 16 lanes (LLVM: vbroadcastss from
        # memory), 64 bytes of weights, the accumulators as a vector: all TIR loads, so
        # that LLVM knows they are distinct buffers (module doc, 2).
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
    def desc(X: _fp32_vector(), Y: _bf16_vector()) -> None:
        # What unsafe_set_dtype makes of TOPI's copy of the input (pad_temp).
        with T.sblock("root"):
            T.reads(X[0:LANES])
            T.writes(Y[0:LANES])
            for i in T.serial(LANES):
                with T.sblock("round"):
                    vi = T.axis.remap("S", [i])
                    Y[vi] = T.cast(X[vi], "bfloat16")

    @T.prim_func(s_tir=True)
    def impl(X: _fp32_vector(), Y: _bf16_vector()) -> None:
        # Stored through a pointer: that keeps the kernel's bf16 scratch bf16 (module
        # doc, 2). The pointer's element type is uint16, what bf16 storage is lowered to
        # (BF16ComputeLegalize would re-type a bf16 annotation float32, and LowerIntrin
        # then finds it does not match the buffer).
        with T.sblock("root"):
            T.reads(X[0:LANES])
            T.writes(Y[0:LANES])
            T.evaluate(T.call_extern("void", ROUND_INTRIN, X.vload([0], "float32x16"),
                                     T.tvm_access_ptr(T.type_annotation("uint16"), Y.data, Y.elem_offset, LANES, 2)))

    return desc, impl


def register() -> str:
    """Register the tensor intrinsics (once per process); returns the dot product's name.
    Every process that applies or replays these schedules (MetaSchedule's database, the
    build) must have called it: importing :mod:`.gemm_bf16` does."""
    from tvm.s_tir import TensorIntrin

    for name, make in ((INTRIN, _dot_intrinsic), (ROUND_INTRIN, _round_intrinsic)):
        if TensorIntrin.get(name, allow_missing=True) is None:
            TensorIntrin.register(name, *make())
    return INTRIN
