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
zero point is 0 (``VisitBatchMatMulNode``); PT2E's int8 activations are affine, so the
int8 ``q^T k`` products stay outside the delegate whatever their operator.
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
