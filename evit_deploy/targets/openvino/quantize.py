"""int8 OpenVINO models with NNCF's post-training quantization (``nncf.quantize``).

NNCF inserts FakeQuantize operations (int8 weights per output channel, activations with
ranges measured on the calibration images of :mod:`evit_deploy.calibration`) that
OpenVINO's CPU plug-in runs as integer kernels. Two of NNCF's defaults are changed because
they measured worse here (the README's OpenVINO section has the figures):

* activation ranges are the minimum and maximum seen on the calibration images (NNCF's
  default averages each image's range, which clips what the other images reach);
* no bias correction: NNCF's fast bias correction shifts each layer's bias to undo the
  quantization error measured on the calibration images, and made the result worse.

The overflow fix follows ``--int8-kernels``: ``portable`` (the default) gives every
convolution and matrix product 7-bit weights (``OverflowFix.ENABLE``; NNCF's default only
does the first layer), so that oneDNN's u8×s8 kernels on x86 CPUs without VNNI, which add
pairs of products in int16, cannot saturate; ``vnni`` keeps 8 bits (``DISABLE``) for CPUs
with VNNI or AMX. Depthwise convolutions keep 8-bit weights either way: NNCF leaves them
out of the fix, and oneDNN's int8 depthwise kernel widens both operands to 32 bits before
it multiplies (``vpmovsxbd``, ``vpmulld`` in ``jit_uni_x8s8s32x_dw_conv``). The preset,
the model type and ignored scopes stay NNCF's (the alternatives measured no better).

NNCF reports progress with its own bars on stdout and logs on its own logger; both would
mix into evit-deploy's output (``--json -`` writes to stdout), so they are held back while
it runs and its warnings are passed on to the reporter.
"""

from __future__ import annotations

import contextlib
import io
import logging

from ...calibration import CalibrationSet
from ...description import ModelDescription
from ...errors import ExportError
from .runtime import first_line


@contextlib.contextmanager
def _nncf_output(reporter):
    """Hold back NNCF's progress bars (stdout) and pass its warnings to ``reporter``."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record)

    logger = logging.getLogger("nncf")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    logger.handlers, logger.propagate = [Collect(logging.WARNING)], False
    logger.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.handlers, logger.propagate = handlers, propagate
        logger.setLevel(level)
        for record in records:
            reporter.warn(f"NNCF: {record.getMessage()}")


def advanced_parameters(kernels: str):
    """NNCF's defaults but for the two measured above, and the overflow fix ``kernels``
    asks for: 7-bit weights in every layer (portable) or 8-bit in all (vnni)."""
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    return AdvancedQuantizationParameters(activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX,
                                          disable_bias_correction=True,
                                          overflow_fix=OverflowFix.ENABLE if kernels == "portable"
                                          else OverflowFix.DISABLE)


def quantize(model, desc: ModelDescription, calibration: CalibrationSet, kernels: str, reporter):
    """An int8 copy of the float ``model`` and the facts its description records."""
    from .telemetry import off

    off()                        # before nncf is first imported: it keeps the class it finds
    batches = list(calibration.batches(desc.preprocessing, desc.input_format, desc.batch))
    with _nncf_output(reporter):
        import nncf

        try:
            # Each dataset item is fed to the model's one input as it is.
            quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches),
                                      advanced_parameters=advanced_parameters(kernels))
        except Exception as exc:
            raise ExportError(f"NNCF int8 quantization failed: {first_line(exc)}") from exc
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    facts = {"quantizer": f"nncf {nncf.__version__}", "method": "nncf.quantize (post-training)",
             "preset": "performance", "activation_ranges": "min/max over the calibration images",
             "bias_correction": False, "kernels": kernels,
             "weights": "int8 per output channel, symmetric, " + ("7-bit (overflow fix in every layer)"
                                                                  if kernels == "portable" else "8-bit"),
             "activations": "int8, symmetric, ranges from the calibration images",
             "fake_quantize_ops": fake_quantize, "calibration": calibration.describe()}
    return quantized, facts
