"""Progress reporting for long operations, decoupled from how it is shown.

The Python API takes a :class:`Reporter`; the default one only records stage timings and
sends warnings to the ``evit_deploy`` logger. The CLI passes a Rich implementation.
"""

from __future__ import annotations

import logging
import signal
import time
from contextlib import contextmanager

log = logging.getLogger("evit_deploy")

#: What stops a command the way Ctrl-C does: SIGINT (Ctrl-C) and SIGTERM (``kill``, a
#: cancelled CI job), so that its cleanup runs: staging areas removed, workers stopped.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)

#: The stop signal received during the command, 0 if none (:func:`catch_ctrl_c`).
_stop_signal = 0


class Terminated(KeyboardInterrupt):
    """The command was stopped by SIGTERM."""


def _stop(signum: int) -> KeyboardInterrupt:
    return Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


def on_ctrl_c(signum, frame) -> None:
    """SIGINT and SIGTERM handler of the CLI: raise KeyboardInterrupt (:class:`Terminated`
    for SIGTERM), and remember it."""
    raise stopped_by(signum)


def stopped_by(signum: int) -> KeyboardInterrupt:
    """The exception that stops the command for ``signum``, remembered as the signal that
    stopped it (the exit code says which): for work that defers a signal and stops later,
    such as ``tune`` between rounds."""
    global _stop_signal
    _stop_signal = signum
    return _stop(signum)


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt again if Ctrl-C was pressed and the work went on: raised
    while Python runs a finalizer or weakref callback it is only reported ("Exception
    ignored in ..."), and a library may turn it into an error of its own that drops one
    candidate or artifact. Every stage and progress update checks."""
    if _stop_signal:
        raise _stop(_stop_signal)


@contextmanager
def stop_signals_to(handler):
    """Within the block, SIGINT and SIGTERM go to ``handler``; yields the handlers they had,
    restored when it ends. Main thread only, as signals are: elsewhere nothing changes and
    it yields None."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield None
        return
    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield previous
    finally:
        for s, earlier in previous.items():
            signal.signal(s, earlier)


@contextmanager
def ctrl_c_deferred():
    """Within the block a Ctrl-C (or SIGTERM) waits and is raised when the block ends: for
    the few renames that must happen together (a new OpenVINO ``.bin`` under an old
    ``.xml`` would be a model nobody made)."""
    pressed = []
    previous = None
    try:
        with stop_signals_to(lambda signum, frame: pressed.append(signum)) as previous:
            yield
    finally:
        for signum in pressed[:1]:
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)           # the CLI's handler or Python's: KeyboardInterrupt
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)     # what it would have done at once


@contextmanager
def catch_ctrl_c():
    """Within the block, SIGINT and SIGTERM go through :func:`on_ctrl_c` (main thread only;
    the previous handlers are restored after), and an exception raised after one leaves
    as the KeyboardInterrupt it is (TVM's runtime returns one as a RuntimeError, a
    converter as an error of its own). Yields a list that holds the signal that stopped
    the block, if one did, after it ends."""
    global _stop_signal
    _stop_signal = 0
    stopped_by: list[int] = []
    try:
        with stop_signals_to(on_ctrl_c):
            yield stopped_by
    except Exception:
        raise_if_interrupted()
        raise
    finally:
        if _stop_signal:
            stopped_by.append(_stop_signal)
        _stop_signal = 0


class Task:
    """A counted piece of work (e.g. tuning trials); ``update`` is cheap to call often."""

    def __init__(self, description: str, total: float | None):
        self.description = description
        self.total = total
        self.completed = 0.0
        self.fields: dict = {}

    def update(self, *, advance: float = 0, completed: float | None = None,
               description: str | None = None, total: float | None = None, **fields) -> None:
        raise_if_interrupted()
        self.completed = completed if completed is not None else self.completed + advance
        if description is not None:
            self.description = description
        if total is not None:
            self.total = total
        self.fields.update(fields)


class Reporter:
    def __init__(self):
        self.timings: dict[str, float] = {}
        self.warnings: list[str] = []

    @contextmanager
    def stage(self, name: str, detail: str = ""):
        """Time a named stage (trace, export, verify, ...)."""
        raise_if_interrupted()
        start = time.perf_counter()
        self.stage_started(name, detail)
        ok = False
        try:
            yield
            raise_if_interrupted()
            ok = True
        finally:
            elapsed = time.perf_counter() - start
            self.timings[name] = self.timings.get(name, 0.0) + elapsed
            self.stage_finished(name, detail, elapsed, ok)

    @contextmanager
    def task(self, description: str, total: float | None = None):
        """A progress bar for a loop; yields a :class:`Task` to update."""
        task = Task(description, total)
        yield task

    def stage_started(self, name: str, detail: str) -> None:
        pass

    def stage_finished(self, name: str, detail: str, seconds: float, ok: bool) -> None:
        log.debug("%s %s: %.1f s", name, detail, seconds)

    def info(self, message: str) -> None:
        log.info(message)

    def warn(self, message: str) -> None:
        self.warnings.append(message)
        log.warning(message)


class QuietReporter(Reporter):
    """Records timings and warnings without logging them (work whose warnings the caller
    reports itself, e.g. benchmark artifacts made from synthetic weights on purpose)."""

    def warn(self, message: str) -> None:
        self.warnings.append(message)
