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

from ..base import Target
from ..options import calibration_option, int8_kernels_option, precision_option


class OpenVinoTarget(Target):
    """OpenVINO IR (.xml + .bin), run by OpenVINO's CPU plug-in"""

    suffixes = (".xml",)
    requires = {"openvino": "openvino", "nncf": "nncf"}
    run_requires = {"openvino": "openvino"}
    supports_dynamic_batch = True

    @dataclass
    class Options:
        precision: str = precision_option(
            "fp32", ("fp32", "fp16", "bf16", "int8"),
            "fp32; fp16 (fp16 weights, computed in f32); bf16 (computed in bf16: CPUs with BF16 only); "
            "int8 (NNCF post-training quantization)")
        calibration: str | None = calibration_option()
        int8_kernels: str = int8_kernels_option()

    def validate(self, options: Options) -> None:
        from .runtime import PRECISIONS, require_precision

        super().validate(options)
        require_precision(PRECISIONS[options.precision][0])
