"""The tuner's scheduling policy (pure: no TVM), and the graph's layout rules, each on a
small module, checked for the transposes they remove and for computing the same thing."""

from __future__ import annotations

import numpy as np
import pytest

from evit_deploy.targets.tvm.policy import (DEFAULT_TRIALS_PER_KERNEL, DEFAULTS, DEFAULTS_PER_ROUND,
                                            FAILED_ROUNDS_LIMIT, SEARCH, TIME_BUDGET, TRIALS, VARIANTS, KernelState,
                                            estimated_latency, finish_round, largest_share, next_round, record_round,
                                            resumed, round_limit, stop_reason, trial_budget)


def _kernels(*specs) -> list[KernelState]:
    """(calls, flops) -> kernels, in the model's order."""
    return [KernelState(i, f"k{i}", calls, flops) for i, (calls, flops) in enumerate(specs)]


def test_a_stop_signal_between_rounds_stops_the_search_as_it_stops_a_command():
    """The first Ctrl-C or SIGTERM of a tune is a request the search honours before its next
    round; it then stops as that signal stops any command (SIGTERM: exit code 143)."""
    import os
    import signal
    import time

    pytest.importorskip("tvm")
    from evit_deploy.progress import Terminated, catch_ctrl_c
    from evit_deploy.targets.tvm.search import Search
    from evit_deploy.targets.tvm.tune import ctrl_c_between_rounds

    class BeforeItsFirstRound:          # what Search.run reads before a round
        _contexts: dict = {}
        trials_done = 0

    warned = []
    with pytest.raises(Terminated):
        with catch_ctrl_c() as stopped:
            with ctrl_c_between_rounds(lambda: warned.append(True)) as stop_requested:
                assert stop_requested() == 0
                os.kill(os.getpid(), signal.SIGTERM)            # requested, not raised here
                deadline = time.monotonic() + 10
                while not warned and time.monotonic() < deadline:
                    time.sleep(0.01)
                assert stop_requested() == signal.SIGTERM
                Search.run(BeforeItsFirstRound(), max_trials=10, stop_requested=stop_requested)
    assert stopped == [signal.SIGTERM]


def _play(kernels, plan, seconds=1e-3):
    """What the tuner does with a plan: measure one candidate per kernel, and tell the policy."""
    finish_round(plan, [(k, seconds, plan.hand_written) for k in plan.kernels])


def test_defaults_first_many_kernels_per_round_biggest_first():
    kernels = _kernels(*[(1, float(i)) for i in range(DEFAULTS_PER_ROUND + 3)], (4, 10.0))
    for k in kernels[:-1]:
        k.default_pending = k.variants_pending = True
    # The last kernel has no default schedule.
    plan = next_round(kernels)
    assert plan.kind == DEFAULTS and len(plan.kernels) == DEFAULTS_PER_ROUND
    assert [k.flops for k in plan.kernels] == sorted((k.flops for k in plan.kernels), reverse=True)
    _play(kernels, plan)
    plan = next_round(kernels)
    assert plan.kind == DEFAULTS and len(plan.kernels) == 3
    _play(kernels, plan)
    # Then the kernel without a default is searched at once, before any variant.
    plan = next_round(kernels)
    assert plan.kind == SEARCH and plan.kernels == [kernels[-1]]


def test_later_rounds_go_where_the_model_time_is_per_trial_spent():
    kernels = _kernels((1, 1.0), (10, 1.0), (1, 1.0))
    for k, best in zip(kernels, (5e-3, 1e-3, 1e-4)):
        k.variants_pending = True
        record_round(k, [best], hand_written=True)
    # calls x best / (1 + trials): 5e-3/2, 1e-2/2, 1e-4/2 -- first the default's variants...
    plan = next_round(kernels)
    assert (plan.kind, plan.kernels) == (VARIANTS, [kernels[1]])
    _play(kernels, plan)
    # ... and the search for the same kernel while it still has the largest share.
    assert next_round(kernels).kernels == [kernels[1]] and next_round(kernels).kind == SEARCH
    record_round(kernels[1], [1e-3] * 16, hand_written=False)        # 10 x 1e-3 / 19 < 5e-3 / 2
    assert next_round(kernels).kernels == [kernels[0]]
    # Ties go to the earlier kernel, so the order is reproducible.
    tied = _kernels((1, 1.0), (1, 1.0))
    for k in tied:
        record_round(k, [1e-3], hand_written=False)
    assert next_round(tied).kernels == [tied[0]]


