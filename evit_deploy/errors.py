"""Errors that reach the user, each with its documented exit code.

The CLI prints ``error: <message>`` (one line) and exits with ``exit_code``; a Python
caller catches :class:`EvitError` or one of its subclasses. Anything else escaping the
CLI is a bug and exits with :data:`EXIT_INTERNAL`.
"""

from __future__ import annotations

import difflib

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_BAD_INPUT = 2
EXIT_EXPORT_FAILED = 3
EXIT_PARITY_FAILED = 4
EXIT_MISSING_DEPENDENCY = 5
EXIT_OUTPUT_ERROR = 6
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143      # 128 + SIGTERM, as a shell reports a process that SIGTERM ended


class EvitError(Exception):
    """Base class: a problem the user can act on."""

    exit_code = EXIT_INTERNAL


class BadInputError(EvitError, ValueError):
    """Unknown name, unreadable or wrong checkpoint, bad image, bad config or target string."""

    exit_code = EXIT_BAD_INPUT


class CheckpointError(BadInputError):
    """A checkpoint that cannot be read, is not a checkpoint, or is for another model."""


class OutOfMemoryError(BadInputError):
    """This machine ran out of memory for the work asked (a batch too large for it): not
    a failed artifact, and not a bug."""


#: How the runtimes say they ran out of memory, besides MemoryError (numpy, Python): torch
#: ("can't allocate memory"), onnxruntime ("Failed to allocate memory"), OpenVINO and TVM
#: (C++ "std::bad_alloc", "out of memory").
_OUT_OF_MEMORY = ("bad_alloc", "can't allocate memory", "cannot allocate memory", "unable to allocate",
                  "failed to allocate memory", "out of memory")


def is_out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or any(phrase in text for phrase in _OUT_OF_MEMORY)


def out_of_memory(exc: BaseException, doing: str = "") -> OutOfMemoryError:
    """``this machine ran out of memory running x.onnx (input 1024x3x224x224) (…); …``."""
    what = " ".join(filter(None, ("this machine ran out of memory", doing)))
    return OutOfMemoryError(f"{what} ({first_line(exc)}); a smaller --batch needs less")


class ExportError(EvitError):
    """A converter or compiler failed on a valid request."""

    exit_code = EXIT_EXPORT_FAILED


class ParityError(EvitError):
    """An artifact does not compute what the PyTorch reference computes."""

    exit_code = EXIT_PARITY_FAILED

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class MissingDependencyError(EvitError):
    """An optional package a target needs is not importable here."""

    exit_code = EXIT_MISSING_DEPENDENCY


class OutputError(EvitError):
    """The output location cannot be written (permissions, full disk, not a directory)."""

    exit_code = EXIT_OUTPUT_ERROR


def unknown_name(kind: str, name: str, valid) -> BadInputError:
    """``unknown model 'm9' (did you mean 'm0'?); valid: ...`` as a :class:`BadInputError`."""
    valid = list(valid)
    spelling = {v.lower(): v for v in valid}      # suggest 'iOS16', not its lower-case form
    close = difflib.get_close_matches(name.lower(), list(spelling), n=1, cutoff=0.5)
    hint = f" (did you mean '{spelling[close[0]]}'?)" if close else ""
    return BadInputError(f"unknown {kind} '{name}'{hint}; valid: {', '.join(valid)}")


def first_line(exc: BaseException, *, skip: tuple[str, ...] = ()) -> str:
    """The first non-empty line of an exception's message (passing over lines that start
    with one of ``skip``, unless nothing else is left), or its type's name when it has
    none: errors reach users as one line, and an empty one says nothing."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(skip)] if skip else lines
    return (useful or lines or [type(exc).__name__])[0]


def named_first_line(exc: BaseException) -> str:
    """``ValueError: its first line`` (``ValueError`` alone when it has no message): for
    errors from code that is not ours (a library, the user's model), where the type says
    what kind of failure it was."""
    name, line = type(exc).__name__, first_line(exc)
    return name if line == name else f"{name}: {line}"
