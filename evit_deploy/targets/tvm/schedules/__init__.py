"""Schedules written here for every kernel class EfficientViT has, chosen by rules from
the kernel's shapes and the target, without measuring.

One module per kernel class, each with ``match(sch)`` (whether and how the kernel is of
its class), ``variants(sch, facts)`` (the parameters it offers, the rule's best guess
first) and ``apply(sch, variant, facts)`` (the schedule):

* :mod:`.gemm_bf16`: the 1x1 convolutions a bf16 library computes in bf16 (AVX512_BF16
  or AMX, through the tensor intrinsics of :mod:`.bf16_intrinsics` and
  :mod:`.amx_intrinsics`);
* :mod:`.gemm`: dense convolutions (1x1, the stem's 3x3) as register-blocked products;
* :mod:`.depthwise`: depthwise convolutions;
* :mod:`.matmul`: the attention's batched products and the classifier head;
* :mod:`.rows`: the attention's softmax, each row reduced in vector lanes;
* :mod:`.reduction`: average pools;
* :mod:`.injective`: element-wise kernels and copies.

Export applies every kernel's best guess (so a library is fast without a tuning
database); ``tune`` measures every variant first and starts its search from the best.
"""

from __future__ import annotations

from . import depthwise, gemm, gemm_bf16, injective, matmul, reduction, rows
from .common import MARK, is_hand_written
from .facts import CpuFacts

__all__ = ["CLASSES", "CpuFacts", "MARK", "is_hand_written", "kernel_class", "variant_count", "candidates",
           "default_candidate"]

#: In the order they are tried: the first class that matches a kernel schedules it.
CLASSES = (gemm_bf16, gemm, depthwise, matmul, rows, reduction, injective)


def kernel_class(mod, facts: CpuFacts | None = None):
    """The module of the class that schedules this kernel (an IRModule with ``main``), or
    None: the first that matches it (and, given the target's ``facts``, offers variants
    for it)."""
    from tvm import s_tir

    for cls in CLASSES:
        if cls.match(s_tir.Schedule(mod)) and (facts is None or cls.variants(s_tir.Schedule(mod), facts)):
            return cls
    return None


def variant_count(mod, facts: CpuFacts) -> int:
    """How many variants this kernel's class offers (0: no class)."""
    from tvm import s_tir

    cls = kernel_class(mod, facts)
    return len(cls.variants(s_tir.Schedule(mod), facts)) if cls is not None else 0


def candidates(mod, facts: CpuFacts, postprocs, *, limit: int | None = None) -> list:
    """Measure candidates (MetaSchedule ``MeasureCandidate``) of this kernel's schedules,
    one per variant, the rule's choice first; the post-processors add what MetaSchedule's
    own candidates get (weight packing, the reduction's initialisation). Empty when no
    class applies."""
    return [candidate for _, candidate in labelled_candidates(mod, facts, postprocs, limit=limit)]


def labelled_candidates(mod, facts: CpuFacts, postprocs, *, limit: int | None = None) -> list[tuple]:
    """(variant, candidate) pairs of :func:`candidates`."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate

    cls = kernel_class(mod, facts)
    if cls is None:
        return []
    out = []
    for variant in cls.variants(s_tir.Schedule(mod), facts):
        try:
            sch = cls.apply(s_tir.Schedule(mod), variant, facts)
            sch.enter_postproc()
            if not all(p.apply(sch) for p in postprocs):
                continue
        except Exception:   # a schedule primitive refused this kernel's shape: skip the variant
            continue
        # The runner feeds the kernel as built: weights already packed.
        out.append((variant, MeasureCandidate(sch, ArgInfo.from_entry_func(sch.mod, remove_preproc=True))))
        if limit is not None and len(out) >= limit:
            break
    return out


def default_candidate(mod, facts: CpuFacts, postprocs):
    """The rule's choice for this kernel, or None."""
    found = candidates(mod, facts, postprocs, limit=1)
    return found[0] if found else None
