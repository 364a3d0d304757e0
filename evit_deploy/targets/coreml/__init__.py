"""Core ML target: an ML program ``.mlpackage`` for iPhone/iPad/Mac, verified on any OS.

Export goes through ``torch.export`` and coremltools (:mod:`.convert`). ``run`` uses Apple's
Core ML runtime where it exists (macOS) and otherwise the numpy reference executor
(:mod:`.executor`), which runs the ML program saved in the package op by op, rounding each
fp16 result as the device does.
"""

from __future__ import annotations

import os
import platform
import re
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from ... import calibration as calib
from ...description import ModelDescription
from ...errors import ExportError, first_line
from ..base import Artifact, Finding, Target
from ..options import calibration_option, option, precision_option
from .compress import MODES as COMPRESS_MODES
from .convert import DEPLOYMENT_TARGETS
from .runtime import COMPUTE_UNITS


@dataclass
class CoreMLOptions:
    minimum_deployment_target: str = option("iOS16", "oldest OS the ML program must run on",
                                            choices=DEPLOYMENT_TARGETS)
    precision: str = precision_option("fp16", ("fp16", "fp32", "int8"),
                                      "compute precision of the ML program; int8: W8A8 (int8 activations and "
                                      "weights, calibrated on images; iOS 17 or later)")
    compute_units: str = option("all", "compute units Core ML may use when this package is run on macOS",
                                choices=tuple(COMPUTE_UNITS))
    input_type: str = option("image", "image (RGB pixels, what Vision and CVPixelBuffer callers feed) "
                             "or tensor (float 0..1 NCHW)", choices=("image", "tensor"))
    compress: str = option("none", "weight-only compression of an fp16/fp32 program (palettize: k-means lookup "
                           "tables of 2^n entries; int8: int8 weights, fp16 activations)", choices=COMPRESS_MODES)
    calibration: str | None = calibration_option()
    zip: bool = option(False, "also write a deterministic .mlpackage.zip for artifact stores")


class CoreMLTarget(Target):
    name = "coreml"
    produces = "Core ML ML program (.mlpackage); verified by a numpy reference executor off macOS"
    suffixes = (".mlpackage",)
    requires = {"coremltools": "coremltools"}
    run_requires = {"coremltools": "coremltools"}
    supports_dynamic_batch = False
    Options = CoreMLOptions

    def diagnose(self) -> list[Finding]:
        from .quiet_import import coremltools
        from .runtime import EXECUTOR_ENV, available

        missing = self.missing_packages()
        if missing:
            return super().diagnose()
        try:
            ct = coremltools()      # quietly: the base check would print its import chatter
        except Exception as exc:
            return [Finding("error", f"coremltools fails to import: {type(exc).__name__}: {first_line(exc)}",
                            "pip install --force-reinstall coremltools")]
        findings = [Finding("ok", f"coremltools {ct.__version__} converts here")]
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

    def input_format(self, options: CoreMLOptions) -> str:
        # The program holds the per-channel normalisation; the image input's 1/255 scale
        # (or the caller, for a tensor input) turns pixels into 0..1 first.
        return "float01"

    def precision(self, options: CoreMLOptions) -> str:
        return "compressed" if options.compress != "none" else options.precision

    def validate(self, options: CoreMLOptions) -> None:
        from .convert import check_options

        check_options(options)
        calib.check_request(options.precision, options.calibration, target=self.name)

    def artifact_name(self, description: ModelDescription, options: CoreMLOptions) -> str:
        # Xcode names the generated class after the file: keep it a clean identifier.
        base = re.sub(r"[^A-Za-z0-9]+", "-", description.display_name).strip("-")
        variant = {"fp16": "", "fp32": "-fp32", "int8": "-w8a8"}[options.precision] + \
                  (f"-{options.compress}" if options.compress != "none" else "")
        return f"{base}{variant}{self.suffixes[0]}"

    def export(self, traced, options: CoreMLOptions, path: Path, reporter) -> Artifact:
        from .convert import convert, write
        from .executor import UnsupportedOpError, check_supported
        from .package import read_spec, zip_package

        converted = convert(traced, options, reporter)
        write(converted, path)
        try:
            check_supported(read_spec(path), path.name)     # not the staging directory
        except UnsupportedOpError as exc:
            raise ExportError(f"the package cannot be verified: {exc}") from None
        sidecars = ()
        if options.zip:
            sidecars = (zip_package(path, path.with_name(path.name + ".zip")),)
        return Artifact(path, self.name, converted.description, sidecars)

    # -- reading and running ---------------------------------------------------------------
    def read_description(self, path: Path) -> ModelDescription:
        return _description(*_key(path))

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from . import runtime

        description = self.read_description(path)
        if runtime.available():
            model = runtime.load(path, description.extra.get("options", {}).get("compute_units", "all"))
            results = runtime.predict(model, description, inputs)
        else:
            program = _program(*_key(path))
            feed = {description.input.name: np.asarray(inputs[description.input.name], np.float32)}
            results = [program.run(feed)]
        per_call = [numeric_outputs(r, description) for r in results]
        return {k: np.concatenate([r[k] for r in per_call]) for k in per_call[0]}

    def runtime_name(self, path: Path) -> str:
        from . import runtime

        if runtime.available():
            units = self.read_description(path).extra.get("options", {}).get("compute_units", "all")
            return f"Core ML runtime (macOS {platform.mac_ver()[0]}, compute units {units})"
        precision = self.read_description(path).extra.get("coreml", {}).get("compute_precision", "fp32")
        return f"reference executor (numpy, {precision})"

    def parity_extras(self, path: Path, report) -> dict:
        from . import runtime
        from .package import package_bytes

        description = self.read_description(path)
        coreml = description.extra.get("coreml", {})
        extras = {"executor": "coreml-runtime" if runtime.available() else "reference-executor",
                  "package_bytes": package_bytes(path), "weights_bytes": coreml.get("weights_bytes")}
        if coreml.get("compress", "none") != "none":
            extras["compress"] = coreml["compress"]
            extras["uncompressed_weights_bytes"] = coreml.get("uncompressed_weights_bytes")
        try:
            extras.update(fp16_drift(_program(*_key(path)), description))
        except Exception as exc:   # a broken package already failed parity; say why drift is missing
            extras["fp16_drift"] = None
            extras["fp16_drift_error"] = first_line(exc)
        return extras


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


def _key(path: Path) -> tuple[str, int]:
    """(resolved path, newest modification time): cached readers follow changes to a package."""
    path = Path(path)
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else []
    return str(path.resolve()), max((p.stat().st_mtime_ns for p in files), default=0)


@lru_cache(maxsize=4)
def _description(path: str, mtime_ns: int) -> ModelDescription:
    from .metadata import description_from_spec
    from .package import read_spec

    return description_from_spec(read_spec(Path(path)), path)


@lru_cache(maxsize=2)
def _program(path: str, mtime_ns: int):
    from .executor import Program

    return Program(Path(path))
