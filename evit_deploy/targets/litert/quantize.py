"""The LiteRT target's reduced precisions (export side: needs torch).

* int8: PyTorch 2 export quantization (:mod:`evit_deploy.targets.pt2e`) with litert-torch's
  XNNPACK-style quantizer (and symmetric attention keys, see :mod:`.matmul`), static,
  per-channel symmetric weights, activations calibrated on :mod:`evit_deploy.calibration`
  images; litert-torch turns the quantize/dequantize pairs into an integer TFLite model
  whose input and output are int8 tensors with a scale and zero point (the runner
  quantizes, see :mod:`.runtime`).
* fp16: the fp32 flatbuffer with its convolution and fully-connected weights stored as
  fp16 by ai-edge-quantizer (``FLOAT_CASTING``, with explicit DEQUANTIZE ops the runtime
  folds at load time): half the file, fp32 arithmetic.
"""

from __future__ import annotations

from ...calibration import CalibrationSet
from ...description import ModelDescription
from ...errors import ExportError, first_line
from ...native_output import captured
from .. import pt2e
from .matmul import int8_quantizer

#: What each precision makes (the help of ``--precision``).
PRECISIONS = {
    "fp32": "",
    "fp16": "fp16 convolution and linear weights, fp32 compute",
    "int8": "PT2E static quantization: int8 weights per channel and activations, int8 input and output tensors",
}
#: The ops ai-edge-quantizer's FLOAT_CASTING algorithm can store fp16 weights of, among
#: the ones EfficientViT converts to (it is registered for these and a few others only).
FP16_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def int8(module, description: ModelDescription, calibration: CalibrationSet):
    """(``module`` quantized for int8, the ``quant_config`` litert-torch converts it with,
    the facts the description records)."""
    with captured():            # torchao's announcements, as litert-torch imports it
        from litert_torch.quantize.quant_config import QuantConfig

    quantizer = int8_quantizer()
    # fold_quantize=False: litert-torch folds the weight quantization itself.
    quantized = pt2e.quantize(module, quantizer, calibration, description, fold_quantize=False)
    facts = pt2e.facts("PT2E static (litert-torch's XNNPACK quantizer; the right operand of q^T k symmetric)",
                       calibration)
    return quantized, QuantConfig(pt2e_quantizer=quantizer), facts


def fp16_weights(data: bytes) -> tuple[bytes, dict]:
    """The model with :data:`FP16_WEIGHT_OPS`' weights stored as fp16, and the facts the
    description records."""
    from ai_edge_quantizer import qtyping, quantizer

    try:
        q = quantizer.Quantizer(bytearray(data))
        config = qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
            compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True)
        for op in FP16_WEIGHT_OPS:
            q.update_quantization_recipe(regex=".*", operation_name=getattr(qtyping.TFLOperationName, op),
                                         algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING, op_config=config)
        data = bytes(q.quantize(enable_progress_report=False).quantized_model)
    except Exception as exc:
        raise ExportError(f"ai-edge-quantizer could not store fp16 weights: {first_line(exc)}") from exc
    return data, {"weights": f"fp16 ({', '.join(FP16_WEIGHT_OPS)} weights; fp32 compute)"}
