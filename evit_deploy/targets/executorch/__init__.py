"""ExecuTorch target: a ``.pte`` program with the XNNPACK delegate, for Android and iOS apps.

Export lowers the shared ``torch.export`` trace (:mod:`.lower`) and stores the evit-deploy
description in the program itself, as a constant method. ``run`` and ``verify`` use
ExecuTorch's Python runtime (:mod:`.runtime`), which needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import calibration as calib
from ...description import ModelDescription
from ...fsutil import atomic_path
from ..base import Artifact, Finding, OpTime, Target
from ..options import calibration_option, precision_option
from ..sessions import SessionCache


@dataclass
class ExecuTorchOptions:
    precision: str = precision_option(
        "fp32", ("fp32", "fp16", "int8"),
        "fp32; fp16 (fp16 weights and arithmetic in XNNPACK, float16 input and output); int8 (PT2E static "
        "quantization for XNNPACK: int8 weights per channel and activations, float32 input and output)")
    calibration: str | None = calibration_option()


class ExecuTorchTarget(Target):
    name = "executorch"
    produces = "ExecuTorch program (.pte) with the XNNPACK delegate, run by ExecuTorch's runtime"
    suffixes = (".pte",)
    requires = {"executorch": "executorch", "torch": "torch"}
    # executorch's Python runtime links libtorch and exchanges torch tensors.
    run_requires = {"executorch": "executorch", "torch": "torch"}
    supports_dynamic_batch = False
    Options = ExecuTorchOptions
    benchmark_backend = "executorch"
    supports_profiling = True        # ETDump, with XNNPACK's per-operator events

    def validate(self, options: ExecuTorchOptions) -> None:
        calib.check_request(options.precision, options.calibration, target=self.name)

    def export(self, traced, options: ExecuTorchOptions, path: Path, reporter) -> Artifact:
        from .lower import lower, to_pte

        if options.precision == "int8" and options.calibration is None:
            reporter.warn(calib.DEFAULT_WARNING)
        edge, delegated, facts, desc = lower(traced, options.precision, options.calibration)
        extra = {"delegation": delegated, **({options.precision: facts} if facts else {})}
        desc = desc.with_extra(executorch=extra)
        if not delegated["fully_delegated"]:
            left = ", ".join(f"{n} {k}" for k, n in delegated["ops_outside_xnnpack"].items())
            reporter.warn(f"not every operator is delegated to XNNPACK: {left} run on ExecuTorch's portable kernels")
        data = to_pte(edge, desc)
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        return Artifact(path, self.name, desc)

    # -- reading and running ---------------------------------------------------------------
    def read_description(self, path: Path) -> ModelDescription:
        return _sessions.cached(path).description

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _sessions.cached(path)(inputs)

    def open_session(self, path: Path, threads: int | None = None):
        return _sessions.open(path, threads)

    def profile_ops(self, path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                    blocks: dict[str, str]) -> list[OpTime]:
        from .profile import profile_ops

        return profile_ops(path, inputs, threads=threads, iterations=iterations)

    def runtime_name(self, path: Path) -> str:
        from importlib.metadata import version

        from .runtime import default_threads

        return f"ExecuTorch {version('executorch')} runtime (XNNPACK, {default_threads()} threads)"

    def health(self, path: Path, description: ModelDescription) -> list[Finding]:
        found = description.extra.get("executorch", {}).get("delegation")
        if not found:
            return []
        if found["fully_delegated"]:
            return [Finding("ok", f"XNNPACK runs every operator ({found['xnnpack_delegate_calls']} delegate call)")]
        left = ", ".join(f"{n} {k}" for k, n in found["ops_outside_xnnpack"].items())
        return [Finding("warning", f"operators outside XNNPACK: {left}")]

    def diagnose(self) -> list[Finding]:
        findings = super().diagnose()
        if any(f.level == "error" for f in findings):
            return findings
        from importlib.metadata import version

        return [*findings, Finding("ok", f"executorch {version('executorch')}: exports here; running a .pte from "
                                         "Python needs torch (its runtime binding links libtorch)")]


#: Loaded models, reused while the file is unchanged.
_sessions = SessionCache(f"{__package__}.runtime:Session")
