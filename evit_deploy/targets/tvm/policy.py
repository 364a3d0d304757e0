"""Where the tuner spends its trials: which kernels next, with what, and what a round
taught it.

Pure bookkeeping (no TVM), so that the policy can be read and tested on its own: the
loop (:mod:`.search`) asks it what to measure, how many candidates a round may have and
when to stop, and tells it what each round measured.

MetaSchedule's own task schedulers give every kernel a full round (64 trials) before
looking at where the time goes, so a modest budget is spent on the first kernels of the
list and the rest stay untuned. Here tuning starts from the default schedules
(:mod:`.schedules`): the first rounds measure every kernel's default, many kernels per
round (their builds run in parallel), which gives each kernel's share of the model's
time. From then on each round goes to the kernel with the largest share of the
estimated model latency per trial already spent on it (``calls x best latency /
trials``): first the other variants of its default schedule (a few candidates that are
often the best there is), then MetaSchedule's search, which starts from the best
measured so far.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Rounds in which every candidate failed after which a kernel is given up.
FAILED_ROUNDS_LIMIT = 3
#: Kernels whose defaults are measured in one round.
DEFAULTS_PER_ROUND = 16
#: Trials per kernel when neither a trial count nor a time budget is given.
DEFAULT_TRIALS_PER_KERNEL = 32

DEFAULTS, VARIANTS, SEARCH = "defaults", "variants", "search"
#: Why a run stopped (besides "interrupted", which the loop does not decide).
TRIALS, TIME_BUDGET, EXHAUSTED = "trials", "time budget", "all kernels exhausted"


@dataclass
class KernelState:
    """What the tuner knows about one kernel (a MetaSchedule task)."""

    index: int                        # position in the model's kernel list (breaks ties)
    name: str
    calls: int                        # how often one run of the model calls it
    flops: float                      # of one call, to order the first rounds
    best_s: float | None = None       # best measured latency of one call
    trials: int = 0                   # measured in this run
    previous_trials: int = 0          # records found in the database
    rounds: int = 0
    exhausted: bool = False           # the search has nothing new to offer
    default_pending: bool = False     # its default schedule is not measured yet
    variants_pending: bool = False    # the default's other variants are not measured yet
    best_hand_written: bool = False   # the best schedule so far is one of schedules/

    @property
    def total_trials(self) -> int:
        return self.trials + self.previous_trials


@dataclass
class RoundPlan:
    kind: str                          # DEFAULTS | VARIANTS | SEARCH
    kernels: list[KernelState]

    @property
    def hand_written(self) -> bool:
        """Whether the round's candidates are schedules of schedules/ (a default and its
        variants), unless a candidate says otherwise (another database's record)."""
        return self.kind != SEARCH


def resumed(index: int, name: str, calls: int, flops: float, *, records: int, best_s: float | None,
            best_hand_written: bool, written: int, variants: int) -> KernelState:
    """A kernel's state, continuing from the ``records`` the database holds for it (the
    best at ``best_s``; ``written`` of them schedules of schedules/, whose class offers
    ``variants``): a resumed tune measures nothing twice. The default is the first
    written schedule measured, the other variants come after it."""
    return KernelState(index, name, calls, flops, best_s=best_s, previous_trials=records,
                       best_hand_written=best_hand_written,
                       default_pending=written == 0 and variants > 0, variants_pending=written < variants)


def trial_budget(trials: int | None, budget_s: float | None, kernels: int) -> int | None:
    """The trials a run may measure: as asked, or :data:`DEFAULT_TRIALS_PER_KERNEL` per
    kernel when neither trials nor a time budget is given."""
    if trials is None and budget_s is None:
        return DEFAULT_TRIALS_PER_KERNEL * kernels
    return trials


def stop_reason(trials_done: int, max_trials: int | None, deadline: float | None, now: float) -> str | None:
    """Why the run stops before another round (None: it goes on). A round is never cut
    in half: the deadline is checked between rounds."""
    if deadline is not None and now >= deadline:
        return TIME_BUDGET
    if max_trials is not None and trials_done >= max_trials:
        return TRIALS
    return None


def round_limit(trials_done: int, max_trials: int | None) -> int | None:
    """The most candidates the next round may measure: a trial budget is a promise, not
    a hint."""
    return None if max_trials is None else max_trials - trials_done


def estimated_latency(kernels: list[KernelState]) -> float | None:
    """Seconds per model run: the sum of calls x best latency, once every kernel has one."""
    if any(k.best_s is None for k in kernels):
        return None
    return sum(k.calls * k.best_s for k in kernels)


def _biggest_first(kernels: list[KernelState]) -> list[KernelState]:
    return sorted(kernels, key=lambda k: (-k.calls * k.flops, k.index))


def next_round(kernels: list[KernelState], limit: int | None = None) -> RoundPlan | None:
    """What the next round measures (at most ``limit`` candidates); None when every
    kernel is exhausted."""
    live = [k for k in kernels if not k.exhausted]
    if not live:
        return None
    defaults = [k for k in live if k.default_pending]
    if defaults:
        return RoundPlan(DEFAULTS, _biggest_first(defaults)[:DEFAULTS_PER_ROUND if limit is None else min(DEFAULTS_PER_ROUND, limit)])
    unmeasured = [k for k in live if k.best_s is None]      # no default schedule: search at once
    if unmeasured:
        return RoundPlan(SEARCH, _biggest_first(unmeasured)[:1])
    kernel = max(live, key=lambda k: (k.calls * k.best_s / (1 + k.total_trials), -k.index))
    return RoundPlan(VARIANTS if kernel.variants_pending else SEARCH, [kernel])


def finish_round(plan: RoundPlan, measured: list[tuple[KernelState, float | None, bool]]) -> None:
    """Update the plan's kernels after the round: ``measured`` is (kernel, seconds or None
    when the candidate failed, whether it is a schedule of schedules/) per candidate.

    A defaults or variants round is not planned again for its kernels; a round with
    nothing to measure moves its kernels on (defaults: to the search; search: exhausted).
    """
    for kernel in plan.kernels:
        if plan.kind == DEFAULTS:
            kernel.default_pending = False
        elif plan.kind == VARIANTS:
            kernel.variants_pending = False
        elif not measured:
            kernel.exhausted = True
        for hand_written in (True, False):
            mine = [seconds for k, seconds, written in measured if k is kernel and written == hand_written]
            if mine:
                record_round(kernel, mine, hand_written=hand_written)


def largest_share(kernels: list[KernelState]) -> KernelState:
    """The kernel with the largest share of the model's time so far (calls x best)."""
    return max(kernels, key=lambda k: k.calls * (k.best_s or 0))


def record_round(kernel: KernelState, latencies: list[float | None], *, hand_written: bool) -> None:
    """Update ``kernel`` after a round of candidates measured at ``latencies`` seconds
    (None: the candidate failed to build or run)."""
    for seconds in latencies:
        if seconds is not None and (kernel.best_s is None or seconds < kernel.best_s):
            kernel.best_s = seconds
            kernel.best_hand_written = hand_written
    kernel.trials += len(latencies)
    kernel.rounds += 1
    if kernel.best_s is None:         # nothing ever worked: do not retry forever
        kernel.exhausted = kernel.rounds >= FAILED_ROUNDS_LIMIT
