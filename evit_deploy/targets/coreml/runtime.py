"""Apple's Core ML runtime (macOS only), reached through coremltools' ``MLModel.predict``.

Everywhere else, and when ``EVIT_COREML_EXECUTOR=reference`` is set, the target runs
packages with the reference executor instead.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np

from ...description import ModelDescription

EXECUTOR_ENV = "EVIT_COREML_EXECUTOR"      # "reference" or "coreml"; default: coreml where it exists
COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU"}


def available() -> bool:
    """Whether ``MLModel.predict`` works here (macOS with coremltools' native extension)."""
    if os.environ.get(EXECUTOR_ENV, "").lower() == "reference":
        return False
    return sys.platform == "darwin" and importlib.util.find_spec("coremltools.libcoremlpython") is not None


def load(path: Path, compute_units: str):
    path = Path(path)
    return _load(str(path.resolve()), _mtime(path), compute_units)


def _mtime(package: Path) -> int:
    return max(p.stat().st_mtime_ns for p in package.rglob("*"))


@lru_cache(maxsize=2)
def _load(path: str, mtime_ns: int, compute_units: str):
    from .quiet_import import coremltools

    ct = coremltools()
    return ct.models.MLModel(path, compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[compute_units]))


def predict(model, description: ModelDescription, inputs: dict[str, np.ndarray]) -> list[dict]:
    """Raw ``predict`` results: one per image for an image input, one per batch for a tensor."""
    spec = description.input
    x = np.asarray(inputs[spec.name])
    if description.input_format != "uint8":
        return [model.predict({spec.name: x.astype(np.float32)})]
    from PIL import Image

    # Core ML image inputs take one picture (a CVPixelBuffer) per prediction.
    return [model.predict({spec.name: Image.fromarray(np.ascontiguousarray(item.transpose(1, 2, 0)), "RGB")})
            for item in x.astype(np.uint8)]
