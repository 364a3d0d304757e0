"""Running a Core ML package, and reading its description (from the saved package alone).

Apple's Core ML runtime runs it where it exists (macOS, through coremltools'
``MLModel.predict``); everywhere else, and when ``EVIT_COREML_EXECUTOR=reference`` is set,
the reference executor (:mod:`.reference`) runs the same ML program in numpy. The
reference executor also measures, for parity reports, how far the program's fp16
rounding moves its outputs (:func:`fp16_drift`), on macOS too.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from pathlib import Path

import numpy as np

from ...description import ModelDescription
from ...errors import first_line
from ..base import Finding
from .metadata import description_from_spec
from .package import package_bytes, read_spec
from .quiet_import import coremltools

EXECUTOR_ENV = "EVIT_COREML_EXECUTOR"      # "reference" or "coreml"; default: coreml where it exists
COMPUTE_UNITS = {"all": "ALL", "cpu_and_ne": "CPU_AND_NE", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU"}


def available() -> bool:
    """Whether ``MLModel.predict`` works here (macOS with coremltools' native extension)."""
    if os.environ.get(EXECUTOR_ENV, "").lower() == "reference":
        return False
    return sys.platform == "darwin" and importlib.util.find_spec("coremltools.libcoremlpython") is not None


class Session:
    """A package's description, and ``session(inputs) -> outputs`` by Core ML where it
    exists, else by the reference executor. Each engine is loaded when first used: reading
    the description loads neither. (``threads``: both engines choose their own.)"""

    def __init__(self, path: Path, threads: int | None = None):
        self.path = Path(path)
        self.description = read_description(self.path)
        self._model = None
        self._reference = None

    @property
    def reference(self):
        """The reference executor's :class:`~.reference.Program` of the package."""
        if self._reference is None:
            from .reference import Program

            self._reference = Program(self.path)
        return self._reference

    def _coreml_model(self):
        if self._model is None:
            ct = coremltools()
            units = self.description.extra.get("options", {}).get("compute_units", "all")
            self._model = ct.models.MLModel(str(self.path), compute_units=getattr(ct.ComputeUnit, COMPUTE_UNITS[units]))
        return self._model

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        description = self.description
        if available():
            results = predict(self._coreml_model(), description, inputs)
        else:
            feed = {description.input.name: np.asarray(inputs[description.input.name], np.float32)}
            results = [self.reference.run(feed)]
        per_call = [numeric_outputs(r, description) for r in results]
        return {k: np.concatenate([r[k] for r in per_call]) for k in per_call[0]}


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


def numeric_outputs(result: dict, description: ModelDescription) -> dict[str, np.ndarray]:
    """The numeric outputs of one prediction; class probabilities as an array in label order.

    The predicted label (a string) is left out: it is the arg-max of the probabilities.
    """
    out = {}
    for name, value in result.items():
        if isinstance(value, dict):
            if description.labels is not None:
                out[name] = np.array([[value[label] for label in description.labels]], np.float32)
            continue
        arr = np.asarray(value)
        if arr.dtype.kind in "fiub":
            out[name] = arr
    return out


def read_description(path: Path) -> ModelDescription:
    """The description in the package's metadata, read without loading the program."""
    return description_from_spec(read_spec(Path(path)), str(path))


def runtime_name(path: Path) -> str:
    description = read_description(path)
    if available():
        units = description.extra.get("options", {}).get("compute_units", "all")
        return f"Core ML runtime (macOS {platform.mac_ver()[0]}, compute units {units})"
    precision = description.extra.get("coreml", {}).get("compute_precision", "fp32")
    return f"reference executor (numpy, {precision})"


def parity_extras(session: Session) -> dict:
    """What a parity report adds for a package: which engine ran it, its sizes, and the
    fp16 drift (or why it could not be measured)."""
    description = session.description
    coreml = description.extra.get("coreml", {})
    extras = {"executor": "coreml-runtime" if available() else "reference-executor",
              "package_bytes": package_bytes(session.path), "weights_bytes": coreml.get("weights_bytes")}
    if coreml.get("compress", "none") != "none":
        extras["compress"] = coreml["compress"]
        extras["uncompressed_weights_bytes"] = coreml.get("uncompressed_weights_bytes")
    try:
        extras.update(fp16_drift(session.reference, description))
    except Exception as exc:   # a broken package already failed parity; say why drift is missing
        extras["fp16_drift"] = None
        extras["fp16_drift_error"] = first_line(exc)
    return extras


def fp16_drift(program, description: ModelDescription) -> dict:
    """How far the program's fp16 rounding moves its outputs, on the sample photos.

    The same saved program runs twice through the reference executor: with each op's
    result rounded to fp16 as declared, and with fp32 activations. Also checks that the
    classifier's label is the arg-max of the logits.
    """
    from ...preprocess import to_input
    from ...samples import sample_inputs

    if not program.computes_fp16:
        return {"fp16_drift": None, "fp16_drift_note": "the program computes in fp32"}
    photos = sample_inputs(description.preprocessing, noise=0)
    x = to_input(np.stack([p.image for p in photos]), description.preprocessing, description.input_format)
    name, first = description.input.name, description.outputs[0].name
    batch = description.batch or 1
    drift = {"inputs": [p.name for p in photos], "output": first}
    rounded, exact, labels = [], [], []
    for start in range(0, len(x) - len(x) % batch, batch):
        feed = {name: x[start:start + batch].astype(np.float32)}
        with_fp16 = program.run(feed)
        rounded.append(np.asarray(with_fp16[first], np.float64))
        exact.append(np.asarray(program.run(feed, round_fp16=False)[first], np.float64))
        if "classLabel" in with_fp16:
            labels.append(str(np.asarray(with_fp16["classLabel"], dtype=object).item()))
    rounded, exact = np.concatenate(rounded), np.concatenate(exact)
    scale = float(np.abs(exact).max()) or 1.0
    drift["max_abs"] = float(np.abs(rounded - exact).max())
    drift["max_rel"] = drift["max_abs"] / scale
    if rounded.ndim == 2 and description.labels is not None:
        drift["top1_changed"] = int((rounded.argmax(1) != exact.argmax(1)).sum())
        if labels:
            drift["class_label_matches_logits"] = sum(
                lab == description.labels[i] for lab, i in zip(labels, rounded.argmax(1)))
    return {"fp16_drift": drift}


def host_findings() -> list[Finding]:
    """Which coremltools converts, and what verifies and runs packages here."""
    findings = [Finding("ok", f"coremltools {coremltools().__version__} converts here")]
    if available():
        findings.append(Finding("ok", "Core ML runtime available: artifacts are verified and run by Core ML"))
    elif sys.platform == "darwin" and os.environ.get(EXECUTOR_ENV, "").lower() != "reference":
        findings.append(Finding("warning", "macOS, but coremltools has no native extension: the reference "
                                           "executor verifies artifacts instead of Core ML",
                                "install a coremltools wheel built for this macOS and Python"))
    else:
        findings.append(Finding("ok", "Core ML prediction needs macOS: artifacts are verified by "
                                      "evit-deploy's reference executor (the same ML program, in numpy)",
                                "re-verify on a Mac with `evit-deploy verify` before shipping"))
    return findings