def test_a_round_keeps_the_best_and_failures_exhaust_a_kernel():
    k = _kernels((1, 1.0))[0]
    record_round(k, [3e-3, None, 2e-3], hand_written=False)
    assert (k.best_s, k.trials, k.rounds) == (2e-3, 3, 1)
    record_round(k, [2.5e-3], hand_written=True)
    assert k.best_s == 2e-3 and not k.best_hand_written
    record_round(k, [1e-3], hand_written=True)
    assert k.best_s == 1e-3 and k.best_hand_written
    broken = _kernels((1, 1.0))[0]
    for _ in range(FAILED_ROUNDS_LIMIT - 1):
        record_round(broken, [None, None], hand_written=False)
        assert not broken.exhausted
    record_round(broken, [None], hand_written=False)
    assert broken.exhausted and next_round([broken]) is None


def test_the_estimate_waits_for_every_kernel():
    kernels = _kernels((2, 1.0), (3, 1.0))
    record_round(kernels[0], [1e-3], hand_written=False)
    assert estimated_latency(kernels) is None
    record_round(kernels[1], [2e-3], hand_written=False)
    assert estimated_latency(kernels) == pytest.approx(2 * 1e-3 + 3 * 2e-3)


def test_a_round_with_nothing_to_measure_moves_its_kernels_on():
    kernels = _kernels((1, 1.0), (1, 2.0))
    for k in kernels:
        k.default_pending = k.variants_pending = True
    plan = next_round(kernels)
    finish_round(plan, [])                       # no kernel had a default schedule after all
    assert not any(k.default_pending for k in kernels) and not any(k.exhausted for k in kernels)
    plan = next_round(kernels)                   # unmeasured: searched at once
    assert (plan.kind, plan.kernels) == (SEARCH, [kernels[1]])
    finish_round(plan, [])                       # the search has nothing new either
    assert kernels[1].exhausted and next_round(kernels).kernels == [kernels[0]]
    measured = _kernels((1, 1.0))[0]
    measured.variants_pending = True
    record_round(measured, [1e-3], hand_written=True)
    plan = next_round([measured])
    assert plan.kind == VARIANTS
    finish_round(plan, [])
    assert not measured.variants_pending and not measured.exhausted and next_round([measured]).kind == SEARCH


def test_a_round_records_each_kernels_candidates_by_origin():
    """A defaults round may hold another database's searched record beside a default:
    the best says which it was."""
    kernels = _kernels((1, 1.0), (1, 1.0))
    for k in kernels:
        k.default_pending = True
    plan = next_round(kernels)
    finish_round(plan, [(kernels[0], 2e-3, True), (kernels[0], 1e-3, False), (kernels[1], 3e-3, True),
                        (kernels[1], None, False)])
    assert (kernels[0].best_s, kernels[0].best_hand_written, kernels[0].trials) == (1e-3, False, 2)
    assert (kernels[1].best_s, kernels[1].best_hand_written, kernels[1].trials) == (3e-3, True, 2)
    assert largest_share(kernels) is kernels[1]


def test_a_resumed_kernel_measures_nothing_twice():
    fresh = resumed(0, "k", 1, 1.0, records=0, best_s=None, best_hand_written=False, written=0, variants=3)
    assert fresh.default_pending and fresh.variants_pending and fresh.best_s is None
    # The default was measured (the first written schedule), two variants are left.
    started = resumed(0, "k", 1, 1.0, records=5, best_s=1e-3, best_hand_written=True, written=1, variants=3)
    assert not started.default_pending and started.variants_pending
    assert (started.total_trials, started.best_s, started.best_hand_written) == (5, 1e-3, True)
    assert next_round([started]).kind == VARIANTS
    done = resumed(0, "k", 1, 1.0, records=9, best_s=1e-3, best_hand_written=False, written=3, variants=3)
    assert not done.default_pending and not done.variants_pending and next_round([done]).kind == SEARCH
    # No class of schedules/ offers it anything: MetaSchedule's search from the start.
    unclassed = resumed(0, "k", 1, 1.0, records=0, best_s=None, best_hand_written=False, written=0, variants=0)
    assert not unclassed.default_pending and not unclassed.variants_pending
    assert next_round([unclassed]).kind == SEARCH


