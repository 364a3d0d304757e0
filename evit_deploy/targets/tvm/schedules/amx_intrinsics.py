"""The AMX tensor intrinsic of :mod:`.gemm_bf16`: up to 16 pixels times 16 output
channels over the whole reduction, in one tile register.

``tdpbf16ps`` multiplies a tile of up to 16 rows x 32 bf16 values by a tile of 16 pairs x
16 channels (the weights pair-interleaved, as :func:`.gemm_bf16.pack_weights` stores them
for ``vdpbf16ps``) into 16 rows x 16 fp32 sums; with two panels, two such tiles of sums
share the pixels' (32 channels per call). The intrinsic's pixels are whole rows of the
feature map, or 16 consecutive pixels of a kernel that numbers them across rows and
images (in NHWC each pixel's channels start where the last pixel's end, whatever row it
is in); its implementation is an LLVM IR function, linked in like
:mod:`.bf16_intrinsics`' (TVM 0.27 has no AMX intrinsics of its own), that

1. asks Linux once per process for the right to use the tile data (``arch_prctl``
   ``ARCH_REQ_XCOMP_PERM``; without it the first tile instruction dies of SIGILL);
2. loads the tile configuration only when the thread's differs (``ldtilecfg`` costs about
   as much as a whole 14 x 16 x 64 product, ``sttilecfg`` and a compare nearly nothing);
3. loads the sums, runs the reduction 32 values at a time with the sums kept in the
   tiles, and stores them back.

The rows, panels and the reduction's length are part of the intrinsic (a tensor intrinsic
has a fixed shape): one is registered per shape a kernel needs, when a schedule is
applied, and for every one a tuning database's records name before MetaSchedule reads them
(:func:`register_named_in`: it looks each intrinsic up as it parses a record).
"""

from __future__ import annotations

import re

from ....cpufeatures import AMX_PERMISSION_SYSCALL

#: Output channels in one tile row (16 fp32 sums, 64 bytes).
CHANNELS = 16
#: Reduction values one ``tdpbf16ps`` takes per row (32 bf16, 64 bytes).
STEP = 32
#: Rows of a tile.
MAX_PIXELS = 16

FUNCTION = "evit_amx_bf16_rows"

#: Tile configuration (64 bytes: palette 1; tile 0 the sums, 1 the pixels, 2 the weights,
#: 3 and 4 a second panel's sums and weights, each row 64 bytes; the sums and pixels with
#: ``%rows`` rows, the weights with 16) as eight i64 words: word 0 the palette, words 2 and
#: 3 the column widths (16 bits a tile), word 6 the row counts (8 bits a tile). One
#: configuration for one and two panels: a thread switching between them loads none.
LLVM_IR = f"""
@evit_amx_permitted = internal global i8 0
declare i64 @syscall(i64, ...)
declare void @llvm.x86.ldtilecfg(ptr)
declare void @llvm.x86.sttilecfg(ptr)
declare void @llvm.x86.tileloadd64(i8 immarg, ptr, i64)
declare void @llvm.x86.tilestored64(i8 immarg, ptr, i64)
declare void @llvm.x86.tdpbf16ps(i8 immarg, i8 immarg, i8 immarg)
define void @{FUNCTION}(ptr %c, i64 %c_stride, ptr %a, i64 %a_stride, ptr %b, i64 %b_stride, i64 %b_panel, i64 %panels, i64 %rows, i64 %steps) {{
entry:
  %want = alloca <8 x i64>, align 64
  %have = alloca <8 x i64>, align 64
  %r = and i64 %rows, 255
  %r8 = shl i64 %r, 8
  %r24 = shl i64 %r, 24
  %rr = or i64 %r, %r8
  %rrr = or i64 %rr, %r24
  %row_counts = or i64 %rrr, {16 << 16 | 16 << 32}
  %w0 = insertelement <8 x i64> zeroinitializer, i64 1, i32 0
  %w2 = insertelement <8 x i64> %w0, i64 {64 | 64 << 16 | 64 << 32 | 64 << 48}, i32 2
  %w3 = insertelement <8 x i64> %w2, i64 64, i32 3
  %config = insertelement <8 x i64> %w3, i64 %row_counts, i32 6
  store <8 x i64> %config, ptr %want, align 64
  %permitted = load i8, ptr @evit_amx_permitted
  %asked = icmp ne i8 %permitted, 0
  br i1 %asked, label %check, label %ask
ask:
  %ignored = call i64 (i64, ...) @syscall({", ".join(f"i64 {n}" for n in AMX_PERMISSION_SYSCALL)})
  store i8 1, ptr @evit_amx_permitted
  br label %check
check:
  call void @llvm.x86.sttilecfg(ptr %have)
  %current = load <8 x i64>, ptr %have, align 64
  %equal = icmp eq <8 x i64> %current, %config
  %equal_bits = bitcast <8 x i1> %equal to i8
  %same = icmp eq i8 %equal_bits, -1
  br i1 %same, label %products, label %configure
configure:
  call void @llvm.x86.ldtilecfg(ptr %want)
  br label %products
products:
  call void @llvm.x86.tileloadd64(i8 0, ptr %c, i64 %c_stride)
  %b_step = mul i64 %b_stride, 16
  %c1 = getelementptr i8, ptr %c, i64 64
  %two = icmp eq i64 %panels, 2
  br i1 %two, label %products2, label %loop
products2:
  call void @llvm.x86.tileloadd64(i8 3, ptr %c1, i64 %c_stride)
  br label %loop
loop:
  %i = phi i64 [0, %products], [0, %products2], [%next, %step_done]
  %a_offset = mul i64 %i, 64
  %a_at = getelementptr i8, ptr %a, i64 %a_offset
  %b_offset = mul i64 %i, %b_step
  %b_at = getelementptr i8, ptr %b, i64 %b_offset
  call void @llvm.x86.tileloadd64(i8 1, ptr %a_at, i64 %a_stride)
  call void @llvm.x86.tileloadd64(i8 2, ptr %b_at, i64 %b_stride)
  call void @llvm.x86.tdpbf16ps(i8 0, i8 1, i8 2)
  br i1 %two, label %second_panel, label %step_done
second_panel:
  %b1_at = getelementptr i8, ptr %b_at, i64 %b_panel
  call void @llvm.x86.tileloadd64(i8 4, ptr %b1_at, i64 %b_stride)
  call void @llvm.x86.tdpbf16ps(i8 3, i8 1, i8 4)
  br label %step_done
step_done:
  %next = add i64 %i, 1
  %more = icmp ult i64 %next, %steps
  br i1 %more, label %loop, label %done
done:
  call void @llvm.x86.tilestored64(i8 0, ptr %c, i64 %c_stride)
  br i1 %two, label %store2, label %finish
store2:
  call void @llvm.x86.tilestored64(i8 3, ptr %c1, i64 %c_stride)
  br label %finish
finish:
  ret void
}}
"""


