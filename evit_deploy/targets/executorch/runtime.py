"""Running a ``.pte`` with ExecuTorch's Python runtime (``executorch.runtime``).

That runtime is a binding of the C++ one an app embeds, with the XNNPACK backend built
in; it links libtorch and takes and returns ``torch.Tensor``, so running needs torch
(an Android or iOS app links the C++ runtime instead).

Its thread pool is one per process, and an XNNPACK delegate keeps the pool it was loaded
with: resizing the pool under a loaded method leaves that method waiting forever on the
old one. So the pool is sized before a method is loaded, and a :class:`Session` whose
method was loaded before a later resize loads it again before it runs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...description import ModelDescription
from ...errors import BadInputError, first_line
from ...hostinfo import package_version, usable_cpus
from ...native_output import captured
from ..base import Finding

#: The program's constant method that returns the description's JSON.
DESCRIPTION_METHOD = "evit_deploy_description"


def runtime_name(path: Path | None = None) -> str:
    return f"ExecuTorch {package_version('executorch')} runtime (XNNPACK, {usable_cpus()} threads)"


def host_findings() -> list[Finding]:
    return [Finding("ok", f"executorch {package_version('executorch')}: exports here; running a .pte from "
                          "Python needs torch (its runtime binding links libtorch)")]


def health(path: Path, description: ModelDescription) -> list[Finding]:
    """Whether XNNPACK runs every operator, as the export recorded it."""
    found = description.extra.get("executorch", {}).get("delegation")
    if not found:
        return []
    if found["fully_delegated"]:
        return [Finding("ok", f"XNNPACK runs every operator ({found['xnnpack_delegate_calls']} delegate call)")]
    left = ", ".join(f"{n} {k}" for k, n in found["ops_outside_xnnpack"].items())
    return [Finding("warning", f"operators outside XNNPACK: {left}")]


#: Incremented at each resize of the pool: methods loaded before it must be loaded again.
_pool_generation = 0


def pool_with(threads: int) -> int:
    """Size the process's thread pool to ``threads`` (if it is not); the pool's generation."""
    global _pool_generation
    # Importing the binding announces torchao kernels it cannot load, the pool's creation
    # how it read the CPU, a resize "Resetting threadpool to N threads".
    with captured():
        from executorch.extension.pybindings import portable_lib

        if portable_lib._threadpool_get_thread_count() != threads:
            portable_lib._unsafe_reset_threadpool(threads)
            _pool_generation += 1
    return _pool_generation


def check_identifier(data: bytes, source: str) -> None:
    """Refuse bytes that are not an ExecuTorch program before the runtime reads them: a
    flatbuffer names its schema in bytes 4-8 (``ET12``), and the runtime, rejecting
    another identifier, logs those bytes as text, which aborts the process when they are
    not UTF-8."""
    identifier = data[4:8]
    if not (identifier[:2] == b"ET" and identifier[2:].isdigit()):
        raise BadInputError(f"{source} is not an ExecuTorch program (no 'ET' schema identifier at byte 4)")


def load_program(path: Path, *, etdump: bool = False):
    import warnings

    # Importing the runtime announces torchao kernels it cannot load and an
    # "experimental API" warning; creating it, how it read the CPU's identity.
    with warnings.catch_warnings(), captured():
        warnings.simplefilter("ignore")
        from executorch.runtime import Runtime

        runtime = Runtime.get()
    data = Path(path).read_bytes()
    check_identifier(data, str(path))
    try:
        with captured():
            return runtime.load_program(data, enable_etdump=etdump)
    except Exception as exc:   # the runtime raises RuntimeError with its error code
        raise BadInputError(f"{path} is not a loadable ExecuTorch program: {first_line(exc)}") from None


def program_description(program, source: str) -> ModelDescription:
    if DESCRIPTION_METHOD not in program.method_names:
        raise BadInputError(f"{source} was not made by evit-deploy (no '{DESCRIPTION_METHOD}' method)")
    try:
        return ModelDescription.from_json(program.load_method(DESCRIPTION_METHOD).execute([])[0])
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{source}: its '{DESCRIPTION_METHOD}' is not a description: {exc}") from None


class Session:
    """The ``forward`` method of one program: ``session({name: array}) -> {name: array}``
    (``etdump``: the program records an ETDump of its runs, see :mod:`.profile`)."""

    def __init__(self, path: Path, threads: int | None = None, *, etdump: bool = False):
        self.path = Path(path)
        self.threads = threads or usable_cpus()
        self.etdump = etdump
        self._load()

    def _load(self) -> None:
        self.generation = pool_with(self.threads)
        program = load_program(self.path, etdump=self.etdump)
        self.description = program_description(program, str(self.path))
        try:
            with captured():            # XNNPACK's initialisation reports the CPU it found
                self.method = program.load_method("forward")
        except Exception as exc:
            raise BadInputError(f"{self.path}: its forward method does not load: {first_line(exc)}") from None
        self.program = program          # the method's memory belongs to the program

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        spec = self.description.input
        if spec.name not in inputs:
            raise BadInputError(f"the model takes '{spec.name}'; got {', '.join(inputs) or 'nothing'}")
        x = np.ascontiguousarray(inputs[spec.name], dtype=spec.dtype)
        if tuple(x.shape) != tuple(spec.shape):
            raise BadInputError(f"input '{spec.name}' has shape {x.shape}, the model takes {tuple(spec.shape)}")
        if pool_with(self.threads) != self.generation:
            self._load()
        outputs = self.method.execute([torch.from_numpy(x)])
        return {o.name: out.detach().numpy().astype(np.float32) for o, out in zip(self.description.outputs, outputs)}
