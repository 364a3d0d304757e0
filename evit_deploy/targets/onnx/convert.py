"""From the shared ``torch.export`` trace to an ``.onnx`` file (export side: needs torch).

``torch.onnx.export`` (dynamo) converts the trace and :func:`tidy` folds its constants;
:mod:`.quantize` makes its fp16 or int8 copy; then the graph is made smaller and
machine-independent (shared initializers, no stack traces), the description goes into the
model's metadata (:data:`.runtime.METADATA_KEY`), and the model is checked and written with
deterministic serialisation.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from ...description import ModelDescription
from ...errors import ExportError, first_line
from . import quantize
from .runtime import METADATA_KEY


def export(traced, options, path: Path, reporter) -> ModelDescription:
    """Write the ``.onnx`` at ``path`` as ``options`` ask; the description it holds."""
    import onnx
    import torch

    desc = traced.description
    # The exporter logs its progress and skipped torchvision ops; we report our own.
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        program = torch.onnx.export(
            traced.program, (traced.example_input(),), dynamo=True, verbose=False,
            opset_version=options.opset, input_names=[desc.input.name],
            output_names=[o.name for o in desc.outputs], optimize=False, external_data=False)
        tidy(program.model)
    except Exception as exc:
        raise ExportError(f"torch.onnx.export failed: {first_line(exc)}") from exc
    proto = program.model_proto
    produced = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    if produced != options.opset:
        raise ExportError(f"torch.onnx produced opset {produced} instead of the requested {options.opset}")
    if options.precision == "fp16":
        proto = quantize.fp16(proto)
        # The converter appends its input casts at the end of the node list.
        topological_sort(proto.graph)
    elif options.precision == "int8":
        proto, desc = quantize.int8(proto, desc, options, reporter)
    dedupe_initializers(proto.graph)
    strip_machine_specifics(proto.graph)
    set_metadata(proto, desc)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as exc:
        raise ExportError(f"the exported ONNX model is invalid: {first_line(exc)}") from exc
    # Serialised by hand with deterministic map ordering: the same inputs give the
    # same bytes (onnx.save does not promise that).
    path.write_bytes(proto.SerializeToString(deterministic=True))
    return desc


def tidy(model) -> None:
    """What ``torch.onnx.export(optimize=True)`` does to the graph (onnxscript's optimizer),
    but for its pattern rewriter: constants folded and lifted to initializers, common
    subexpressions merged, unused nodes removed, in place on the exporter's ``onnx_ir``
    model. The rewriter finds nothing to rewrite in a BN-folded EfficientViT (the same
    nodes, the same outputs) and is the slowest part of an export."""
    import onnx_ir
    from onnx_ir.passes import common
    from onnxscript import optimizer

    optimizer.fold_constants(model)
    onnx_ir.passes.Sequential(
        common.RemoveUnusedNodesPass(), common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass())(model)


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


def set_metadata(proto, desc: ModelDescription) -> None:
    """The description in the model's metadata (what ``run`` and ``verify`` read), its main
    facts as separate entries for people reading the file, and evit-deploy as producer."""
    from ... import __version__

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
