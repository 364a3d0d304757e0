"""int8 OpenVINO models with NNCF's post-training quantization (``nncf.quantize``).

NNCF inserts FakeQuantize operations (int8 weights per output channel, activations with
ranges measured on the calibration images of :mod:`evit_deploy.calibration`) that
OpenVINO's CPU plug-in runs as integer kernels. NNCF's defaults are kept (preset
PERFORMANCE, no model type, no ignored scopes): on realistic synthetic M0 and M4 weights
they stay inside the int8 parity class on the photos (README, "OpenVINO"), and nothing
measured here asked for more.

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


def quantize(model, desc: ModelDescription, calibration: CalibrationSet, reporter):
    """An int8 copy of the float ``model`` and the facts its description records."""
    from .convert import telemetry_off

    batches = list(calibration.batches(desc.preprocessing, desc.input_format, desc.batch))
    with telemetry_off(), _nncf_output(reporter):
        import nncf

        try:
            # Each dataset item is fed to the model's one input as it is.
            quantized = nncf.quantize(model, nncf.Dataset(batches), subset_size=len(batches))
        except Exception as exc:
            raise ExportError(f"NNCF int8 quantization failed: {first_line(exc)}") from exc
    fake_quantize = sum(op.get_type_name() == "FakeQuantize" for op in quantized.get_ordered_ops())
    facts = {"quantizer": f"nncf {nncf.__version__}", "method": "nncf.quantize (post-training, defaults)",
             "preset": "performance", "weights": "int8 per output channel, symmetric",
             "activations": "int8, symmetric, ranges from the calibration images",
             "fake_quantize_ops": fake_quantize, "calibration": calibration.describe()}
    return quantized, facts
