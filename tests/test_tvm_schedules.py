"""The schedules written for every kernel class (targets/tvm/schedules/): each applies to
the kernels it is for, chooses its blocks from the target's registers, and every variant
of every kernel of M0 computes what the unscheduled kernel computes, for an AVX-512 and
an AVX2 target."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from evit_deploy.targets.tvm import schedules  # noqa: E402
from evit_deploy.targets.tvm.schedules import gemm  # noqa: E402
from evit_deploy.targets.tvm.schedules.facts import CpuFacts  # noqa: E402

AVX512 = CpuFacts(vector_bits=512, vector_registers=32, cores=1)
AVX2 = CpuFacts(vector_bits=256, vector_registers=16, cores=1)


@pytest.mark.parametrize("facts", [AVX512, AVX2], ids=["avx512", "avx2"])
@pytest.mark.parametrize("shape", [(16, 7, 7, 128, 1), (16, 4, 4, 192, 1), (1, 14, 14, 256, 1), (2, 1, 1, 48, 1),
                                   (1, 1, 1, 64, 1), (64, 7, 7, 48, 1), (1, 1, 1, 1000, 1), (16, 56, 56, 32, 3),
                                   (16, 112, 112, 8, 3), (16, 112, 112, 24, 3)])
def test_gemm_blocks_tile_the_output_and_fit_the_targets_registers(shape, facts):
    n, h, w, f, k = shape
    conv = gemm.Conv(n, h, w, f, k, k, 16)
    shapes = gemm.block_shapes(conv, facts)
    assert len(shapes) <= gemm.MAX_VARIANTS
    lanes = facts.lanes
    if conv.window:                             # a 3x3 convolution: one position of several images
        assert all(rows == cols == 1 for _, rows, cols, _ in shapes)
    if f % lanes:
        # Not a whole number of vectors: the stem's first convolutions (8 channels in M0,
        # 24 in M5) take all their channels in half-width vectors; nothing else fits.
        if f % (lanes // 2) == 0 and f <= 2 * lanes:
            assert all(nr == f and gemm.lanes_for(nr, facts) == lanes // 2 for *_, nr in shapes)
        else:
            assert not shapes
    accumulators = [images * rows * cols * nr // gemm.lanes_for(nr, facts) for images, rows, cols, nr in shapes]
    for (images, rows, cols, nr), acc in zip(shapes, accumulators):
        assert n % images == 0 and h % rows == 0 and w % cols == 0 and f % nr == 0
        assert rows == 1 or cols == w           # whole rows: the output block is a rectangle
        assert acc <= facts.vector_registers - gemm.SPARE_REGISTERS
    # Blocks too small to keep the FMA units busy come after every one that is not.
    small = [acc < gemm.MIN_ACCUMULATORS for acc in accumulators]
    assert small == sorted(small)
    for cols, nr in gemm.row_tiles(conv, facts):
        assert conv.window and w % cols == 0 and f % nr == 0
        assert cols * nr // gemm.lanes_for(nr, facts) <= facts.vector_registers - gemm.SPARE_REGISTERS


@pytest.mark.parametrize("facts", [AVX512, AVX2], ids=["avx512", "avx2"])
@pytest.mark.parametrize("product", [(64, 49, 49, 16), (64, 49, 16, 49), (None, 16, 1000, 384), (None, 1, 1000, 384),
                                     (8, 16, 16, 16)])
def test_matmul_blocks_tile_the_output_and_fit_the_registers(product, facts):
    """A window's scores and its product with the values, the classifier head at batch 16
    and 1: every block tiles the output and accumulates in at most half the registers
    (the head's 1000 columns once came as one block of 100 vectors, which spilled: 5x
    slower); a window's 49 x 49 scores come as rows of one vector first."""
    from evit_deploy.targets.tvm.schedules import matmul
    from evit_deploy.targets.tvm.schedules.common import vector_width

    mm = matmul.Matmul(*product)
    shapes = matmul.block_shapes(mm, facts)
    width = vector_width(mm.n, facts.lanes)
    assert shapes and len(set(shapes)) == len(shapes)
    for rows, cols in shapes:
        assert mm.m % rows == 0 and mm.n % cols == 0 and cols % width == 0
        assert rows * cols // width <= facts.vector_registers // 2, (rows, cols)
    if (mm.m, mm.n) == (49, 49):
        assert shapes[0] == (7, 7)


