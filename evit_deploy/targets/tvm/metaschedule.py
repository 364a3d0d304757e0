"""MetaSchedule, configured for this tuner, with the workarounds it needs here.

Everything that knows MetaSchedule's API lives in this module: extracting the model's
kernels, the design space, the cost model, the search context of one kernel, and the
database queries. The policy (:mod:`.policy`) and the loop (:mod:`.search`) only call it.
"""

from __future__ import annotations

import sys
import types
from contextlib import contextmanager
from dataclasses import dataclass

#: Widest vector loop a candidate may have. MetaSchedule's CPU default (64) lets it
#: vectorize whole 49-long window rows (7x7 attention windows): LLVM then spends minutes
#: legalising <49 x float> operations in unrolled loops (builds time out) and the code
#: is no faster. 16 floats is one AVX-512 register or two AVX2 ones.
MAX_VECTOR_LANES = 16

#: Custom schedule rules TOPI names on its blocks that TVM registers for no CPU target.
UNREGISTERED_CPU_RULES = ("meta_schedule.adaptive_pool_avg",)

#: The cost model retrains once this many new measurements (or a quarter more) arrived.
RETRAIN_AFTER = 64


@dataclass
class Kernel:
    """One fused kernel of the model, as MetaSchedule extracted it."""

    name: str
    calls: int                # MetaSchedule's task weight: calls per model run
    mod: object               # the kernel's IRModule
    flops: float


def extract_kernels(mod, target) -> list[Kernel]:
    """One entry per distinct fused kernel of a prepared Relax module."""
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks

    kernels = []
    for task in extract_tasks(mod, target):
        kernel = task.dispatched[0]
        kernels.append(Kernel(str(task.task_name), int(task.weight), kernel, flops(kernel)))
    return kernels


def flops(mod) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops
    try:
        return float(estimate_tir_flops(mod))
    except Exception:   # estimation is only used to order the first round
        return 0.0


def register_cpu_rules() -> None:
    """Keep TOPI's pooling block as it is, and say so.

    MetaSchedule leaves a block whose custom rule is not registered unscheduled, after
    printing a C++ warning on the terminal ("Unknown schedule rule
    meta_schedule.adaptive_pool_avg"). Here that is the model's one global average pool
    (a few microseconds): registering the rule as "unchanged" keeps exactly that
    behaviour, without the warning.
    """
    import tvm_ffi

    for rule in UNREGISTERED_CPU_RULES:
        name = f"s_tir.meta_schedule.cpu.{rule}"
        if tvm_ffi.get_global_func(name, allow_missing=True) is None:
            tvm_ffi.register_global_func(name, lambda sch, block: [sch])


def space_generator():
    """MetaSchedule's LLVM design space with vector loops capped at :data:`MAX_VECTOR_LANES`."""
    from tvm.s_tir.meta_schedule.schedule_rule import ParallelizeVectorizeUnroll, ScheduleRule
    from tvm.s_tir.meta_schedule.space_generator import PostOrderApply

    register_cpu_rules()
    rules = [ParallelizeVectorizeUnroll(max_jobs_per_core=16, max_vectorize_extent=MAX_VECTOR_LANES,
                                        unroll_max_steps=[0, 16, 64, 512], unroll_explicit=True)
             if isinstance(rule, ParallelizeVectorizeUnroll) else rule
             for rule in ScheduleRule.create("llvm")]
    return PostOrderApply(sch_rules=rules, postprocs="llvm", mutator_probs="llvm")


