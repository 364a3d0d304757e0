"""LiteRT target (formerly TensorFlow Lite): a ``.tflite`` model for Android.

Export converts the shared ``torch.export`` trace with litert-torch (:mod:`.convert`) and
stores the evit-deploy description in the file's own metadata (:mod:`.flatbuffer`).
``run`` and ``verify`` use ai-edge-litert's Interpreter with its default XNNPACK
delegate (:mod:`.runtime`): no torch, no TensorFlow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ... import calibration as calib
from ...description import ModelDescription
from ...errors import BadInputError
from ...fsutil import atomic_path
from ..base import Artifact, Finding, Target
from ..options import calibration_option, precision_option
from ..sessions import SessionCache


@dataclass
class LiteRTOptions:
    precision: str = precision_option(
        "fp32", ("fp32", "fp16", "int8"),
        "fp32; fp16 (fp16 convolution and linear weights, fp32 compute); int8 (PT2E static quantization: int8 "
        "weights per channel and activations, int8 input and output tensors)")
    calibration: str | None = calibration_option()


class LiteRTTarget(Target):
    name = "litert"
    produces = "LiteRT / TensorFlow Lite model (.tflite), run by ai-edge-litert's Interpreter with XNNPACK"
    suffixes = (".tflite",)
    requires = {"litert_torch": "litert-torch", "ai_edge_quantizer": "ai-edge-quantizer"}
    run_requires = {"ai_edge_litert": "ai-edge-litert"}
    supports_dynamic_batch = False
    Options = LiteRTOptions
    benchmark_backend = "litert"

    def validate(self, options: LiteRTOptions) -> None:
        calib.check_request(options.precision, options.calibration, target=self.name)

    def export(self, traced, options: LiteRTOptions, path: Path, reporter) -> Artifact:
        from .convert import convert
        from .flatbuffer import add_description, operator_counts
        from .runtime import Session, delegation, tensor_quantization

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
        return Artifact(path, self.name, desc)

    # -- reading and running (torch-free) ----------------------------------------------------
    def read_description(self, path: Path) -> ModelDescription:
        from .flatbuffer import read_description

        return read_description(_read(path), str(path))

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _sessions.cached(path)(inputs)

    def open_session(self, path: Path, threads: int | None = None):
        return _sessions.open(path, threads)

    def runtime_name(self, path: Path) -> str:
        from importlib.metadata import version

        from .runtime import default_threads

        return f"ai-edge-litert {version('ai-edge-litert')} Interpreter (XNNPACK, {default_threads()} threads)"

    def health(self, path: Path, description: ModelDescription) -> list[Finding]:
        from .runtime import delegation

        found = delegation(_sessions.cached(path))
        if not found.outside:
            return [Finding("ok", f"XNNPACK runs every operator ({found.partitions} partition)")]
        left = ", ".join(f"{n} {k}" for k, n in found.outside.items())
        return [Finding("warning", f"{sum(found.outside.values())} of {found.total_ops} operators outside "
                                   f"XNNPACK ({left})")]

    def diagnose(self) -> list[Finding]:
        findings = super().diagnose()
        if any(f.level == "error" for f in findings):
            return findings
        from importlib.metadata import version

        return [*findings, Finding("ok", f"litert-torch {version('litert-torch')} converts; ai-edge-litert "
                                         f"{version('ai-edge-litert')} runs .tflite files without torch")]


def _read(path: Path) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"artifact not found: {path}")
    return path.read_bytes()


#: Loaded models, reused while the file is unchanged.
_sessions = SessionCache(f"{__package__}.runtime:Session")