def test_the_targets_vector_width_comes_from_its_cpu():
    from evit_deploy.targets.tvm.target_string import resolve_target, to_tvm

    broadwell = CpuFacts.for_target(to_tvm(resolve_target("llvm -mcpu=broadwell -num-cores=14")))
    skylake = CpuFacts.for_target(to_tvm(resolve_target("llvm -mcpu=skylake-avx512 -num-cores=1")))
    sapphire = CpuFacts.for_target(to_tvm(resolve_target("llvm -mcpu=sapphirerapids -num-cores=1")))
    assert (broadwell.lanes, broadwell.vector_registers, broadwell.cores, broadwell.bf16_dot) == (8, 16, 14, False)
    assert (skylake.lanes, skylake.vector_registers, skylake.bf16_dot) == (16, 32, False)
    assert sapphire.bf16_dot and sapphire.int8_dot


@pytest.fixture(scope="module")
def m0_kernels():
    from evit_deploy.targets.tvm import graph
    from evit_deploy.targets.tvm.metaschedule import extract_kernels
    from evit_deploy.targets.tvm.target_string import resolve_target, to_tvm
    from evit_deploy.tracing import trace

    target = to_tvm(resolve_target("native -num-cores=1"))
    mod = graph.prepare(graph.import_program(trace("m0", batch=8, img_size=64).program), target)
    return target, extract_kernels(mod, target)


def test_every_kernel_of_the_model_has_a_class(m0_kernels):
    _, kernels = m0_kernels
    classes = {k.name: schedules.kernel_class(k.mod) for k in kernels}
    assert all(classes.values()), [name for name, cls in classes.items() if cls is None]
    kinds = {cls.KIND for cls in classes.values()}
    assert kinds == {"gemm", "depthwise", "matmul", "rows", "reduction", "injective"}
    # The stem's first convolution (3 input channels, fewer than a vector) starts from a row tile.
    first = next(k for k in kernels if "nchw_input" in k.name)
    from tvm import s_tir
    assert gemm.variants(s_tir.Schedule(first.mod), AVX512)[0][0] == "rows"


def _run(mod, target, args):
    import tvm

    lib = tvm.tirx.build(mod, target=target)
    out = [tvm.runtime.tensor(a) for a in args]
    lib["main"](*out)
    return out[-1].numpy()


def _args(kernel, rng):
    func = kernel.mod["main"]
    args = [rng.standard_normal([int(s) for s in p.ty.shape]).astype(str(p.ty.dtype)) for p in func.params]
    args[-1][:] = 0
    return args


def test_every_kernels_default_schedule_computes_the_kernel(m0_kernels):
    """The schedule export gives each kernel of M0 (batch 8, 64x64), against the same
    kernel unscheduled."""
    from tvm import s_tir

    target, kernels = m0_kernels
    rng = np.random.default_rng(0)
    for kernel in kernels:
        cls = schedules.kernel_class(kernel.mod)
        args = _args(kernel, rng)
        default = cls.variants(s_tir.Schedule(kernel.mod), AVX512)[0]
        sch = cls.apply(s_tir.Schedule(kernel.mod), default, AVX512)
        assert schedules.is_hand_written(sch.trace)
        np.testing.assert_allclose(_run(sch.mod, target, args), _run(kernel.mod, target, args), rtol=1e-4,
                                   atol=1e-4, err_msg=f"{kernel.name} {default}")


