"""TVM target: Relax + MetaSchedule-tuned kernels in a deployable shared library.

``export`` imports the trace into Relax, applies a tuning database made by
``evit-deploy tune`` (see :mod:`.tune`), compiles for the TVM target and writes
``<model>.so`` (weights included) and ``<model>.tvm.json`` (the description). Running an
artifact needs ``tvm`` and numpy only (:mod:`.runtime`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...cpufeatures import CpuNeeds
from ...description import ModelDescription
from ...errors import ExportError, first_line
from ..base import Artifact, Command, Finding, OpTime, Target, missing_modules
from ..options import option, precision_option

DEFAULTS_NOTE = ("no tuning database (--db): every kernel gets its default schedule (written for its kernel "
                 "class, chosen by rules for this CPU); `evit-deploy tune` measures alternatives and can make it faster")


@dataclass
class TvmOptions:
    tvm_target: str | None = option(None, "TVM target: 'llvm -mcpu=broadwell -num-cores=14', JSON, or native "
                                    "(default: the database's target with --db, else native)",
                                    flag="--tvm-target")
    db: str | None = option(None, "tuning database directory made by `evit-deploy tune`", flag="--db", path=True)
    db_any_target: bool = option(False, "apply a database tuned for a different TVM target anyway",
                                 flag="--db-any-target")
    precision: str = precision_option("fp32", ("fp32", "bf16"),
                                      "bf16: the 1x1 convolutions from bf16 weights and activations with fp32 "
                                      "accumulation (needs AVX512_BF16 on the target CPU)")


def schedule_summary(info: dict) -> str:
    """``70: 12 tuned, 58 default schedules`` from a library's description."""
    parts = [f"{info.get('tuned_kernels') or 0} tuned", f"{info.get('default_kernels') or 0} default schedules"]
    if info.get("unscheduled_kernels"):
        parts.append(f"{info['unscheduled_kernels']} unscheduled")
    return f"{info.get('kernels')}: {', '.join(parts)}"


