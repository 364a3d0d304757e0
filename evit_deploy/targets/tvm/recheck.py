"""Schedules measured on another CPU, checked on this one before a library uses them.

A tuning database records the CPU its schedules were timed on. On another CPU its best
schedule for a kernel may be slower than the kernel's default (schedules/): the cache
sizes, the vector units and the cost of a wide register block all differ. When a library
is exported for the machine doing the export from a database measured elsewhere, each
kernel's record is timed here beside its default and the faster one is built in, so the
database can only make the model faster than the defaults, never slower.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Recheck:
    database: object          # a MetaSchedule database: the faster schedule of each kernel
    kernels: int              # kernels with a record that were checked
    kept: int                 # of which the record was faster than the default here
    failed: int               # records that no longer build or run here (the default is used)


def recheck(database, prepared, target, reporter) -> Recheck:
    """Time each kernel's best record in ``database`` against its default on this machine."""
    from tvm.s_tir.meta_schedule.database import MemoryDatabase

    from . import metaschedule, schedules
    from .measure import Builder, Runner, remove_artifact, settings_for_machine

    facts = schedules.CpuFacts.for_target(target)
    kernels = [k for k in metaschedule.extract_kernels(prepared, target)
               if metaschedule.measured_records(database, k.mod)]
    result = MemoryDatabase()
    if not kernels:
        return Recheck(result, 0, 0, 0)
    postprocs = metaschedule.postprocs(kernels[0], target)
    pairs = [(k, metaschedule.best_candidate(database, k.mod), schedules.default_candidate(k.mod, facts, postprocs))
             for k in kernels]
    candidates = [c for _, record, default in pairs for c in (record, default) if c is not None]
    builder = runner = None
    try:
        builder, runner = Builder(settings_for_machine(facts.cores)), Runner(settings_for_machine(facts.cores))
        with reporter.task("checking the database's schedules here", total=len(candidates)) as task:
            built = builder.build(candidates, target)
            ok = [(c, path) for c, (path, _) in zip(candidates, built) if path]
            timed = iter(runner.run(ok))
            seconds = {}
            for candidate, (path, _) in zip(candidates, built):
                seconds[id(candidate)] = next(timed)[0] if path else None
                remove_artifact(path)
                task.update(advance=1)
    finally:
        for part in (builder, runner):
            if part is not None:
                part.shutdown()
    kept = failed = 0
    for kernel, record, default in pairs:
        record_s = seconds.get(id(record)) if record is not None else None
        default_s = seconds.get(id(default)) if default is not None else None
        if record_s is None:
            failed += 1
        if record_s is not None and (default_s is None or record_s <= default_s):
            kept += 1
            metaschedule.commit(result, kernel.mod, record, [record_s], target)
        elif default is not None and default_s is not None:
            metaschedule.commit(result, kernel.mod, default, [default_s], target)
    return Recheck(result, len(pairs), kept, failed)