def cost_model(threads: int):
    """MetaSchedule's XGBoost cost model, retrained less often.

    The stock model retrains after every round; on a few hundred samples its training
    runs up to thousands of boosting rounds with Python callbacks (10-15 s on a loaded
    2-core machine, a third of a 16-candidate round). Measurements between retrainings
    are still added to its data.
    """
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.cost_model.xgb_model import XGBModel

    @derived_object
    class BatchedXGBModel(XGBModel._cls):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.trained_at = 0

        def update(self, context, candidates, results):
            grown = self.data_size + len(candidates) - self.trained_at
            if grown >= max(RETRAIN_AFTER, self.trained_at // 4):
                super().update(context, candidates, results)
                self.trained_at = self.data_size
                return
            # XGBModel skips training while data_size - last_train_size < last_train_size / 5.
            saved = self.last_train_size
            self.last_train_size = 1 << 60
            try:
                super().update(context, candidates, results)
            finally:
                self.last_train_size = saved

    return BatchedXGBModel(num_tuning_cores=threads, adaptive_training=True)


def tune_context(kernel: Kernel, target, *, seed: int, threads: int, population: int, trials_per_round: int,
                 database, cost_model, logger):
    """MetaSchedule's search context for one kernel, ready to generate candidates."""
    from tvm.s_tir.meta_schedule import TuneContext
    from tvm.s_tir.meta_schedule.search_strategy import EvolutionarySearch

    with without_tensor_intrinsics():
        ctx = TuneContext(mod=kernel.mod, target=target, space_generator=space_generator(),
                          search_strategy=EvolutionarySearch(population_size=population,
                                                             init_min_unmeasured=min(50, population // 4)),
                          task_name=kernel.name, rand_state=seed, num_threads=threads, logger=logger)
    ctx.pre_tuning(max_trials=1 << 30, num_trials_per_iter=trials_per_round,
                   design_spaces=ctx.generate_design_space(), database=database, cost_model=cost_model)
    return ctx


def postprocs(kernel: Kernel, target) -> list:
    """MetaSchedule's post-processors for ``target`` (weight packing, reduction init, ...),
    initialised: what every candidate goes through before it is built or stored."""
    from tvm.s_tir.meta_schedule import TuneContext

    with without_tensor_intrinsics():
        ctx = TuneContext(mod=kernel.mod, target=target, space_generator=space_generator(), task_name=kernel.name)
    return list(ctx.space_generator.postprocs)


def close_context(ctx) -> None:
    try:
        ctx.post_tuning()
    except Exception:  # post_tuning only frees search state
        pass


def measured_records(database, mod) -> list:
    """The database's records for a kernel, best first."""
    if not database.has_workload(mod):
        return []
    return list(database.get_top_k(database.commit_workload(mod), 1_000_000))


def best_candidate(database, mod):
    """A measure candidate of the best schedule ``database`` holds for this kernel (its
    trace replayed on the kernel), or None."""
    from tvm import s_tir
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo
    from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate

    records = measured_records(database, mod)
    if not records:
        return None
    sch = s_tir.Schedule(mod)
    try:
        records[0].trace.apply_to_schedule(sch, remove_postproc=False)
    except Exception:   # a schedule that does not apply to this kernel any more
        return None
    return MeasureCandidate(sch, ArgInfo.from_entry_func(sch.mod, remove_preproc=True))


def same_schedule(a, b) -> bool:
    """Whether two measure candidates of one kernel are the same schedule (a database's
    record that is the default schedule again, say): the same trace, decisions included,
    makes the same kernel."""
    return str(a.sch.trace) == str(b.sch.trace)


def commit(database, mod, candidate, seconds: list[float], target) -> None:
    """Store one measured candidate."""
    from tvm.s_tir.meta_schedule.database import TuningRecord

    workload = database.commit_workload(mod)
    database.commit_tuning_record(TuningRecord(candidate.sch.trace, workload, seconds, target,
                                               candidate.args_info))


def runner_result(seconds: float | None, error: str | None = None):
    """A MetaSchedule ``RunnerResult`` (what the search strategy and cost model learn from)."""
    from tvm.s_tir.meta_schedule.runner import RunnerResult

    return RunnerResult(run_secs=None if seconds is None else [seconds], error_msg=error)


@contextmanager
def without_tensor_intrinsics():
    """Let TuneContext skip ``import tvm.s_tir.tensor_intrin``.

    That import parses hundreds of TVMScript intrinsics for CUDA, ARM, Hexagon and int8
    x86 (over a minute on a loaded 2-core machine, in the first tuning round); the fp32
    LLVM design space of :func:`space_generator` uses none of them. A placeholder module
    stands in while the context is built; nothing is left behind if the real one was
    not imported.
    """
    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        yield
        return
    sys.modules[name] = types.ModuleType(name)
    try:
        yield
    finally:
        del sys.modules[name]