def _version_tuple(version: str) -> tuple[int, ...]:
    """``0.1.15.post2`` -> (0, 1, 15): enough to compare releases."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


class TvmTarget(Target):
    name = "tvm"
    produces = "shared library (.so) + description (.tvm.json), run by the TVM runtime"
    suffixes = (".so",)
    requires = {"tvm": "apache-tvm", "tvm_ffi": "apache-tvm-ffi"}
    run_requires = {"tvm": "apache-tvm", "tvm_ffi": "apache-tvm-ffi"}
    supports_dynamic_batch = False
    benchmark_backend = "tvm"
    reproducible = False
    reproducibility_note = ("the library is compiled from the schedules in the tuning database, so it is "
                            "determined by the database (its record count is in the description), the TVM "
                            "target and the TVM version; tuning itself measures wall-clock time and is not "
                            "repeatable, and LLVM output is not guaranteed byte-identical")
    Options = TvmOptions

    option_shortcuts = {"--db": "db"}
    supports_profiling = True

    @classmethod
    def commands(cls) -> list[Command]:
        from .commands import tune_command
        return [Command("tune", tune_command)]

    def validate(self, options: TvmOptions) -> None:
        # Before the (slow) trace: a typo in the target or a database for another target
        # fails at once.
        target = self.resolved_target(options)
        if options.db:
            self.database(options).check_target(target, allow_mismatch=options.db_any_target)
        if options.precision == "bf16":
            from .schedules.gemm_bf16 import require
            require(target)

    def cpu_needs(self, options: TvmOptions) -> CpuNeeds:
        from .target_string import required_cpu_flags
        return CpuNeeds(isa=required_cpu_flags(self.resolved_target(options)))

    @staticmethod
    def database(options: TvmOptions):
        from .database import TuningDatabase
        return TuningDatabase.open(options.db)

    def default_batch(self, options: TvmOptions, model: str) -> tuple[int, str] | None:
        """The batch the database tuned ``model`` at, if it tuned it at one batch only:
        kernels of another batch size have no record and would run untuned."""
        if not options.db:
            return None
        batches = {int(entry["input_shape"][0]) for entry in self.database(options).models().values()
                   if entry.get("model") == model and entry.get("input_shape")}
        if len(batches) != 1:
            return None
        batch = batches.pop()
        return batch, f"the batch {options.db} was tuned at"

    @staticmethod
    def resolved_target(options: TvmOptions) -> dict:
        """The target to compile for: as given, else the database's (tuning records only
        apply to the target they were measured on), else the host."""
        from .database import TuningDatabase
        from .target_string import resolve_target

        if options.tvm_target is None and options.db:
            return resolve_target(TuningDatabase.open(options.db).meta["target"])
        return resolve_target(options.tvm_target or "native")

    def export(self, traced, options: TvmOptions, path: Path, reporter) -> Artifact:
        from ...fsutil import write_text_atomic
        from . import compile as tvm_compile
        from . import graph
        from .database import TuningDatabase, model_key
        from .runtime import description_json, sidecar_path
        from .target_string import to_classic, to_tvm

        target = self.resolved_target(options)
        tvm_target = to_tvm(target)
        desc = traced.description
        database = db_info = None
        if options.db:
            db = TuningDatabase.open(options.db)
            same = db.check_target(target, allow_mismatch=options.db_any_target)
            if not same:
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
            database = db.ms_database()
            db_info = {"path": str(db.path), "target_string": db.meta["target_string"],
                       "records": db.record_count(), "models": sorted(db.models()),
                       "measured_on": sorted(db.measured_on_cpus())}
        else:
            reporter.info(DEFAULTS_NOTE)
        try:
            prepared = graph.prepare(graph.import_program(traced.program), tvm_target, precision=options.precision)
            if database is not None:
                database = self._checked_here(db, database, prepared, target, tvm_target, reporter, db_info)
            built = tvm_compile.build(prepared, tvm_target, database)
        except Exception as exc:
            raise ExportError(f"TVM compilation failed: {type(exc).__name__}: {first_line(exc)}") from exc
        if database is None:
            reporter.info(f"no tuning database: the {built.kernels} kernels use their default schedules "
                          f"(`evit-deploy tune` measures alternatives)")
        elif built.tuned < built.kernels:
            reporter.info(f"{built.kernels - built.tuned} of {built.kernels} kernels have no record in "
                          f"{options.db}: they use their default schedules")
        if built.unscheduled:
            reporter.warn(f"{built.unscheduled} of {built.kernels} kernels have neither a record nor a default "
                          f"schedule: TVM's own unscheduled code runs them (slow)")
        import tvm

        description = desc.with_extra(tvm={
            "target": target, "target_string": to_classic(target), "threads": target["num-cores"],
            "kernels": built.kernels, "tuned_kernels": built.tuned, "hand_written_kernels": built.hand_written,
            "default_kernels": built.defaults, "unscheduled_kernels": built.unscheduled,
            "schedule_classes": built.kinds,
            "inputs_in_place": built.inputs_in_place, "graph": graph.VERSION,
            "database": db_info, "tvm_version": tvm.__version__})
        try:
            built.executable.export_library(str(path))
        except Exception as exc:
            raise ExportError(f"writing the TVM library failed: {first_line(exc)}") from exc
        side = sidecar_path(path)
        write_text_atomic(side, description_json(description))
        return Artifact(path, self.name, description, sidecars=(side,))

    @staticmethod
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

    def diagnose(self) -> list[Finding]:
        findings = super().diagnose()
        if any(f.level == "error" for f in findings):
            return findings
        from ...hostinfo import package_version
        from .target_string import resolve_target, to_classic

        ffi = package_version("apache-tvm-ffi")
        if ffi and _version_tuple(ffi) >= (0, 1, 15) and _version_tuple(package_version("apache-tvm") or "0") < (0, 28):
            findings.append(Finding(
                "error", f"apache-tvm-ffi {ffi} with apache-tvm {package_version('apache-tvm')}: tuning crashes "
                         "(segfault in tvm::ffi::ToJSONGraph when MetaSchedule starts)",
                'pip install "apache-tvm-ffi>=0.1.14.post0,<0.1.15"'))
        from .measure import TUNING_REQUIRES

        missing = sorted(missing_modules(TUNING_REQUIRES).values())
        if missing:
            findings.append(Finding("warning", f"tuning needs {', '.join(missing)} (export and run work without)",
                                    f"pip install {' '.join(missing)}"))
        try:
            host = resolve_target("native")
            findings.append(Finding("ok", f"host target: {to_classic(host)}"))
        except Exception as exc:  # LLVM may not know a brand-new CPU
            findings.append(Finding("warning", f"cannot name the host CPU for LLVM: {first_line(exc)}",
                                    "pass an explicit target, e.g. --tvm-target 'llvm -mcpu=skylake-avx512'"))
        return findings

    def open_session(self, path: Path, threads: int | None = None):
        from .runtime import load

        return load(path, threads=threads).run_named

    def health(self, path: Path, description: ModelDescription) -> list[Finding]:
        from .graph import VERSION

        info = description.extra.get("tvm", {})
        findings = []
        kernels, tuned = info.get("kernels"), info.get("tuned_kernels")
        # Libraries from before default schedules existed had only records or TVM's code.
        unscheduled = info.get("unscheduled_kernels", None if kernels is None else kernels - (tuned or 0))
        if unscheduled:
            # One kernel with TVM's own unscheduled code is enough to make the library slow.
            findings.append(Finding("warning", f"{unscheduled} of {kernels} kernels unscheduled",
                                    "export again with this evit-deploy (default schedules), or tune"))
        if info.get("graph") not in (None, VERSION):
            findings.append(Finding("warning", f"compiled by an older graph pipeline ({info.get('graph')})",
                                    "export it again to get this version's kernels"))
        return findings

    def profile_ops(self, path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                    blocks: dict[str, str]) -> list[OpTime]:
        """Per-kernel times from the Relax VM's profiler. TVM fuses operators into kernels
        named after them (``fused_conv2d_add_relu``) and keeps no module paths, so
        kernels are categorised by name and not attributed to blocks."""
        from .runtime import load

        model = load(path, threads=threads, profile=True)
        x = model.to_device(inputs[model.description.input.name])
        model.run_device(x)                                # warm-up
        ops = []
        for _ in range(iterations):
            for name, seconds in model.profile_kernels(x):
                ops.append(OpTime(name, seconds, None))
        return ops

    # -- reading and running (torch-free) ----------------------------------------------------
    def read_description(self, path: Path) -> ModelDescription:
        from .runtime import read_description
        return read_description(path)

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .runtime import cached_model
        return cached_model(path).run_named(inputs)

    def runtime_name(self, path: Path) -> str:
        from .runtime import describe_runtime, read_description
        return describe_runtime(read_description(path))

    def parity_extras(self, path: Path, report) -> dict:
        from .runtime import read_description
        info = read_description(path).extra.get("tvm", {})
        return {"tvm_target": info.get("target_string"), "kernels": schedule_summary(info)}
