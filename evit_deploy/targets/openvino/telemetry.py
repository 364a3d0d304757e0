"""OpenVINO's and NNCF's usage telemetry, switched off for evit-deploy's processes.

``import openvino`` (through ``openvino.tools.ovc``), every ``convert_model`` call and
``import nncf`` send usage events to Google Analytics, and write a client id under
``~/intel``, unless the user ran openvino_telemetry's opt-out. A build machine exporting
models, or a server running them through evit-deploy, has agreed to nothing, and CI
machines often have no network to send through. The packages offer no switch (their CI
detection looks at variables such as ``CI=true``), so :func:`off` replaces
``openvino_telemetry.Telemetry`` with a class that does nothing, before openvino or nncf
is first imported by this package; both look the class up from that module.
"""

from __future__ import annotations


def _nothing(*args, **kwargs) -> None:
    return None


class NoTelemetry:
    """The methods openvino and nncf call on openvino_telemetry's ``Telemetry`` (those of
    the stand-in ``openvino.tools.ovc.telemetry_stub`` ships), doing nothing."""

    def __init__(self, *args, **kwargs):
        pass

    init = send_event = send_error = start_session = end_session = force_shutdown = send_stack_trace = _nothing


def off() -> None:
    """Make openvino_telemetry send nothing from this process (idempotent)."""
    try:
        import openvino_telemetry
    except ImportError:          # not installed: nothing is sent
        return
    openvino_telemetry.Telemetry = NoTelemetry
