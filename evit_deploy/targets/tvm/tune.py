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
import re
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ...errors import BadInputError
from ...progress import Reporter

#: Trials per task when neither --trials nor --time-budget is given.
DEFAULT_TRIALS_PER_TASK = 32
#: Candidates built and measured together; small rounds let a small budget reach every task.
TRIALS_PER_ROUND = 16

log = logging.getLogger("evit_deploy.tvm.tuning")


@dataclass
class TuneResult:
    db_path: Path
    model: str
    input_shape: tuple[int, ...]
    target: dict
    target_string: str
    tasks: int
    trials: int                          # measured in this run
    total_trials: int                    # records for this model's kernels, all runs
    seconds: float
    stopped: str                         # "trials" | "time budget" | "all tasks exhausted" | "interrupted"
    estimated_latency_ms: float | None   # sum over kernels of calls x best latency
    errors: int
    measured_on: str
    log_path: Path | None = None
    per_task: list[dict] = field(default_factory=list)

    @property
    def estimated_images_per_s(self) -> float | None:
        if not self.estimated_latency_ms:
            return None
        return self.input_shape[0] / (self.estimated_latency_ms / 1e3)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["db_path"] = str(self.db_path)
        data["log_path"] = str(self.log_path) if self.log_path else None
        data["estimated_images_per_s"] = self.estimated_images_per_s
        return data


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|m|min|s|sec)?", re.IGNORECASE)


