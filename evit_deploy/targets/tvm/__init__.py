"""TVM target: Relax + MetaSchedule-tuned kernels in a deployable shared library.

``export`` imports the trace into Relax, applies a tuning database made by
``evit-deploy tune`` (see :mod:`.tune`), compiles for the TVM target and writes
``<model>.so`` (weights included) and ``<model>.tvm.json`` (the description)
(:mod:`.convert`); ``--precision bf16`` computes the 1x1 convolutions in bf16
(:mod:`.quantize`). Running an artifact needs ``tvm`` and numpy only (:mod:`.runtime`);
per-kernel times come from the VM (:mod:`.profile`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ...cpufeatures import CpuNeeds
from ...description import ModelDescription
from ...errors import first_line
from ..base import Artifact, Command, Finding, Target, missing_modules
from ..options import option, precision_option
from .quantize import PRECISIONS


def _version_tuple(version: str) -> tuple[int, ...]:
    """``0.1.15.post2`` -> (0, 1, 15): enough to compare releases."""
    return tuple(int(n) for n in re.findall(r"\d+", version.split("+")[0])[:3])


class TvmTarget(Target):
    """shared library (.so) + description (.tvm.json), run by the TVM runtime"""

    suffixes = (".so",)
    requires = {"tvm": "apache-tvm", "tvm_ffi": "apache-tvm-ffi"}
    reproducible = False
    reproducibility_note = ("the library is compiled from the schedules in the tuning database, so it is "
                            "determined by the database (its record count is in the description), the TVM "
                            "target and the TVM version; tuning itself measures wall-clock time and is not "
                            "repeatable, and LLVM output is not guaranteed byte-identical")

    option_shortcuts = {"--db": "db"}

    @dataclass
    class Options:
        tvm_target: str | None = option(None, "TVM target: 'llvm -mcpu=broadwell -num-cores=14', JSON, or native "
                                        "(default: the database's target with --db, else native)",
                                        flag="--tvm-target")
        db: str | None = option(None, "tuning database directory made by `evit-deploy tune`", flag="--db", path=True)
        db_any_target: bool = option(False, "apply a database tuned for a different TVM target anyway",
                                     flag="--db-any-target")
        precision: str = precision_option("fp32", PRECISIONS)

    @classmethod
    def commands(cls) -> list[Command]:
        from .commands import tune_command
        return [Command("tune", tune_command)]

    def validate(self, options: Options) -> None:
        from .convert import check
        check(options, self.database(options))

    def cpu_needs(self, options: Options) -> CpuNeeds:
        from .target_string import AMX_FLAGS, required_cpu_flags
        flags = required_cpu_flags(self.resolved_target(options))
        # AMX instructions come only from the bf16 schedules (LLVM emits none by itself).
        return CpuNeeds(isa=flags if options.precision == "bf16" else tuple(f for f in flags if f not in AMX_FLAGS))

    def database(self, options: Options):
        """The tuning database ``--db`` names (None without one), read-only and read once
        while its files stay unchanged: planning an export asks for it five times."""
        return self._databases(options.db) if options.db else None

    @cached_property
    def _databases(self):
        from .database import ReadOnce
        return ReadOnce()

    def default_batch(self, options: Options, model: str) -> tuple[int, str] | None:
        """The batch the database tuned ``model`` at, if it tuned it at one batch only."""
        from .convert import tuned_batch

        db = self.database(options)
        batch = tuned_batch(db, model) if db is not None else None
        return None if batch is None else (batch, f"the batch {options.db} was tuned at")

    def resolved_target(self, options: Options) -> dict:
        """The target to compile for: as given, else the database's, else the host."""
        from .convert import resolved_target
        return resolved_target(options, self.database(options))

    def export(self, traced, options: Options, path: Path, reporter) -> Artifact:
        from .convert import export
        return export(traced, options, self.database(options), path, reporter, target_name=self.name)

    def tuned_options(self, model: str, options: dict, *, batch: int, threads: int, img_size: int, seconds: float,
                      workdir: Path, reporter) -> dict:
        from .tune import tune

        parsed = self.parse_options(options)
        target = self.resolved_target(parsed)
        result = tune(model, {**target, "num-cores": threads}, time_budget=seconds, batch=batch, img_size=img_size,
                      db_dir=Path(workdir) / f"tvm-{parsed.precision}-b{batch}-t{threads}", precision=parsed.precision,
                      reporter=reporter)
        return {"db": str(result.db_path), "tvm_target": result.target_string}

    def rebuild_options(self, description: ModelDescription) -> dict:
        # `native` is where it was compiled: elsewhere it would be another CPU.
        return {**super().rebuild_options(description), "tvm_target": description.extra["tvm"]["target_string"]}

    def host_findings(self) -> list[Finding]:
        findings = []
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
