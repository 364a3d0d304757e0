"""The contract every export target fulfils.

A target is a class with a ``name`` (by default its package's), what it ``produces``
(by default the first paragraph of its docstring), the Python packages it ``requires``,
an ``Options`` dataclass, ``export(traced, options, path, reporter)`` and
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

import importlib
import importlib.util
import inspect
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..cpufeatures import INT8_KERNELS, CpuNeeds, check_int8_kernels, int8_cpu_needs
from ..description import ModelDescription
from ..errors import BadInputError, MissingDependencyError, named_first_line
from ..native_output import captured
from .options import PRECISION, option_fields, parse_options
from .sessions import SessionCache, package_files

#: One cache of loaded artifacts per target class (see :meth:`Target.sessions`).
_session_caches: dict[type, SessionCache] = {}


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


def missing_modules(needed: dict[str, str]) -> dict[str, str]:
    """The entries of ``needed`` (import name -> pip package) that cannot be imported."""
    return {mod: pip for mod, pip in needed.items() if importlib.util.find_spec(mod) is None}


#: What a target package's ``runtime`` module may define, each called by the method of
#: the same name: ``runtime_name(path)``, ``read_description(path)``,
#: ``artifact_files(path)``, ``health(path, description)``, ``parity_extras(session)``,
#: ``host_findings()``.
RUNTIME_FUNCTIONS = ("runtime_name", "read_description", "artifact_files", "health", "parity_extras",
                     "host_findings")


def _has_module(package: str | None, module: str) -> bool:
    return package is not None and importlib.util.find_spec(f"{package}.{module}") is not None


@lru_cache(maxsize=None)
def _package_function(package: str | None, module: str, function: str) -> Callable | None:
    """``<package>.<module>.<function>`` where the package has it: looked up once (a hook
    such as ``artifact_files`` is asked on every run of a cached session), imported only
    when the method that needs it is first called (heavy runtimes, see above)."""
    if not _has_module(package, module):
        return None
    return getattr(importlib.import_module(f"{package}.{module}"), function, None)


class Target:
    """Base class of export targets. A target package (``targets/<name>/``) sets the class
    attributes in its ``__init__``; the rest comes from its modules by name: :meth:`export`
    is its ``convert.export``, its artifacts are loaded by its ``runtime.Session``
    (:attr:`session_class`), :meth:`profile_ops` is its ``profile.profile_ops``, and each
    method listed in :data:`RUNTIME_FUNCTIONS` is its ``runtime`` module's function of that
    name where it has one."""

    name: ClassVar[str]                           # default: its package's name (targets/<name>/)
    produces: ClassVar[str]                       # default: its docstring ("ONNX model (.onnx), ...")
    suffixes: ClassVar[tuple[str, ...]]           # artifact file/directory suffixes it reads
    requires: ClassVar[dict[str, str]] = {}       # import name -> pip package, for export
    run_requires: ClassVar[dict[str, str]] = {}   # import name -> pip package, for run (default: requires)
    supports_dynamic_batch: ClassVar[bool] = False
    Options: ClassVar[type] = None                # a dataclass built with option()
    # Whether two exports from the same inputs give byte-identical files; if not, the
    # note says what determines the artifact (recorded in build manifests).
    reproducible: ClassVar[bool] = True
    reproducibility_note: ClassVar[str] = ""
    # The name `evit-deploy bench --backends` knows this target's runtime by (default: the
    # target's name; None: no runtime to time here).
    benchmark_backend: ClassVar[str | None] = None
    # Short flags `bench` and `profile` accept for this target's options, e.g. TVM's
    # {"--db": "db"}: `--db DIR` is `-O tvm.db=DIR`.
    option_shortcuts: ClassVar[dict[str, str]] = {}
    # The runtime's loaded artifact, "package.module:Class" (imported when first needed):
    # ``Class(path, threads=None)``, called with inputs by name, returns outputs by name, and
    # has the artifact's ``description``. A target runs, opens sessions and reads
    # descriptions through one cache of them (:meth:`sessions`). Default for a target
    # package: its ``runtime:Session``.
    session_class: ClassVar[str | None] = None
    # The package a target class is declared in (its convert.py, runtime.py, ...); a
    # subclass declared in a plain module (a test's variant) inherits its parent's.
    package: ClassVar[str | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        declared = cls.__dict__
        if hasattr(sys.modules.get(cls.__module__), "__path__"):
            cls.package = cls.__module__
            if "session_class" not in declared:
                cls.session_class = f"{cls.package}.runtime:Session"
            if "name" not in declared:
                cls.name = cls.package.rpartition(".")[2]
        if cls.__doc__ and "produces" not in declared:
            cls.produces = " ".join(inspect.cleandoc(cls.__doc__).split("\n\n")[0].split())
        if "name" in declared and "benchmark_backend" not in declared:
            cls.benchmark_backend = cls.name
        if "requires" in declared and "run_requires" not in declared:
            cls.run_requires = cls.requires

    # -- what the framework asks of a target ------------------------------------------------
    def validate(self, options) -> None:
        """Check options against the world before the (slow) trace: files they name, a
        database's target, ... Raises :class:`BadInputError`; changes nothing. Here: the
        shared options of :mod:`.options`, for any target that declares them (a target
        with checks of its own calls ``super().validate``)."""
        precision = getattr(options, PRECISION, None) or "fp32"
        if hasattr(options, "calibration"):
            from ..calibration import check_request

            check_request(precision, options.calibration, target=self.name)
        if hasattr(options, "int8_kernels"):
            check_int8_kernels(precision, options.int8_kernels, target=self.name)

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
        verified. Runtimes that choose kernels by CPUID at load time need nothing; a target
        with the ``int8_kernels`` option runs u8×s8 kernels (:func:`int8_cpu_needs`)."""
        if hasattr(options, "int8_kernels"):
            return int8_cpu_needs(getattr(options, PRECISION, None) or "fp32", options.int8_kernels)
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

    def export(self, traced, options, path: Path, reporter) -> Artifact:
        """Write the artifact at ``path`` (and any sidecars next to it); warnings for the
        person exporting go to ``reporter`` (a :class:`~evit_deploy.progress.Reporter`).
        Default: the package's ``convert.export(traced, options, path, reporter)``, which
        returns the description, or the description and the sidecar files."""
        if self.package is None:
            raise NotImplementedError(f"target '{self.name}' has no package with a convert module")
        made = importlib.import_module(f"{self.package}.convert").export(traced, options, path, reporter)
        description, sidecars = made if isinstance(made, tuple) else (made, ())
        return Artifact(path, self.name, description, tuple(sidecars))

    @classmethod
    def commands(cls) -> list[Command]:
        """The commands this target adds to the CLI (TVM: ``tune``)."""
        return []

    def health(self, path: Path, description: ModelDescription) -> list[Finding]:
        """What a user of this artifact should know about how well it will run (TVM: how
        many kernels have a tuned schedule). Benchmarks and reports show the warnings."""
        found = self._package_function("runtime", "health")
        return found(path, description) if found else []

    def profile_ops(self, path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                    blocks: dict[str, str]) -> list[OpTime]:
        """Per-operator times of ``iterations`` runs on ``inputs`` (after a warm-up);
        ``blocks`` maps PyTorch module paths to block kinds, for runtimes that keep them.
        Default: the package's ``profile.profile_ops``, for a runtime that has per-operator
        times (:meth:`supports_profiling`)."""
        found = self._package_function("profile", "profile_ops")
        if found is None:
            raise BadInputError(f"target '{self.name}' cannot report per-operator times")
        return found(path, inputs, threads=threads, iterations=iterations, blocks=blocks)

    @classmethod
    def supports_profiling(cls) -> bool:
        """Whether :meth:`profile_ops` can time this target's operators."""
        return cls.profile_ops is not Target.profile_ops or _has_module(cls.package, "profile")

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the artifact with its own runtime on named inputs; outputs by name."""
        return self.sessions().cached(path)(inputs)

    def read_description(self, path: Path) -> ModelDescription:
        found = self._package_function("runtime", "read_description")    # from the files, not loaded
        return found(path) if found else self.sessions().cached(path).description

    def runtime_name(self, path: Path) -> str:
        """Which engine :meth:`run` uses, for reports (e.g. "onnxruntime 1.32 (CPU)")."""
        found = self._package_function("runtime", "runtime_name")
        return found(path) if found else self.name

    @classmethod
    def can_tune(cls) -> bool:
        """Whether :meth:`tuned_options` can make this target's artifacts faster with time."""
        return cls.tuned_options is not Target.tuned_options

    def tuned_options(self, model: str, options: dict, *, batch: int, threads: int, img_size: int, seconds: float,
                      workdir: Path, reporter) -> dict:
        """Options of an artifact made faster by spending ``seconds`` here (TVM: tuning its
        kernels into a database under ``workdir``, which a later call continues);
        ``evit-deploy optimize --tune`` calls it."""
        raise BadInputError(f"target '{self.name}' has nothing to tune")

    def rebuild_options(self, description: ModelDescription) -> dict:
        """The options that make this artifact again on another machine (the ones it was
        exported with; TVM names the CPU that ``native`` meant)."""
        return dict(description.extra.get("options", {}))

    def artifact_files(self, path: Path) -> tuple[Path, ...]:
        """The files an artifact is made of (sidecars first): what a cached session of it
        depends on. Default: the file, or every file of a directory artifact."""
        found = self._package_function("runtime", "artifact_files")
        return found(path) if found else package_files(path)

    def recognizes(self, path: Path) -> bool:
        return any(str(path).endswith(s) for s in self.suffixes)

    def diagnose(self) -> list[Finding]:
        """Whether this target can work here, and why not: its packages, then, once they
        import, what :meth:`host_findings` adds."""
        findings = self._package_findings()
        if any(f.level == "error" for f in findings):
            return findings
        return [*findings, *self.host_findings()]

    def host_findings(self) -> list[Finding]:
        """What ``doctor`` should say about this target here once its packages import:
        the versions that convert and run, which runtime runs artifacts, known-bad versions."""
        found = self._package_function("runtime", "host_findings")
        return found() if found else []

    def _package_findings(self) -> list[Finding]:
        missing = self.missing_packages()
        if missing:
            return [Finding("error", f"missing Python packages: {', '.join(sorted(set(missing.values())))}",
                            f"pip install {' '.join(sorted(set(missing.values())))}")]
        findings = []
        for module in {**self.requires, **self.run_requires}:
            try:
                # Converters announce, as they import, the native parts and CUDA kernels
                # they cannot load here: nothing for doctor's reader to act on.
                with warnings.catch_warnings(), captured():
                    warnings.simplefilter("ignore")
                    importlib.import_module(module)
            except Exception as exc:  # installed but broken: report, do not crash doctor
                findings.append(Finding("error", f"'{module}' is installed but fails to import: "
                                                 f"{named_first_line(exc)}",
                                        f"reinstall it: pip install --force-reinstall {self.requires.get(module) or self.run_requires[module]}"))
        return findings or [Finding("ok", "required packages import")]

    def sessions(self) -> SessionCache:
        """This target's loaded artifacts (of its :attr:`session_class`), reused while the
        files of an artifact (:meth:`artifact_files`) are unchanged."""
        if self.session_class is None:
            raise NotImplementedError(f"target '{self.name}' names no session_class")
        cache = _session_caches.get(type(self))
        if cache is None:
            cache = _session_caches[type(self)] = SessionCache(self.session_class, files=self.artifact_files)
        return cache

    def open_session(self, path: Path, threads: int | None = None):
        """A callable ``inputs -> outputs`` with the artifact loaded once, for repeated runs
        (benchmarks, servers). ``threads`` caps the runtime's intra-op threads."""
        if self.session_class is None:
            return lambda inputs: self.run(path, inputs)
        return self.sessions().open(path, threads)

    def parity_extras(self, path: Path) -> dict:
        """Target-specific facts to add to a parity report (e.g. fp16 drift), from the
        loaded artifact."""
        found = self._package_function("runtime", "parity_extras")
        return found(self.sessions().cached(path)) if found else {}

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
    def _package_function(self, module: str, function: str) -> Callable | None:
        return _package_function(self.package, module, function)

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
