"""Compile a prepared Relax module into a Relax VM executable: tuned kernels from a
database, every other kernel with the default schedule of :mod:`.schedules`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CompiledLibrary:
    executable: object
    kernels: int          # fused kernels in the module
    tuned: int            # of which a tuning record was applied
    hand_written: int     # of which the record is a schedule of schedules/ (not a searched one)
    defaults: int = 0     # kernels without a record, given their default schedule
    inputs_in_place: bool = False   # the kernels read a caller's array where it is
    kinds: dict = None    # kernels per class of schedules/ (records and defaults)

    @property
    def unscheduled(self) -> int:
        """Kernels left with TVM's own code (no record, no default schedule)."""
        return self.kernels - self.tuned - self.defaults


def count_kernels(mod) -> int:
    from tvm import tirx
    return sum(1 for _, f in mod.functions.items() if isinstance(f, tirx.PrimFunc))


def _scheduled(mod):
    """The kernels a record was applied to."""
    from tvm import tirx
    return [f for _, f in mod.functions.items()
            if isinstance(f, tirx.PrimFunc) and f.attrs is not None and f.attrs.get("tirx.is_scheduled", False)]


def schedule_kinds(mod) -> dict[str, int]:
    """How many scheduled kernels each class of schedules/ wrote (``{"gemm": 24, ...}``)."""
    from collections import Counter

    from tvm import s_tir

    from .schedules import MARK

    def kind_in(sch, scope):
        # The marked block may sit inside another (a tensorized block's outer one).
        for block in sch.get_child_blocks(scope):
            kind = sch.get(block).annotations.get(MARK)
            if kind is None:
                kind = kind_in(sch, block)
            if kind is not None:
                return str(kind)
        return None

    kinds: Counter = Counter()
    for f in _scheduled(mod):
        sch = s_tir.Schedule(f)
        kind = kind_in(sch, sch.get_sblock("root"))
        if kind is not None:
            kinds[kind] += 1
    return dict(sorted(kinds.items()))


def count_scheduled(mod) -> tuple[int, int]:
    """(kernels a record was applied to, of which the schedule is one of schedules/)."""
    return len(_scheduled(mod)), sum(schedule_kinds(mod).values())


def default_database(prepared, target, database=None):
    """A MetaSchedule database holding the default schedule (schedules/) of every kernel
    of ``prepared`` that ``database`` has no record for; with the number of them.

    Defaults go through the same database mechanism as tuned records, so a library built
    from defaults is what a tuning round measuring them would have stored.
    """
    from tvm.s_tir.meta_schedule.database import MemoryDatabase

    from . import metaschedule, schedules

    facts = schedules.CpuFacts.for_target(target)
    defaults = MemoryDatabase()
    postprocs = None
    count = 0
    for kernel in metaschedule.extract_kernels(prepared, target):
        if database is not None and metaschedule.measured_records(database, kernel.mod):
            continue
        if postprocs is None:
            postprocs = metaschedule.postprocs(kernel, target)
        candidate = schedules.default_candidate(kernel.mod, facts, postprocs)
        if candidate is not None:
            # No measurement: the latency stands for "a default", never compared.
            metaschedule.commit(defaults, kernel.mod, candidate, [1.0], target)
            count += 1
    return defaults, count


def read_inputs_in_place(mod):
    """Let the kernels that read the model's inputs take any address aligned to their
    element type, as any numpy array's is.

    TIR assumes every buffer starts on a 64-byte boundary and vectorizes with aligned
    loads; numpy's large arrays start 16 bytes past a page boundary. Without this, a
    caller's array has to be copied into a TVM tensor first: 9.6 MB for a batch of 16 at
    224x224, 1.2 ms of M0's 25 ms. Only the kernels reading an input change, and after
    the tuning records are applied, so the database keys stay the same.

    Returns the module and whether every use of an input was rewritten (an input used
    any other way, say reshaped into a view, leaves the module as it is: the caller's
    array must then be copied).
    """
    import tvm
    import tvm_ffi
    from tvm import relax, tirx

    main = mod["main"]
    inputs = list(main.params)
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def mentions_input(expr) -> bool:
        return any(v.same_as(x) for v in relax.analysis.free_vars(expr) for x in inputs)

    readers: dict = {}          # kernel -> positions of its parameters that are inputs
    for block in main.body.blocks:
        for binding in block.bindings:
            call = binding.value
            if not mentions_input(call):
                continue
            if not (isinstance(call, relax.Call) and call.op.same_as(call_tir)):
                return mod, False
            for i, arg in enumerate(call.args[1].fields):
                if any(arg.same_as(x) for x in inputs):
                    readers.setdefault(call.args[0], set()).add(i)
                elif mentions_input(arg):
                    return mod, False
    if mentions_input(main.body.body):
        return mod, False
    for gv, positions in readers.items():
        func = mod[gv]
        renamed = {}
        for i in positions:
            param = func.params[i]
            ty = param.ty
            element_bytes = max(1, tvm.runtime.DataType(str(ty.dtype)).bits // 8)
            renamed[param] = tirx.decl_buffer(ty.shape, ty.dtype, param.name, data_alignment=element_bytes,
                                              offset_factor=ty.offset_factor, elem_offset=ty.elem_offset,
                                              strides=ty.strides)

        def swap(var, renamed=renamed):
            return next((new for old, new in renamed.items() if var.same_as(old)), var)

        mod[gv] = tvm_ffi.structural_map(func, [(tvm.ir.expr.Var, swap)])
    return mod, bool(readers)


def build(prepared, target, database=None, *, defaults: bool = True) -> CompiledLibrary:
    """``prepared`` (from :func:`graph.prepare`) -> executable.

    Kernels with a record in ``database`` get the tuned schedule; with ``defaults`` every
    other kernel gets its default schedule (schedules/), else TVM's own unscheduled code.
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
        tuned, hand_written = count_scheduled(mod)
        applied_defaults = 0
        if defaults:
            # Scheduled kernels no longer match an unscheduled workload: only the others
            # pick up their default.
            fallback, _ = default_database(prepared, target, database)
            with fallback:
                mod = relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
            applied_defaults = count_scheduled(mod)[0] - tuned
        kinds = schedule_kinds(mod)
        # Tuned kernels may read their weights in a blocked layout: split that rewrite
        # out of the kernel and fold it into the constants at build time.
        mod = tvm.transform.Sequential([
            relax.transform.SplitLayoutRewritePreproc(),
            relax.transform.FoldConstant(),
            relax.transform.DeadCodeElimination(),
        ])(mod)
        mod, inputs_in_place = read_inputs_in_place(mod)
        lower = tvm.transform.Sequential([
            relax.transform.RewriteDataflowReshape(),
            relax.transform.ToNonDataflow(),
            relax.transform.RemovePurityChecking(),
            relax.transform.CallTIRRewrite(),
            *rp.finalize_passes(target),
        ])
        executable = tvm.compile(mod, target=target, relax_pipeline=lower)
    return CompiledLibrary(executable, kernels, tuned, hand_written, applied_defaults, inputs_in_place, kinds)