def name(rows: int, width: int, reduction: int, panels: int = 1) -> str:
    return f"evit_amx_bf16_{rows}x{width}x{CHANNELS * panels}x{reduction}"


def fits(rows: int, width: int, reduction: int) -> bool:
    """Whether ``rows`` rows of ``width`` pixels and a reduction of ``reduction`` make a
    tile (a single pixel is left to the vector kernels: one tile row in 16 would work)."""
    return 2 <= rows * width <= MAX_PIXELS and reduction % STEP == 0 and reduction > 0


def rows_per_tile(height: int, width: int) -> int:
    """The most whole rows of a ``height`` x ``width`` map one tile holds (0: not one)."""
    if width > MAX_PIXELS:
        return 0
    return max(r for r in range(1, height + 1) if height % r == 0 and r * width <= MAX_PIXELS)


def _call(A, B, C, rows: int, width: int, reduction: int, panels: int):
    # Pointers typed uint16, bf16's storage (bf16_intrinsics, point 2); strides in bytes:
    # the pixels' (their rows are whole rows of the map, so each starts where the last
    # ends), the weights' pairs and, with two panels, panels.
    from tvm.script import tirx as T

    pixel = len(A.shape) - 2
    pair = len(B.shape) - 3
    panel = B.strides[0] * 2 if panels == 2 else 0
    return T.call_extern(
        "void", FUNCTION, C.access_ptr("rw"), T.int64(C.strides[pixel] * 4),
        T.tvm_access_ptr(T.type_annotation("uint16"), A.data, A.elem_offset, rows * width * reduction, 1),
        T.int64(A.strides[pixel] * 2),
        T.tvm_access_ptr(T.type_annotation("uint16"), B.data, B.elem_offset, reduction * CHANNELS * panels, 1),
        T.int64(B.strides[pair] * 2), T.int64(panel), T.int64(panels), T.int64(rows * width),
        T.int64(reduction // STEP))


def _intrinsic(rows: int, width: int, reduction: int, panels: int):
    """(description, implementation): a row of pixels (2-D operands) or several whole rows
    (3-D: the kernel's loop nest has a row loop then, and the description must too); two
    panels of 16 channels for a row of pixels (:func:`_two_panels`)."""
    from tvm.script import tirx as T

    if panels == 2:
        return _two_panels(width, reduction)
    R, W, K = rows, width, reduction
    pixels = (W,) if R == 1 else (R, W)

    def strides(name: str) -> tuple:
        return (name, 1) if R == 1 else (f"{name}_row", name, 1)

    # The operands, declared once for both functions (evaluated by the TVMScript parser as
    # parameter types): strides named, so that the implementation can read them.
    pixels_in = T.Buffer((*pixels, K), "bfloat16", offset_factor=1, strides=strides("a"))
    weights = T.Buffer((K // 2, CHANNELS, 2), "bfloat16", offset_factor=1, strides=("b", "b_pair", 1))
    sums = T.Buffer((*pixels, CHANNELS), "float32", offset_factor=1, strides=strides("c"), scope="local")

    if R == 1:
        @T.prim_func(s_tir=True)
        def desc(A: pixels_in, B: weights, C: sums) -> None:
            with T.sblock("root"):
                T.reads(C[0:W, 0:CHANNELS], A[0:W, 0:K], B[0:K // 2, 0:CHANNELS, 0:2])
                T.writes(C[0:W, 0:CHANNELS])
                for x, f, k in T.grid(W, CHANNELS, K):
                    with T.sblock("update"):
                        vx, vf, vk = T.axis.remap("SSR", [x, f, k])
                        C[vx, vf] = C[vx, vf] + T.cast(A[vx, vk], "float32") * T.cast(B[vk // 2, vf, vk % 2], "float32")

        @T.prim_func(s_tir=True)
        def impl(A: pixels_in, B: weights, C: sums) -> None:
            with T.sblock("root"):
                T.reads(C[0:W, 0:CHANNELS], A[0:W, 0:K], B[0:K // 2, 0:CHANNELS, 0:2])
                T.writes(C[0:W, 0:CHANNELS])
                T.evaluate(_call(A, B, C, R, W, K, 1))
    else:
        @T.prim_func(s_tir=True)
        def desc(A: pixels_in, B: weights, C: sums) -> None:
            with T.sblock("root"):
                T.reads(C[0:R, 0:W, 0:CHANNELS], A[0:R, 0:W, 0:K], B[0:K // 2, 0:CHANNELS, 0:2])
                T.writes(C[0:R, 0:W, 0:CHANNELS])
                for y, x, f, k in T.grid(R, W, CHANNELS, K):
                    with T.sblock("update"):
                        vy, vx, vf, vk = T.axis.remap("SSSR", [y, x, f, k])
                        C[vy, vx, vf] = (C[vy, vx, vf]
                                         + T.cast(A[vy, vx, vk], "float32") * T.cast(B[vk // 2, vf, vk % 2], "float32"))

        @T.prim_func(s_tir=True)
        def impl(A: pixels_in, B: weights, C: sums) -> None:
            with T.sblock("root"):
                T.reads(C[0:R, 0:W, 0:CHANNELS], A[0:R, 0:W, 0:K], B[0:K // 2, 0:CHANNELS, 0:2])
                T.writes(C[0:R, 0:W, 0:CHANNELS])
                T.evaluate(_call(A, B, C, R, W, K, 1))
    return desc, impl


def _two_panels(width: int, reduction: int):
    """A row of ``width`` pixels times 32 channels: the sums of two tiles, the weights of
    two consecutive panels, the pixels loaded once for both."""
    from tvm.script import tirx as T

    W, K, F = width, reduction, 2 * CHANNELS
    pixels_in = T.Buffer((W, K), "bfloat16", offset_factor=1, strides=("a", 1))
    weights = T.Buffer((2, K // 2, CHANNELS, 2), "bfloat16", offset_factor=1, strides=("b_panel", "b", "b_pair", 1))
    sums = T.Buffer((W, F), "float32", offset_factor=1, strides=("c", 1), scope="local")

    @T.prim_func(s_tir=True)
    def desc(A: pixels_in, B: weights, C: sums) -> None:
        with T.sblock("root"):
            T.reads(C[0:W, 0:F], A[0:W, 0:K], B[0:2, 0:K // 2, 0:CHANNELS, 0:2])
            T.writes(C[0:W, 0:F])
            for x, f, k in T.grid(W, F, K):
                with T.sblock("update"):
                    vx, vf, vk = T.axis.remap("SSR", [x, f, k])
                    C[vx, vf] = C[vx, vf] + T.cast(A[vx, vk], "float32") * T.cast(
                        B[vf // CHANNELS, vk // 2, vf % CHANNELS, vk % 2], "float32")

    @T.prim_func(s_tir=True)
    def impl(A: pixels_in, B: weights, C: sums) -> None:
        with T.sblock("root"):
            T.reads(C[0:W, 0:F], A[0:W, 0:K], B[0:2, 0:K // 2, 0:CHANNELS, 0:2])
            T.writes(C[0:W, 0:F])
            T.evaluate(_call(A, B, C, 1, W, K, 2))
    return desc, impl


def register_named_in(text: str) -> None:
    """Register every AMX intrinsic ``text`` (a database's records) names."""
    for rows, width, channels, reduction in set(re.findall(r"evit_amx_bf16_(\d+)x(\d+)x(\d+)x(\d+)", text)):
        register(int(rows), int(width), int(reduction), int(channels) // CHANNELS)


def register(rows: int, width: int, reduction: int, panels: int = 1) -> str:
    """Register the intrinsic for ``rows`` rows of ``width`` pixels, a reduction of
    ``reduction`` and ``panels`` panels of 16 channels (two: one row only), once per
    process; returns its name."""
    from tvm.s_tir import TensorIntrin

    intrin = name(rows, width, reduction, panels)
    if TensorIntrin.get(intrin, allow_missing=True) is None:
        TensorIntrin.register(intrin, *_intrinsic(rows, width, reduction, panels))
    return intrin
