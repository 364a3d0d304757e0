"""LiteRT target (formerly TensorFlow Lite): a ``.tflite`` model for Android.

Export converts the shared ``torch.export`` trace with litert-torch (:mod:`.convert`; int8
and fp16 weights: :mod:`.quantize`) and stores the evit-deploy description in the file's
own metadata (:mod:`.flatbuffer`). ``run`` and ``verify`` use ai-edge-litert's Interpreter
with its default XNNPACK delegate (:mod:`.runtime`): no torch, no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...description import ModelDescription
from ..base import Finding, Target
from ..options import calibration_option, precision_option


@dataclass
class LiteRTOptions:
    precision: str = precision_option(
        "fp32", ("fp32", "fp16", "int8"),
        "fp32; fp16 (fp16 convolution and linear weights, fp32 compute); int8 (PT2E static quantization: int8 "
        "weights per channel and activations, int8 input and output tensors)")
    calibration: str | None = calibration_option()


class LiteRTTarget(Target):
    name = "litert"
    produces = "LiteRT / TensorFlow Lite model (.tflite), run by ai-edge-litert's Interpreter with XNNPACK"
    suffixes = (".tflite",)
    requires = {"litert_torch": "litert-torch", "ai_edge_quantizer": "ai-edge-quantizer"}
    run_requires = {"ai_edge_litert": "ai-edge-litert"}
    Options = LiteRTOptions

    def read_description(self, path: Path) -> ModelDescription:
        from .runtime import read_description

        return read_description(path)       # from the file alone, without loading the model

    def runtime_name(self, path: Path) -> str:
        from .runtime import runtime_name

        return runtime_name()

    def health(self, path: Path, description: ModelDescription) -> list[Finding]:
        from .runtime import health

        return health(self.sessions().cached(path))

    def host_findings(self) -> list[Finding]:
        from importlib.metadata import version

        return [Finding("ok", f"litert-torch {version('litert-torch')} converts; ai-edge-litert "
                              f"{version('ai-edge-litert')} runs .tflite files without torch")]
