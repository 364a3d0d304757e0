"""The tuning loop: MetaSchedule's evolutionary search, driven task by task from Python.

MetaSchedule's own task schedulers give every task a full round (64 trials) before
looking at where time goes, so a modest budget is spent on the first tasks of the list
and the rest stay untuned. Here every task first gets one small round, then each next
round goes to the task with the largest share of the estimated model latency per trial
already spent on it (``weight x best latency / trials``). Before any of that, each dense
convolution gets one round of the hand-written kernels of
:mod:`.templates`, measured and stored like any other candidate. The loop stops at a
trial count or a deadline, checks both between rounds, and reports after every round.
"""

from __future__ import annotations

import logging
import sys
import time
import types
from contextlib import contextmanager
from dataclasses import dataclass

from . import templates

log = logging.getLogger("evit_deploy.tvm.tuning")


@dataclass
class TaskState:
    index: int
    name: str
    weight: int
    mod: object                       # the task's IRModule
    flops: float
    ctx: object = None                # TuneContext, created on first use
    best_s: float | None = None       # best measured latency of one call
    trials: int = 0                   # measured in this session
    previous_trials: int = 0          # records found in the database
    rounds: int = 0
    exhausted: bool = False
    template_pending: bool = False    # hand-written candidates (templates.py) not measured yet
    best_hand_written: bool = False   # the best schedule is one of templates.py's

    @property
    def total_trials(self) -> int:
        return self.trials + self.previous_trials


@dataclass
class Progress:
    """What a progress display needs after each round."""

    task: TaskState
    trials_done: int
    rounds: int
    tasks_tuned: int
    tasks_total: int
    estimated_latency_s: float | None     # sum of weight x best over tasks, None until all have one
    elapsed_s: float
    errors: int


def extract_tasks(mod, target) -> list[TaskState]:
    """One task per distinct fused kernel, weighted by how often the model calls it."""
    from tvm.s_tir.meta_schedule.relax_integration import extract_tasks as ms_extract

    extracted = ms_extract(mod, target)
    tasks = []
    for i, task in enumerate(extracted):
        kernel = task.dispatched[0]
        tasks.append(TaskState(i, str(task.task_name), int(task.weight), kernel, _flops(kernel)))
    return tasks


#: Widest vector loop a candidate may have. MetaSchedule's CPU default (64) lets it
#: vectorize whole 49-long window rows (7x7 attention windows): LLVM then spends minutes
#: legalising <49 x float> operations in unrolled loops (builds time out) and the code
#: is no faster. 16 floats is one AVX-512 register or two AVX2 ones.
MAX_VECTOR_LANES = 16


#: Custom schedule rules TOPI names on its blocks that TVM registers for no CPU target.
UNREGISTERED_CPU_RULES = ("meta_schedule.adaptive_pool_avg",)


def _register_cpu_rules() -> None:
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

    _register_cpu_rules()

    rules = [ParallelizeVectorizeUnroll(max_jobs_per_core=16, max_vectorize_extent=MAX_VECTOR_LANES,
                                        unroll_max_steps=[0, 16, 64, 512], unroll_explicit=True)
             if isinstance(rule, ParallelizeVectorizeUnroll) else rule
             for rule in ScheduleRule.create("llvm")]
    return PostOrderApply(sch_rules=rules, postprocs="llvm", mutator_probs="llvm")


#: The cost model retrains once this many new measurements (or a quarter more) arrived.
RETRAIN_AFTER = 64


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


def _flops(mod) -> float:
    from tvm.s_tir.analysis import estimate_tir_flops
    try:
        return float(estimate_tir_flops(mod))
    except Exception:   # estimation is only used to order the first round
        return 0.0


