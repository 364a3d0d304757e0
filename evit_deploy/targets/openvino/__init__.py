"""OpenVINO target: an OpenVINO IR (``.xml`` + ``.bin``) run by OpenVINO's CPU plug-in.

``export`` converts the shared ``torch.export`` trace with ``openvino.convert_model``
(:mod:`.convert`), quantizes it with NNCF for int8 (:mod:`.quantize`) and stores the
description in the IR's rt_info, so ``run``, ``verify`` and an application need only the
two files. Running an artifact needs ``openvino`` and numpy only (:mod:`.runtime`).

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

from ... import calibration as calib
from ...description import ModelDescription
from ...cpufeatures import CpuNeeds, check_int8_kernels, int8_cpu_needs
from ..base import Artifact, Finding, OpTime, Target
from ..options import calibration_option, int8_kernels_option, precision_option

#: --precision -> (INFERENCE_PRECISION_HINT, weights as stored)
PRECISIONS = {"fp32": ("f32", "f32"), "fp16": ("f32", "f16"), "bf16": ("bf16", "f32"), "int8": ("f32", "int8")}


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
    benchmark_backend = "openvino"
    supports_profiling = True

    def validate(self, options: OpenVinoOptions) -> None:
        from .runtime import require_precision

        calib.check_request(options.precision, options.calibration, target=self.name)
        check_int8_kernels(options.precision, options.int8_kernels, target=self.name)
        require_precision(PRECISIONS[options.precision][0])

    def cpu_needs(self, options: OpenVinoOptions) -> CpuNeeds:
        return int8_cpu_needs(options.precision, options.int8_kernels)

    def export(self, traced, options: OpenVinoOptions, path: Path, reporter) -> Artifact:
        from .convert import convert, save, set_description
        from .runtime import import_openvino

        ov = import_openvino()
        inference_precision, weights = PRECISIONS[options.precision]
        desc = traced.description
        model, paths = convert(traced)
        info = {"inference_precision": inference_precision, "weights": weights,
                "openvino_version": ov.__version__}
        if options.precision == "int8":
            from .quantize import quantize

            if options.calibration is None:
                reporter.warn(calib.DEFAULT_WARNING)
            calibration = calib.calibration_set(desc.preprocessing, options.calibration)
            model, facts = quantize(model, desc, calibration, options.int8_kernels, reporter)
            desc = desc.with_extra(int8=facts)
        desc = desc.with_extra(openvino=info)
        set_description(model, desc, inference_precision, paths)
        xml, weights_file = save(model, path, compress_to_fp16=options.precision == "fp16")
        return Artifact(xml, self.name, desc, sidecars=(weights_file,))

    # -- reading and running (torch-free) ----------------------------------------------------
    def read_description(self, path: Path) -> ModelDescription:
        from .runtime import read_description
        return read_description(path)

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from .runtime import cached_model
        return cached_model(path).run_named(inputs)

    def open_session(self, path: Path, threads: int | None = None):
        from .runtime import load
        return load(path, threads=threads).run_named

    def runtime_name(self, path: Path) -> str:
        from .runtime import inference_precision_of, read_model, runtime_name
        return runtime_name(inference_precision_of(read_model(path), Path(path)))

    def parity_extras(self, path: Path, report) -> dict:
        from .runtime import bin_path, cached_model, import_openvino

        import_openvino()
        import openvino.properties.hint as hints

        loaded = cached_model(path)
        return {"inference_precision": loaded.property(hints.inference_precision).get_type_name(),
                "weights_bytes": bin_path(path).stat().st_size}

    def profile_ops(self, path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                    blocks: dict[str, str]) -> list[OpTime]:
        from .profile import profile_ops
        return profile_ops(path, inputs, threads=threads, iterations=iterations, blocks=blocks)

    def health(self, path: Path, description: ModelDescription) -> list[Finding]:
        from .runtime import cpu_capabilities

        precision = description.extra.get("openvino", {}).get("inference_precision", "f32")
        if precision == "bf16" and "BF16" not in cpu_capabilities():
            return [Finding("error", "exported for bf16 inference, which this CPU does not have",
                            "export --precision fp32 for it")]
        return []

    def diagnose(self) -> list[Finding]:
        findings = super().diagnose()
        if any(f.level == "error" for f in findings):
            return findings
        from .runtime import cpu_capabilities, import_openvino

        ov = import_openvino()
        capabilities = cpu_capabilities()
        findings.append(Finding("ok", f"OpenVINO {ov.__version__.split('-')[0]} CPU plug-in, "
                                      f"OPTIMIZATION_CAPABILITIES: {', '.join(capabilities)}"))
        if "BF16" not in capabilities:
            findings.append(Finding("warning", "this CPU has no BF16 capability: --precision bf16 is refused here",
                                    "export fp32 or int8 on this machine, bf16 on a CPU with AVX512_BF16 or AMX"))
        return findings
