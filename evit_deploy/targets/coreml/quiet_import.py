"""Importing coremltools without its import-time chatter.

coremltools logs a warning for each native proxy it cannot load (all of them off macOS)
and for every installed framework newer than it was tested with, and it imports torchao
when that is installed (it is, for the Android targets), which announces the CUDA kernels
it cannot load on a CPU build; none of that is actionable for someone exporting or
verifying a model.
"""

from __future__ import annotations

import logging
import warnings

from ...native_output import captured


def coremltools():
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings(), captured():
        warnings.simplefilter("ignore")
        import coremltools as ct
    return ct


def proto():
    """The protobuf modules of the Core ML model format: (Model_pb2, MIL_pb2)."""
    coremltools()
    from coremltools.proto import MIL_pb2, Model_pb2
    return Model_pb2, MIL_pb2
