"""The ONNX target's reduced precisions, by onnxruntime's own tools: fp16
(``onnxruntime.transformers.float16``, fp32 inputs and outputs) and int8
(``onnxruntime.quantization``).

For int8, static quantization (the default) writes a QDQ model: int8 weights per output
channel, activations quantized with ranges calibrated on images
(:mod:`evit_deploy.calibration`). onnxruntime's CPU provider fuses each
QuantizeLinear/DequantizeLinear pair around a convolution into one integer kernel.
Dynamic quantization stores int8 weights and measures activation ranges on every batch
at run time: no calibration (its speed is not measured here; onnxruntime runs its
convolutions as ConvInteger).

The recipe was chosen by measuring on onnxruntime's CPU provider (README, "Reduced
precision"; ``benchmarks/onnx_int8_recipe.py`` repeats the measurement):

* uint8 activations, asymmetric (zero point from the calibrated range): with signed int8
  activations the same graph ran at 0.68× (M0) and 1.13× (M4) fp32 speed, symmetric ones
  at 0.71× and 0.94×, where uint8 ran at 1.64× and 3.2×;
* every operator type quantized except the attention's score path (MatMul, the scale Mul,
  Softmax) and the squeeze-excitation gate (Sigmoid, Mul): quantized, their QDQ pairs stay
  unfused around float kernels and only add work (M4: 2.35× with them, 3.2× without;
  leaving Add in float as well lost agreement, 0.84 against 0.91, for no speed);
* MinMax calibration: the ranges are then exactly those seen on the calibration images;
* 7-bit weights (``reduce_range``, ``--int8-kernels portable``, the default): on x86 CPUs
  without VNNI onnxruntime's u8×s8 kernels add pairs of products in int16 (VPMADDUBSW),
  which 8-bit weights overflow; with |w| ≤ 64 a pair stays below 2·255·64 = 32640 and
  every CPU computes what the QDQ graph says (but for values on a rounding boundary,
  which the fused element-wise kernels, ``QLinearAdd``, may round one step the other
  way). ``--int8-kernels vnni`` keeps 8 bits for fleets whose CPUs all have VNNI (or AMX). Measured (``benchmarks/int8_portability.py``):
  the same speed as 8-bit weights, where uint8 weights (U8U8 kernels, exact too) were
  20-25% slower; on an AVX2 CPU 8-bit weights failed parity with the default synthetic
  weights (cosine 0.04) and, with realistic ones, passed it while top-1 agreement fell
  from 0.92 to 0.76 (M4). Depthwise convolutions need 7 bits too (8-bit depthwise
  weights measurably saturate).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from ... import calibration as calib
from ...calibration import CalibrationSet
from ...description import ModelDescription
from ...errors import ExportError, first_line
from ...native_output import quiet_loggers

#: Operator types kept in float: quantizing them made the model slower (see above).
KEEP_FLOAT = ("MatMul", "Softmax", "Mul", "Sigmoid")


def fp16(proto):
    """An fp16 copy of the fp32 ``proto`` (weights and compute; fp32 inputs and outputs).
    Its input casts come last in the node list: the caller sorts the graph."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    return convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)


def int8(proto, desc: ModelDescription, options, reporter) -> tuple[object, ModelDescription]:
    """The int8 copy ``options`` ask for (calibrated on their images, for static
    quantization) and the description with the facts of its quantization."""
    calibration = None
    if options.quantization == "static":
        calibration = calib.for_export(desc.preprocessing, options.calibration, reporter)
    proto, facts = quantize(proto, mode=options.quantization, kernels=options.int8_kernels,
                            calibration=calibration, input_name=desc.input.name,
                            input_format=desc.input_format, preprocessing=desc.preprocessing, batch=desc.batch)
    return proto, desc.with_extra(int8=facts)


def op_types_to_quantize(proto) -> list[str]:
    """Every operator type of the graph except :data:`KEEP_FLOAT`."""
    return sorted({node.op_type for node in proto.graph.node} - set(KEEP_FLOAT))


def quantize(proto, *, mode: str, kernels: str, calibration: CalibrationSet | None, input_name: str,
             input_format: str, preprocessing, batch: int | None):
    """An int8 copy of the fp32 ``proto`` (``mode`` static or dynamic; ``kernels``
    portable: 7-bit weights, or vnni: 8-bit) and the facts its description records."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType, \
        quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = calibration.batches(preprocessing, input_format, batch)

        def get_next(self):
            x = next(self.batches, None)
            return None if x is None else {input_name: x}

    ops = op_types_to_quantize(proto)
    reduce_range = kernels == "portable"
    with tempfile.TemporaryDirectory(prefix="evit-int8-") as tmp, quiet_loggers():
        fp32, prepared, quantized = (Path(tmp) / n for n in ("fp32.onnx", "prepared.onnx", "int8.onnx"))
        fp32.write_bytes(proto.SerializeToString())
        try:
            # onnxruntime's recommended pre-processing: its graph optimisations (so that
            # what is quantized is what the CPU provider runs) and shape inference.
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
            if mode == "static":
                quantize_static(str(prepared), str(quantized), Reader(), quant_format=QuantFormat.QDQ,
                                per_channel=True, reduce_range=reduce_range, weight_type=QuantType.QInt8,
                                activation_type=QuantType.QUInt8, op_types_to_quantize=ops,
                                calibrate_method=CalibrationMethod.MinMax)
            else:
                quantize_dynamic(str(prepared), str(quantized), per_channel=True, reduce_range=reduce_range,
                                 weight_type=QuantType.QInt8, op_types_to_quantize=ops)
        except Exception as exc:
            raise ExportError(f"onnxruntime's {mode} int8 quantization failed: {first_line(exc)}") from exc
        result = onnx.load(str(quantized))
    facts = {"mode": mode, "format": "QDQ" if mode == "static" else "QOperator",
             "weights": "int8 per channel, symmetric, " + ("7-bit (-64..64)" if reduce_range else "8-bit"),
             "kernels": kernels,
             "activations": "uint8, asymmetric, MinMax-calibrated" if mode == "static" else "uint8, per batch",
             "float_ops": list(KEEP_FLOAT)}
    if calibration is not None:
        facts["calibration"] = calibration.describe()
    return result, facts

