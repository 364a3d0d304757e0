"""The contract every export target fulfils, and the option schema they share.

A target is a class with a ``name``, what it ``produces``, the Python packages it
``requires``, an ``Options`` dataclass, ``export(traced, options, path, reporter)`` and
``run(path, inputs)``. Targets are found through the ``evit_deploy.targets`` entry-point
group, so a package that declares one adds a target without touching evit-deploy. A
target owns everything about itself: its options, the commands it adds to the CLI
(:meth:`Target.commands`), what it says about an artifact's health
(:meth:`Target.health`) and how it times its operators (:meth:`Target.profile_ops`).
Target modules import nothing of evit-deploy's command layer (``api``, ``cli``,
``bench``, ``profiler``, ``build``); ``tests/test_layers.py`` enforces it.

Target modules must import their heavy dependencies (torch, converters, runtimes)
inside methods: the registry imports every target module to list them, and ``run`` for
ONNX and TVM artifacts must work where torch is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..cpufeatures import INT8_KERNELS, CpuNeeds
from ..description import ModelDescription
from ..errors import BadInputError, MissingDependencyError, first_line, unknown_name


#: The numeric precisions an artifact can compute in. Every target has one ``precision``
#: option; it declares which of these it exports with :func:`precision_option` (a target
#: without one exports fp32 only, see :func:`parse_options`).
PRECISIONS = ("fp32", "fp16", "bf16", "int8")


def option(default, help: str, *, choices: tuple | None = None, flag: str | None = None):
    """Declare one export option: its default, help text and allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag})


def precision_option(default: str, supported: tuple[str, ...], help: str = "numeric precision of the artifact"):
    """The ``precision`` option of a target that exports the ``supported`` precisions (a
    subset of :data:`PRECISIONS`). Asking for another one of :data:`PRECISIONS` is the
    one-line error "target 'x' does not support precision 'bf16'", not "unknown value"."""
    unknown = sorted(set(supported) - set(PRECISIONS))
    if unknown or default not in supported:
        raise ValueError(f"precision_option: {unknown or default!r} is not one of {PRECISIONS}")
    return field(default=default, metadata={"help": help, "choices": tuple(supported), "flag": None,
                                            "vocabulary": PRECISIONS})


def int8_kernels_option():
    """The ``int8_kernels`` option of a target whose int8 artifacts run u8×s8 kernels
    (see :mod:`evit_deploy.cpufeatures`)."""
    return option(INT8_KERNELS[0], "which x86 CPUs compute --precision int8 exactly: portable (7-bit weights: "
                  "every CPU) or vnni (8-bit weights: only CPUs with AVX512-VNNI, AVX-VNNI or AMX; others "
                  "saturate)", choices=INT8_KERNELS)


@dataclass(frozen=True)
class Finding:
    """One fact about a target on this machine (``evit-deploy doctor``) or about an
    artifact (:meth:`Target.health`)."""

    level: str              # "ok" | "warning" | "error" (error: the target or artifact is unusable)
    message: str
    advice: str = ""


@dataclass
class OpTime:
    """One operator's time, as a target's profiler reports it (``evit-deploy profile``)."""

    name: str                 # operator/kernel name as the runtime reports it
    seconds: float            # total over the profiled iterations
    block: str | None = None  # block kind of the network, where the runtime knows it


@dataclass
class CommandResult:
    """What a target's command returns: data for ``--json`` and renderables for people."""

    data: Any
    tables: list = field(default_factory=list)      # Rich renderables, printed in order
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Command:
    """A command a target adds to the CLI: ``evit-deploy NAME ...``.

    ``function`` declares its parameters as any Typer command does (``typer.Argument`` and
    ``typer.Option`` defaults), plus a ``reporter`` parameter that the CLI fills in with
    its progress display; it returns a :class:`CommandResult`. The CLI adds ``--json`` and
    turns :class:`~evit_deploy.errors.EvitError` into its one-line message and exit code.
    """

    name: str
    function: Callable[..., CommandResult]


@dataclass
class Artifact:
    """An exported artifact: the file users open, plus files it needs beside it."""

    path: Path
    target: str
    description: ModelDescription
    sidecars: tuple[Path, ...] = ()

    @property
    def files(self) -> tuple[Path, ...]:
        return (*self.sidecars, self.path)


