"""Export options: how a target declares them, and how values from the command line,
device profiles, build files and Python become a validated ``Options`` dataclass.

A target's ``Options`` is a dataclass whose fields are declared with :func:`option` (or
one of the shared declarations below: :func:`precision_option`,
:func:`calibration_option`, :func:`int8_kernels_option`). An option whose value names a
file or directory says so (``path=True``): a build file resolves it relative to itself
and its contents count in the rebuild key, without guessing from the value.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any

from ..cpufeatures import INT8_KERNELS
from ..errors import BadInputError, unknown_name

#: The numeric precisions an artifact can compute in. Every target has one ``precision``
#: option; it declares which of these it exports with :func:`precision_option` (a target
#: without one exports fp32 only, see :func:`parse_options`).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
PRECISION = "precision"


def option(default, help: str, *, choices: tuple | None = None, flag: str | None = None, path: bool = False):
    """Declare one export option: its default, help text and allowed values; ``path``: its
    value names a file or directory."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "path": path})


def precision_option(default: str, supported: tuple[str, ...] | Mapping[str, str],
                     help: str = "numeric precision of the artifact"):
    """The ``precision`` option of a target that exports the ``supported`` precisions (a
    subset of :data:`PRECISIONS`), or a mapping of each to what it makes, which is then the
    help ("fp32; int8 (int8 weights ...)"). Asking for another one of :data:`PRECISIONS` is
    the one-line error "target 'x' does not support precision 'bf16'", not "unknown value"."""
    if isinstance(supported, Mapping):
        help = "; ".join(f"{p} ({made})" if made else p for p, made in supported.items())
    unknown = sorted(set(supported) - set(PRECISIONS))
    if unknown or default not in supported:
        raise ValueError(f"precision_option: {unknown or default!r} is not one of {PRECISIONS}")
    return field(default=default, metadata={"help": help, "choices": tuple(supported), "flag": None,
                                            "vocabulary": PRECISIONS, "path": False})


def calibration_option():
    """The ``calibration`` option of a target that quantizes to int8 (see
    :mod:`evit_deploy.calibration`)."""
    return option(None, "directory of calibration images for --precision int8; default: the bundled photos and "
                  "seeded crops of them", path=True)


def int8_kernels_option():
    """The ``int8_kernels`` option of a target whose int8 artifacts run u8×s8 kernels
    (see :mod:`evit_deploy.cpufeatures`)."""
    return option(INT8_KERNELS[0], "which x86 CPUs compute --precision int8 exactly: portable (7-bit weights: "
                  "every CPU) or vnni (8-bit weights: only CPUs with AVX512-VNNI, AVX-VNNI or AMX; others "
                  "saturate)", choices=INT8_KERNELS)


def option_fields(options_cls) -> list[dataclasses.Field]:
    return list(dataclasses.fields(options_cls)) if options_cls else []


def _has_precision(options_cls) -> bool:
    return any(f.name == PRECISION for f in option_fields(options_cls))


def _unsupported_precision(value, supported, *, target: str, source: str) -> BadInputError:
    return BadInputError(f"{source}: target '{target}' does not support precision '{value}' "
                         f"(it supports {', '.join(supported)})")


def _check_implicit_precision(value, *, target: str, source: str) -> None:
    """A target without a precision option exports fp32: ``precision = "fp32"`` is
    accepted (so one build file or command line can name the precision of every target),
    any other is refused."""
    if value is None or str(value) == "fp32":
        return
    if str(value) in PRECISIONS:
        raise _unsupported_precision(value, ("fp32",), target=target, source=source)
    raise unknown_name(f"value for {source}: option '{PRECISION}' of target '{target}'", str(value), PRECISIONS)


def _field_type(options_cls, f: dataclasses.Field):
    hints = typing.get_type_hints(options_cls)
    tp = hints[f.name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args else tp


def coerce(options_cls, f: dataclasses.Field, value, *, target: str, source: str):
    """Convert ``value`` to the field's type and check its allowed values."""
    tp = _field_type(options_cls, f)
    label = f"{source}: option '{f.name}' of target '{target}'"
    try:
        if value is None:
            out = None
        elif tp is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                out = value.lower() in ("true", "1", "yes")
            elif isinstance(value, bool):
                out = value
            else:
                raise ValueError(value)
        elif tp is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError(value)
            out = int(value)
        elif tp is float:
            out = float(value)
        else:
            out = str(value)
    except (TypeError, ValueError):
        raise BadInputError(f"{label} must be {getattr(tp, '__name__', tp)}, got {value!r}") from None
    choices = f.metadata.get("choices")
    if choices and out is not None and out not in choices:
        if out in (f.metadata.get("vocabulary") or ()):
            raise _unsupported_precision(out, choices, target=target, source=source)
        raise unknown_name(f"value for {label}", str(out), [str(c) for c in choices])
    return out


def parse_options(options_cls, values: dict[str, Any], *, target: str, source: str):
    if not _has_precision(options_cls) and PRECISION in values:
        values = dict(values)
        _check_implicit_precision(values.pop(PRECISION), target=target, source=source)
    if options_cls is None:
        if values:
            raise BadInputError(f"{source}: target '{target}' takes no options, got {', '.join(values)}")
        return None
    by_name = {f.name: f for f in option_fields(options_cls)}
    kwargs = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in by_name:
            raise unknown_name(f"option for target '{target}' in {source}", key,
                               [f.name for f in by_name.values()])
        kwargs[name] = coerce(options_cls, by_name[name], value, target=target, source=source)
    return options_cls(**kwargs)


def parse_cli_values(options_cls, args: list[str], *, target: str) -> dict[str, Any]:
    """The option values that ``--opset 17 --fp16 --precision=fp32`` style arguments set.

    Only options present in ``args`` appear in the result, so they can override a profile.
    """
    by_flag = {}
    for f in option_fields(options_cls):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        by_flag[flag] = f
        if _field_type(options_cls, f) is bool:
            by_flag["--no-" + flag[2:]] = f
    if not _has_precision(options_cls):
        by_flag["--" + PRECISION] = None        # fp32 only: see _check_implicit_precision
    values: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        flag, _, inline = arg.partition("=")
        if flag not in by_flag:
            raise unknown_name(f"option for target '{target}'", arg, sorted(by_flag) or ["(none)"])
        f = by_flag[flag]
        if f is None:
            if not inline and i + 1 >= len(args):
                raise BadInputError(f"option {flag} of target '{target}' needs a value")
            values[PRECISION] = inline or args[i + 1]
            i += 1 if inline else 2
            continue
        if _field_type(options_cls, f) is bool and not inline:
            values[f.name] = not flag.startswith("--no-")
        elif inline:
            values[f.name] = inline
        else:
            if i + 1 >= len(args):
                raise BadInputError(f"option {flag} of target '{target}' needs a value")
            values[f.name] = args[i + 1]
            i += 1
        i += 1
    return values


def describe_options(options_cls) -> list[tuple[str, str, str]]:
    """(flag, default, help) for each option, for help screens and docs."""
    rows = []
    for f in option_fields(options_cls):
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        choices = f.metadata.get("choices")
        text = f.metadata.get("help", "")
        if choices:
            text += f" [{'|'.join(str(c) for c in choices)}]"
        rows.append((flag, repr(f.default), text))
    return rows


def options_to_dict(options) -> dict:
    return dataclasses.asdict(options) if options is not None else {}


def path_options(options_cls) -> tuple[str, ...]:
    """The names of the options whose values name files or directories."""
    return tuple(f.name for f in option_fields(options_cls) if f.metadata.get("path"))


_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(h|min|m|sec|s)?", re.IGNORECASE)


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
