"""PyTorch 2 export quantization (PT2E): the int8 of the targets that lower a quantized
``torch.export`` program (LiteRT, ExecuTorch).

The recipe is the same for both, only the quantizer differs (each runtime's own, which
knows what its kernels fuse): ``prepare_pt2e`` inserts observers where the quantizer
annotated the graph, the calibration images of :mod:`evit_deploy.calibration` run through
it, and ``convert_pt2e`` turns the observed ranges into quantize/dequantize pairs, static
and per tensor for activations (the quantizers here take weights per channel, symmetric).
"""

from __future__ import annotations

from ..calibration import CalibrationSet
from ..description import ModelDescription
from ..errors import ExportError, first_line
from ..native_output import captured


def quantize(module, quantizer, calibration: CalibrationSet, description: ModelDescription, *,
             fold_quantize: bool = True):
    """``module`` (a ``torch.fx.GraphModule`` from ``torch.export``) quantized by
    ``quantizer`` with ranges observed on ``calibration``; ``fold_quantize=False`` leaves
    the weights' quantization for the converter to fold."""
    import torch
    # torchao announces the CUDA kernels it cannot load on a CPU build when imported.
    with captured():
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    try:
        with torch.no_grad():
            prepared = prepare_pt2e(module, quantizer)
            for batch in calibration.batches(description.preprocessing, description.input_format, description.batch):
                prepared(torch.from_numpy(batch))
            return convert_pt2e(prepared, fold_quantize=fold_quantize)
    except Exception as exc:
        raise ExportError(f"pt2e int8 quantization failed: {first_line(exc)}") from exc


def facts(scheme: str, calibration: CalibrationSet, **more) -> dict:
    """What a PT2E int8 artifact's description records about its quantization."""
    return {"scheme": scheme, "weights": "int8 per channel, symmetric",
            "activations": "int8 per tensor (affine), ranges observed on the calibration images",
            **more, "calibration": calibration.describe()}
