"""PyTorch -> ``.tflite`` with litert-torch (export side: needs torch).

* ``litert_torch.convert`` of the shared trace's module (``traced.program.module()``:
  litert-torch takes an ``nn.Module`` and runs ``torch.export`` itself; it refuses an
  ``ExportedProgram``), PT2E-quantized first for int8 (:mod:`.quantize`). The default
  conversion path never imports xdsl (only ``lightweight_conversion``/
  ``runtime_constant_folding`` do), see vendor/relabel_xdsl.py.
* every precision: the products of two activations the converter made FULLY_CONNECTED
  are written back as BATCH_MATMUL, which the Interpreter's default XNNPACK delegate takes
  (:mod:`.matmul`); fp16 weights are stored after that (:mod:`.quantize`).
* the description goes into the file's metadata (:mod:`.flatbuffer`), with what only the
  loaded model tells: how XNNPACK delegated it, the int8 input's and output's scales.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from ... import calibration as calib
from ...description import ModelDescription
from ...errors import ExportError, first_line
from ...fsutil import atomic_path
from ...native_output import captured, quiet_loggers
from . import quantize
from .flatbuffer import add_description, operator_counts
from .matmul import dynamic_fully_connected_as_batch_matmul
from .runtime import Session, delegation, tensor_quantization


def export(traced, options, path: Path, reporter) -> ModelDescription:
    """Write the ``.tflite`` at ``path`` as ``options`` ask; the description it holds."""
    data, facts, rewritten = convert(traced, options.precision, options.calibration, reporter)
    desc = traced.description
    names = ([t.name for t in desc.inputs], [t.name for t in desc.outputs])
    # Write once without the facts only a loaded model gives, load it, then write the
    # final file with them: the description must describe the file it is in.
    with atomic_path(path) as tmp:
        tmp.write_bytes(add_description(data, desc, input_names=names[0], output_names=names[1]))
        session = Session(tmp, threads=1)
        litert = {"operators": operator_counts(data), "delegation": delegation(session).to_dict(),
                  "activation_products_as_batch_matmul": rewritten,
                  **({options.precision: facts} if facts else {})}
        quantized = tensor_quantization(session)
        if quantized:
            litert["quantized_io"] = quantized
        del session
        desc = desc.with_extra(litert=litert)
        tmp.write_bytes(add_description(data, desc, input_names=names[0], output_names=names[1]))
    return desc


def convert(traced, precision: str, calibration_dir, reporter) -> tuple[bytes, dict, int]:
    """The converted model's bytes, the facts the description records about its precision,
    and how many activation products were rewritten for XNNPACK (see :mod:`.matmul`)."""
    import torch

    module = traced.program.module()
    sample = (traced.example_input(),)
    facts: dict = {}
    description = traced.description
    images = calib.for_export(description.preprocessing, calibration_dir, reporter) if precision == "int8" else None
    with _quiet(), torch.no_grad():
        if precision == "int8":
            module, quant_config, facts = quantize.int8(module, description, images)
            data = to_flatbuffer(module, sample, quant_config=quant_config)
        else:
            data = to_flatbuffer(module, sample)
        # Before the fp16 weights: their DEQUANTIZE outputs are not constants either.
        data, rewritten = dynamic_fully_connected_as_batch_matmul(data)
        if precision == "fp16":
            data, facts = quantize.fp16_weights(data)
    return data, facts, rewritten


def to_flatbuffer(module, sample, **kwargs) -> bytes:
    import litert_torch

    try:
        return bytes(litert_torch.convert(module, sample, **kwargs).model_content())
    except Exception as exc:
        raise ExportError(f"litert_torch.convert failed: {first_line(exc)}") from exc


@contextlib.contextmanager
def _quiet():
    """litert-torch logs every stage at INFO on the root logger, its converter writes MLIR
    diagnostics from native code (and through absl); what matters reaches us as exceptions."""
    with quiet_loggers("absl"), captured():
        yield
