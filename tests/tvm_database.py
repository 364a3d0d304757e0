"""A tuning database made from fixed records, for the tests that only need "a database".

Every kernel of the model gets one record: the first design-space sample of MetaSchedule
that its post-processors accept (sampled with a fixed seed: a searched schedule, so a
library built from the database is not simply the default one), or for the dense
convolutions their default schedule (a hand-written one), timed at a made-up latency
proportional to its FLOPs.
No candidate is built or measured: the same call gives the same database, in seconds.
"""

from __future__ import annotations

from pathlib import Path


def deterministic_database(path: Path, model: str, *, batch: int, img_size: int, target: str,
                           seed: int = 0) -> Path:
    from tvm.s_tir.meta_schedule import TuneContext
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    from evit_deploy.targets.tvm import graph, metaschedule, schedules
    from evit_deploy.targets.tvm.database import TuningDatabase, model_key
    from evit_deploy.targets.tvm.target_string import resolve_target, to_tvm
    from evit_deploy.tracing import trace

    canonical = resolve_target(target)
    tvm_target = to_tvm(canonical)
    db = TuningDatabase.open_or_create(path, canonical, graph=graph.VERSION)
    traced = trace(model, None, batch=batch, img_size=img_size)
    kernels = metaschedule.extract_kernels(graph.prepare(graph.import_program(traced.program), tvm_target),
                                           tvm_target)
    database = db.ms_database()
    for i, kernel in enumerate(kernels):
        with metaschedule.without_tensor_intrinsics():
            ctx = TuneContext(mod=kernel.mod, target=tvm_target, space_generator=metaschedule.space_generator(),
                              task_name=kernel.name, rand_state=seed + i + 1)
        postprocs = ctx.space_generator.postprocs
        candidate = None
        if schedules.kernel_class(kernel.mod) is schedules.gemm:
            candidate = schedules.default_candidate(kernel.mod, schedules.CpuFacts.for_target(tvm_target), postprocs)
        if candidate is None:
            candidate = _first_valid_sample(ctx.generate_design_space(), postprocs, ArgInfo)
        metaschedule.commit(database, kernel.mod, candidate, [max(kernel.flops, 1.0) * 1e-11], tvm_target)
    desc = traced.description
    db.update_model(model_key(desc.model, desc.input.shape), model=desc.model,
                    input_shape=list(desc.input.shape), kernels=len(kernels), trials=len(kernels), seconds=0.0,
                    estimated_latency_ms=None)
    db.save_meta()
    db.close()
    return path


def _first_valid_sample(spaces, postprocs, ArgInfo):
    from tvm.s_tir.meta_schedule.search_strategy import MeasureCandidate

    for sch in spaces:
        sch = sch.copy()
        sch.enter_postproc()
        if all(p.apply(sch) for p in postprocs):
            return MeasureCandidate(sch, ArgInfo.from_entry_func(sch.mod, remove_preproc=True))
    raise AssertionError("no design-space sample passed the post-processors")
