"""The tuning loop: round after round, one kernel at a time, until the budget is spent.

A round takes the kernel :mod:`.policy` names, gets its candidates (the hand-written
schedules of :mod:`.handwritten` the first time, else MetaSchedule's evolutionary
search, through :mod:`.metaschedule`), builds and measures them (:mod:`.measure`),
stores every measurement in the database and tells the policy what it learnt. The loop
checks the trial budget, the deadline and a stop request between rounds, never inside
one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from . import handwritten, metaschedule, policy
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
class Round:
    """One round's candidates, where they came from, and what measuring them gave."""

    kernel: KernelState
    candidates: list
    hand_written: bool
    latencies: list = None              # seconds per candidate; None where it failed
    errors: list = None                 # error text per candidate; None where it ran


class Search:
    """Tune ``kernels`` (:class:`.metaschedule.Kernel`) for ``target`` into ``database``."""

    def __init__(self, kernels: list, target, database, builder, runner, *, logger: logging.Logger,
                 trials_per_round: int = 16, search_threads: int = 1, seed: int = 0, population: int = 256):
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
        self.states = [self._state(i, k) for i, k in enumerate(kernels)]
        self._contexts: dict[int, object] = {}
        self.trials_done = 0
        self.rounds = 0
        self.errors = 0
        self.started = time.monotonic()

    def _state(self, index: int, kernel) -> KernelState:
        """A kernel's state, continuing from what the database already holds."""
        records = metaschedule.measured_records(self.database, kernel.mod)
        state = KernelState(index, kernel.name, kernel.calls, kernel.flops, previous_trials=len(records))
        if records:
            state.best_s = min(float(s) for s in records[0].run_secs)
            state.best_hand_written = handwritten.is_hand_written(records[0].trace)
        state.hand_written_pending = (handwritten.applies(kernel.mod)
                                      and not any(handwritten.is_hand_written(r.trace) for r in records))
        return state

    def estimated_latency(self) -> float | None:
        return policy.estimated_latency(self.states)

    # -- one round ------------------------------------------------------------------------
    def step(self, limit: int | None = None) -> Progress | None:
        """Tune the next kernel for one round of at most ``limit`` candidates; None when
        every kernel is exhausted."""
        state = policy.next_kernel(self.states)
        if state is None:
            return None
        t0 = time.monotonic()
        round_ = self._candidates(state, limit)
        if not round_.candidates:
            state.exhausted = True
            return self._progress(state)
        t1 = time.monotonic()
        self._measure(round_)
        t2 = time.monotonic()
        self._learn(round_)
        self._store(round_)
        policy.record_round(state, round_.latencies, hand_written=round_.hand_written)
        self.trials_done += len(round_.candidates)
        self.rounds += 1
        self.log.info("%s: %d %s candidates: search %.1f s, build and measure %.1f s, learn and record %.1f s",
                      state.name, len(round_.candidates), "hand-written" if round_.hand_written else "searched",
                      t1 - t0, t2 - t1, time.monotonic() - t2)
        return self._progress(state)

    def _context(self, state: KernelState):
        if state.index not in self._contexts:
            self._contexts[state.index] = metaschedule.tune_context(
                self.kernels[state.index], self.target, seed=self.seed + state.index + 1,
                threads=self.search_threads, population=self.population, trials_per_round=self.trials_per_round,
                database=self.database, cost_model=self.cost_model, logger=self.log)
        return self._contexts[state.index]

    def _candidates(self, state: KernelState, limit: int | None) -> Round:
        ctx = self._context(state)
        candidates, hand_written = [], False
        if state.hand_written_pending:
            state.hand_written_pending = False
            candidates = handwritten.candidates(self.kernels[state.index].mod, ctx.space_generator.postprocs)
            hand_written = bool(candidates)
        if not hand_written:
            candidates = list(ctx.generate_measure_candidates() or [])
        if limit is not None:
            candidates = candidates[:limit]     # a trial budget is a promise, not a hint
        return Round(state, candidates, hand_written)

    def _measure(self, round_: Round) -> None:
        from .measure import remove_artifact

        built = self.builder.build(round_.candidates, self.target)
        ok = [(c, path) for c, (path, _) in zip(round_.candidates, built) if path]
        measured = iter(self.runner.run(ok)) if ok else iter(())
        round_.latencies, round_.errors = [], []
        for path, build_error in built:
            seconds, error = (next(measured) if path else (None, build_error))
            round_.latencies.append(seconds)
            round_.errors.append(error)
            remove_artifact(path)

    def _learn(self, round_: Round) -> None:
        ctx = self._context(round_.kernel)
        results = [metaschedule.runner_result(s, e) for s, e in zip(round_.latencies, round_.errors)]
        if not round_.hand_written:        # the evolutionary search counts only its own candidates
            ctx.notify_runner_results(round_.candidates, results)
        self.cost_model.update(ctx, round_.candidates, results)

    def _store(self, round_: Round) -> None:
        mod = self.kernels[round_.kernel.index].mod
        for candidate, seconds, error in zip(round_.candidates, round_.latencies, round_.errors):
            if seconds is None:
                self.errors += 1
                self.log.warning("%s: candidate failed: %s", round_.kernel.name,
                                 str(error).strip().splitlines()[-1] if str(error).strip() else "no result")
                continue
            metaschedule.commit(self.database, mod, candidate, [seconds], self.target)

    def _progress(self, state: KernelState) -> Progress:
        return Progress(state, self.trials_done, self.rounds, sum(s.best_s is not None for s in self.states),
                        len(self.states), self.estimated_latency(), time.monotonic() - self.started, self.errors)

    # -- the loop -------------------------------------------------------------------------
    def run(self, *, max_trials: int | None = None, deadline: float | None = None, on_round=None,
            stop_requested=None) -> None:
        """Rounds until ``max_trials`` trials were measured, ``deadline`` (a
        ``time.monotonic()`` value) passed, or every kernel is exhausted.

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
            for ctx in self._contexts.values():
                metaschedule.close_context(ctx)
