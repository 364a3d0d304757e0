"""Progress reporting for long operations, decoupled from how it is shown.

The Python API takes a :class:`Reporter`; the default one only records stage timings and
sends warnings to the ``evit_deploy`` logger. The CLI passes a Rich implementation.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("evit_deploy")

#: Whether Ctrl-C was pressed during the command (:func:`catch_ctrl_c`).
_ctrl_c = False


def on_ctrl_c(signum, frame) -> None:
    """SIGINT handler of the CLI: raise KeyboardInterrupt, and remember it."""
    global _ctrl_c
    _ctrl_c = True
    raise KeyboardInterrupt


def raise_if_interrupted() -> None:
    """Raise KeyboardInterrupt again if Ctrl-C was pressed and the work went on: raised
    while Python runs a finalizer or weakref callback it is only reported ("Exception
    ignored in ..."), and a library may turn it into an error of its own that drops one
    candidate or artifact. Every stage and progress update checks."""
    if _ctrl_c:
        raise KeyboardInterrupt


@contextmanager
def ctrl_c_deferred():
    """Within the block a Ctrl-C waits and is raised when the block ends: for the few
    renames that must happen together (a new OpenVINO ``.bin`` under an old ``.xml`` would
    be a model nobody made). Main thread only, as signals are; elsewhere a plain block."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pressed = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pressed.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if pressed and callable(previous):
            previous(signal.SIGINT, None)       # the CLI's handler or Python's: KeyboardInterrupt


@contextmanager
def catch_ctrl_c():
    """Within the block, SIGINT goes through :func:`on_ctrl_c` (main thread only; the
    previous handler is restored after), and an exception raised after a Ctrl-C leaves as
    the KeyboardInterrupt it is (TVM's runtime returns one as a RuntimeError, a converter as
    an error of its own)."""
    import signal
    import threading

    global _ctrl_c
    _ctrl_c = False
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        yield
    except Exception:
        raise_if_interrupted()
        raise
    finally:
        signal.signal(signal.SIGINT, previous)
        _ctrl_c = False


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
