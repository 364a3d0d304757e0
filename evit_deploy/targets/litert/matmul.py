"""Products of two activations as ``BATCH_MATMUL``, which the XNNPACK delegate takes.

The TFLite converter lowers a batch-1 matrix product whose right operand is contracted
along its last dimension (the attention's ``bmm(v, attn^T)`` at batch 1, and in int8
models ``bmm(q^T, k)`` too) to ``FULLY_CONNECTED`` with the right operand as its
"weights", an activation rather than a constant. The XNNPACK delegate of ai-edge-litert
2.3.0 accepts a non-constant FULLY_CONNECTED filter only when created with
``TFLITE_XNNPACK_DELEGATE_FLAG_DYNAMIC_FULLY_CONNECTED`` (and only for fp32;
``VisitFullyConnectedNode`` in ``tflite/delegates/xnnpack/xnnpack_delegate.cc``), and the
Interpreter an app (or ai-edge-litert's Python ``Interpreter``) creates by default does not
set that flag: ``experimental_default_delegate_latest_features`` does not either. So each
such operator stays with TFLite's own kernels and splits the XNNPACK partition around it
(M0 at 224: 20 of 628 operators, 21 partitions).

``FULLY_CONNECTED(x, w)`` without bias or fused activation is ``x @ w^T``, which is
``BATCH_MATMUL(x, w, adj_y=True)``: the same products and sums, and XNNPACK defines it
for two activations (``xnn_define_batch_matrix_multiply`` with ``XNN_FLAG_TRANSPOSE_B``).
No converter option keeps the BATCH_MATMUL (the lowering is a fixed pattern of the
TFLite MLIR converter), hence this edit of the converted flatbuffer. Nothing else is
touched: an operator is rewritten only when its output shape is exactly the
BATCH_MATMUL's (``x.shape[:-1] + [w.shape[0]]``).

int8: XNNPACK takes a statically quantized BATCH_MATMUL only when its right operand's
zero point is 0 (``VisitBatchMatMulNode``), and PT2E's int8 activations are affine (the
keys ``k`` come out of a convolution with a zero point of their own), so the int8
``q^T k`` products would stay outside the delegate whatever their operator.
:func:`int8_quantizer` is litert-torch's quantizer plus one annotation: the right operand
of each product of two convolution outputs is quantized again symmetrically (zero point
0) on its way into the product (a requantization XNNPACK runs). The attention's
``attn·v`` product, whose operand comes from the softmax, is left as litert-torch makes
it (in float).
"""

from __future__ import annotations


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def dynamic_fully_connected_as_batch_matmul(data: bytes) -> tuple[bytes, int]:
    """The model with every FULLY_CONNECTED whose filter is an activation rewritten as
    BATCH_MATMUL(adj_y), and how many were rewritten."""
    from ai_edge_litert.tools import flatbuffer_utils

    fb = _schema()
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    rewritten = 0
    for subgraph in model.subgraphs:
        for op in subgraph.operators:
            if _builtin(model.operatorCodes[op.opcodeIndex]) != fb.BuiltinOperator.FULLY_CONNECTED:
                continue
            if not _is_activation_product(model, subgraph, op):
                continue
            options = fb.BatchMatMulOptionsT()
            options.adjX, options.adjY, options.asymmetricQuantizeInputs = False, True, False
            # BATCH_MATMUL's version 2 is its int8 kernel (TFLite's op_version.cc).
            int8 = subgraph.tensors[op.inputs[0]].type == fb.TensorType.INT8
            op.opcodeIndex = _opcode(model, fb.BuiltinOperator.BATCH_MATMUL, 2 if int8 else 1)
            op.inputs = list(op.inputs[:2])
            op.builtinOptionsType = fb.BuiltinOptions.BatchMatMulOptions
            op.builtinOptions = options
            rewritten += 1
    if not rewritten:
        return data, 0
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model)), rewritten


def _is_activation_product(model, subgraph, op) -> bool:
    fb = _schema()
    x, w = (subgraph.tensors[i] for i in op.inputs[:2])
    has_bias = len(op.inputs) > 2 and op.inputs[2] >= 0
    options = op.builtinOptions
    if has_bias or model.buffers[w.buffer].data is not None:     # a constant filter: XNNPACK takes it
        return False
    if options is not None and options.fusedActivationFunction != fb.ActivationFunctionType.NONE:
        return False
    out = subgraph.tensors[op.outputs[0]]
    return [*x.shape[:-1], w.shape[0]] == list(out.shape) and len(w.shape) == 2


def _builtin(code) -> int:
    # Codes above 127 live in builtinCode only; older files fill deprecatedBuiltinCode only.
    return max(code.builtinCode, code.deprecatedBuiltinCode)


def _opcode(model, builtin: int, version: int) -> int:
    """Index of the model's operator code for ``builtin`` at ``version`` (added if absent)."""
    fb = _schema()
    for i, code in enumerate(model.operatorCodes):
        if _builtin(code) == builtin and code.version == version:
            return i
    code = fb.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, fb.BuiltinOperator.PLACEHOLDER_FOR_GREATER_OP_CODES)
    code.version = version
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def int8_quantizer():
    """litert-torch's static int8 PT2E quantizer (per-channel weights), with the right
    operand of every ``bmm`` of two convolution outputs quantized symmetrically."""
    import dataclasses

    import torch
    from litert_torch.quantize.pt2e_quantizer import PT2EQuantizer, get_symmetric_quantization_config
    from torchao.quantization.pt2e.quantizer import QuantizationAnnotation

    aten = torch.ops.aten
    # Ops that move or select values without computing: a product's operand traced
    # back through them reaches the op that computed it.
    moves = {aten.view.default, aten.reshape.default, aten.slice.Tensor, aten.transpose.int,
             aten.permute.default, aten.flatten.using_ints, aten.clone.default, aten._unsafe_view.default}
    computed_by_a_layer = {aten.conv2d.default, aten.linear.default}

    def producer(node):
        while node.op == "call_function" and node.target in moves:
            node = node.args[0]
        return node

    class XnnpackInt8Quantizer(PT2EQuantizer):
        def annotate(self, model):
            model = super().annotate(model)
            symmetric = dataclasses.replace(self.global_config.input_activation, qscheme=torch.per_tensor_symmetric)
            for node in model.graph.nodes:
                if node.op != "call_function" or node.target != aten.bmm.default:
                    continue
                rhs = node.args[1]
                if producer(rhs).target in computed_by_a_layer and producer(node.args[0]).target in computed_by_a_layer:
                    node.meta["quantization_annotation"] = QuantizationAnnotation(
                        input_qspec_map={rhs: symmetric}, _annotated=True)
            return model

    return XnnpackInt8Quantizer().set_global(get_symmetric_quantization_config(is_per_channel=True, is_dynamic=False))
