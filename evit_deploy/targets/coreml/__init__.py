"""Core ML target: an ML program ``.mlpackage`` for iPhone/iPad/Mac, verified on any OS.

Export goes through ``torch.export`` and coremltools (:mod:`.convert`; W8A8 and weight
compression: :mod:`.quantize`). ``run`` uses Apple's Core ML runtime where it exists
(macOS) and otherwise the numpy reference executor (:mod:`.runtime`, :mod:`.reference`),
which runs the ML program saved in the package op by op, rounding each fp16 result as
the device does.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...description import ModelDescription
from ..base import Target
from ..options import calibration_option, option, precision_option
from .convert import DEPLOYMENT_TARGETS
from .quantize import COMPRESS_MODES
from .runtime import COMPUTE_UNITS


class CoreMLTarget(Target):
    """Core ML ML program (.mlpackage); verified by a numpy reference executor off macOS"""

    suffixes = (".mlpackage",)
    requires = {"coremltools": "coremltools"}
    benchmark_backend = None        # Core ML runs on Apple devices alone

    @dataclass
    class Options:
        minimum_deployment_target: str = option("iOS16", "oldest OS the ML program must run on",
                                                choices=DEPLOYMENT_TARGETS)
        precision: str = precision_option("fp16", ("fp16", "fp32", "int8"),
                                          "compute precision of the ML program; int8: W8A8 (int8 activations and "
                                          "weights, calibrated on images; iOS 17 or later)")
        compute_units: str = option("all", "compute units Core ML may use when this package is run on macOS",
                                    choices=tuple(COMPUTE_UNITS))
        input_type: str = option("image", "image (RGB pixels, what Vision and CVPixelBuffer callers feed) "
                                 "or tensor (float 0..1 NCHW)", choices=("image", "tensor"))
        compress: str = option("none", "weight-only compression of an fp16/fp32 program (palettize: k-means lookup "
                               "tables of 2^n entries; int8: int8 weights, fp16 activations)", choices=COMPRESS_MODES)
        calibration: str | None = calibration_option()
        zip: bool = option(False, "also write a deterministic .mlpackage.zip for artifact stores")

    def input_format(self, options: Options) -> str:
        # The program holds the per-channel normalisation; the image input's 1/255 scale
        # (or the caller, for a tensor input) turns pixels into 0..1 first.
        return "float01"

    def precision(self, options: Options) -> str:
        return "compressed" if options.compress != "none" else options.precision

    def validate(self, options: Options) -> None:
        from .convert import check_options

        check_options(options)
        super().validate(options)

    def artifact_name(self, description: ModelDescription, options: Options) -> str:
        # Xcode names the generated class after the file: keep it a clean identifier.
        base = re.sub(r"[^A-Za-z0-9]+", "-", description.display_name).strip("-")
        return f"{base}{self.variant(options)}{self.suffixes[0]}"

    def variant(self, options: Options) -> str:
        # fp16 is Core ML's default precision; int8 is W8A8 (weight-only int8 is --compress int8).
        return {"fp16": "", "fp32": "-fp32", "int8": "-w8a8"}[options.precision] + \
            (f"-{options.compress}" if options.compress != "none" else "")
