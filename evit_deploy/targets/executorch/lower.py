"""PyTorch -> ``.pte``: the shared trace lowered to ExecuTorch with the XNNPACK delegate.

* Weight-only subgraphs are folded first with ExecuTorch's ``constant_prop_pass``: the
  attention's relative-position bias gather (``attention_biases[:, idxs]`` and the
  per-head ``select``) depends on parameters only, and XNNPACK takes neither ``index``
  nor ``select``; folded, each head's bias is one constant the delegate adds.
* ``to_edge_transform_and_lower`` with the ``XnnpackPartitioner`` then hands every
  operator XNNPACK supports to the delegate; :func:`delegation` counts what is left
  outside (run by ExecuTorch's portable kernels).
* int8: PyTorch 2 export quantization with ExecuTorch's ``XNNPACKQuantizer`` (static,
  int8 per-channel symmetric weights, int8 activations calibrated on
  :mod:`evit_deploy.calibration` images). The program keeps float32 input and output;
  quantize and dequantize run inside the delegate.
* fp16: the deploy model in half precision, exported again with a float16 input and
  output (weights, activations and XNNPACK's arithmetic in fp16), so that XNNPACK runs
  the whole program: ExecuTorch 1.5.1's XNNPACK partitioner takes ``_to_dim_order_copy``
  only when it keeps the dtype ("dtype conversion ... is not supported",
  ``ToDimOrderCopyConfig``), so float32 ends would leave two casts to the portable
  kernels. The app converts the image to float16 and reads float16 logits (as a LiteRT
  int8 app quantizes its input); the description's tensor types say so and ``run`` and
  ``verify`` convert.
* The description goes into the program as a *constant method* (ExecuTorch's way of
  storing configuration in a ``.pte``: a method that returns the value), named
  :data:`DESCRIPTION_METHOD`.
"""

from __future__ import annotations

import collections
import copy
import dataclasses

from ... import calibration as calib
from ...description import ModelDescription
from ...errors import ExportError, first_line
from ...native_output import captured

DESCRIPTION_METHOD = "evit_deploy_description"
DELEGATE_CALL = "executorch_call_delegate"


def lower(traced, precision: str, calibration_dir):
    """(edge program manager, delegation facts, precision facts, the program's description:
    the trace's, with the tensor types the program takes and returns)."""
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
            program, facts = _int8(traced, calibration_dir)
        elif precision == "fp16":
            program, facts, description = _fp16(traced)
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


def _int8(traced, calibration_dir):
    import torch
    with captured():            # torchao's announcements, as in lower()
        from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                             get_symmetric_quantization_config)
        from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    description = traced.description
    images = calib.calibration_set(description.preprocessing, calibration_dir)
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    try:
        prepared = prepare_pt2e(traced.program.module(), quantizer)
        for batch in images.batches(description.preprocessing, description.input_format, description.batch):
            prepared(torch.from_numpy(batch))
        quantized = convert_pt2e(prepared)
        program = torch.export.export(quantized, (traced.example_input(),))
    except Exception as exc:
        raise ExportError(f"pt2e int8 quantization failed: {first_line(exc)}") from exc
    facts = {"scheme": "PT2E static (ExecuTorch's XNNPACKQuantizer)",
             "weights": "int8 per channel, symmetric",
             "activations": "int8 per tensor (affine), ranges observed on the calibration images",
             "io": "float32 (quantize/dequantize inside the program)",
             "calibration": images.describe()}
    return program, facts


def _fp16(traced):
    """(fp16 program, facts, the description with float16 input and output)."""
    import torch

    deploy = copy.deepcopy(traced.deploy).half().eval()
    try:
        program = torch.export.export(deploy, (traced.example_input().to(torch.float16),))
    except Exception as exc:
        raise ExportError(f"the fp16 model does not export: {first_line(exc)}") from exc
    desc = traced.description
    desc = dataclasses.replace(desc, inputs=_half(desc.inputs), outputs=_half(desc.outputs))
    return program, {"compute": "fp16 (weights and activations, XNNPACK fp16 kernels)",
                     "io": "float16 input and output (the app converts)"}, desc


def _half(tensors):
    return tuple(dataclasses.replace(t, dtype="float16") for t in tensors)

