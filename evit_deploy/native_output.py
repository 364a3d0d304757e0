"""Keeping native libraries' console chatter away from the person running evit-deploy.

Converters and runtimes written in C++ print to the process's file descriptors (TFLite
announces its XNNPACK delegate, MLIR passes log through absl) or, through their Python
bindings, to ``sys.stdout``/``sys.stderr`` (ExecuTorch's runtime reports how it read the
CPU's identity and why a file did not load). None of it is actionable here: failures
arrive as exceptions, with their own message.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def captured() -> Iterator[Callable[[], str]]:
    """Keep what is written meanwhile to file descriptors 1 and 2 and to Python's
    ``sys.stdout``/``sys.stderr``; yields a callable returning the text kept so far."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    python_text = io.StringIO()
    with tempfile.TemporaryFile(mode="w+b") as sink:
        def text() -> str:
            sink.flush()
            sink.seek(0)
            return sink.read().decode("utf-8", "replace") + python_text.getvalue()

        try:
            for fd in saved:
                os.dup2(sink.fileno(), fd)
            with contextlib.redirect_stdout(python_text), contextlib.redirect_stderr(python_text):
                yield text
        finally:
            for fd, original in saved.items():
                os.dup2(original, fd)
                os.close(original)


@contextlib.contextmanager
def quiet_loggers(*names: str) -> Iterator[None]:
    """Raise the root logger (and the loggers ``names``) to ERROR meanwhile: converters
    log every stage, and every tensor they leave alone, at INFO or WARNING on the root
    logger; what matters reaches evit-deploy as exceptions."""
    loggers = [logging.getLogger(), *(logging.getLogger(n) for n in names)]
    levels = [lg.level for lg in loggers]
    for lg, level in zip(loggers, levels):
        lg.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
