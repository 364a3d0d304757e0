"""Running a build: which artifacts are up to date, the others made (in worker processes
with ``jobs > 1``), verified, judged by their gates, and recorded as each one finishes."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..cpufeatures import judge
from ..errors import EvitError, ExportError, OutputError, ParityError, named_first_line
from ..fsutil import ensure_output_dir, exclusive_lock
from ..hostinfo import package_versions
from ..plan import plan_export, trace_plan
from ..progress import Reporter, raise_if_interrupted
from .gates import judge_gates, reject
from .inputs import inputs_key, weights_id
from .manifest import MANIFEST, artifact_files, files_intact, read_manifest, write_manifest
from .record import BuildRecord, Status, parity_summary
from .schema import BuildFile, load_build_file


@dataclass
class BuildResult:
    records: list[BuildRecord]
    manifest: Path

    @property
    def failed(self) -> list[BuildRecord]:
        return [r for r in self.records if r.status.failed]

    @property
    def counts(self) -> dict[Status, int]:
        return {s: sum(r.status is s for r in self.records) for s in Status}


class Job(NamedTuple):
    """One model of one ``[[artifact]]`` entry to make (sent to worker processes as is)."""
    model: str                # its key in [models]
    artifact: int             # index of its entry in the file
    weights_id: str
    inputs_sha256: str


def build(path: str | os.PathLike, *, out: str | os.PathLike | None = None, jobs: int = 1,
          reporter: Reporter | None = None) -> BuildResult:
    """Build every artifact of a build file into ``out``, verify each, write the manifest."""
    reporter = reporter or Reporter()
    spec = load_build_file(path)
    out_dir = ensure_output_dir(Path(out) if out is not None else spec.out)
    # Two builds into one folder would each write a manifest of the other's files.
    with exclusive_lock(out_dir, f"{out_dir} is being written by another `evit-deploy build` or `optimize`: "
                                 f"wait for it to finish, or build into another --out"):
        return _build(spec, out_dir, jobs, reporter)


def _build(spec: BuildFile, out_dir: Path, jobs: int, reporter: Reporter) -> BuildResult:
    manifest_path = out_dir / MANIFEST
    previous = read_manifest(manifest_path)
    versions = package_versions()
    records: dict[tuple[str, str], BuildRecord] = {}
    waiting: dict[tuple[str, str], str] = {}       # not built yet: the manifest says so until they are

    def save(r: BuildRecord) -> None:
        records[r.key] = r
        waiting.pop(r.key, None)
        write_manifest(manifest_path, spec.path, records.values(), versions, pending=waiting.values())

    pending: list[Job] = []
    for index, art in enumerate(spec.artifacts):
        for key in art.models:
            model = spec.models[key]
            weights = weights_id(model, spec.seed)
            job = Job(key, index, weights, inputs_key(model, art, spec, weights, versions))
            old = previous.get((art.name, model.name))
            if old and old.inputs_sha256 == job.inputs_sha256 and files_intact(out_dir, old):
                unverified = old.status is Status.UNVERIFIED      # still to be verified where it runs
                records[old.key] = dataclasses.replace(old, status=old.status if unverified else Status.UP_TO_DATE)
            else:
                pending.append(job)
                waiting[art.name, model.name] = f"{art.name}/{key}"
    if pending:
        # Before the first file is replaced: a build stopped at any point says "incomplete".
        write_manifest(manifest_path, spec.path, records.values(), versions, pending=waiting.values())
    with reporter.task("build", total=len(pending)) as task:
        if jobs > 1 and len(pending) > 1:
            _build_parallel(spec, pending, out_dir, jobs, save, task)
        else:
            traces: dict = {}
            for job in pending:
                task.update(description=f"{spec.artifacts[job.artifact].name}/{job.model}")
                save(_build_one(spec, job, out_dir, reporter, traces))
                task.update(advance=1)
    write_manifest(manifest_path, spec.path, records.values(), versions)
    return BuildResult(list(records.values()), manifest_path)


def _build_parallel(spec: BuildFile, pending: list[Job], out_dir: Path, jobs: int, save, task) -> None:
    """Build in worker processes, one per model, so that each model is traced once per
    input format (the same trace serves all of its artifacts)."""
    import concurrent.futures
    import multiprocessing

    by_model: dict[str, list[Job]] = {}
    for job in pending:
        by_model.setdefault(job.model, []).append(job)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_start_worker,
                                                initargs=(list(warnings.filters),)) as pool:
        futures = [pool.submit(_build_group, str(spec.path), group, str(out_dir)) for group in by_model.values()]
        try:
            for future in concurrent.futures.as_completed(futures):
                for r in future.result():
                    save(r)
                    task.update(advance=1)
        except BaseException:
            for f in futures:
                f.cancel()
            _interrupt_workers()
            raise


def _start_worker(filters: list) -> None:
    """A worker warns as the command does (the CLI hides libraries' deprecation notices)."""
    warnings.filters[:] = filters


def _interrupt_workers() -> None:
    """Pass an interrupt on to the workers, so that leaving the pool does not wait for the
    artifacts they are making: Ctrl-C in a terminal reaches them, a SIGINT or SIGTERM sent
    to this process alone (``kill``, a CI runner) does not. A worker stops as the command
    does: its staging area removed, an artifact's files published together or not at all.
    (The pool's workers are this process's multiprocessing children: ``ProcessPoolExecutor``
    has no public way to reach them before Python 3.14.)"""
    import multiprocessing

    for process in multiprocessing.active_children():
        try:
            os.kill(process.pid, signal.SIGINT)
        except OSError:
            pass                                  # already gone


def _build_group(build_path: str, jobs: list[Job], out_dir: str) -> list[BuildRecord]:
    """Worker-process entry point: build one model's artifacts."""
    spec = load_build_file(build_path)
    traces: dict = {}
    return [_build_one(spec, job, Path(out_dir), Reporter(), traces) for job in jobs]


def _build_one(spec: BuildFile, job: Job, out_dir: Path, reporter: Reporter, traces: dict) -> BuildRecord:
    from ..api import export_traced

    model, art = spec.models[job.model], spec.artifacts[job.artifact]
    start = time.perf_counter()

    def finish(status: Status, **fields) -> BuildRecord:
        return dataclasses.replace(record, status=status, seconds=round(time.perf_counter() - start, 1), **fields)

    record = BuildRecord(art.name, model.name, art.target, art.device, art.options,
                         job.weights_id.split(":")[0] if job.weights_id.startswith("random-init") else job.weights_id,
                         spec.seed if model.weights is None else None, art.batch, art.dynamic_batch,
                         job.inputs_sha256, status=Status.FAILED_EXPORT,       # until finish() says
                         chosen_by=art.chosen_by)
    try:
        plan = plan_export(model.name, art.target, device=art.device, options=art.export_options(),
                           batch=art.batch, dynamic_batch=art.dynamic_batch, weights=model.weights, seed=spec.seed,
                           **model.options)
        record = dataclasses.replace(
            record, options=plan.options_dict(), batch=plan.batch, reproducible=plan.target.reproducible,
            reproducibility=None if plan.target.reproducible else plan.target.reproducibility_note)
        for note in plan.notes:
            reporter.info(f"{art.name}/{model.key}: {note}")
        if plan.trace_key not in traces:
            with reporter.stage("trace", f"{model.key} ({plan.input_format})"):
                traces[plan.trace_key] = trace_plan(plan)
            for warning in traces[plan.trace_key].warnings:
                reporter.warn(f"{model.key}: {warning}")
        target_dir = ensure_output_dir(out_dir / art.name)
        verify = art.chosen_by is None or verifiable_here(plan)
        result = export_traced(traces[plan.trace_key], plan, target_dir, verify=verify, images=spec.images,
                               reporter=reporter)
        if not verify:
            reporter.warn(f"{art.name}/{model.key}: chosen on {art.chosen_by['cpu']}; this CPU cannot verify it "
                          f"exactly: run `evit-deploy verify` on the CPU it was chosen for")
            return finish(Status.UNVERIFIED, **artifact_files(result.artifact, out_dir),
                          cpu=result.artifact.description.extra.get("cpu"))
        record = dataclasses.replace(record, parity=parity_summary(result.report))
        if art.gates:
            report = judge_gates(spec, art, result.artifact, traces[plan.trace_key].reference, reporter)
            if report["failures"]:
                rejected = reject(result.artifact, report)
                return finish(Status.FAILED_GATE, eval=report,
                              error=f"{'; '.join(report['failures'])} (the artifact was moved to "
                                    f"{rejected.relative_to(out_dir).as_posix()})")
            record = dataclasses.replace(record, eval=report)
        # Which CPUs compute it as verified, and the one it was verified on (not in the file:
        # its bytes would then depend on the machine that built it).
        return finish(Status.BUILT, **artifact_files(result.artifact, out_dir),
                      cpu={**result.artifact.description.extra.get("cpu", {}), "verified_on": result.report.cpu})
    except ParityError as exc:
        raise_if_interrupted()        # Ctrl-C in the form of a failure: not this artifact's
        return finish(Status.FAILED_PARITY, error=str(exc), parity=parity_summary(exc.report))
    except OutputError:
        raise           # the disk under the build's output: every other artifact would fail the same way
    except EvitError as exc:
        raise_if_interrupted()
        return finish(Status.FAILED_EXPORT, error=str(exc))
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a converter crash fails this artifact, not the build
        raise_if_interrupted()
        return finish(Status.FAILED_EXPORT, error=named_first_line(exc))


def verifiable_here(plan) -> bool:
    verdict = judge(plan.target.cpu_needs(plan.options))
    return verdict.runs and verdict.exact


def exit_status(result: BuildResult) -> EvitError | None:
    """The error a failed build exits with: parity failures take precedence."""
    if any(r.status.failed_verification for r in result.records):
        return ParityError(f"{len(result.failed)} artifact(s) failed; see {result.manifest}")
    if result.failed:
        return ExportError(f"{len(result.failed)} artifact(s) failed to export; see {result.manifest}")
    return None
