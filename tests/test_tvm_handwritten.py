"""The hand-written kernels (targets/tvm/handwritten.py): the GEMM's block shapes fit the
kernel, they apply where they should, and every candidate computes what the unscheduled
kernel computes."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from evit_deploy.targets.tvm import handwritten  # noqa: E402

TARGET = "native -num-cores=1"


@pytest.mark.parametrize("window", [False, True])
@pytest.mark.parametrize("shape", [(16, 7, 7, 128), (16, 4, 4, 192), (1, 14, 14, 256), (2, 1, 1, 48), (1, 1, 1, 64),
                                   (64, 7, 7, 48), (1, 1, 1, 1000), (16, 56, 56, 32), (16, 112, 112, 8),
                                   (16, 112, 112, 24)])
def test_block_shapes_tile_the_output_and_fit_in_registers(shape, window):
    n, h, w, f = shape
    shapes = handwritten.block_shapes(n, h, w, f, window=window)
    assert len(shapes) <= handwritten.MAX_CANDIDATES
    if window:                                  # a 3x3 convolution: one position of several images
        assert all(rows == cols == 1 for _, rows, cols, _ in shapes)
        assert bool(shapes) == (n >= 8 or (n >= 4 and f % 64 == 0) or (n >= 2 and f % 128 == 0))
    if f % handwritten.LANES:
        # Not a whole number of vectors: the stem's first convolutions (8 channels in M0,
        # 24 in M5) take all their channels in half-width vectors; nothing else fits.
        if f % handwritten.HALF_LANES == 0 and f <= 2 * handwritten.LANES:
            assert shapes and all(nr == f and handwritten.lanes(nr) == handwritten.HALF_LANES for *_, nr in shapes)
        else:
            assert not shapes
    for images, rows, cols, nr in shapes:
        assert n % images == 0 and h % rows == 0 and w % cols == 0 and f % nr == 0
        assert nr % handwritten.lanes(nr) == 0
        assert rows == 1 or cols == w           # whole rows: the output block is a rectangle
        accumulators = images * rows * cols * nr // handwritten.lanes(nr)
        assert handwritten.MIN_ACCUMULATORS <= accumulators <= handwritten.MAX_ACCUMULATORS


@pytest.fixture(scope="module")
def m0_tasks():
    from evit_deploy.targets.tvm import graph
    from evit_deploy.targets.tvm.metaschedule import extract_kernels
    from evit_deploy.targets.tvm.target_string import resolve_target, to_tvm
    from evit_deploy.trace import trace

    target = to_tvm(resolve_target(TARGET))
    mod = graph.prepare(graph.import_program(trace("m0", batch=8, img_size=64).program), target)
    return target, extract_kernels(mod, target)


def _postprocs(task, target):
    from tvm.s_tir.meta_schedule import TuneContext

    from evit_deploy.targets.tvm.metaschedule import space_generator, without_tensor_intrinsics

    with without_tensor_intrinsics():
        ctx = TuneContext(mod=task.mod, target=target, space_generator=space_generator(), task_name=task.name)
    return ctx.space_generator.postprocs


def _run(mod, target, args):
    import tvm

    lib = tvm.compile(mod, target=target)
    out = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*out)
    return out[-1].numpy()


def _window(extents) -> bool:
    return extents[4:6] != (1, 1)


def test_hand_written_kernels_apply_to_dense_convolutions(m0_tasks):
    _, tasks = m0_tasks
    gemm = {t.name: handwritten.conv_extents(t.mod) for t in tasks if handwritten.conv_extents(t.mod) is not None}
    assert gemm and all("conv2d" in name for name in gemm)
    assert sorted(e[4:6] for e in gemm.values() if _window(e)) == [(3, 3)] * 4     # the stem
    # The image's NCHW -> NHWC transpose is folded into the first of them (graph.py).
    assert any("nchw_input" in name for name in gemm)
    assert not any(t.name.startswith("transpose") for t in tasks)
    assert {t.name for t in tasks if handwritten.applies(t.mod)} == set(gemm)
    depthwise = [t for t in tasks if "conv2d" in t.name and t.name not in gemm]
    assert depthwise, "grouped (depthwise) convolutions stay with MetaSchedule"


def test_every_candidate_computes_the_kernel(m0_tasks):
    """Each variant of each kernel of M0 with a hand-written schedule (1x1 convolutions
    with their fused bias, residual, ReLU or sigmoid; a 3x3 stride-2 convolution of the
    stem, its zero padding inlined, and the first one, which reads the NCHW image)
    against the same kernel unscheduled."""
    target, tasks = m0_tasks
    rng = np.random.default_rng(0)
    checked = set()
    for task in tasks:
        if not handwritten.applies(task.mod):
            continue
        func = task.mod["main"]
        args = [rng.standard_normal([int(s) for s in p.shape]).astype(p.dtype) for p in func.params]
        args[-1][:] = 0
        expected = _run(task.mod, target, args)
        cands = handwritten.candidates(task.mod, _postprocs(task, target))
        # None only when no GEMM block fits (tiny maps at this test size), never
        # because a schedule failed to apply.
        extents = handwritten.conv_extents(task.mod)
        assert cands or (extents and not handwritten.block_shapes(*extents[:4], window=_window(extents))), task.name
        for cand in cands:
            assert handwritten.is_hand_written(cand.sch.trace)
            np.testing.assert_allclose(_run(cand.sch.mod, target, args), expected, rtol=1e-4, atol=1e-4,
                                       err_msg=task.name)
            checked.add(task.name)
    assert len(checked) >= 10 and any("nchw_input" in name for name in checked)
    assert any(_window(handwritten.conv_extents(t.mod)) for t in tasks if t.name in checked and "conv2d" in t.name)
