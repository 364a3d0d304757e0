"""Importing coremltools without its import-time chatter.

coremltools logs a warning for each native proxy it cannot load (all of them off macOS)
and for every installed framework newer than it was tested with; none of that is
actionable for someone exporting or verifying a model.
"""

from __future__ import annotations

import logging
import warnings


def coremltools():
    logging.getLogger("coremltools").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import coremltools as ct
    return ct


def proto():
    """The protobuf modules of the Core ML model format: (Model_pb2, MIL_pb2)."""
    coremltools()
    from coremltools.proto import MIL_pb2, Model_pb2
    return Model_pb2, MIL_pb2
