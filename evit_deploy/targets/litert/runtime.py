"""Running a ``.tflite`` with ai-edge-litert's Interpreter (torch-free, TensorFlow-free),
and reading its description (:mod:`.flatbuffer`).

The Interpreter is the runtime an Android app embeds; by default it hands every operator
the XNNPACK delegate accepts to XNNPACK, as on the phone. Inputs and outputs are
float32 for the caller whatever the model's tensors are: an int8 model's input is
quantized here with the input tensor's own scale and zero point, its output dequantized
with the output tensor's, as an app must do.

Which operators XNNPACK took is not reported by the Interpreter's public API. After
delegation its node list holds one ``DELEGATE`` node per XNNPACK partition next to the
original nodes (those it replaced included): :func:`delegation` walks back from the
model's outputs, taking each tensor from the delegate that produces it if one does, so
the nodes it reaches are exactly the ones that run (``_get_ops_details`` is the
Interpreter's own node listing, used by its tests and tools).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ...description import ModelDescription
from ...errors import BadInputError, first_line
from ...hostinfo import package_version, usable_cpus
from ...native_output import captured
from ..base import Finding
from . import flatbuffer

DELEGATE_NODE = "DELEGATE"


def runtime_name(path: Path | None = None) -> str:
    return f"ai-edge-litert {package_version('ai-edge-litert')} Interpreter (XNNPACK, {usable_cpus()} threads)"


def host_findings() -> list[Finding]:
    return [Finding("ok", f"litert-torch {package_version('litert-torch')} converts; ai-edge-litert "
                          f"{package_version('ai-edge-litert')} runs .tflite files without torch")]


def read_description(path: Path) -> ModelDescription:
    """The description in the file's metadata, read without loading the model."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"artifact not found: {path}")
    return flatbuffer.read_description(path.read_bytes(), str(path))


class Session:
    """One loaded model: ``session({name: float array}) -> {name: float array}``."""

    def __init__(self, path: Path, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self.threads = threads or usable_cpus()
        try:
            with captured():
                self.interpreter = Interpreter(model_path=str(path), num_threads=self.threads)
                self.interpreter.allocate_tensors()
            self.runner = self.interpreter.get_signature_runner()
        except Exception as exc:   # the interpreter raises ValueError/RuntimeError on damaged files
            raise BadInputError(f"{path} is not a loadable TFLite model: {first_line(exc)}") from None
        self.inputs = self.runner.get_input_details()
        self.outputs = self.runner.get_output_details()

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        feed = {}
        for name, details in self.inputs.items():
            if name not in inputs:
                raise BadInputError(f"the model takes '{name}'; got {', '.join(inputs) or 'nothing'}")
            x = np.asarray(inputs[name])
            expected = tuple(details["shape"])
            if x.shape != expected:
                raise BadInputError(f"input '{name}' has shape {x.shape}, the model takes {expected}")
            feed[name] = quantize(x, details)
        results = self.runner(**feed)
        return {name: dequantize(results[name], details) for name, details in self.outputs.items()}


def quantize(x: np.ndarray, details: dict) -> np.ndarray:
    """``x`` as the tensor's type: float32 as is, an integer type through its scale and
    zero point (``q = round(x / scale) + zero_point``, clipped to the type's range)."""
    dtype = np.dtype(details["dtype"])
    if dtype.kind == "f":
        return x.astype(dtype)
    scale, zero_point = details["quantization"]
    if not scale:
        return x.astype(dtype)
    info = np.iinfo(dtype)
    return np.clip(np.round(x / scale) + zero_point, info.min, info.max).astype(dtype)


def dequantize(y: np.ndarray, details: dict) -> np.ndarray:
    if np.dtype(details["dtype"]).kind == "f":
        return np.asarray(y, np.float32)
    scale, zero_point = details["quantization"]
    if not scale:
        return np.asarray(y, np.float32)
    return ((np.asarray(y, np.float32) - zero_point) * scale).astype(np.float32)


def tensor_quantization(session: Session) -> dict[str, dict]:
    """Scale and zero point of each integer input and output (what an app feeds and reads)."""
    found = {}
    for kind, tensors in (("input", session.inputs), ("output", session.outputs)):
        for name, details in tensors.items():
            dtype = np.dtype(details["dtype"])
            if dtype.kind in "iu":
                scale, zero_point = details["quantization"]
                found[name] = {"kind": kind, "dtype": dtype.name, "scale": float(scale),
                               "zero_point": int(zero_point)}
    return found


@dataclass(frozen=True)
class Delegation:
    partitions: int                  # XNNPACK partitions (DELEGATE nodes that run)
    delegated_ops: int               # model operators inside them
    outside: dict[str, int]          # operators left to TFLite's builtin kernels, by kind

    @property
    def total_ops(self) -> int:
        return self.delegated_ops + sum(self.outside.values())

    def to_dict(self) -> dict:
        return {"xnnpack_partitions": self.partitions, "delegated_ops": self.delegated_ops,
                "ops_outside_xnnpack": dict(self.outside),
                "delegated_share": round(self.delegated_ops / self.total_ops, 4) if self.total_ops else None}


def delegation(session: Session) -> Delegation:
    """How the Interpreter's default XNNPACK delegate split the model (see the module doc)."""
    it = session.interpreter
    nodes = it._get_ops_details()
    producer: dict[int, dict] = {}
    # Delegates last: a tensor a delegate produces is the delegate's, not its original node's.
    for node in sorted(nodes, key=lambda n: n["op_name"] == DELEGATE_NODE):
        for t in node["outputs"]:
            producer[int(t)] = node
    running, seen = [], set()
    pending = [int(d["index"]) for d in it.get_output_details()]
    while pending:
        node = producer.get(pending.pop())
        if node is None or node["index"] in seen:
            continue
        seen.add(node["index"])
        running.append(node)
        pending.extend(int(t) for t in node["inputs"] if int(t) >= 0)
    outside = collections.Counter(n["op_name"] for n in running if n["op_name"] != DELEGATE_NODE)
    partitions = sum(1 for n in running if n["op_name"] == DELEGATE_NODE)
    model_ops = sum(1 for n in nodes if n["op_name"] != DELEGATE_NODE)
    return Delegation(partitions, model_ops - sum(outside.values()), dict(sorted(outside.items())))


def delegation_findings(session: Session) -> list[Finding]:
    """Whether XNNPACK runs every operator of the loaded model, and which it leaves out."""
    found = delegation(session)
    if not found.outside:
        return [Finding("ok", f"XNNPACK runs every operator ({found.partitions} partition)")]
    left = ", ".join(f"{n} {k}" for k, n in found.outside.items())
    return [Finding("warning", f"{sum(found.outside.values())} of {found.total_ops} operators outside "
                               f"XNNPACK ({left})")]
