"""OpenVINO target: an OpenVINO IR (``.xml`` + ``.bin``) run by OpenVINO's CPU plug-in.

``export`` converts the shared ``torch.export`` trace with ``openvino.convert_model``
(:mod:`.convert`), quantizes it with NNCF for int8 (:mod:`.quantize`) and stores the
description in the IR's rt_info, so ``run``, ``verify`` and an application need only the
two files. Running an artifact needs ``openvino`` and numpy only (:mod:`.runtime`);
``profile`` reads the plug-in's performance counters (:mod:`.profile`).

Precisions (``--precision``):

* ``fp32`` (default): f32 weights, compiled with ``INFERENCE_PRECISION_HINT`` f32 — stated
  explicitly, since the CPU plug-in picks bf16 by itself on CPUs that have it;
* ``bf16``: the same f32 IR, compiled with the bf16 hint (recorded in its rt_info), for
  CPUs whose OpenVINO capabilities include BF16 (AVX512_BF16, AMX); refused elsewhere;
* ``int8``: NNCF post-training quantization calibrated on images (``--calibration DIR``),
  the float parts compiled in f32;
* ``fp16``: fp16 weights (``save_model(compress_to_fp16=True)``, half the .bin), computed
  in f32: the CPU plug-in decompresses them when it compiles, and x86 CPUs without
  AVX512_FP16/AMX_FP16 have no fp16 arithmetic to run them in anyway. Judged in the fp16
  parity class (the tightest that fp16 storage fits).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...description import ModelDescription
from ..base import Finding, OpTime, Target
from ..options import calibration_option, int8_kernels_option, precision_option


@dataclass
class OpenVinoOptions:
    precision: str = precision_option(
        "fp32", ("fp32", "fp16", "bf16", "int8"),
        "fp32; fp16 (fp16 weights, computed in f32); bf16 (computed in bf16: CPUs with BF16 only); "
        "int8 (NNCF post-training quantization)")
    calibration: str | None = calibration_option()
    int8_kernels: str = int8_kernels_option()


class OpenVinoTarget(Target):
    name = "openvino"
    produces = "OpenVINO IR (.xml + .bin), run by OpenVINO's CPU plug-in"
    suffixes = (".xml",)
    requires = {"openvino": "openvino", "nncf": "nncf"}
    run_requires = {"openvino": "openvino"}
    supports_dynamic_batch = True
    Options = OpenVinoOptions

    def validate(self, options: OpenVinoOptions) -> None:
        from .runtime import PRECISIONS, require_precision

        super().validate(options)
        require_precision(PRECISIONS[options.precision][0])

    def artifact_files(self, path: Path) -> tuple[Path, ...]:
        from .runtime import artifact_files

        return artifact_files(path)

    def read_description(self, path: Path) -> ModelDescription:
        from .runtime import read_description

        return read_description(path)       # the IR read, not compiled

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.sessions().cached(path).run_named(inputs)

    def open_session(self, path: Path, threads: int | None = None):
        return self.sessions().open(path, threads).run_named

    def runtime_name(self, path: Path) -> str:
        from .runtime import runtime_name

        return runtime_name(path)

    def parity_extras(self, path: Path, report) -> dict:
        from .runtime import parity_extras

        return parity_extras(self.sessions().cached(path))

    def profile_ops(self, path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                    blocks: dict[str, str]) -> list[OpTime]:
        from .profile import profile_ops

        return profile_ops(path, inputs, threads=threads, iterations=iterations, blocks=blocks)

    def health(self, path: Path, description: ModelDescription) -> list[Finding]:
        from .runtime import health

        return health(description)

    def host_findings(self) -> list[Finding]:
        from .runtime import host_findings

        return host_findings()
