"""ONNX target: ``torch.onnx`` (dynamo) export (:mod:`.convert`), int8 and fp16 by
onnxruntime's tools (:mod:`.quantize`), run by onnxruntime (:mod:`.runtime`), per-node
times from its profiler (:mod:`.profile`).

Running an artifact needs onnxruntime and numpy only; torch and onnx are imported by
``export`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from ...errors import BadInputError
from ..base import Target
from ..options import calibration_option, int8_kernels_option, option, precision_option


class OnnxTarget(Target):
    """ONNX model (.onnx), run by onnxruntime"""

    suffixes = (".onnx",)
    requires = {"onnx": "onnx", "onnxscript": "onnxscript", "onnx_ir": "onnx-ir"}
    run_requires = {"onnxruntime": "onnxruntime"}
    supports_dynamic_batch = True
    benchmark_backend = "onnxruntime"

    @dataclass
    class Options:
        # torch.onnx's dynamo exporter emits opset 18 or newer (it cannot convert below).
        opset: int = option(18, "ONNX opset version", choices=tuple(range(18, 24)))
        precision: str = precision_option(
            "fp32", ("fp32", "fp16", "int8"),
            "fp32; fp16 (fp16 weights and compute, fp32 inputs and outputs); int8 (onnxruntime quantization: "
            "int8 weights per channel, uint8 activations)")
        fp16: bool = option(False, "the same as --precision fp16 (kept for existing scripts and build files)")
        quantization: str = option("static", "how --precision int8 quantizes activations: static (ranges calibrated "
                                   "on images, QDQ) or dynamic (measured on every batch at run time)",
                                   choices=("static", "dynamic"))
        calibration: str | None = calibration_option()
        int8_kernels: str = int8_kernels_option()
        bake_preprocessing: str = option(
            "none", "bake scaling and ImageNet normalisation into the graph so it takes raw RGB",
            choices=("none", "float01", "uint8"))

        def __post_init__(self):
            if self.fp16:
                if self.precision not in ("fp32", "fp16"):
                    raise BadInputError(f"--fp16 and --precision {self.precision} contradict each other: "
                                        "keep --precision alone")
                self.precision = "fp16"

    def input_format(self, options: Options) -> str:
        return "normalized" if options.bake_preprocessing == "none" else options.bake_preprocessing

    def validate(self, options: Options) -> None:
        if options.quantization == "dynamic" and options.precision != "int8":
            raise BadInputError(f"--quantization dynamic is for --precision int8, not {options.precision}")
        if options.calibration is not None and options.quantization == "dynamic":
            raise BadInputError("--calibration is for static int8 quantization; dynamic quantization measures "
                                "activation ranges at run time")
        super().validate(options)

    def variant(self, options: Options) -> str:
        dynamic = options.precision == "int8" and options.quantization == "dynamic"
        return super().variant(options) + ("_dynamic" if dynamic else "")
