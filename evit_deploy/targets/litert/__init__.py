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
from .quantize import PRECISIONS


class LiteRTTarget(Target):
    """LiteRT / TensorFlow Lite model (.tflite), run by ai-edge-litert's Interpreter with XNNPACK"""

    suffixes = (".tflite",)
    requires = {"litert_torch": "litert-torch", "ai_edge_quantizer": "ai-edge-quantizer"}
    run_requires = {"ai_edge_litert": "ai-edge-litert"}

    @dataclass
    class Options:
        precision: str = precision_option("fp32", PRECISIONS)
        calibration: str | None = calibration_option()

    def health(self, path: Path, description: ModelDescription) -> list[Finding]:
        from .runtime import delegation_findings

        return delegation_findings(self.sessions().cached(path))    # read from the loaded interpreter
