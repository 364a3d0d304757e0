"""The export pipeline: trace -> Relax -> prepared graph -> tuning database applied ->
compiled library (``<model>.so``) and its description (``<model>.tvm.json``).

The plan's questions (which target, which batch, whether the options fit) are answered
here too, from the database as :class:`~.database.TuningDatabase.open` read it: once,
read-only.
"""

from __future__ import annotations

from pathlib import Path

from ...errors import ExportError, first_line, named_first_line
from ..base import Artifact

DEFAULTS_NOTE = ("no tuning database (--db): every kernel gets its default schedule (written for its kernel "
                 "class, chosen by rules for this CPU); `evit-deploy tune` measures alternatives and can make it faster")


# -- planning -----------------------------------------------------------------------------

def resolved_target(options, db) -> dict:
    """The target to compile for: as given, else the database's (tuning records only
    apply to the target they were measured on), else the host."""
    from .target_string import resolve_target

    if options.tvm_target is None and db is not None:
        return resolve_target(db.meta["target"])
    return resolve_target(options.tvm_target or "native")


def check(options, db) -> None:
    """Refuse, before the (slow) trace, a typo in the target, a database for another
    target, or bf16 for a CPU without it."""
    target = resolved_target(options, db)
    if db is not None:
        db.check_target(target, allow_mismatch=options.db_any_target)
    if options.precision == "bf16":
        from .quantize import require_bf16
        require_bf16(target)


def tuned_batch(db, model: str) -> int | None:
    """The batch ``db`` tuned ``model`` at, if it tuned it at one batch only: kernels of
    another batch size have no record and would run untuned."""
    batches = {int(entry["input_shape"][0]) for entry in db.models().values()
               if entry.get("model") == model and entry.get("input_shape")}
    return batches.pop() if len(batches) == 1 else None


# -- exporting ----------------------------------------------------------------------------

def export(traced, options, db, path: Path, reporter, *, target_name: str) -> Artifact:
    """Compile ``traced`` with ``db`` (a read-only TuningDatabase, or None) and write the
    library at ``path`` and its description beside it."""
    from . import compile as tvm_compile
    from . import graph
    from .target_string import to_tvm

    target = resolved_target(options, db)
    tvm_target = to_tvm(target)
    desc = traced.description
    database = db_info = None
    if db is not None:
        database, db_info = _applied_database(db, options, target, desc, reporter)
    else:
        reporter.info(DEFAULTS_NOTE)
    try:
        prepared = graph.prepare(graph.import_program(traced.program), tvm_target, precision=options.precision)
        if database is not None:
            database = _checked_here(db, database, prepared, target, tvm_target, reporter, db_info)
        built = tvm_compile.build(prepared, tvm_target, database)
    except Exception as exc:
        raise ExportError(f"TVM compilation failed: {named_first_line(exc)}") from exc
    _report_schedules(built, database is not None, options.db, reporter)
    description = desc.with_extra(tvm=_library_facts(built, target, db_info))
    return _write(built, description, path, target_name, traced.weight_bytes())


def _applied_database(db, options, target: dict, desc, reporter):
    """The MetaSchedule database to build with, and what the description records of it;
    warnings for a database that may not fit."""
    from . import graph
    from .database import model_key
    from .target_string import to_classic

    if not db.check_target(target, allow_mismatch=options.db_any_target):
        reporter.warn(f"applying {db.path}, tuned for '{db.meta['target_string']}', to "
                      f"'{to_classic(target)}' (--db-any-target)")
    for stale in (db.version_mismatch(), db.graph_mismatch(graph.VERSION)):
        if stale:
            reporter.warn(stale)
    key = model_key(desc.model, desc.input.shape, options.precision)
    if key not in db.models():
        tuned_for = ", ".join(db.models()) or "nothing yet"
        reporter.warn(f"{db.path} has no tuning run for {key} (it has: {tuned_for}); only kernels "
                      f"shared with those are tuned")
    info = {"path": str(db.path), "target_string": db.meta["target_string"], "records": db.record_count(),
            "models": sorted(db.models()), "measured_on": sorted(db.measured_on_cpus())}
    return db.ms_database(), info


