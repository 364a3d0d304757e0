"""Progress reporting for long operations, decoupled from how it is shown.

The Python API takes a :class:`Reporter`; the default one only records stage timings and
sends warnings to the ``evit_deploy`` logger. The CLI passes a Rich implementation.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager

log = logging.getLogger("evit_deploy")


class Task:
    """A counted piece of work (e.g. tuning trials); ``update`` is cheap to call often."""

    def __init__(self, description: str, total: float | None):
        self.description = description
        self.total = total
        self.completed = 0.0
        self.fields: dict = {}

    def update(self, *, advance: float = 0, completed: float | None = None,
               description: str | None = None, total: float | None = None, **fields) -> None:
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
        start = time.perf_counter()
        self.stage_started(name, detail)
        ok = False
        try:
            yield
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
