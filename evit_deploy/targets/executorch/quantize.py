"""The ExecuTorch target's reduced precisions: programs to lower (export side: needs torch).

* int8: PyTorch 2 export quantization (:mod:`evit_deploy.targets.pt2e`) with ExecuTorch's
  ``XNNPACKQuantizer`` (static, int8 per-channel symmetric weights, int8 activations
  calibrated on :mod:`evit_deploy.calibration` images). The program keeps float32 input
  and output; quantize and dequantize run inside the delegate.
* fp16: the deploy model in half precision, exported again with a float16 input and
  output (weights, activations and XNNPACK's arithmetic in fp16), so that XNNPACK runs
  the whole program: ExecuTorch 1.5.1's XNNPACK partitioner takes ``_to_dim_order_copy``
  only when it keeps the dtype ("dtype conversion ... is not supported",
  ``ToDimOrderCopyConfig``), so float32 ends would leave two casts to the portable
  kernels. The app converts the image to float16 and reads float16 logits (as a LiteRT
  int8 app quantizes its input); the description's tensor types say so and ``run`` and
  ``verify`` convert.
"""

from __future__ import annotations

import copy
import dataclasses

from ...calibration import CalibrationSet
from ...errors import ExportError, first_line
from ...native_output import captured
from .. import pt2e

#: What each precision makes (the help of ``--precision``).
PRECISIONS = {
    "fp32": "",
    "fp16": "fp16 weights and arithmetic in XNNPACK, float16 input and output",
    "int8": "PT2E static quantization for XNNPACK: int8 weights per channel and activations, float32 input "
            "and output",
}


def int8(traced, calibration: CalibrationSet):
    """(int8 program, facts)."""
    import torch
    # Importing ExecuTorch imports torchao, which announces the CUDA kernels it cannot load
    # on a CPU build: nothing for the user to act on.
    with captured():
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                             get_symmetric_quantization_config)

    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    quantized = pt2e.quantize(traced.program.module(), quantizer, calibration, traced.description)
    try:
        program = torch.export.export(quantized, (traced.example_input(),))
    except Exception as exc:
        raise ExportError(f"pt2e int8 quantization failed: {first_line(exc)}") from exc
    return program, pt2e.facts("PT2E static (ExecuTorch's XNNPACKQuantizer)", calibration,
                               io="float32 (quantize/dequantize inside the program)")


def fp16(traced):
    """(fp16 program, facts, the description with float16 input and output)."""
    import torch

    deploy = copy.deepcopy(traced.deploy).half().eval()
    try:
        program = torch.export.export(deploy, (traced.example_input().to(torch.float16),))
    except Exception as exc:
        raise ExportError(f"the fp16 model does not export: {first_line(exc)}") from exc
    desc = traced.description
    desc = dataclasses.replace(desc, inputs=_half(desc.inputs), outputs=_half(desc.outputs))
    return program, {"compute": "fp16 (weights and activations, XNNPACK fp16 kernels)",
                     "io": "float16 input and output (the app converts)"}, desc


def _half(tensors):
    return tuple(dataclasses.replace(t, dtype="float16") for t in tensors)
