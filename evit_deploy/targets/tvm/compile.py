"""Compile a prepared Relax module into a Relax VM executable, applying tuned kernels."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class BuildResult:
    executable: object
    kernels: int          # fused kernels in the module
    tuned: int            # of which a tuning record was applied
    hand_written: int     # of which the record is a schedule from templates.py


def count_kernels(mod) -> int:
    from tvm import tirx
    return sum(1 for _, f in mod.functions.items() if isinstance(f, tirx.PrimFunc))


def _scheduled(mod):
    """The kernels a tuning record was applied to."""
    from tvm import tirx
    return [f for _, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and f.attrs.get("tirx.is_scheduled", False)]


def count_tuned(mod) -> int:
    return len(_scheduled(mod))


def count_hand_written(mod) -> int:
    from tvm import s_tir

    from .templates import MARK

    count = 0
    for f in _scheduled(mod):
        sch = s_tir.Schedule(f)
        count += any(MARK in sch.get(b).annotations for b in sch.get_child_blocks(sch.get_sblock("root")))
    return count


def build(prepared, target, database=None) -> BuildResult:
    """``prepared`` (from :func:`graph.prepare`) -> executable.

    With a database, kernels that have a record get the tuned schedule and the rest keep
    TVM's default (unscheduled, single-threaded) code.
    """
    import tvm
    from tvm import relax
    from tvm.relax import pipeline as rp

    kernels = count_kernels(prepared)
    mod = prepared
    with target, tvm.transform.PassContext(opt_level=3):
        if database is not None:
            with database:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
        tuned, hand_written = count_tuned(mod), count_hand_written(mod)
        # Tuned kernels may read their weights in a blocked layout: split that rewrite
        # out of the kernel and fold it into the constants at build time.
        mod = tvm.transform.Sequential([
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ])(mod)
        lower = tvm.transform.Sequential([
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            *rp.finalize_passes(target),
        ])
        executable = tvm.compile(mod, target=target, relax_pipeline=lower)
    return BuildResult(executable, kernels, tuned, hand_written)
