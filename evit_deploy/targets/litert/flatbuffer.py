"""The ``.tflite`` file itself: the description in its metadata, its signature's tensor
names, and which operators it holds (torch-free: ai-edge-litert's flatbuffer schema and
``flatbuffer_utils`` only).

A TFLite model has a list of metadata entries, each a name and the index of a buffer in
the model (``Model.metadata``, schema.fbs): the converter itself stores
``min_runtime_version`` there. The evit-deploy description is one more entry,
:data:`METADATA_NAME`, whose buffer holds the description's JSON (UTF-8), so ``run``,
``verify`` and an app need nothing but the file. The TFLite Support library's
``TFLITE_METADATA`` entry is a different, schema-defined record (its writer needs
tflite-support, not installed here) and is not written.

The edits are made on the model's object form (``flatbuffer_utils``) and written back
whole: no library appends a metadata entry to a finished flatbuffer in place.
"""

from __future__ import annotations

import collections

import numpy as np

from ...description import ModelDescription
from ...errors import BadInputError, ExportError, named_first_line

METADATA_NAME = "evit_deploy.description"


def _schema():
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def add_description(data: bytes, description: ModelDescription, *, input_names: list[str],
                    output_names: list[str]) -> bytes:
    """A copy of the model with ``description`` in its metadata and its default
    signature's inputs and outputs named as the description names them (the converter
    calls them ``args_0`` and ``output_0``)."""
    from ai_edge_litert.tools import flatbuffer_utils

    fb = _schema()
    model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    for signature in model.signatureDefs or []:
        subgraph = model.subgraphs[signature.subgraphIndex]
        for entries, tensors, names in ((signature.inputs, subgraph.inputs, input_names),
                                        (signature.outputs, subgraph.outputs, output_names)):
            if len(entries or []) != len(names):
                raise ExportError(f"the converted model's signature has {len(entries or [])} tensors "
                                  f"where the description has {len(names)}")
            # The subgraph lists its inputs and outputs in the traced program's order.
            position = {int(t): i for i, t in enumerate(tensors)}
            for entry in entries:
                entry.name = names[position[int(entry.tensorIndex)]]
    buffer = fb.BufferT()
    buffer.data = np.frombuffer(description.to_json().encode("utf-8"), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = fb.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    kept = [m for m in (model.metadata or []) if _text(m.name) != METADATA_NAME]
    model.metadata = [*kept, entry]
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def metadata(data: bytes, source: str = "the model") -> dict[str, bytes]:
    """Every metadata entry of a model, name -> contents, read without unpacking it."""
    fb = _schema()
    try:
        if not fb.Model.ModelBufferHasIdentifier(data, 0):
            raise ValueError("no TFL3 identifier")
        model = fb.Model.GetRootAs(data, 0)
        found = {}
        for i in range(model.MetadataLength()):
            entry = model.Metadata(i)
            buffer = model.Buffers(entry.Buffer())
            if buffer.Offset() > 1:          # stored after the flatbuffer (models over 2 GB)
                raw = bytes(data[buffer.Offset():buffer.Offset() + buffer.Size()])
            else:
                raw = buffer.DataAsNumpy().tobytes() if buffer.DataLength() else b""
            found[_text(entry.Name())] = raw
    except Exception as exc:   # flatbuffers raises struct/index errors on damaged files
        raise BadInputError(f"{source} is not a readable TFLite model ({named_first_line(exc)})") from None
    return found


def read_description(data: bytes, source: str) -> ModelDescription:
    entries = metadata(data, source)
    if METADATA_NAME not in entries:
        raise BadInputError(f"{source} was not made by evit-deploy (no '{METADATA_NAME}' metadata entry)")
    try:
        return ModelDescription.from_json(entries[METADATA_NAME].decode("utf-8"))
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(f"{source}: its '{METADATA_NAME}' metadata is not a description: {exc}") from None


def operator_counts(data: bytes) -> dict[str, int]:
    """How many operators of each kind the model's subgraphs hold (``CONV_2D``: 74, ...)."""
    fb = _schema()
    names = {value: key for key, value in vars(fb.BuiltinOperator).items() if not key.startswith("_")}
    model = fb.Model.GetRootAs(data, 0)
    codes = []
    for i in range(model.OperatorCodesLength()):
        code = model.OperatorCodes(i)
        # Codes above 127 live in BuiltinCode; older files only fill DeprecatedBuiltinCode.
        name = names.get(max(code.BuiltinCode(), code.DeprecatedBuiltinCode()), "?")
        codes.append(f"CUSTOM:{_text(code.CustomCode())}" if name == "CUSTOM" else name)
    counts = collections.Counter()
    for s in range(model.SubgraphsLength()):
        subgraph = model.Subgraphs(s)
        for j in range(subgraph.OperatorsLength()):
            counts[codes[subgraph.Operators(j).OpcodeIndex()]] += 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else str(value)

