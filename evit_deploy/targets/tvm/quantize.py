"""The bf16 precision of a TVM library: which kernels compute in bf16, and the CPU it needs.

A bf16 library differs from an fp32 one in two places, and only for the dense, unpadded
1x1 convolutions (the FFNs and projections: most of the model's multiply-adds):

* the graph (:func:`graph.convolutions_in_bf16 <.graph.convolutions_in_bf16>`) gives
  them bf16 weights, rounded once by numpy (:func:`round_weights`), and an fp32 result;
  :func:`computes_in_bf16` decides which convolutions qualify;
* their kernels (:mod:`.schedules.gemm_bf16`) round the fp32 activations to bf16 block
  by block and sum the products in fp32 with AVX512_BF16's dot product.

Everything else (the stem, depthwise convolutions, the attention) stays fp32. Code with
the dot product runs only on CPUs that have it (:func:`require_bf16`).
"""

from __future__ import annotations

#: What each precision makes (the help of ``--precision``).
PRECISIONS = {
    "fp32": "",
    "bf16": "the 1x1 convolutions from bf16 weights and activations with fp32 accumulation; needs AVX512_BF16 "
            "on the target CPU",
}


def computes_in_bf16(input_dtype: str, weights, *, kernel_layout: str, groups: int, padding, out_dtype: str) -> bool:
    """Whether a conv2d of fp32 ``input_dtype`` with constant ``weights`` (a numpy array
    in ``kernel_layout``) is one a bf16 library computes in bf16: dense, 1x1, unpadded,
    fp32, with channel counts the dot product takes (output a multiple of its lanes,
    input of its pair)."""
    import numpy as np

    from .schedules.bf16_intrinsics import LANES, PAIR

    dims = dict(zip(kernel_layout, weights.shape))
    return (input_dtype == "float32" and weights.dtype == np.float32 and groups == 1
            and (dims["H"], dims["W"]) == (1, 1) and not any(int(p) for p in padding)
            and dims["O"] % LANES == 0 and dims["I"] % PAIR == 0 and out_dtype in ("", "float32"))


def round_weights(weights):
    """fp32 weights rounded to bf16 (to nearest even)."""
    import ml_dtypes

    return weights.astype(ml_dtypes.bfloat16)


def supports_bf16(target) -> bool:
    """Whether ``target`` (a ``tvm.target.Target``, llvm) has vdpbf16ps and AVX-512
    registers: the target's features, not the compiling machine's."""
    from tvm.target.codegen import llvm_get_cpu_features

    return {"avx512f", "avx512bf16"} <= set(llvm_get_cpu_features(target))


def require_bf16(target: dict) -> None:
    """Refuse bf16 for a CPU without the bf16 dot product (a canonical target dict; one
    line, exit code 2)."""
    from ...errors import BadInputError
    from .target_string import to_classic, to_tvm

    if not supports_bf16(to_tvm(target)):
        raise BadInputError(f"--precision bf16 needs AVX512_BF16 (vdpbf16ps), which the target CPU "
                            f"'{to_classic(target)}' does not have; export fp32 for it")
