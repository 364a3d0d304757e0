"""ONNX target: ``torch.onnx`` (dynamo) export, run by onnxruntime.

Running an artifact needs onnxruntime and numpy only; torch and onnx are imported by
``export`` alone.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import calibration as calib
from ..description import ModelDescription
from ..errors import BadInputError, ExportError, first_line
from ..cpufeatures import CpuNeeds, check_int8_kernels, int8_cpu_needs, with_legacy_int8_needs
from .base import Artifact, OpTime, Target
from .options import calibration_option, int8_kernels_option, option, precision_option
from .sessions import SessionCache

METADATA_KEY = "evit_deploy.description"


@dataclass
class OnnxOptions:
    # torch.onnx's dynamo exporter emits opset 18 or newer (it cannot convert below).
    opset: int = option(18, "ONNX opset version", choices=tuple(range(18, 24)))
    precision: str = precision_option(
        "fp32", ("fp32", "fp16", "int8"),
        "fp32; fp16 (fp16 weights and compute, fp32 inputs and outputs); int8 (onnxruntime quantization: "
        "int8 weights per channel, uint8 activations)")
    fp16: bool = option(False, "the same as --precision fp16 (kept for existing scripts and build files)")
    quantization: str = option("static", "how --precision int8 quantizes activations: static (ranges calibrated "
                               "on images, QDQ) or dynamic (measured on every batch at run time)",
                               choices=("static", "dynamic"))
    calibration: str | None = calibration_option()
    int8_kernels: str = int8_kernels_option()
    bake_preprocessing: str = option(
        "none", "bake scaling and ImageNet normalisation into the graph so it takes raw RGB",
        choices=("none", "float01", "uint8"))

    def __post_init__(self):
        if self.fp16:
            if self.precision not in ("fp32", "fp16"):
                raise BadInputError(f"--fp16 and --precision {self.precision} contradict each other: "
                                    "keep --precision alone")
            self.precision = "fp16"


class OnnxTarget(Target):
    name = "onnx"
    produces = "ONNX model (.onnx), run by onnxruntime"
    suffixes = (".onnx",)
    requires = {"onnx": "onnx", "onnxscript": "onnxscript"}
    run_requires = {"onnxruntime": "onnxruntime"}
    supports_dynamic_batch = True
    Options = OnnxOptions
    benchmark_backend = "onnxruntime"
    supports_profiling = True

    def input_format(self, options: OnnxOptions) -> str:
        return "normalized" if options.bake_preprocessing == "none" else options.bake_preprocessing

    def validate(self, options: OnnxOptions) -> None:
        if options.quantization == "dynamic" and options.precision != "int8":
            raise BadInputError(f"--quantization dynamic is for --precision int8, not {options.precision}")
        if options.calibration is not None and options.quantization == "dynamic":
            raise BadInputError("--calibration is for static int8 quantization; dynamic quantization measures "
                                "activation ranges at run time")
        calib.check_request(options.precision, options.calibration, target=self.name)
        check_int8_kernels(options.precision, options.int8_kernels, target=self.name)

    def cpu_needs(self, options: OnnxOptions) -> CpuNeeds:
        return int8_cpu_needs(options.precision, options.int8_kernels)

    def variant(self, options: OnnxOptions) -> str:
        dynamic = options.precision == "int8" and options.quantization == "dynamic"
        return super().variant(options) + ("_dynamic" if dynamic else "")

    def export(self, traced, options: OnnxOptions, path: Path, reporter) -> Artifact:
        import onnx
        import torch

        desc = traced.description
        # The exporter logs its progress and skipped torchvision ops; we report our own.
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        try:
            program = torch.onnx.export(
                traced.program, (traced.example_input(),), dynamo=True, verbose=False,
                opset_version=options.opset, input_names=[desc.input.name],
                output_names=[o.name for o in desc.outputs], optimize=True, external_data=False)
        except Exception as exc:
            raise ExportError(f"torch.onnx.export failed: {first_line(exc)}") from exc
        proto = program.model_proto
        produced = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
        if produced != options.opset:
            raise ExportError(f"torch.onnx produced opset {produced} instead of the requested {options.opset}")
        if options.precision == "fp16":
            from onnxruntime.transformers.float16 import convert_float_to_float16
            proto = convert_float_to_float16(proto, keep_io_types=True, disable_shape_infer=True)
            # The converter appends its input casts at the end of the node list.
            topological_sort(proto.graph)
        elif options.precision == "int8":
            proto, desc = self._quantize(proto, desc, options, reporter)
        dedupe_initializers(proto.graph)
        strip_machine_specifics(proto.graph)
        _set_metadata(proto, desc)
        try:
            onnx.checker.check_model(proto, full_check=True)
        except onnx.checker.ValidationError as exc:
            raise ExportError(f"the exported ONNX model is invalid: {first_line(exc)}") from exc
        # Serialised by hand with deterministic map ordering: the same inputs give the
        # same bytes (onnx.save does not promise that).
        path.write_bytes(proto.SerializeToString(deterministic=True))
        return Artifact(path, self.name, desc)

    def _quantize(self, proto, desc: ModelDescription, options: OnnxOptions, reporter):
        from .onnx_int8 import quantize

        calibration = None
        if options.quantization == "static":
            if options.calibration is None:
                reporter.warn(calib.DEFAULT_WARNING)
            calibration = calib.calibration_set(desc.preprocessing, options.calibration)
        proto, facts = quantize(proto, mode=options.quantization, kernels=options.int8_kernels,
                                calibration=calibration, input_name=desc.input.name,
                                input_format=desc.input_format, preprocessing=desc.preprocessing, batch=desc.batch)
        return proto, desc.with_extra(int8=facts)

    # -- reading and running (torch-free) ----------------------------------------------------
    def read_description(self, path: Path) -> ModelDescription:
        meta = _sessions.cached(path).ort.get_modelmeta().custom_metadata_map
        if METADATA_KEY not in meta:
            raise BadInputError(f"{path} was not made by evit-deploy (no '{METADATA_KEY}' metadata)")
        return with_legacy_int8_needs(ModelDescription.from_json(meta[METADATA_KEY]))

    def run(self, path: Path, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return _sessions.cached(path)(inputs)

    def open_session(self, path: Path, threads: int | None = None):
        return _sessions.open(path, threads)

    def profile_ops(self, path: Path, inputs: dict[str, np.ndarray], *, threads: int, iterations: int,
                    blocks: dict[str, str]) -> list[OpTime]:
        """Per-node kernel times from onnxruntime's profiler, each attributed to the block
        of the PyTorch module it was exported from (the exporter records module paths)."""
        import json as json_
        import tempfile

        import onnx
        import onnxruntime as ort

        scopes = {}
        for node in onnx.load(str(path)).graph.node:
            # onnxruntime names the nodes it rewrites after the original node or its output.
            for key in (node.name, *node.output):
                scopes[key] = _module_paths(node)
        with tempfile.TemporaryDirectory(prefix="evit-ort-profile-") as tmp:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "ort")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            session.run(None, inputs)                      # warm-up, excluded below
            for _ in range(iterations):
                session.run(None, inputs)
            events = json_.loads(Path(session.end_profiling()).read_text())
        runs = sorted((e for e in events if e.get("name") == "model_run"), key=lambda e: e["ts"])
        after_warmup = runs[0]["ts"] + runs[0]["dur"] if runs else 0
        ops = []
        for e in events:
            if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or e["ts"] < after_warmup:
                continue
            node = e["name"].removesuffix("_kernel_time")
            ops.append(OpTime(e.get("args", {}).get("op_name", node), e["dur"] / 1e6,
                              _block_for(node, scopes, blocks)))
        return ops

    def runtime_name(self, path: Path) -> str:
        import onnxruntime as ort
        return f"onnxruntime {ort.__version__} (CPU)"


class OrtSession:
    """An onnxruntime CPU session: ``session(inputs) -> outputs`` by name. With ``threads``,
    sequential execution on that many intra-op threads (benchmarks); without, onnxruntime's
    defaults (run, verify)."""

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

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


#: Sessions reused while the file is unchanged (verify and run read the description and
#: then run the same file).
_sessions = SessionCache(f"{__name__}:OrtSession")


def dedupe_initializers(graph) -> int:
    """Make initializers with identical type, shape and bytes share one tensor.

    The exporter can emit the same constant (a reshape target, a folded bias) once per
    use; duplicates only make the file larger. Returns how many were removed.
    """
    from onnx import numpy_helper

    first: dict[tuple, str] = {}
    rename: dict[str, str] = {}
    keep = []
    for init in graph.initializer:
        arr = numpy_helper.to_array(init)
        key = (init.data_type, tuple(init.dims), hashlib.sha256(arr.tobytes()).hexdigest())
        if key in first:
            rename[init.name] = first[key]
        else:
            first[key] = init.name
            keep.append(init)
    if not rename:
        return 0
    graph_outputs = {o.name for o in graph.output}
    if graph_outputs & set(rename):
        return 0    # an initializer exposed as an output must keep its name
    del graph.initializer[:]
    graph.initializer.extend(keep)
    for node in _all_nodes(graph):
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    return len(rename)


def _module_paths(node) -> list[str]:
    """Module paths (outermost first) from the exporter's ``namespace`` node metadata,
    without the input adapter's ``model.`` prefix."""
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    paths = [part.split(":")[0].strip() for part in namespace.split("/")]
    return [p.removeprefix("model.") for p in paths if p.startswith("model.")]


