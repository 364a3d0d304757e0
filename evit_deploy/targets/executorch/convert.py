"""PyTorch -> ``.pte``: the shared trace lowered to ExecuTorch with the XNNPACK delegate.

* Weight-only subgraphs are folded first with ExecuTorch's ``constant_prop_pass``: the
  attention's relative-position bias gather (``attention_biases[:, idxs]`` and the
  per-head ``select``) depends on parameters only, and XNNPACK takes neither ``index``
  nor ``select``; folded, each head's bias is one constant the delegate adds.
* ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` then hands every
  operator XNNPACK supports to the delegate; :func:`delegation` counts what is left
  outside (run by ExecuTorch's portable kernels).
* int8 and fp16 programs come from :mod:`.quantize`.
* The description goes into the program as a *constant method* (ExecuTorch's way of
  storing configuration in a ``.pte``: a method that returns the value), named
  :data:`.runtime.DESCRIPTION_METHOD`.
"""

from __future__ import annotations

import collections
import copy
from pathlib import Path

from ... import calibration as calib
from ...description import ModelDescription
from ...errors import ExportError, first_line
from ...fsutil import atomic_path
from ...native_output import captured
from . import quantize
from .runtime import DESCRIPTION_METHOD

DELEGATE_CALL = "executorch_call_delegate"


def export(traced, options, path: Path, reporter) -> ModelDescription:
    """Write the ``.pte`` at ``path`` as ``options`` ask; the description it holds."""
    calibration = None
    if options.precision == "int8":
        calibration = calib.for_export(traced.description.preprocessing, options.calibration, reporter)
    edge, delegated, facts, desc = lower(traced, options.precision, calibration)
    extra = {"delegation": delegated, **({options.precision: facts} if facts else {})}
    desc = desc.with_extra(executorch=extra)
    if not delegated["fully_delegated"]:
        left = ", ".join(f"{n} {k}" for k, n in delegated["ops_outside_xnnpack"].items())
        reporter.warn(f"not every operator is delegated to XNNPACK: {left} run on ExecuTorch's portable kernels")
    data = to_pte(edge, desc)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return desc


def lower(traced, precision: str, calibration):
    """(edge program manager, delegation facts, precision facts, the program's description:
    the trace's, with the tensor types the program takes and returns); ``calibration``:
    the images of an int8 program."""
    import torch
    # Importing ExecuTorch imports torchao, which announces the CUDA kernels it cannot load
    # on a CPU build: nothing for the user to act on.
    with captured():
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
        from executorch.exir import to_edge_transform_and_lower
        from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    facts: dict = {}
    program, description = traced.program, traced.description
    with torch.no_grad():
        if precision == "int8":
            program, facts = quantize.int8(traced, calibration)
        elif precision == "fp16":
            program, facts, description = quantize.fp16(traced)
        try:
            # A copy: the trace is shared with the other targets of a build. The int8
            # weights' dequantize must stay: folded, the weights would be fp32 again and
            # XNNPACK would see float convolutions between fake-quantized activations.
            quantized = torch.ops.quantized_decomposed
            keep = {quantized.dequantize_per_channel.default, quantized.dequantize_per_tensor.default,
                    quantized.quantize_per_tensor.default, quantized.quantize_per_channel.default}
            folded = constant_prop_pass(copy.deepcopy(program), custom_skip_targets=keep)
            edge = to_edge_transform_and_lower(folded, partitioner=[XnnpackPartitioner()],
                                               transform_passes=[_fold_edge_constants()] if precision == "fp16" else None)
        except Exception as exc:
            raise ExportError(f"ExecuTorch lowering failed: {first_line(exc)}") from exc
    return edge, delegation(edge), facts, description


def delegation(edge) -> dict:
    """XNNPACK delegate calls in the lowered graph and the operators left outside them."""
    graph = edge.exported_program().graph_module.graph
    delegates, outside = 0, collections.Counter()
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        name = getattr(node.target, "__name__", str(node.target))
        if DELEGATE_CALL in name:
            delegates += 1
        elif name != "getitem":
            outside[name] += 1
    return {"xnnpack_delegate_calls": delegates, "ops_outside_xnnpack": dict(sorted(outside.items())),
            "fully_delegated": not outside}


def _fold_edge_constants():
    """A pass folding what depends on constants only, run on the edge program before
    partitioning: converting to the edge dialect turns the fp16 model's scalar operands
    (the attention scale) into fp32 constants cast to fp16, casts the partitioner would
    leave outside XNNPACK; folded, they are fp16 constants."""
    from executorch.exir.pass_base import ExportedProgramPassBase, ExportedProgramPassResult
    from executorch.exir.passes.constant_prop_pass import constant_prop_pass

    class FoldConstants(ExportedProgramPassBase):
        def call(self, exported_program):
            return ExportedProgramPassResult(constant_prop_pass(exported_program), True)

    return FoldConstants()


def to_pte(edge, description: ModelDescription) -> bytes:
    """The program's bytes with ``description`` as a constant method.

    The description records the delegation, known only after lowering, so the lowered
    program is wrapped again with the constant method (``to_edge_transform_and_lower``
    builds its result the same way) rather than lowered twice.
    """
    from executorch.exir import EdgeProgramManager

    try:
        final = EdgeProgramManager({"forward": edge.exported_program()},
                                   constant_methods={DESCRIPTION_METHOD: description.to_json()},
                                   compile_config=edge.compile_config)
        return bytes(final.to_executorch().buffer)
    except Exception as exc:
        raise ExportError(f"ExecuTorch could not emit the program: {first_line(exc)}") from exc
