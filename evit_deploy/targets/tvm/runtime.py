"""Load and run an exported TVM library with ``tvm`` and numpy only (no torch).

An export is two files::

    efficientvit_m4.so          the compiled model, weights included (a Relax VM executable)
    efficientvit_m4.tvm.json    its description: input/output contract, preprocessing,
                                labels, target, thread count

Application code::

    from evit_deploy.targets.tvm.runtime import load
    model = load("efficientvit_m4.so")
    logits = model(batch)          # numpy float32, N x 3 x 224 x 224 (N = the exported batch)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np

from ...cpufeatures import CpuNeeds, needs_of, require_amx_permission, require_runnable
from ...description import ModelDescription
from ...errors import BadInputError, first_line
from ...hostinfo import usable_cpus
from ..base import Finding
from .graph import VERSION

SIDECAR_SUFFIX = ".tvm.json"


def sidecar_path(library: Path) -> Path:
    library = Path(library)
    return library.with_name(library.name[: -len(library.suffix)] + SIDECAR_SUFFIX)


def artifact_files(library: Path) -> tuple[Path, Path]:
    """The two files of an export: its description, then the library."""
    return sidecar_path(library), Path(library)


def read_description(library: Path) -> ModelDescription:
    library = Path(library)
    if not library.is_file():
        raise BadInputError(f"artifact not found: {library}")
    side = sidecar_path(library)
    if not side.is_file():
        raise BadInputError(f"{library} has no description {side.name} beside it (keep the two files together)")
    try:
        description = ModelDescription.from_json(side.read_text("utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{side} is not a readable evit-deploy description: {exc}") from None
    if "cpu" not in description.extra and description.extra.get("tvm", {}).get("target"):
        # Made before descriptions recorded it: the instruction sets follow from the target.
        from .target_string import required_cpu_flags
        description = description.with_extra(cpu=CpuNeeds(isa=required_cpu_flags(description.extra["tvm"]["target"]))
                                              .to_dict())
    return description


#: The size TVM's thread pool was last given here. The pool is the process's, shared by
#: every loaded library; a model sizes it when it runs (not when it loads), so two
#: models with different thread counts can live side by side.
_pool_threads: int | None = None


def set_threads(threads: int) -> None:
    """Size TVM's kernel thread pool (process-wide)."""
    global _pool_threads
    import tvm  # noqa: F401  (registers the runtime functions)
    import tvm_ffi

    tvm_ffi.get_global_func("runtime.config_threadpool")(1, int(threads))
    _pool_threads = int(threads)


def ensure_threads(threads: int) -> None:
    """:func:`set_threads`, unless the pool already has that size (resizing restarts it)."""
    if _pool_threads != threads:
        set_threads(threads)


