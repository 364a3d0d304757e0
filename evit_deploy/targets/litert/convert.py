"""PyTorch -> ``.tflite`` with litert-torch (export side: needs torch).

* every precision: the products of two activations the converter made FULLY_CONNECTED
  are written back as BATCH_MATMUL, which the Interpreter's default XNNPACK delegate takes
  (:mod:`.matmul`).
* fp32: ``litert_torch.convert`` of the shared trace's module (``traced.program.module()``:
  litert-torch takes an ``nn.Module`` and runs ``torch.export`` itself; it refuses an
  ``ExportedProgram``). The default conversion path never imports xdsl (only
  ``lightweight_conversion``/``runtime_constant_folding`` do), see vendor/relabel_xdsl.py.
* fp16: the fp32 flatbuffer with its convolution and fully-connected weights stored as
  fp16 by ai-edge-quantizer (``FLOAT_CASTING``, with explicit DEQUANTIZE ops the runtime
  folds at load time): half the file, fp32 arithmetic.
* int8: PyTorch 2 export quantization (``prepare_pt2e``/``convert_pt2e``) with litert-torch's
  XNNPACK-style quantizer (and symmetric attention keys, see :mod:`.matmul`), static,
  per-channel symmetric weights, activations calibrated on :mod:`evit_deploy.calibration`
  images; litert-torch turns the quantize/dequantize pairs into an integer TFLite model
  whose input and output are int8 tensors with a scale and zero point (the runner
  quantizes, see :mod:`.runtime`).
"""

from __future__ import annotations

import contextlib

from ... import calibration as calib
from ...description import ModelDescription
from ...errors import ExportError, first_line
from ...native_output import captured, quiet_loggers
from .matmul import dynamic_fully_connected_as_batch_matmul, int8_quantizer

#: The ops ai-edge-quantizer's FLOAT_CASTING algorithm can store fp16 weights of, among
#: the ones EfficientViT converts to (it is registered for these and a few others only).
FP16_WEIGHT_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def convert(traced, precision: str, calibration_dir, reporter) -> tuple[bytes, dict, int]:
    """The converted model's bytes, the facts the description records about its precision,
    and how many activation products were rewritten for XNNPACK (see :mod:`.matmul`)."""
    import torch

    module = traced.program.module()
    sample = (traced.example_input(),)
    facts: dict = {}
    if precision == "int8" and calibration_dir is None:
        reporter.warn(calib.DEFAULT_WARNING)
    with _quiet(), torch.no_grad():
        if precision == "int8":
            data, facts = _int8(module, sample, traced.description, calibration_dir)
        else:
            data = _convert(module, sample)
        # Before the fp16 weights: their DEQUANTIZE outputs are not constants either.
        data, rewritten = dynamic_fully_connected_as_batch_matmul(data)
        if precision == "fp16":
            data = _fp16_weights(data)
            facts = {"weights": f"fp16 ({', '.join(FP16_WEIGHT_OPS)} weights; fp32 compute)"}
    return data, facts, rewritten


def _convert(module, sample, **kwargs) -> bytes:
    import litert_torch

    try:
        return bytes(litert_torch.convert(module, sample, **kwargs).model_content())
    except Exception as exc:
        raise ExportError(f"litert_torch.convert failed: {first_line(exc)}") from exc


def _fp16_weights(data: bytes) -> bytes:
    from ai_edge_quantizer import qtyping, quantizer

    try:
        q = quantizer.Quantizer(bytearray(data))
        config = qtyping.OpQuantizationConfig(
            weight_tensor_config=qtyping.TensorQuantizationConfig(num_bits=16, dtype=qtyping.TensorDataType.FLOAT),
            compute_precision=qtyping.ComputePrecision.FLOAT, explicit_dequantize=True)
        for op in FP16_WEIGHT_OPS:
            q.update_quantization_recipe(regex=".*", operation_name=getattr(qtyping.TFLOperationName, op),
                                         algorithm_key=quantizer.AlgorithmName.FLOAT_CASTING, op_config=config)
        return bytes(q.quantize(enable_progress_report=False).quantized_model)
    except Exception as exc:
        raise ExportError(f"ai-edge-quantizer could not store fp16 weights: {first_line(exc)}") from exc


def _int8(module, sample, description: ModelDescription, calibration_dir) -> tuple[bytes, dict]:
    import torch
    # torchao announces the CUDA kernels it cannot load on a CPU build when imported.
    with captured():
        from litert_torch.quantize.quant_config import QuantConfig
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    images = calib.calibration_set(description.preprocessing, calibration_dir)
    quantizer = int8_quantizer()
    try:
        prepared = prepare_pt2e(module, quantizer)
        for batch in images.batches(description.preprocessing, description.input_format, description.batch):
            prepared(torch.from_numpy(batch))
        # fold_quantize=False: litert-torch folds the weight quantization itself.
        quantized = convert_pt2e(prepared, fold_quantize=False)
    except Exception as exc:
        raise ExportError(f"pt2e int8 quantization failed: {first_line(exc)}") from exc
    data = _convert(quantized, sample, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    facts = {"scheme": "PT2E static (litert-torch's XNNPACK quantizer; the right operand of q^T k symmetric)",
             "weights": "int8 per channel, symmetric",
             "activations": "int8 per tensor (affine), ranges observed on the calibration images",
             "calibration": images.describe()}
    return data, facts


@contextlib.contextmanager
def _quiet():
    """litert-torch logs every stage at INFO on the root logger, its converter writes MLIR
    diagnostics from native code (and through absl); what matters reaches us as exceptions."""
    with quiet_loggers("absl"), captured():
        yield

