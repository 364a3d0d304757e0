"""``evit-deploy tune``: tune a model's kernels for a TVM target into a database.

Usage from Python::

    from evit_deploy.targets.tvm.tune import tune
    result = tune("m4", "llvm -mcpu=broadwell", time_budget="30m", db_dir="tuning/broadwell")

Re-running with the same database continues where the last run stopped: kernels already
in it start from their best schedules and are not measured again.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...errors import BadInputError, OutputError, first_line
from ...fsutil import room_error, write_error
from ...progress import Reporter, stop_signals_to
from ..options import parse_duration
from .database import model_key, versions
from .policy import trial_budget
from .target_string import to_classic

#: Free space a tune needs to go on after a round: its records and log lines are small.
WRITE_MARGIN_BYTES = 1 << 20

#: Candidates built and measured together; small rounds let a small budget reach every task.
TRIALS_PER_ROUND = 16


@dataclass
class TuneResult:
    db_path: Path
    model: str
    input_shape: tuple[int, ...]
    target: dict
    target_string: str
    kernels: int
    trials: int                          # measured in this run
    total_trials: int                    # records for this model's kernels, all runs
    seconds: float
    stopped: str                         # "trials" | "time budget" | "all kernels exhausted" | "interrupted"
    estimated_latency_ms: float | None   # sum over kernels of calls x best latency
    errors: int
    measured_on: str
    log_path: Path | None = None
    per_kernel: list[dict] = field(default_factory=list)
    # [seconds into the run, trials, estimated latency in ms] after each round that had an
    # estimate: how fast the run converged (benchmarks/tune_convergence.py compares runs).
    curve: list[list[float]] = field(default_factory=list)

    @property
    def estimated_images_per_s(self) -> float | None:
        if not self.estimated_latency_ms:
            return None
        return self.input_shape[0] / (self.estimated_latency_ms / 1e3)

    @property
    def hand_written_kernels(self) -> int:
        return sum(k["hand_written"] for k in self.per_kernel)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["db_path"] = str(self.db_path)
        data["log_path"] = str(self.log_path) if self.log_path else None
        data["estimated_images_per_s"] = self.estimated_images_per_s
        return data


@dataclass(frozen=True)
class TuneRequest:
    """A checked ``tune`` request."""

    model: str
    target: dict                         # canonical (target_string.resolve_target)
    batch: int
    img_size: int
    trials: int | None
    budget_s: float | None
    db_dir: Path | None
    rpc: object | None                   # measure.RpcSpec
    seed: int
    trials_per_round: int
    start_from: object | None = None     # database.TuningDatabase to take a head start from
    precision: str = "fp32"


def tune(model: str = "m0", target: str | dict = "native", *, trials: int | None = None,
         time_budget=None, db_dir: str | Path | None = None, batch: int = 16, threads: int | None = None,
         img_size: int = 224, rpc_tracker: str | None = None, rpc_key: str | None = None,
         seed: int = 0, trials_per_round: int = TRIALS_PER_ROUND, start_from: str | Path | None = None,
         precision: str = "fp32", reporter: Reporter | None = None) -> TuneResult:
    """Tune ``model``'s kernels at ``batch`` x 3 x ``img_size``² for ``target``.

    The budget is ``trials`` (measured candidates in this run) and/or ``time_budget``
    (seconds or ``"30m"``); without either, :data:`.policy.DEFAULT_TRIALS_PER_KERNEL` per kernel.
    ``threads`` sets the target's ``num-cores``: kernels are tuned and measured for that
    many threads. With ``rpc_tracker`` (``HOST:PORT``) and ``rpc_key``, candidates are built
    here and timed on every device registered with the tracker under that key.
    ``start_from`` is another tuning database (made for another CPU, say): its best
    schedule for each kernel is measured here beside the default, a head start.
    ``precision="bf16"`` tunes the kernels of a bf16 library (export ``--precision bf16``).
    """
    reporter = reporter or Reporter()
    request = tuning_request(model, target, trials=trials, time_budget=time_budget, db_dir=db_dir, batch=batch,
                             threads=threads, img_size=img_size, rpc_tracker=rpc_tracker, rpc_key=rpc_key,
                             seed=seed, trials_per_round=trials_per_round, start_from=start_from,
                             precision=precision)
    devices, measured_on = _measurement_devices(request)
    db = _open_database(request, reporter)
    try:
        return _tune(request, db, devices, measured_on, reporter)
    finally:
        db.close()


def _tune(request: TuneRequest, db, devices, measured_on, reporter: Reporter) -> TuneResult:
    model_name, shape, kernels = _model_kernels(request, reporter)
    key = model_key(model_name, shape, request.precision)
    trials = trial_budget(request.trials, request.budget_s, len(kernels))
    with tuning_log(db.path, model_name) as (log, log_file):
        run = _TuningRun(db, key, model_name, shape, len(kernels), measured_on, log, log_file)
        try:
            search = _search(request, kernels, db, devices, trials, reporter, run)
        except BaseException as exc:
            if isinstance(exc, KeyboardInterrupt):
                reporter.warn(f"interrupted: {db.path} keeps every finished measurement; run the same command "
                              f"to continue from it")
            with suppress(OutputError):     # what stopped the run may be the disk its record goes to
                run.record()
            raise
        run.record()
    return TuneResult(db.path, model_name, shape, request.target, to_classic(request.target), len(kernels),
                      search.trials_done, sum(s.total_trials for s in search.states), run.seconds, run.stopped,
                      run.estimate * 1e3 if run.estimate else None, search.errors, measured_on, run.log_path,
                      [{"kernel": s.name, "calls": s.calls, "best_ms": s.best_s * 1e3 if s.best_s else None,
                        "trials": s.total_trials, "hand_written": s.best_hand_written}
                       for s in sorted(search.states, key=lambda s: -(s.calls * (s.best_s or 0)))],
                      run.curve)


def tuning_request(model: str, target: str | dict, *, trials, time_budget, db_dir, batch: int, threads,
                   img_size: int, rpc_tracker, rpc_key, seed: int, trials_per_round: int,
                   start_from=None, precision: str = "fp32") -> TuneRequest:
    """Check every argument of :func:`tune` (one-line errors) before any work."""
    from .. import get_target
    from .measure import parse_tracker
    from .quantize import PRECISIONS, require_bf16
    from .target_string import resolve_target

    get_target("tvm").check_available()
    _check_tuning_dependencies()
    if trials is not None and trials < 1:
        raise BadInputError(f"--trials must be at least 1, got {trials}")
    budget_s = parse_duration(time_budget) if time_budget is not None else None
    if batch < 1:
        raise BadInputError(f"--batch must be at least 1, got {batch}")
    if trials_per_round < 1:
        raise BadInputError(f"trials per round must be at least 1, got {trials_per_round}")
    rpc = None
    if rpc_tracker is not None or rpc_key is not None:
        if rpc_tracker is None:
            raise BadInputError("--rpc-key needs --rpc-tracker HOST:PORT")
        rpc = parse_tracker(rpc_tracker, rpc_key)
    if precision not in PRECISIONS:
        from ...errors import unknown_name
        raise unknown_name("precision", precision, list(PRECISIONS))
    canonical = resolve_target(target, threads=threads)
    if precision == "bf16":
        require_bf16(canonical)
    other = None
    if start_from is not None:
        from .database import TuningDatabase
        other = TuningDatabase.open(start_from)
    return TuneRequest(model, canonical, batch, img_size, trials, budget_s,
                       Path(db_dir) if db_dir is not None else None, rpc, seed, trials_per_round, other, precision)


LOCAL = "this machine"


def measuring_cpu() -> dict:
    """The CPU candidates are timed on here, as a database records it."""
    from ...hostinfo import cpu_info

    info = cpu_info()
    return {"model": info["model"], "vector_extensions": info["vector_extensions"]}


def _measurement_devices(request: TuneRequest) -> tuple[int, str]:
    """How many devices time candidates, and where they are."""
    from .measure import free_devices

    rpc = request.rpc
    if rpc is None:
        return 1, LOCAL
    devices = free_devices(rpc)
    if devices == 0:
        raise BadInputError(f"no device is registered with the tracker {rpc.host}:{rpc.port} under key "
                            f"'{rpc.key}'; start one with: python -m tvm.exec.rpc_server "
                            f"--tracker {rpc.host}:{rpc.port} --key {rpc.key}")
    return devices, f"{devices} device(s) '{rpc.key}' via tracker {rpc.host}:{rpc.port}"


def _open_database(request: TuneRequest, reporter: Reporter):
    from . import graph
    from .database import TuningDatabase, default_path

    db = TuningDatabase.open_or_create(request.db_dir or default_path(request.target), request.target,
                                       graph=graph.VERSION)
    for problem in (db.version_mismatch(), db.graph_mismatch(graph.VERSION)):
        if problem:
            reporter.warn(problem + "; its records may no longer apply")
    return db


def _model_kernels(request: TuneRequest, reporter: Reporter):
    """(model name, input shape, kernels) of the model as export will compile it."""
    from ...tracing import trace
    from . import graph
    from .metaschedule import extract_kernels
    from .target_string import to_tvm

    with reporter.stage("trace", str(request.model)):
        traced = trace(request.model, None, batch=request.batch, img_size=request.img_size)
    desc = traced.description
    tvm_target = to_tvm(request.target)
    with reporter.stage("import", f"Relax, {graph.DEFAULT_LAYOUT}"):
        kernels = extract_kernels(graph.prepare(graph.import_program(traced.program), tvm_target,
                                                precision=request.precision), tvm_target)
    if not kernels:
        raise BadInputError(f"{desc.model} has no kernels to tune")
    return desc.model, tuple(desc.input.shape), kernels


class _TuningRun:
    """What one run did, recorded into the database when it ends, however it ends."""

    def __init__(self, db, key: str, model: str, shape: tuple, kernels: int, measured_on: str,
                 log: logging.Logger, log_file: "_LogFile"):
        self.db, self.key, self.model, self.shape, self.kernels = db, key, model, shape, kernels
        self.measured_on, self.log, self.log_file = measured_on, log, log_file
        self.log_path = log_file.path
        self.cpu = measuring_cpu() if measured_on == LOCAL else None
        self.started_at, self.started = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.monotonic()
        self.search = None
        self.settings = None
        self.stopped = "interrupted"
        self.estimate = None
        self.seconds = 0.0
        self.curve: list[list[float]] = []

    def check_writes(self) -> None:
        """After a round: stop with an :class:`OutputError` if the database or the log could
        not be written. MetaSchedule's appends fail silently: on a full disk the rest of
        the budget would go to measurements that are not kept, and a later append after a
        line cut short would damage the file for good."""
        cut, failure = self.db.cut_short(), self.log_file.failure
        if cut is None and failure is None:
            return
        why = first_line(failure) if failure else "a line was cut short"
        reason = (room_error(self.db.path, WRITE_MARGIN_BYTES) or write_error(failure)
                  or f"cannot write {cut or self.log_path}: {why}")
        raise OutputError(f"{reason}; the rounds before this one are kept: run the same command to continue "
                          f"once it can be written")

    def record(self) -> None:
        self.seconds = time.monotonic() - self.started
        search = self.search
        if search is None:
            return
        self.estimate = search.estimated_latency()
        db = self.db
        entry = db.update_model(
            self.key, model=self.model, input_shape=list(self.shape), kernels=self.kernels,
            trials=sum(s.total_trials for s in search.states),
            seconds=round(db.models().get(self.key, {}).get("seconds", 0.0) + self.seconds, 1),
            estimated_latency_ms=round(self.estimate * 1e3, 4) if self.estimate else None)
        db.add_run(self.key, {"started": self.started_at, "seconds": round(self.seconds, 1),
                              "trials": search.trials_done, "stopped": self.stopped, "errors": search.errors,
                              "measured_on": self.measured_on, "cpu": self.cpu, "settings": asdict(self.settings),
                              "versions": versions(), "log": str(self.log_path.relative_to(db.path)),
                              "curve": self.curve})
        db.save_meta()
        self.log.info("stopped (%s) after %.0f s: %d trials, %d errors; estimated latency %s",
                      self.stopped, self.seconds, search.trials_done, search.errors,
                      entry.get("estimated_latency_ms"))


def _search(request: TuneRequest, kernels, db, devices: int, trials, reporter: Reporter, run: _TuningRun):
    """Build the measuring machinery, run the loop, and shut the machinery down."""
    from .measure import Builder, Runner, settings_for_machine
    from .search import Search
    from .target_string import to_tvm

    target = request.target
    settings = run.settings = settings_for_machine(target["num-cores"], remote=request.rpc is not None)
    deadline = run.started + request.budget_s if request.budget_s is not None else None
    log = run.log
    log.info("tuning %s for %s (%s) into %s; %d kernels; budget %s trials, %s s; measured on %s; %s",
             run.key, to_classic(target), target, db.path, len(kernels), trials, request.budget_s, run.measured_on,
             settings.describe())
    builder = runner = None
    try:
        builder = Builder(settings)
        runner = Runner(settings, rpc=request.rpc, devices=devices)
        start_from = None
        if request.start_from is not None:
            other = request.start_from
            start_from = other.ms_database()
            reporter.info(f"starting from {other.path} (made for '{other.meta['target_string']}'"
                          + (f", measured on {', '.join(sorted(other.measured_on_cpus()))}"
                             if other.measured_on_cpus() else "") + "): its best schedules are measured here first")
        search = run.search = Search(kernels, to_tvm(target), db.ms_database(), builder, runner, logger=log,
                                     trials_per_round=request.trials_per_round,
                                     search_threads=settings.build_workers, seed=request.seed,
                                     start_from=start_from)
        resumed = sum(s.previous_trials for s in search.states)
        if resumed:
            reporter.info(f"resuming: {resumed} measured schedules of these kernels are already in {db.path}")
        reporter.info(f"{len(kernels)} kernels; measuring on {run.measured_on}; {settings.describe()}")
        run.stopped = _run(search, reporter, run, trials, request.budget_s, deadline)
        return search
    finally:
        for part in (builder, runner):
            if part is not None:
                part.shutdown()


def _run(search, reporter: Reporter, run: _TuningRun, trials, budget_s, deadline) -> str:
    model, log, curve = run.model, run.log, run.curve
    by_time = trials is None
    total = round(budget_s) if by_time else trials
    unit = "s" if by_time else "trials"
    with reporter.task(f"tuning {model} ({unit})", total=total) as bar:
        def on_round(p):
            est = p.estimated_latency_s
            batch_info = "" if est is None else f"{est * 1e3:.2f} ms/batch"
            if est is not None:
                curve.append([round(p.elapsed_s, 1), p.trials_done, round(est * 1e3, 4)])
            bar.update(completed=min(total, round(p.elapsed_s) if by_time else p.trials_done),
                       kernel=p.kernel.name[:32], measured=f"{p.kernels_measured}/{p.kernels_total}",
                       trials=p.trials_done,
                       best=f"{p.kernel.best_s * 1e3:.3f} ms" if p.kernel.best_s else "-",
                       model=batch_info or "after every kernel has one",
                       errors=p.errors)
            log.info("round %d: %s best %s ms after %d trials; %d/%d kernels measured; estimate %s; errors %d",
                     p.rounds, p.kernel.name, f"{p.kernel.best_s * 1e3:.4f}" if p.kernel.best_s else None,
                     p.kernel.total_trials, p.kernels_measured, p.kernels_total, batch_info, p.errors)
            run.check_writes()
        def first_ctrl_c():
            reporter.warn("stopping after the current round (Ctrl-C again to stop at once, losing that round)")
        with ctrl_c_between_rounds(first_ctrl_c) as stop_requested:
            return search.run(max_trials=trials, deadline=deadline, on_round=on_round, stop_requested=stop_requested)


@contextmanager
def ctrl_c_between_rounds(on_first):
    """Turn the first Ctrl-C (or SIGTERM) into a request checked between rounds: yields a
    function that returns the signal requested, 0 while none was.

    MetaSchedule's search runs C++ worker threads that call back into Python (the cost
    model); a KeyboardInterrupt raised inside such a callback terminates the process. A
    second one stops at once the ordinary way.
    """
    requested = []

    def handler(signum, frame):
        if requested:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        requested.append(signum)
        on_first()

    with stop_signals_to(handler):              # off the main thread: never called, never requested
        yield lambda: requested[0] if requested else 0


def _check_tuning_dependencies() -> None:
    from ...errors import MissingDependencyError
    from ..base import missing_modules
    from .measure import TUNING_REQUIRES

    missing = missing_modules(TUNING_REQUIRES)
    if missing:
        raise MissingDependencyError(f"tuning needs {', '.join(sorted(missing))}: "
                                     f"pip install {' '.join(sorted(missing.values()))}")


@contextmanager
def tuning_log(db_path: Path, model: str):
    """A logger writing this run's details (ours and MetaSchedule's) to a file in the
    database, and the file's path. The logger is private to the run: nothing global is
    configured, and nothing reaches the terminal, whose display is the progress bar."""
    logs = db_path / "logs"
    logs.mkdir(exist_ok=True)
    path = logs / f"tune-{model}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    handler = _LogFile(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # A Logger made directly (not through logging.getLogger) is in no hierarchy: it
    # propagates nowhere and its children (getChild) only reach its handler.
    log = logging.Logger(f"evit_deploy.tvm.tuning.{model}", logging.INFO)
    log.addHandler(handler)
    try:
        yield log, handler
    finally:
        log.removeHandler(handler)
        handler.close()


class _LogFile(logging.FileHandler):
    """A run's log file that keeps the first failed write (a full disk, say) for the run to
    act on, instead of printing a traceback over the progress bar at every record."""

    failure: OSError | None = None

    def __init__(self, path: Path):
        super().__init__(path, encoding="utf-8")
        self.path = path

    def handleError(self, record) -> None:
        failure = sys.exc_info()[1]
        if isinstance(failure, OSError):
            self.failure = self.failure or failure
        else:                           # a record that does not format: logging's own report
            super().handleError(record)

    def close(self) -> None:
        try:
            super().close()
        except OSError as exc:          # flushing what a full disk refused
            self.failure = self.failure or exc