def parse_duration(value) -> float:
    """Seconds from ``90``, ``"90s"``, ``"30m"``, ``"1h30m"`` or ``"1.5h"``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    else:
        text = str(value).strip().lower().replace(" ", "")
        pos, seconds = 0, 0.0
        units = {"h": 3600, "m": 60, "min": 60, "s": 1, "sec": 1, None: 1}
        if not text:
            raise BadInputError("empty time budget: write e.g. 30m, 1h or 90s")
        while pos < len(text):
            match = _DURATION.match(text, pos)
            if not match or match.end() == pos:
                raise BadInputError(f"time budget must look like 30m, 1h30m or 90s, got '{value}'")
            number, unit = match.groups()
            if unit is None and match.end() != len(text):
                raise BadInputError(f"time budget must look like 30m, 1h30m or 90s, got '{value}'")
            seconds += float(number) * units[unit]
            pos = match.end()
    if seconds <= 0:
        raise BadInputError(f"time budget must be positive, got '{value}'")
    return seconds


def tune(model: str = "m0", target: str | dict = "native", *, trials: int | None = None,
         time_budget=None, db_dir: str | Path | None = None, batch: int = 16, threads: int | None = None,
         img_size: int = 224, rpc_tracker: str | None = None, rpc_key: str | None = None,
         seed: int = 0, trials_per_round: int = TRIALS_PER_ROUND,
         reporter: Reporter | None = None) -> TuneResult:
    """Tune ``model``'s kernels at ``batch`` x 3 x ``img_size``² for ``target``.

    The budget is ``trials`` (measured candidates in this run) and/or ``time_budget``
    (seconds or ``"30m"``); without either, :data:`DEFAULT_TRIALS_PER_TASK` per kernel.
    ``threads`` sets the target's ``num-cores``: kernels are tuned and measured for that
    many threads. With ``rpc_tracker`` (``HOST:PORT``) and ``rpc_key``, candidates are built
    here and timed on every device registered with the tracker under that key.
    """
    from .. import get_target
    from ...trace import trace
    from . import graph
    from .database import TuningDatabase, default_path, model_key, versions
    from .measure import Builder, Runner, free_devices, parse_tracker, settings_for_machine
    from .search import Search, extract_tasks
    from .target_string import resolve_target, to_classic, to_tvm

    reporter = reporter or Reporter()
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
    canonical = resolve_target(target, threads=threads)
    tvm_target = to_tvm(canonical)
    devices = 1
    measured_on = "this machine"
    if rpc is not None:
        devices = free_devices(rpc)
        if devices == 0:
            raise BadInputError(f"no device is registered with the tracker {rpc.host}:{rpc.port} under key "
                                f"'{rpc.key}'; start one with: python -m tvm.exec.rpc_server "
                                f"--tracker {rpc.host}:{rpc.port} --key {rpc.key}")
        measured_on = f"{devices} device(s) '{rpc.key}' via tracker {rpc.host}:{rpc.port}"
    db = TuningDatabase.open_or_create(db_dir or default_path(canonical), canonical, graph=graph.VERSION)
    stale = db.version_mismatch()
    if stale:
        reporter.warn(stale + "; its records may no longer apply")

    with reporter.stage("trace", str(model)):
        traced = trace(model, None, batch=batch, img_size=img_size)
    desc = traced.description
    shape = tuple(desc.input.shape)
    key = model_key(desc.model, shape)
    with reporter.stage("import", f"Relax, {graph.DEFAULT_LAYOUT}"):
        prepared = graph.prepare(graph.import_program(traced.program), tvm_target)
        tasks = extract_tasks(prepared, tvm_target)
    if not tasks:
        raise BadInputError(f"{desc.model} has no kernels to tune")

    settings = settings_for_machine(canonical["num-cores"], remote=rpc is not None)
    if trials is None and budget_s is None:
        trials = DEFAULT_TRIALS_PER_TASK * len(tasks)
    log_path = _open_log(db.path, desc.model)
    started_at, started = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.monotonic()
    deadline = started + budget_s if budget_s is not None else None
    log.info("tuning %s for %s (%s) into %s; %d kernels; budget %s trials, %s s; measured on %s; %s",
             key, to_classic(canonical), canonical, db.path, len(tasks), trials, budget_s, measured_on,
             settings.describe())

    builder = runner = search = None
    stopped = "interrupted"
    try:
        database = db.ms_database()
        builder = Builder(settings)
        runner = Runner(settings, rpc=rpc, devices=devices)
        search = Search(tasks, tvm_target, database, builder, runner, trials_per_round=trials_per_round,
                        search_threads=settings.build_workers, seed=seed)
        resumed = sum(t.previous_trials for t in tasks)
        if resumed:
            reporter.info(f"resuming: {resumed} measured schedules of these kernels are already in {db.path}")
        reporter.info(f"{len(tasks)} kernels; measuring on {measured_on}; {settings.describe()}")
        stopped = _run(search, reporter, desc.model, trials, budget_s, deadline, started)
    except KeyboardInterrupt:
        reporter.warn(f"interrupted: {db.path} keeps every finished measurement; run the same command to "
                      f"continue from it")
        raise
    finally:
        for part in (builder, runner):
            if part is not None:
                part.shutdown()
        seconds = time.monotonic() - started
        if search is not None:
            estimate = search.estimated_latency()
            entry = db.update_model(
                key, model=desc.model, input_shape=list(shape), tasks=len(tasks),
                trials=sum(t.total_trials for t in tasks),
                seconds=round(db.models().get(key, {}).get("seconds", 0.0) + seconds, 1),
                estimated_latency_ms=round(estimate * 1e3, 4) if estimate else None)
            db.add_run(key, {"started": started_at, "seconds": round(seconds, 1), "trials": search.trials_done,
                             "stopped": stopped, "errors": search.errors, "measured_on": measured_on,
                             "settings": asdict(settings), "versions": versions(),
                             "log": str(log_path.relative_to(db.path))})
            db.save_meta()
            log.info("stopped (%s) after %.0f s: %d trials, %d errors; estimated latency %s",
                     stopped, seconds, search.trials_done, search.errors, entry.get("estimated_latency_ms"))
        _close_log()
    return TuneResult(db.path, desc.model, shape, canonical, to_classic(canonical), len(tasks), search.trials_done,
                      sum(t.total_trials for t in tasks), seconds, stopped,
                      estimate * 1e3 if estimate else None, search.errors, measured_on, log_path,
                      [{"kernel": t.name, "calls": t.weight, "best_ms": t.best_s * 1e3 if t.best_s else None,
                        "trials": t.total_trials, "hand_written": t.best_hand_written}
                       for t in sorted(tasks, key=lambda t: -(t.weight * (t.best_s or 0)))])


def _run(search, reporter: Reporter, model: str, trials, budget_s, deadline, started) -> str:
    by_time = trials is None
    total = round(budget_s) if by_time else trials
    unit = "s" if by_time else "trials"
    with reporter.task(f"tuning {model} ({unit})", total=total) as bar:
        def on_round(p):
            est = p.estimated_latency_s
            batch_info = "" if est is None else f"{est * 1e3:.2f} ms/batch"
            bar.update(completed=min(total, round(p.elapsed_s) if by_time else p.trials_done),
                       kernel=p.task.name[:32], tuned=f"{p.tasks_tuned}/{p.tasks_total}",
                       trials=p.trials_done,
                       best=f"{p.task.best_s * 1e3:.3f} ms" if p.task.best_s else "-",
                       model=batch_info or "after every kernel has one",
                       errors=p.errors)
            log.info("round %d: %s best %s ms after %d trials; %d/%d kernels tuned; estimate %s; errors %d",
                     p.rounds, p.task.name, f"{p.task.best_s * 1e3:.4f}" if p.task.best_s else None,
                     p.task.total_trials, p.tasks_tuned, p.tasks_total, batch_info, p.errors)
        def first_ctrl_c():
            reporter.warn("stopping after the current round (Ctrl-C again to stop at once, losing that round)")
        with ctrl_c_between_rounds(first_ctrl_c) as stop_requested:
            search.run(max_trials=trials, deadline=deadline, on_round=on_round, stop_requested=stop_requested)
    if deadline is not None and time.monotonic() >= deadline:
        return "time budget"
    if trials is not None and search.trials_done >= trials:
        return "trials"
    return "all kernels exhausted"


@contextmanager
def ctrl_c_between_rounds(on_first):
    """Turn the first Ctrl-C into a request checked between rounds.

    MetaSchedule's search runs C++ worker threads that call back into Python (the cost
    model); a KeyboardInterrupt raised inside such a callback terminates the process. A
    second Ctrl-C stops at once the ordinary way.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    requested = []

    def handler(signum, frame):
        if requested:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
            return
        requested.append(True)
        on_first()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield lambda: bool(requested)
    finally:
        signal.signal(signal.SIGINT, previous)


def _check_tuning_dependencies() -> None:
    from ...errors import MissingDependencyError
    from ..base import missing_modules
    from . import TUNING_REQUIRES

    missing = missing_modules(TUNING_REQUIRES)
    if missing:
        raise MissingDependencyError(f"tuning needs {', '.join(sorted(missing))}: "
                                     f"pip install {' '.join(sorted(missing.values()))}")


_handler: logging.Handler | None = None


def _open_log(db_path: Path, model: str) -> Path:
    """Send this run's log (ours and MetaSchedule's) to a file in the database."""
    global _handler
    logs = db_path / "logs"
    logs.mkdir(exist_ok=True)
    path = logs / f"tune-{model}-{time.strftime('%Y%m%d-%H%M%S')}.log"
    _handler = logging.FileHandler(path, encoding="utf-8")
    _handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # The display is the progress bar; the details (MetaSchedule's included) go to the file.
    log.addHandler(_handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    return path


def _close_log() -> None:
    global _handler
    if _handler is not None:
        log.removeHandler(_handler)
        log.propagate = True
        _handler.close()
        _handler = None
