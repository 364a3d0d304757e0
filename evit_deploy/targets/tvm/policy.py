"""Where the tuner spends its trials: which kernels next, with what, and what a round
taught it.

Pure bookkeeping (no TVM), so that the policy can be read and tested on its own.

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

DEFAULTS, VARIANTS, SEARCH = "defaults", "variants", "search"


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


def estimated_latency(kernels: list[KernelState]) -> float | None:
    """Seconds per model run: the sum of calls x best latency, once every kernel has one."""
    if any(k.best_s is None for k in kernels):
        return None
    return sum(k.calls * k.best_s for k in kernels)


def _biggest_first(kernels: list[KernelState]) -> list[KernelState]:
    return sorted(kernels, key=lambda k: (-k.calls * k.flops, k.index))


def next_round(kernels: list[KernelState]) -> RoundPlan | None:
    """What the next round measures; None when every kernel is exhausted."""
    live = [k for k in kernels if not k.exhausted]
    if not live:
        return None
    defaults = [k for k in live if k.default_pending]
    if defaults:
        return RoundPlan(DEFAULTS, _biggest_first(defaults)[:DEFAULTS_PER_ROUND])
    unmeasured = [k for k in live if k.best_s is None]      # no default schedule: search at once
    if unmeasured:
        return RoundPlan(SEARCH, _biggest_first(unmeasured)[:1])
    kernel = max(live, key=lambda k: (k.calls * k.best_s / (1 + k.total_trials), -k.index))
    return RoundPlan(VARIANTS if kernel.variants_pending else SEARCH, [kernel])


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