@pytest.mark.parametrize("facts", [AVX512, AVX2], ids=["avx512", "avx2"])
def test_every_variant_of_every_class_computes_the_kernel(m0_kernels, facts):
    """All the variants the tuner measures, on the kernel of each class that does the
    most work (for convolutions: with and without a window, whose variants differ), for
    registers of both widths (AVX2 code runs on this CPU too)."""
    from tvm import s_tir

    target, kernels = m0_kernels
    rng = np.random.default_rng(1)
    biggest = {}
    for kernel in kernels:
        cls = schedules.kernel_class(kernel.mod)
        key = (cls, getattr(cls.match(s_tir.Schedule(kernel.mod)), "window", False))
        if key not in biggest or kernel.flops > biggest[key].flops:
            biggest[key] = kernel
    assert len(biggest) == len(schedules.CLASSES)      # all but gemm_bf16 (an fp32 graph), windowed gemm twice
    for (cls, _), kernel in biggest.items():
        args = _args(kernel, rng)
        expected = _run(kernel.mod, target, args)
        for variant in cls.variants(s_tir.Schedule(kernel.mod), facts):
            sch = cls.apply(s_tir.Schedule(kernel.mod), variant, facts)
            np.testing.assert_allclose(_run(sch.mod, target, args), expected, rtol=1e-4, atol=1e-4,
                                       err_msg=f"{kernel.name} {variant}")


def _softmax_kernel(batch: int, length: int):
    """The attention's softmax as the graph has it (FastMathTransform's fast_softmax)."""
    import tvm
    from tvm import te, topi

    x = te.placeholder((batch, length, length), "float32", name="scores")
    return tvm.IRModule({"main": te.create_prim_func([x, topi.nn.fast_softmax(x, axis=-1)])})


@pytest.mark.parametrize("facts", [AVX512, AVX2], ids=["avx512", "avx2"])
@pytest.mark.parametrize("length", [49, 16, 17, 1])
def test_every_softmax_variant_computes_the_softmax(length, facts):
    """Rows of a 7x7 window (49: no register width divides it), of a 4x4 one, of a prime
    length and of one element: every variant (each vector width divides the row: a
    split with a remainder reduced wrong in rfactor) against numpy's softmax."""
    from tvm import s_tir

    from evit_deploy.targets.tvm.schedules import rows
    from evit_deploy.targets.tvm.target_string import resolve_target, to_tvm

    target = to_tvm(resolve_target("native -num-cores=1"))
    mod = _softmax_kernel(3, length)
    assert schedules.kernel_class(mod) is rows
    found = rows.variants(s_tir.Schedule(mod), facts)
    widths = [v[1] for v in found if v != rows.DLIGHT]
    assert found[-1] == rows.DLIGHT and all(length % w == 0 and 1 < w <= facts.lanes for w in widths)
    assert bool(widths) == (length not in (17, 1))
    x = np.random.default_rng(2).standard_normal((3, length, length)).astype(np.float32) * 4
    e = np.exp(x - x.max(-1, keepdims=True))
    expected = e / e.sum(-1, keepdims=True)
    for variant in found:
        sch = rows.apply(s_tir.Schedule(mod), variant, facts)
        assert schedules.is_hand_written(sch.trace)
        out = _run(sch.mod, target, [x, np.zeros_like(x)])
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-7, err_msg=str(variant))


# -- bf16 ---------------------------------------------------------------------------------

def _bf16_host_target(cores: int = 1):
    from evit_deploy.targets.tvm.quantize import supports_bf16
    from evit_deploy.targets.tvm.target_string import resolve_target, to_tvm

    target = to_tvm(resolve_target(f"native -num-cores={cores}"))
    if not supports_bf16(target):
        pytest.skip("this CPU has no AVX512_BF16: bf16 kernels cannot run here")
    return target


def _packing_split(func):
    """A scheduled kernel as a build has it: its weight packing split out (Relax's
    SplitLayoutRewritePreproc, as compile.build does). (A bf16 kernel cannot be built
    whole: its packed weights must be a parameter.)"""
    from tvm import relax

    bb = relax.BlockBuilder()
    params = [relax.Var(p.name, relax.TensorType(_shape(p), str(p.ty.dtype))) for p in func.params[:-1]]
    out = func.params[-1]
    with bb.function("main", params):
        with bb.dataflow():
            gv = bb.add_func(func, "kernel")
            y = bb.emit_output(relax.call_tir(gv, params, relax.TensorType(_shape(out), str(out.ty.dtype))))
        bb.emit_func_output(y)
    return relax.transform.SplitLayoutRewritePreproc()(bb.get())


def _shape(param) -> list[int]:
    return [int(s) for s in param.ty.shape]