class Search:
    """Tune ``tasks`` for ``target`` into ``database``."""

    def __init__(self, tasks: list[TaskState], target, database, builder, runner, *,
                 trials_per_round: int = 16, search_threads: int = 1, seed: int = 0,
                 population: int = 256):
        self.tasks = tasks
        self.target = target
        self.database = database
        self.builder = builder
        self.runner = runner
        self.trials_per_round = trials_per_round
        self.search_threads = max(1, search_threads)
        self.seed = seed
        self.population = population
        self.cost_model = cost_model(self.search_threads)
        self.trials_done = 0
        self.rounds = 0
        self.errors = 0
        self.started = time.monotonic()
        for task in tasks:
            self._load_previous(task)

    # -- database -----------------------------------------------------------------------
    def _load_previous(self, task: TaskState) -> None:
        records = []
        if self.database.has_workload(task.mod):
            workload = self.database.commit_workload(task.mod)
            records = self.database.get_top_k(workload, 1_000_000)     # best first
        if records:
            task.best_s = min(float(s) for s in records[0].run_secs)
            task.best_hand_written = templates.is_template(records[0].trace)
        task.previous_trials = len(records)
        task.template_pending = (templates.applies(task.mod)
                                 and not any(templates.is_template(r.trace) for r in records))

    # -- scheduling ---------------------------------------------------------------------
    def estimated_latency(self) -> float | None:
        if any(t.best_s is None for t in self.tasks):
            return None
        return sum(t.weight * t.best_s for t in self.tasks)

    def next_task(self) -> TaskState | None:
        live = [t for t in self.tasks if not t.exhausted]
        if not live:
            return None
        # Hand-written kernels first (a few candidates that are often the best there
        # is), then a schedule for everything, biggest kernels first.
        for first in ([t for t in live if t.template_pending], [t for t in live if t.best_s is None]):
            if first:
                return max(first, key=lambda t: (t.weight * t.flops, -t.index))
        return max(live, key=lambda t: (t.weight * t.best_s / (1 + t.total_trials), -t.index))

    def _context(self, task: TaskState):
        from tvm.s_tir.meta_schedule import TuneContext
        from tvm.s_tir.meta_schedule.logging import get_logger
        from tvm.s_tir.meta_schedule.search_strategy import EvolutionarySearch

        if task.ctx is None:
            with _without_tensor_intrinsics():
                ctx = TuneContext(mod=task.mod, target=self.target, space_generator=space_generator(),
                                  search_strategy=EvolutionarySearch(
                                      population_size=self.population,
                                      init_min_unmeasured=min(50, self.population // 4)),
                                  task_name=task.name, rand_state=self.seed + task.index + 1,
                                  num_threads=self.search_threads,
                                  logger=get_logger("evit_deploy.tvm.tuning.metaschedule"))
            ctx.pre_tuning(max_trials=1 << 30, num_trials_per_iter=self.trials_per_round,
                           design_spaces=ctx.generate_design_space(), database=self.database,
                           cost_model=self.cost_model)
            task.ctx = ctx
        return task.ctx

    # -- one round ----------------------------------------------------------------------
    def step(self, limit: int | None = None) -> Progress | None:
        """Tune the next task for one round of at most ``limit`` candidates; None when
        every task is exhausted."""
        from tvm.s_tir.meta_schedule.database import TuningRecord
        from tvm.s_tir.meta_schedule.runner import RunnerResult

        from .measure import remove_artifact

        task = self.next_task()
        if task is None:
            return None
        t0 = time.monotonic()
        ctx = self._context(task)
        candidates = []
        if task.template_pending:
            task.template_pending = False
            candidates = templates.candidates(task.mod, ctx.space_generator.postprocs)
        from_search = not candidates
        if from_search:
            candidates = ctx.generate_measure_candidates()
        if candidates and limit is not None:
            candidates = list(candidates)[:limit]     # a trial budget is a promise, not a hint
        if not candidates:
            task.exhausted = True
            return self._progress(task)
        t1 = time.monotonic()
        built = self.builder.build(candidates, self.target)
        ok = [(c, path) for c, (path, _) in zip(candidates, built) if path]
        t2 = time.monotonic()
        measured = iter(self.runner.run(ok)) if ok else iter(())
        t3 = time.monotonic()
        results = []
        for cand, (path, error) in zip(candidates, built):
            results.append(next(measured) if path else RunnerResult(run_secs=None, error_msg=error))
            remove_artifact(path)
        if from_search:         # the evolutionary search counts only its own candidates
            ctx.notify_runner_results(candidates, results)
        self.cost_model.update(ctx, candidates, results)
        t4 = time.monotonic()
        workload = self.database.commit_workload(task.mod)
        for cand, res in zip(candidates, results):
            if res.run_secs is None:
                self.errors += 1
                log.warning("%s: candidate failed: %s", task.name, str(res.error_msg).strip().splitlines()[-1])
                continue
            secs = [float(s) for s in res.run_secs]
            self.database.commit_tuning_record(TuningRecord(cand.sch.trace, workload, secs, self.target,
                                                            cand.args_info))
            if task.best_s is None or min(secs) < task.best_s:
                task.best_s = min(secs)
                task.best_hand_written = not from_search
        log.info("%s: %d %s candidates: search %.1f s, build %.1f s, measure %.1f s, learn %.1f s, record %.1f s",
                 task.name, len(candidates), "searched" if from_search else "hand-written",
                 t1 - t0, t2 - t1, t3 - t2, t4 - t3, time.monotonic() - t4)
        task.trials += len(candidates)
        task.rounds += 1
        self.trials_done += len(candidates)
        self.rounds += 1
        if task.best_s is None:          # all candidates failed: do not retry forever
            task.exhausted = task.rounds >= 3
        return self._progress(task)

    def _progress(self, task: TaskState) -> Progress:
        return Progress(task, self.trials_done, self.rounds, sum(t.best_s is not None for t in self.tasks),
                        len(self.tasks), self.estimated_latency(), time.monotonic() - self.started, self.errors)

    def run(self, *, max_trials: int | None = None, deadline: float | None = None, on_round=None,
            stop_requested=None) -> None:
        """Rounds until ``max_trials`` trials were measured, ``deadline`` (a
        ``time.monotonic()`` value) passed, or every task is exhausted.

        ``stop_requested()`` is checked between rounds; when it returns true the loop
        raises :class:`KeyboardInterrupt` (a round is never cut in half).
        """
        try:
            while True:
                if stop_requested is not None and stop_requested():
                    raise KeyboardInterrupt
                if max_trials is not None and self.trials_done >= max_trials:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    break
                progress = self.step(None if max_trials is None else max_trials - self.trials_done)
                if progress is None:
                    break
                if on_round is not None:
                    on_round(progress)
        finally:
            for task in self.tasks:
                if task.ctx is not None:
                    try:
                        task.ctx.post_tuning()
                    except Exception:  # post_tuning only frees search state
                        pass


@contextmanager
def _without_tensor_intrinsics():
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