def file_key(path) -> tuple[str, int]:
    """(resolved path, modification time) of an artifact file: the key under which a
    runtime's loaded model is cached, so a file written again is loaded again."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"artifact not found: {path}")
    return str(path.resolve()), path.stat().st_mtime_ns


class Sessions:
    """A runtime's loaded artifacts, for a target's ``run`` and ``open_session``.

    ``session_class`` names the runtime's session class (``"package.module:Session"``,
    imported when first needed, so the target's module stays light); it is called as
    ``cls(path, threads=...)`` and a session as ``session(inputs) -> outputs``.
    :meth:`cached` keeps the last few files loaded while they are unchanged (``verify``
    reads a description, then runs the same file many times); :meth:`open` loads a new
    one with its own thread count (benchmarks).
    """

    def __init__(self, session_class: str, maxsize: int = 2):
        self._session_class = session_class
        self._cached = lru_cache(maxsize=maxsize)(self._load)

    def _cls(self):
        module, name = self._session_class.split(":")
        return getattr(importlib.import_module(module), name)

    def _load(self, path: str, mtime_ns: int):
        return self._cls()(Path(path))

    def cached(self, path):
        return self._cached(*file_key(path))

    def open(self, path, threads: int | None = None):
        file_key(path)             # a missing file is bad input, before the runtime sees it
        return self._cls()(Path(path), threads=threads)


def missing_modules(needed: dict[str, str]) -> dict[str, str]:
    """The entries of ``needed`` (import name -> pip package) that cannot be imported."""
    return {mod: pip for mod, pip in needed.items() if importlib.util.find_spec(mod) is None}


class Target:
    """Base class of export targets. Subclasses set the class attributes and override
    :meth:`export`, :meth:`run` and :meth:`read_description`."""

    name: ClassVar[str]
    produces: ClassVar[str]                       # "ONNX model (.onnx)"
    suffixes: ClassVar[tuple[str, ...]]           # artifact file/directory suffixes it reads
    requires: ClassVar[dict[str, str]] = {}       # import name -> pip package, for export
    run_requires: ClassVar[dict[str, str]] = {}   # import name -> pip package, for run
    supports_dynamic_batch: ClassVar[bool] = False
    Options: ClassVar[type] = None                # a dataclass built with option()
    # Whether two exports from the same inputs give byte-identical files; if not, the
    # note says what determines the artifact (recorded in build manifests).
    reproducible: ClassVar[bool] = True
    reproducibility_note: ClassVar[str] = ""
    # The name `evit-deploy bench --backends` knows this target's runtime by, if any.
    benchmark_backend: ClassVar[str | None] = None
    # Short flags `bench` and `profile` accept for this target's options, e.g. TVM's
    # {"--db": "db"}: `--db DIR` is `-O tvm.db=DIR`.
    option_shortcuts: ClassVar[dict[str, str]] = {}
    # Whether profile_ops() can time this target's operators.
    supports_profiling: ClassVar[bool] = False

    # -- what the framework asks of a target ------------------------------------------------
    def validate(self, options) -> None:
        """Check options against the world before the (slow) trace: files they name, a
        database's target, ... Raises :class:`BadInputError`; changes nothing."""

    def input_format(self, options) -> str:
        """The input format to trace the model with (see preprocess.INPUT_FORMATS)."""
        return "normalized"

    def precision(self, options) -> str:
        """The parity tolerance class of an export with these options: its ``precision``
        option (fp32, fp16, bf16, int8), unless the target knows better (Core ML's
        weight-only compression is "compressed")."""
        return getattr(options, "precision", None) or "fp32"

    @classmethod
    def precisions(cls) -> tuple[str, ...]:
        """The precisions this target exports: its ``precision`` option's choices (fp32
        alone for a target without one)."""
        found = next((f for f in option_fields(cls.Options) if f.name == PRECISION), None)
        return tuple(found.metadata.get("choices") or (found.default,)) if found else ("fp32",)

    def cpu_needs(self, options) -> CpuNeeds:
        """What an artifact exported with these options needs of the CPU it runs on: the
        instruction sets its code is compiled for, and what its kernels need to compute as
        verified. Runtimes that choose kernels by CPUID at load time need nothing."""
        return CpuNeeds()

    def default_batch(self, options, model: str) -> tuple[int, str] | None:
        """(batch, why) to export ``model`` (the name the trace gives it: ``efficientvit_m4``
        or a factory spec) at when the user names no batch; None: 1."""
        return None

    def artifact_name(self, description: ModelDescription, options) -> str:
        return f"{description.stem}{self.variant(options)}{self.suffixes[0]}"

    def variant(self, options) -> str:
        """The file-name suffix that lets the variants of one model sit side by side
        (``evit-deploy eval dist/*.onnx``): the precision, and full-range int8 kernels."""
        precision = getattr(options, PRECISION, None) or "fp32"
        suffix = "" if precision == "fp32" else f"_{precision}"
        if precision == "int8" and getattr(options, "int8_kernels", INT8_KERNELS[0]) != INT8_KERNELS[0]:
            suffix += f"_{options.int8_kernels}"
        return suffix

    def export(self, traced, options, path: Path, reporter) -> Artifact:  # pragma: no cover - abstract
        """Write the artifact at ``path`` (and any sidecars next to it); warnings for the
        person exporting go to ``reporter`` (a :class:`~evit_deploy.progress.Reporter`)."""
        raise NotImplementedError

    @classmethod
    def commands(cls) -> list[Command]:
        """The commands this target adds to the CLI (TVM: ``tune``)."""
        return []

    def health(self, path: Path, description: ModelDescription) -> list[Finding]:
        """What a user of this artifact should know about how well it will run (TVM: how
        many kernels have a tuned schedule). Benchmarks and reports show the warnings."""
        return []

    def profile_ops(self, path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                    blocks: dict[str, str]) -> list[OpTime]:
        """Per-operator times of ``iterations`` runs on ``inputs`` (after a warm-up);
        ``blocks`` maps PyTorch module paths to block kinds, for runtimes that keep them.
        Only for targets with ``supports_profiling``."""
        raise BadInputError(f"target '{self.name}' cannot report per-operator times")

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # pragma: no cover
        """Run the artifact with its own runtime on named inputs; outputs by name."""
        raise NotImplementedError

    def read_description(self, path: Path) -> ModelDescription:  # pragma: no cover - abstract
        raise NotImplementedError

    def runtime_name(self, path: Path) -> str:
        """Which engine :meth:`run` uses, for reports (e.g. "onnxruntime 1.32 (CPU)")."""
        return self.name

    def recognizes(self, path: Path) -> bool:
        return any(str(path).endswith(s) for s in self.suffixes)

    def diagnose(self) -> list[Finding]:
        """Whether this target can work here, and why not. Targets add their own facts
        (known-bad package versions, which runtime will run artifacts, ...)."""
        missing = self.missing_packages()
        if missing:
            return [Finding("error", f"missing Python packages: {', '.join(sorted(set(missing.values())))}",
                            f"pip install {' '.join(sorted(set(missing.values())))}")]
        findings = []
        for module in {**self.requires, **self.run_requires}:
            try:
                importlib.import_module(module)
            except Exception as exc:  # installed but broken: report, do not crash doctor
                findings.append(Finding("error", f"'{module}' is installed but fails to import: "
                                                 f"{type(exc).__name__}: {first_line(exc)}",
                                        f"reinstall it: pip install --force-reinstall {self.requires.get(module) or self.run_requires[module]}"))
        return findings or [Finding("ok", "required packages import")]

    def open_session(self, path: Path, threads: int | None = None):
        """A callable ``inputs -> outputs`` with the artifact loaded once, for repeated runs
        (benchmarks, servers). ``threads`` caps the runtime's intra-op threads."""
        return lambda inputs: self.run(path, inputs)

    def parity_extras(self, path: Path, report) -> dict:
        """Target-specific facts to add to a parity report (e.g. fp16 drift)."""
        return {}

    def run_batched(self, path: Path, x: np.ndarray, description: ModelDescription) -> dict[str, np.ndarray]:
        """Run any number of inputs through an artifact with a fixed batch size.

        Inputs are fed in chunks of the artifact's batch; the last chunk is padded by
        repeating its final item and the padding is dropped from the outputs.
        """
        batch = description.batch or len(x)
        chunks = []
        for start in range(0, len(x), batch):
            part = x[start:start + batch]
            n = len(part)
            if n < batch:
                part = np.concatenate([part, np.repeat(part[-1:], batch - n, axis=0)])
            out = self.run(path, {description.input.name: part})
            chunks.append({k: np.asarray(v)[:n] for k, v in out.items()})
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}

    # -- shared helpers --------------------------------------------------------------------
    @classmethod
    def missing_packages(cls, for_run: bool = False) -> dict[str, str]:
        return missing_modules(cls.run_requires if for_run else {**cls.requires, **cls.run_requires})

    @classmethod
    def check_available(cls, for_run: bool = False) -> None:
        missing = cls.missing_packages(for_run)
        if missing:
            raise MissingDependencyError(
                f"target '{cls.name}' needs {', '.join(sorted(missing))}: "
                f"pip install {' '.join(sorted(set(missing.values())))}")

    @classmethod
    def parse_options(cls, values: dict[str, Any] | None = None, *, source: str = "options"):
        """Validate a mapping of option values (from a build file, a profile or Python)."""
        return parse_options(cls.Options, values or {}, target=cls.name, source=source)


# -- option schema -------------------------------------------------------------------------

PRECISION = "precision"


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