def _block_for(node: str, scopes: dict[str, list[str]], blocks: dict[str, str]) -> str | None:
    # Fused nodes are named "<original>/<Fusion>/..."; layout-converted ones "<output>_nchwc".
    name = node.split("/")[0].removesuffix("_nchwc")
    for path in reversed(scopes.get(name, [])):
        if path in blocks:
            return blocks[path]
    return None


def topological_sort(graph) -> None:
    """Reorder ``graph.node`` so that every node comes after the producers of its inputs."""
    available = {i.name for i in graph.input} | {i.name for i in graph.initializer} | {""}
    pending = list(graph.node)
    ordered = []
    while pending:
        ready = [n for n in pending if all(i in available for i in n.input)]
        if not ready:
            raise ExportError("the ONNX graph has a cycle or an input that nothing produces")
        for node in ready:
            available.update(node.output)
        ordered += ready
        ready_ids = {id(n) for n in ready}
        pending = [n for n in pending if id(n) not in ready_ids]
    nodes = [type(n)() for n in ordered]
    for new, old in zip(nodes, ordered):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(nodes)


def strip_machine_specifics(graph) -> None:
    """Drop per-node stack traces: they hold this machine's file paths and line numbers,
    so two builds of the same model on two machines would differ byte for byte."""
    for node in _all_nodes(graph):
        keep = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)


def _all_nodes(graph):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                yield from _all_nodes(attr.g)


def _set_metadata(proto, desc: ModelDescription) -> None:
    from .. import __version__

    proto.producer_name = "evit-deploy"
    proto.producer_version = __version__
    proto.doc_string = (f"{desc.display_name} ({desc.task}); input '{desc.input.name}' "
                        f"{list(desc.input.shape)} {desc.input_format}")
    entries = {
        METADATA_KEY: desc.to_json(),
        "model": desc.model,
        "weights_sha256": desc.weights,
        "input_format": desc.input_format,
        "mean": ",".join(str(v) for v in desc.preprocessing.mean),
        "std": ",".join(str(v) for v in desc.preprocessing.std),
        "evit_deploy_version": __version__,
    }
    del proto.metadata_props[:]
    for key, value in entries.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