def _run_packed(func, target, args):
    """Run a scheduled kernel as a build runs it (:func:`_packing_split`), on the weights
    packed first."""
    import tvm

    mod = _packing_split(func)
    names = [p.name for p in func.params]
    tensors = [tvm.runtime.tensor(a.astype(str(p.ty.dtype))) for a, p in zip(args, func.params)]
    if "kernel_weight_prepack" in [gv.name_hint for gv in mod.functions]:
        pack = mod["kernel_weight_prepack"]
        k = len(pack.params) // 2
        packed = [tvm.runtime.tensor(np.zeros(_shape(p), dtype=str(p.ty.dtype))) for p in pack.params[k:]]
        tvm.tirx.build(pack, target=target)(*[tensors[names.index(p.name)] for p in pack.params[:k]], *packed)
        for p, t in zip(pack.params[:k], packed):
            tensors[names.index(p.name)] = t
        func = mod["kernel_prepacked"]
    tvm.tirx.build(func, target=target)(*tensors)
    return tensors[-1].numpy()


def _largest_bf16_kernel(target, *, batch: int, img_size: int):
    """M0's largest kernel that gemm_bf16 schedules in its bf16 graph, and the target's
    facts (traced once per target and size: several tests schedule the same kernel)."""
    key = (str(target), batch, img_size)
    if key not in _BF16_KERNELS:
        _BF16_KERNELS[key] = _trace_largest_bf16_kernel(target, batch=batch, img_size=img_size)
    return _BF16_KERNELS[key]


_BF16_KERNELS: dict = {}


def _trace_largest_bf16_kernel(target, *, batch: int, img_size: int):
    from evit_deploy.targets.tvm import graph, metaschedule
    from evit_deploy.targets.tvm.schedules import gemm_bf16
    from evit_deploy.tracing import trace

    facts = CpuFacts.for_target(target)
    mod = graph.prepare(graph.import_program(trace("m0", batch=batch, img_size=img_size).program), target,
                        precision="bf16")
    kernels = [k for k in metaschedule.extract_kernels(mod, target) if schedules.kernel_class(k.mod, facts) is gemm_bf16]
    assert len(kernels) >= 10                   # the FFNs and projections
    return max(kernels, key=lambda k: k.flops), facts


def _bf16_schedules(kernel, target, facts):
    """(variant, schedule with MetaSchedule's post-processors applied) for every variant."""
    from tvm import s_tir

    from evit_deploy.targets.tvm import metaschedule
    from evit_deploy.targets.tvm.schedules import gemm_bf16

    postprocs = metaschedule.postprocs(kernel, target)
    variants = gemm_bf16.variants(s_tir.Schedule(kernel.mod), facts)
    assert len(variants) > 1
    for variant in variants:
        sch = gemm_bf16.apply(s_tir.Schedule(kernel.mod), variant, facts)
        sch.enter_postproc()
        assert all(p.apply(sch) for p in postprocs)
        yield variant, sch


def test_every_bf16_variant_compiles_to_the_dot_product_for_a_cpu_with_it():
    """Compiled for Sapphire Rapids on any machine (nothing runs): each variant of the
    largest bf16 convolution multiplies with vdpbf16ps, or AMX tiles (tdpbf16ps, the tile
    configuration loaded only when it differs), and, receiving fp32 activations, rounds
    them with vcvtneps2bf16 (the intrinsics' LLVM IR linked in and inlined)."""
    import tvm
    from tvm import s_tir

    from evit_deploy.targets.tvm.schedules import gemm_bf16
    from evit_deploy.targets.tvm.target_string import resolve_target, to_tvm

    target = to_tvm(resolve_target("llvm -mcpu=sapphirerapids -num-cores=1"))
    kernel, facts = _largest_bf16_kernel(target, batch=4, img_size=96)
    assert gemm_bf16.match(s_tir.Schedule(kernel.mod)).input_dtype == "float32" and facts.amx_bf16
    kinds = set()
    for variant, sch in _bf16_schedules(kernel, target, facts):
        asm = tvm.tirx.build(_packing_split(sch.mod["main"])["kernel_prepacked"], target=target).inspect_source("asm")
        products = ("tdpbf16ps", "sttilecfg", "ldtilecfg") if variant[0].startswith("amx") else ("vdpbf16ps",)
        assert all(p in asm for p in products) and "vcvtneps2bf16" in asm, variant
        kinds.add(variant[0])
    assert kinds == {"amx", "amx_pixels", "bf16"}