def _checked_here(db, database, prepared, target: dict, tvm_target, reporter, db_info: dict):
    """``database``, or, when it was measured on another CPU, the faster of each kernel's
    record and its default as timed on this machine (recheck.py). A library for another
    CPU than this one cannot be checked here: it gets the records as they are."""
    from ...hostinfo import cpu_info
    from .target_string import host_cpu_name

    elsewhere = db.measured_on_cpus()
    here = cpu_info()["model"]
    if not elsewhere or here in elsewhere:
        return database
    if target.get("mcpu") != host_cpu_name():
        reporter.warn(f"{db.path} was measured on {', '.join(sorted(elsewhere))}; this library is for "
                      f"{target.get('mcpu')}, which this machine cannot time: its schedules are used unchecked")
        return database
    from .recheck import recheck

    reporter.info(f"{db.path} was measured on {', '.join(sorted(elsewhere))}, not on this {here}: each "
                  f"kernel's schedule is timed here against its default and the faster one is used")
    checked = recheck(database, prepared, tvm_target, reporter)
    db_info["rechecked_here"] = {"kernels": checked.kernels, "records_kept": checked.kept,
                                 "records_failed": checked.failed}
    reporter.info(f"kept {checked.kept} of {checked.kernels} records; the default was faster here for the "
                  f"rest" + (f" ({checked.failed} no longer built or ran)" if checked.failed else ""))
    return checked.database


def _report_schedules(built, with_database: bool, db_path, reporter) -> None:
    if not with_database:
        reporter.info(f"no tuning database: the {built.kernels} kernels use their default schedules "
                      f"(`evit-deploy tune` measures alternatives)")
    elif built.tuned < built.kernels:
        reporter.info(f"{built.kernels - built.tuned} of {built.kernels} kernels have no record in "
                      f"{db_path}: they use their default schedules")
    if built.unscheduled:
        reporter.warn(f"{built.unscheduled} of {built.kernels} kernels have neither a record nor a default "
                      f"schedule: TVM's own unscheduled code runs them (slow)")


def _library_facts(built, target: dict, db_info: dict | None) -> dict:
    """The description's ``tvm`` section."""
    import tvm

    from . import graph
    from .target_string import to_classic

    return {"target": target, "target_string": to_classic(target), "threads": target["num-cores"],
            "kernels": built.kernels, "tuned_kernels": built.tuned, "hand_written_kernels": built.hand_written,
            "default_kernels": built.defaults, "unscheduled_kernels": built.unscheduled,
            "schedule_classes": built.kinds, "inputs_in_place": built.inputs_in_place, "graph": graph.VERSION,
            "database": db_info, "tvm_version": tvm.__version__}


def _write(built, description, path: Path, target_name: str, weight_bytes: int) -> Artifact:
    """The library, then its description beside it (atomically)."""
    from ...fsutil import artifact_room_error, sha256_file, write_text_atomic
    from .runtime import description_json, sidecar_path

    # LLVM ends the process (exit 1, nothing cleaned up) when it cannot write an object
    # file, so room for the library (about its fp32 weights) is checked first.
    error = artifact_room_error(path, weight_bytes)
    if error is not None:
        raise error
    try:
        built.executable.export_library(str(path))
    except Exception as exc:
        raise ExportError(f"writing the TVM library failed: {first_line(exc)}") from exc
    # Recorded so that a library changed since (damaged in a copy, say) is recognised
    # before TVM's loader maps it (runtime.check_library).
    description = description.with_extra(tvm={**description.extra["tvm"], "library_sha256": sha256_file(path)})
    side = sidecar_path(path)
    write_text_atomic(side, description_json(description))
    return Artifact(path, target_name, description, sidecars=(side,))
