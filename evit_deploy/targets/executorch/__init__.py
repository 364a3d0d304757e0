"""ExecuTorch target: a ``.pte`` program with the XNNPACK delegate, for Android and iOS apps.

Export lowers the shared ``torch.export`` trace (:mod:`.convert`; int8 and fp16 programs:
:mod:`.quantize`) and stores the evit-deploy description in the program itself, as a
constant method. ``run`` and ``verify`` use ExecuTorch's Python runtime (:mod:`.runtime`),
which needs torch; ``profile`` reads its ETDump (:mod:`.profile`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...description import ModelDescription
from ..base import Finding, OpTime, Target
from ..options import calibration_option, precision_option


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
    # torch to run too: executorch's Python runtime links libtorch and exchanges torch tensors.
    requires = {"executorch": "executorch", "torch": "torch"}
    Options = ExecuTorchOptions

    def profile_ops(self, path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                    blocks: dict[str, str]) -> list[OpTime]:
        from .profile import profile_ops

        return profile_ops(path, inputs, threads=threads, iterations=iterations)

    def runtime_name(self, path: Path) -> str:
        from .runtime import runtime_name

        return runtime_name()

    def health(self, path: Path, description: ModelDescription) -> list[Finding]:
        from .runtime import health

        return health(description)

    def host_findings(self) -> list[Finding]:
        from importlib.metadata import version

        return [Finding("ok", f"executorch {version('executorch')}: exports here; running a .pte from Python "
                              "needs torch (its runtime binding links libtorch)")]
