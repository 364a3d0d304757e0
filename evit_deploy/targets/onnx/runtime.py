"""Running an ``.onnx`` made by evit-deploy with onnxruntime's CPU provider, and reading
its description from the model's metadata (onnxruntime and numpy only: no torch, no onnx).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...cpufeatures import with_legacy_int8_needs
from ...description import ModelDescription
from ...errors import BadInputError, first_line

#: The metadata entry that holds the description's JSON.
METADATA_KEY = "evit_deploy.description"


class Session:
    """An onnxruntime CPU session: ``session(inputs) -> outputs`` by name. With ``threads``,
    sequential execution on that many intra-op threads (benchmarks); without, onnxruntime's
    defaults (run, verify)."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        try:
            self.ort = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise BadInputError(f"{path} is not a loadable ONNX model: {first_line(exc)}") from None
        self.output_names = [o.name for o in self.ort.get_outputs()]

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self.output_names, self.ort.run(self.output_names, inputs)))

    @property
    def description(self) -> ModelDescription:
        """The description in the model's metadata (read when asked: a model without one
        still runs)."""
        meta = self.ort.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise BadInputError(f"{self.path} was not made by evit-deploy (no '{METADATA_KEY}' metadata)")
        return with_legacy_int8_needs(ModelDescription.from_json(meta[METADATA_KEY]))


def runtime_name(path: Path | None = None) -> str:
    import onnxruntime as ort

    return f"onnxruntime {ort.__version__} (CPU)"
