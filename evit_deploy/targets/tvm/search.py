"""The tuning loop: round after round, until the budget is spent.

A round does what :mod:`.policy` plans: measure the default schedules (:mod:`.schedules`)
of many kernels at once, the other variants of one kernel's default, or a round of
MetaSchedule's evolutionary search for one kernel (through :mod:`.metaschedule`; the
search starts from the best schedules measured so far). It builds and measures the
candidates (:mod:`.measure`), stores every measurement in the database and tells the
policy what it learnt. Between rounds, never inside one, the loop checks for a stop
request and asks the policy whether the budget is spent.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ...progress import stopped_by
from . import metaschedule, policy, schedules
from .policy import KernelState


@dataclass
class Progress:
    """What a progress display needs after each round."""

    kernel: KernelState
    trials_done: int
    rounds: int
    kernels_measured: int
    kernels_total: int
    estimated_latency_s: float | None     # see policy.estimated_latency
    elapsed_s: float
    errors: int


@dataclass
class Candidate:
    """One candidate of a round: its kernel, the MetaSchedule candidate, what measuring it gave."""

    kernel: KernelState
    candidate: object
    hand_written: bool | None = None     # None: as the round's kind says
    seconds: float | None = None
    error: str | None = None


class Search:
    """Tune ``kernels`` (:class:`.metaschedule.Kernel`) for ``target`` into ``database``."""

    def __init__(self, kernels: list, target, database, builder, runner, *, logger: logging.Logger,
                 trials_per_round: int = 16, search_threads: int = 1, seed: int = 0, population: int = 256,
                 start_from=None):
        self.kernels = kernels
        self.target = target
        self.database = database
        self.builder = builder
        self.runner = runner
        self.log = logger
        self.trials_per_round = trials_per_round
        self.search_threads = max(1, search_threads)
        self.seed = seed
        self.population = population
        self.cost_model = metaschedule.cost_model(self.search_threads)
        self.facts = schedules.CpuFacts.for_target(target)
        self.states = [self._state(i, k) for i, k in enumerate(kernels)]
        self._contexts: dict[int, object] = {}
        self._postprocs = None
        # Another database (made for or on another CPU) whose best schedules are measured
        # here beside the defaults: a head start, never trusted unmeasured.
        self.start_from = start_from
        self.trials_done = 0
        self.rounds = 0
        self.errors = 0
        self.started = time.monotonic()

    def _state(self, index: int, kernel) -> KernelState:
        """A kernel's state, continuing from what the database already holds."""
        records = metaschedule.measured_records(self.database, kernel.mod)
        return policy.resumed(index, kernel.name, kernel.calls, kernel.flops, records=len(records),
                              best_s=min(float(s) for s in records[0].run_secs) if records else None,
                              best_hand_written=bool(records) and schedules.is_hand_written(records[0].trace),
                              written=sum(schedules.is_hand_written(r.trace) for r in records),
                              variants=schedules.variant_count(kernel.mod, self.facts))

    def estimated_latency(self) -> float | None:
        return policy.estimated_latency(self.states)

    # -- one round ------------------------------------------------------------------------
    def step(self, limit: int | None = None) -> Progress | None:
        """One round (at most ``limit`` candidates); None when every kernel is exhausted."""
        plan = policy.next_round(self.states, limit)
        if plan is None:
            return None
        t0 = time.monotonic()
        round_ = self._candidates(plan, limit)
        if not round_:
            policy.finish_round(plan, [])
            return self._progress(plan.kernels[0])
        t1 = time.monotonic()
        self._measure(round_)
        t2 = time.monotonic()
        if plan.kind != policy.DEFAULTS:
            self._learn(plan, round_)
        self._store(round_)
        policy.finish_round(plan, [(c.kernel, c.seconds, plan.hand_written if c.hand_written is None
                                    else c.hand_written) for c in round_])
        self.trials_done += len(round_)
        self.rounds += 1
        self.log.info("%s round, %s: %d candidates: search %.1f s, build and measure %.1f s, learn and record %.1f s",
                      plan.kind, ", ".join(s.name for s in plan.kernels)[:200], len(round_), t1 - t0, t2 - t1,
                      time.monotonic() - t2)
        return self._progress(policy.largest_share(plan.kernels))

    def _context(self, state: KernelState):
        if state.index not in self._contexts:
            self._contexts[state.index] = metaschedule.tune_context(
                self.kernels[state.index], self.target, seed=self.seed + state.index + 1,
                threads=self.search_threads, population=self.population, trials_per_round=self.trials_per_round,
                database=self.database, cost_model=self.cost_model, logger=self.log)
        return self._contexts[state.index]

    def _candidates(self, plan: policy.RoundPlan, limit: int | None) -> list[Candidate]:
        out: list[Candidate] = []
        if plan.kind == policy.DEFAULTS:
            if self._postprocs is None:
                self._postprocs = metaschedule.postprocs(self.kernels[plan.kernels[0].index], self.target)
            for state in plan.kernels:
                mod = self.kernels[state.index].mod
                found = schedules.default_candidate(mod, self.facts, self._postprocs)
                if found is not None:
                    out.append(Candidate(state, found))
                if self.start_from is not None:
                    imported = metaschedule.best_candidate(self.start_from, mod)
                    # The other database's best is often this CPU's default too (a default
                    # of the same vector width): measured once, it delays nothing.
                    if imported is not None and (found is None or not metaschedule.same_schedule(found, imported)):
                        out.append(Candidate(state, imported, hand_written=schedules.is_hand_written(
                            imported.sch.trace)))
        elif plan.kind == policy.VARIANTS:
            (state,) = plan.kernels
            ctx = self._context(state)
            # The default (first) was measured in a defaults round.
            others = schedules.candidates(self.kernels[state.index].mod, self.facts, ctx.space_generator.postprocs)[1:]
            out = [Candidate(state, c) for c in others]
        else:
            (state,) = plan.kernels
            out = [Candidate(state, c) for c in (self._context(state).generate_measure_candidates() or [])]
        return out if limit is None else out[:limit]

    def _measure(self, round_: list[Candidate]) -> None:
        from .measure import remove_artifact

        built = self.builder.build([c.candidate for c in round_], self.target)
        ok = [(c.candidate, path) for c, (path, _) in zip(round_, built) if path]
        measured = iter(self.runner.run(ok)) if ok else iter(())
        for entry, (path, build_error) in zip(round_, built):
            entry.seconds, entry.error = next(measured) if path else (None, build_error)
            remove_artifact(path)

    def _learn(self, plan: policy.RoundPlan, round_: list[Candidate]) -> None:
        (state,) = plan.kernels
        ctx = self._context(state)
        candidates = [c.candidate for c in round_]
        results = [metaschedule.runner_result(c.seconds, c.error) for c in round_]
        if plan.kind == policy.SEARCH:      # the evolutionary search counts only its own candidates
            ctx.notify_runner_results(candidates, results)
        self.cost_model.update(ctx, candidates, results)

    def _store(self, round_: list[Candidate]) -> None:
        for entry in round_:
            if entry.seconds is None:
                self.errors += 1
                error = str(entry.error or "").strip()
                self.log.warning("%s: candidate failed: %s", entry.kernel.name,
                                 error.splitlines()[-1] if error else "no result")
                continue
            metaschedule.commit(self.database, self.kernels[entry.kernel.index].mod, entry.candidate,
                                [entry.seconds], self.target)

    def _progress(self, state: KernelState) -> Progress:
        return Progress(state, self.trials_done, self.rounds, sum(s.best_s is not None for s in self.states),
                        len(self.states), self.estimated_latency(), time.monotonic() - self.started, self.errors)

    # -- the loop -------------------------------------------------------------------------
    def run(self, *, max_trials: int | None = None, deadline: float | None = None, on_round=None,
            stop_requested=None) -> str:
        """Rounds until ``max_trials`` trials were measured, ``deadline`` (a
        ``time.monotonic()`` value) passed, or every kernel is exhausted; returns which
        (:func:`policy.stop_reason`, or :data:`policy.EXHAUSTED`).

        ``stop_requested()`` is checked between rounds; when it returns a signal number the
        loop stops as that signal stops a command (``KeyboardInterrupt``): a round is never
        cut in half.
        """
        try:
            while True:
                if stop_requested is not None and (signum := stop_requested()):
                    raise stopped_by(signum)
                reason = policy.stop_reason(self.trials_done, max_trials, deadline, time.monotonic())
                if reason is not None:
                    return reason
                progress = self.step(policy.round_limit(self.trials_done, max_trials))
                if progress is None:
                    return policy.EXHAUSTED
                if on_round is not None:
                    on_round(progress)
        finally:
            for ctx in self._contexts.values():
                metaschedule.close_context(ctx)