def default_threads(description: ModelDescription) -> int:
    """The thread count the kernels were tuned for (the target's ``num-cores``), capped at
    the CPUs this process may use; ``TVM_NUM_THREADS`` overrides it."""
    value = os.environ.get("TVM_NUM_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise BadInputError(f"TVM_NUM_THREADS must be a whole number of threads, at least 1; got '{value}'")
        return int(value)
    tuned_for = int(description.extra.get("tvm", {}).get("threads") or 1)
    return max(1, min(tuned_for, usable_cpus()))


class CompiledModel:
    """A loaded library: call it on a numpy batch, or use :meth:`to_device` and
    :meth:`run_device` to time the model without conversion costs."""

    def __init__(self, library: str | os.PathLike, *, threads: int | None = None, check: bool = True):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self.path = Path(library)
        self.description = read_description(self.path)
        self.threads = threads or default_threads(self.description)
        # Before the library is mapped: code for instructions this CPU lacks kills the process.
        needs = needs_of(self.description)
        require_runnable(needs, str(self.path))
        if "amx_tile" in needs.isa:
            require_amx_permission(str(self.path))
        if check:           # (off only in check_library's child process)
            check_library(self.path, self.description)
        try:
            lib = tvm.runtime.load_module(str(self.path))
        except Exception as exc:  # TVM raises its own error types
            raise BadInputError(f"{self.path} is not a loadable TVM library: {first_line(exc)}") from None
        self.device = tvm.cpu()
        self.vm = VirtualMachine(lib, self.device)
        self._main = self.vm["main"]
        spec = self.description.input
        self.input_shape = tuple(spec.shape)
        self.input_dtype = spec.dtype
        self.output_names = [o.name for o in self.description.outputs]
        # A library whose description says so reads the caller's array where it is (see
        # compile.read_inputs_in_place); others assume TVM's 64-byte alignment.
        self.inputs_in_place = bool(self.description.extra.get("tvm", {}).get("inputs_in_place"))

    def to_device(self, x: np.ndarray):
        """``x`` as the library's input: the same memory when the library reads inputs
        in place (kept alive by the returned tensor), else a copy."""
        import tvm

        x = np.ascontiguousarray(x, dtype=self.input_dtype)
        if tuple(x.shape) != self.input_shape:
            raise BadInputError(f"{self.path.name} takes input of shape {list(self.input_shape)}, "
                                f"got {list(x.shape)}")
        if self.inputs_in_place:
            import tvm_ffi
            return tvm_ffi.from_dlpack(x, require_alignment=0)
        return tvm.runtime.tensor(x, self.device)

    def run_device(self, x):
        """Run on a tensor from :meth:`to_device` with this model's thread count; returns
        TVM tensors (no copy)."""
        ensure_threads(self.threads)
        out = self._main(x)
        return list(out) if not hasattr(out, "numpy") else [out]

    def __call__(self, x: np.ndarray) -> np.ndarray | tuple[np.ndarray, ...]:
        outs = [o.numpy() for o in self.run_device(self.to_device(x))]
        return outs[0] if len(outs) == 1 else tuple(outs)

    def run_named(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        name = self.description.input.name
        if name not in inputs:
            raise BadInputError(f"{self.path.name} takes input '{name}', got {', '.join(inputs) or 'none'}")
        outs = [o.numpy() for o in self.run_device(self.to_device(inputs[name]))]
        return dict(zip(self.output_names, outs))


def check_library(library: Path, description: ModelDescription) -> None:
    """Refuse, with a one-line error, a library that would kill this process: one cut
    short (the loader maps it past its end), or one changed since export (its SHA-256 is
    not the one its description records: damaged code, say) that kills a child process
    loading and running it first. A changed library that child survives (stripped, say)
    is loaded: parity is the judge of it."""
    data = library.read_bytes()
    check_complete(library, data)
    recorded = description.extra.get("tvm", {}).get("library_sha256")
    if recorded is None or hashlib.sha256(data).hexdigest() == recorded:
        return
    changed = f"{library} was changed since it was exported (its SHA-256 is not the one in " \
              f"{sidecar_path(library).name})"
    try:
        probe = subprocess.run([sys.executable, "-c", _PROBE, str(library)], capture_output=True,
                               timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise BadInputError(f"{changed} and did not finish loading and running once in {PROBE_TIMEOUT_S} s: "
                            f"export it again") from None
    if probe.returncode < 0:
        raise BadInputError(f"{changed} and kills the process that runs it ({_signal_name(-probe.returncode)}): "
                            f"export it again")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


#: check_library's child process: the library loaded unchecked and run once on zeros.
_PROBE = ("import sys, numpy as np\n"
          "from evit_deploy.targets.tvm.runtime import CompiledModel\n"
          "model = CompiledModel(sys.argv[1], threads=1, check=False)\n"
          "model(np.zeros(model.input_shape, model.input_dtype))\n")
#: A Python start, TVM's import, the mapping and one run.
PROBE_TIMEOUT_S = 300


def check_complete(library: Path, data: bytes) -> None:
    """Refuse an ELF library shorter than its headers say (a copy cut short): the loader
    would map it past its end, and the first access there kills the process (SIGBUS)."""
    import struct

    if data[:4] != b"\x7fELF":
        return                              # not ELF: the loader says what is wrong with it
    wide, order = data[4:5] == b"\x02", "<" if data[5:6] == b"\x01" else ">"
    try:
        if wide:
            phoff, shoff = struct.unpack_from(order + "QQ", data, 0x20)
            phsize, phnum, shsize, shnum = struct.unpack_from(order + "HHHH", data, 0x36)
            segments = [struct.unpack_from(order + "Q16xQ", data, phoff + i * phsize + 8) for i in range(phnum)]
        else:
            phoff, shoff = struct.unpack_from(order + "II", data, 0x1C)
            phsize, phnum, shsize, shnum = struct.unpack_from(order + "HHHH", data, 0x2A)
            segments = [struct.unpack_from(order + "I8xI", data, phoff + i * phsize + 4) for i in range(phnum)]
    except struct.error:
        segments, shoff, shnum, shsize = [(len(data) + 1, 0)], 0, 0, 0
    needed = max([shoff + shnum * shsize, *(offset + size for offset, size in segments)])
    if needed > len(data):
        raise BadInputError(f"{library} is cut short ({len(data)} of {needed} bytes): not a complete TVM library")


def load(library: str | os.PathLike, *, threads: int | None = None) -> CompiledModel:
    """Load an exported ``.so`` (with its ``.tvm.json`` beside it)."""
    return CompiledModel(library, threads=threads)


class Session(CompiledModel):
    """A loaded library as the target runs it: ``session({name: array}) -> {name: array}``
    (applications call :class:`CompiledModel` on a batch)."""

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.run_named(inputs)


def runtime_name(library: Path) -> str:
    import tvm

    info = read_description(library).extra.get("tvm", {})
    tuned, defaults = info.get("tuned_kernels") or 0, info.get("default_kernels") or 0
    parts = [f"{tuned} tuned" if tuned else "", f"{defaults} default" if defaults else ""]
    state = " + ".join(p for p in parts if p) or "unscheduled"
    return f"TVM {tvm.__version__} Relax VM, {info.get('target_string', '?')}, {state} of {info.get('kernels')} kernels"


def schedule_summary(info: dict) -> str:
    """``70: 12 tuned, 58 default schedules`` from a library's description."""
    parts = [f"{info.get('tuned_kernels') or 0} tuned", f"{info.get('default_kernels') or 0} default schedules"]
    if info.get("unscheduled_kernels"):
        parts.append(f"{info['unscheduled_kernels']} unscheduled")
    return f"{info.get('kernels')}: {', '.join(parts)}"


def parity_extras(session: CompiledModel) -> dict:
    info = session.description.extra.get("tvm", {})
    return {"tvm_target": info.get("target_string"), "kernels": schedule_summary(info)}


def health(library: Path, description: ModelDescription) -> list[Finding]:
    info = description.extra.get("tvm", {})
    findings = []
    kernels, tuned = info.get("kernels"), info.get("tuned_kernels")
    # Libraries from before default schedules existed had only records or TVM's code.
    unscheduled = info.get("unscheduled_kernels", None if kernels is None else kernels - (tuned or 0))
    if unscheduled:
        # One kernel with TVM's own unscheduled code is enough to make the library slow.
        findings.append(Finding("warning", f"{unscheduled} of {kernels} kernels unscheduled",
                                "export again with this evit-deploy (default schedules), or tune"))
    if info.get("graph") not in (None, VERSION):
        findings.append(Finding("warning", f"compiled by an older graph pipeline ({info.get('graph')})",
                                "export it again to get this version's kernels"))
    return findings


def description_json(description: ModelDescription) -> str:
    return json.dumps(description.to_dict(), indent=1, sort_keys=True) + "\n"