def test_every_bf16_variant_computes_bf16_products_with_fp32_sums():
    """Every variant of the bf16 1x1 convolution (M0's largest, bf16 weights from the
    graph) against the same kernel unscheduled on the activations rounded to bf16: the
    products are then the same, only the order of the fp32 sums differs."""
    import ml_dtypes

    target = _bf16_host_target()
    kernel, facts = _largest_bf16_kernel(target, batch=4, img_size=96)
    args = _args(kernel, np.random.default_rng(0))
    args[0] = args[0].astype(ml_dtypes.bfloat16).astype(np.float32)       # bf16-exact activations
    expected = _run(kernel.mod, target, args)
    scale = np.abs(expected).max()
    for variant, sch in _bf16_schedules(kernel, target, facts):
        np.testing.assert_allclose(_run_packed(sch.mod["main"], target, args), expected, rtol=0, atol=1e-5 * scale,
                                   err_msg=str(variant))


def test_amx_kernels_run_by_two_threads_compute_the_same():
    """The tile configuration is each thread's own: the AMX variants split among two
    threads, against the kernel unscheduled (bf16-exact activations, as above)."""
    import ml_dtypes

    target = _bf16_host_target(cores=2)
    if not CpuFacts.for_target(target).amx_bf16:
        pytest.skip("this CPU has no AMX")
    kernel, facts = _largest_bf16_kernel(target, batch=4, img_size=96)
    args = _args(kernel, np.random.default_rng(1))
    args[0] = args[0].astype(ml_dtypes.bfloat16).astype(np.float32)
    expected = _run(kernel.mod, target, args)
    amx = [(v, sch) for v, sch in _bf16_schedules(kernel, target, facts) if v[0].startswith("amx")]
    assert amx and all("parallel" in str(sch.trace) for _, sch in amx)
    for variant, sch in amx:
        np.testing.assert_allclose(_run_packed(sch.mod["main"], target, args), expected, rtol=0,
                                   atol=1e-5 * np.abs(expected).max(), err_msg=str(variant))


def test_bf16_is_refused_for_a_cpu_without_it(cli, tmp_path):
    code, _, err = cli("export", "m0", "-t", "tvm", "--precision", "bf16", "--tvm-target", "llvm -mcpu=broadwell",
                       "--out", tmp_path)
    assert code == 2 and "AVX512_BF16" in err and "broadwell" in err and "Traceback" not in err


def test_a_database_of_bf16_and_amx_schedules_opens_in_a_new_process(tmp_path):
    """MetaSchedule looks up the tensor intrinsics a record names as it reads a database:
    a new process (an export after a tune) must have registered them first, the AMX ones
    (one per shape) included. Every variant of a bf16 kernel for Sapphire Rapids is stored
    here, then the database is opened by a process that has scheduled nothing."""
    import subprocess
    import sys

    from evit_deploy.targets.tvm import metaschedule
    from evit_deploy.targets.tvm.database import TuningDatabase
    from evit_deploy.targets.tvm.target_string import resolve_target, to_tvm

    resolved = resolve_target("llvm -mcpu=sapphirerapids -num-cores=1")
    target = to_tvm(resolved)
    kernel, facts = _largest_bf16_kernel(target, batch=4, img_size=96)
    db = TuningDatabase.open_or_create(tmp_path / "db", resolved, graph="test")
    ms = db.ms_database()
    stored = schedules.candidates(kernel.mod, facts, metaschedule.postprocs(kernel, target))
    for candidate in stored:
        metaschedule.commit(ms, kernel.mod, candidate, [1.0], target)
    db.close()
    assert {"amx" if "evit_amx_bf16" in str(c.sch.trace) else "bf16" for c in stored} == {"amx", "bf16"}
    opened = ("from evit_deploy.targets.tvm.database import TuningDatabase\n"
              f"print(len(TuningDatabase.open({str(tmp_path / 'db')!r}).ms_database()))")
    proc = subprocess.run([sys.executable, "-c", opened], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.split()[-1] == str(len(stored)), proc.stderr