def test_the_budget_decides_when_to_stop_and_how_big_a_round_is():
    assert trial_budget(None, None, kernels=10) == 10 * DEFAULT_TRIALS_PER_KERNEL
    assert trial_budget(None, 60.0, kernels=10) is None and trial_budget(7, None, kernels=10) == 7
    assert stop_reason(5, 10, None, now=0.0) is None and stop_reason(10, 10, None, now=0.0) == TRIALS
    assert stop_reason(0, None, deadline=5.0, now=4.0) is None and stop_reason(0, None, 5.0, now=5.0) == TIME_BUDGET
    assert stop_reason(10, 10, 5.0, now=6.0) == TIME_BUDGET         # both: the deadline is what the run reports
    assert round_limit(7, 10) == 3 and round_limit(7, None) is None
    # The last trials of a budget go to as many default schedules as there are trials left.
    kernels = _kernels(*[(1, float(i)) for i in range(DEFAULTS_PER_ROUND)])
    for k in kernels:
        k.default_pending = True
    assert len(next_round(kernels, limit=3).kernels) == 3
    assert len(next_round(kernels, limit=None).kernels) == DEFAULTS_PER_ROUND


# -- the graph's layout rules ---------------------------------------------------------------

tvm = pytest.importorskip("tvm")


def _function(build, *shapes):
    """A Relax module whose main takes float32 tensors of ``shapes`` and returns ``build(bb, *params)``."""
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(f"x{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    with bb.function("main", params):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *params))
        bb.emit_func_output(out)
    return bb.get()


def _permutes(mod) -> int:
    from tvm import relax

    count = 0

    def visit(expr):
        nonlocal count
        if isinstance(expr, relax.Call) and getattr(expr.op, "name", None) == "relax.permute_dims":
            count += 1
    relax.analysis.post_order_visit(mod["main"], visit)
    return count


def _run(mod, args):
    from tvm import relax

    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args])
    return out.numpy() if hasattr(out, "numpy") else [o.numpy() for o in out]


def _simplified(mod):
    from evit_deploy.targets.tvm import graph

    with tvm.target.Target("llvm"):
        return graph.simplify_layout()(mod)


NHWC = [0, 3, 1, 2]      # NHWC -> NCHW


def _nchw_view(bb, x):
    from tvm import relax
    return bb.emit(relax.op.permute_dims(x, NHWC))


def _attention_scores(bb, q, k):
    """q^T k of two NHWC maps viewed as (B, C, HW), as the attention computes it."""
    from tvm import relax

    qf = bb.emit(relax.op.reshape(_nchw_view(bb, q), (2, 8, 16)))
    kf = bb.emit(relax.op.reshape(_nchw_view(bb, k), (2, 8, 16)))
    return relax.op.matmul(bb.emit(relax.op.permute_dims(qf, [0, 2, 1])), kf)


def _elementwise_then_back(bb, x, y):
    from tvm import relax

    s = bb.emit(relax.op.add(_nchw_view(bb, x), _nchw_view(bb, y)))
    r = bb.emit(relax.op.nn.relu(s))
    return relax.op.permute_dims(r, [0, 2, 3, 1])                       # back to NHWC


def _concat_of_heads(bb, x, y):
    from tvm import relax

    c = bb.emit(relax.op.concat([_nchw_view(bb, x), _nchw_view(bb, y)], axis=1))
    return relax.op.permute_dims(c, [0, 2, 3, 1])


def _split_heads(bb, x):
    from tvm import relax

    parts = bb.emit(relax.op.split(_nchw_view(bb, x), 2, axis=1))
    first = bb.emit(relax.TupleGetItem(parts, 0))
    return relax.op.permute_dims(first, [0, 2, 3, 1])


@pytest.mark.parametrize("build,shapes,before,after", [
    (_attention_scores, [(2, 4, 4, 8), (2, 4, 4, 8)], 3, 1),          # one transpose, fused into the matmul later
    (_elementwise_then_back, [(2, 4, 4, 8), (2, 4, 4, 8)], 3, 0),
    (_concat_of_heads, [(2, 4, 4, 8), (2, 4, 4, 8)], 3, 0),
    (_split_heads, [(2, 4, 4, 8)], 2, 0),
], ids=["reshape-matmul", "elementwise", "concat", "split"])
def test_layout_rules_remove_transposes_and_keep_the_result(build, shapes, before, after):
    mod = _function(build, *shapes)
    simplified = _simplified(mod)
    assert (_permutes(mod), _permutes(simplified)) == (before, after)
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    np.testing.assert_allclose(_run(simplified, args), _run(mod, args), rtol=1e-6, atol=1e-6)
