"""ExecuTorch target: a ``.pte`` program with the XNNPACK delegate, for Android and iOS apps.

Export lowers the shared ``torch.export`` trace (:mod:`.convert`; int8 and fp16 programs:
:mod:`.quantize`) and stores the evit-deploy description in the program itself, as a
constant method. ``run`` and ``verify`` use ExecuTorch's Python runtime (:mod:`.runtime`),
which needs torch; ``profile`` reads its ETDump (:mod:`.profile`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..base import Target
from ..options import calibration_option, precision_option
from .quantize import PRECISIONS


class ExecuTorchTarget(Target):
    """ExecuTorch program (.pte) with the XNNPACK delegate, run by ExecuTorch's runtime"""

    suffixes = (".pte",)
    # torch to run too: executorch's Python runtime links libtorch and exchanges torch tensors.
    requires = {"executorch": "executorch", "torch": "torch"}

    @dataclass
    class Options:
        precision: str = precision_option("fp32", PRECISIONS)
        calibration: str | None = calibration_option()
