"""MIL types and values of a saved ML program, as numpy.

A value is either an immediate literal in the spec or a ``BlobFileValue`` pointing into
a weight file; both come out as numpy arrays of the declared type and shape (strings as
object arrays, lists and tuples as Python lists, dictionaries as dicts).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..package import resolve_program_file
from .blob import NUMPY_TYPES, SUBBYTE_BITS, BlobFile, unpack_subbyte

#: MIL proto DataType names -> the type names ML programs use (and blob.NUMPY_TYPES keys).
_PROTO_TYPE_NAMES = {"BOOL": "bool", "STRING": "string", "FLOAT16": "fp16", "FLOAT32": "fp32",
                     "FLOAT64": "fp64", "BFLOAT16": "bf16", "INT8": "int8", "INT16": "int16",
                     "INT32": "int32", "INT64": "int64", "INT4": "int4", "UINT8": "uint8",
                     "UINT16": "uint16", "UINT32": "uint32", "UINT64": "uint64", "UINT1": "uint1",
                     "UINT2": "uint2", "UINT3": "uint3", "UINT4": "uint4", "UINT6": "uint6",
                     "FLOAT8E4M3FN": "fp8e4m3fn", "FLOAT8E5M2": "fp8e5m2"}

#: Types whose immediate values are serialised in TensorValue.bytes rather than a typed field.
_IN_BYTES = {"fp16", "int8", "uint8", "uint32", *SUBBYTE_BITS}


@dataclass(frozen=True)
class TensorInfo:
    """Declared element type and shape of a tensor (``None`` for an unknown dimension)."""

    dtype: str
    shape: tuple[int | None, ...]

    @property
    def numpy_dtype(self):
        return object if self.dtype == "string" else NUMPY_TYPES.get(self.dtype)

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(d is None or d == s for d, s in zip(self.shape, shape))

    def __str__(self) -> str:
        return f"{self.dtype}[{','.join('?' if d is None else str(d) for d in self.shape)}]"


def type_name(data_type: int) -> str:
    from ..quiet_import import proto

    _, MIL_pb2 = proto()
    return _PROTO_TYPE_NAMES.get(MIL_pb2.DataType.Name(data_type), MIL_pb2.DataType.Name(data_type).lower())


def tensor_info(value_type) -> TensorInfo | None:
    """The tensor type of a ``ValueType``, or None for lists, tuples, dictionaries and states."""
    if value_type.WhichOneof("type") != "tensorType":
        return None
    t = value_type.tensorType
    shape = tuple(d.constant.size if d.WhichOneof("dimension") == "constant" else None for d in t.dimensions)
    return TensorInfo(type_name(t.dataType), shape)


class ValueDecoder:
    """Decodes the values of one program; weight files are opened once and shared."""

    def __init__(self, spec_file: Path):
        self.spec_file = Path(spec_file)
        self._blobs: dict[Path, BlobFile] = {}

    def blob_file(self, file_name: str) -> BlobFile:
        path = resolve_program_file(self.spec_file, file_name)
        if path not in self._blobs:
            if not path.is_file():
                raise ValueError(f"the weight file {file_name} is missing")
            self._blobs[path] = BlobFile(path)
        return self._blobs[path]

    def decode(self, value):
        """A ``MIL_pb2.Value`` as numpy (or a list/dict for non-tensor values)."""
        kind = value.WhichOneof("value")
        if kind == "blobFileValue":
            info = tensor_info(value.type)
            if info is None or any(d is None for d in info.shape):
                raise ValueError("a weight-file value must be a tensor of fixed shape")
            count = int(np.prod(info.shape, dtype=np.int64))
            blob = value.blobFileValue
            return self.blob_file(blob.fileName).read(int(blob.offset), info.dtype, count).reshape(info.shape)
        if kind == "immediateValue":
            return self._immediate(value.immediateValue, value.type)
        raise ValueError(f"unsupported value kind {kind!r}")

    def _immediate(self, immediate, value_type):
        kind = immediate.WhichOneof("value")
        if kind == "tensor":
            return _tensor_literal(immediate.tensor, tensor_info(value_type))
        if kind == "list":
            item_type = value_type.listType.type
            return [self._immediate(v.immediateValue, v.type if v.HasField("type") else item_type)
                    for v in immediate.list.values]
        if kind == "tuple":
            return [self.decode(v) for v in immediate.tuple.values]
        if kind == "dictionary":
            return {_scalar(self.decode(e.key)): self.decode(e.value) for e in immediate.dictionary.values}
        raise ValueError(f"unsupported immediate value kind {kind!r}")


def _scalar(value):
    arr = np.asarray(value)
    return arr.item() if arr.size == 1 else value


def _tensor_literal(tensor, info: TensorInfo | None) -> np.ndarray:
    if info is None:
        raise ValueError("a tensor literal without a tensor type")
    if any(d is None for d in info.shape):
        raise ValueError(f"a tensor literal of unknown shape {info}")
    count = int(np.prod(info.shape, dtype=np.int64))
    if info.dtype in _IN_BYTES:
        raw = np.frombuffer(tensor.bytes.values, np.uint8)
        if info.dtype in SUBBYTE_BITS:
            flat = unpack_subbyte(raw, info.dtype, count)
        else:
            flat = raw.view(NUMPY_TYPES[info.dtype])
    elif info.dtype == "string":
        flat = np.array([s.decode("utf-8") if isinstance(s, bytes) else s for s in tensor.strings.values],
                        dtype=object)
    else:
        field = tensor.WhichOneof("value")
        if field is None:
            values = []
        else:
            values = list(getattr(tensor, field).values)
        flat = np.array(values, dtype=NUMPY_TYPES[info.dtype])
    if flat.size != count:
        raise ValueError(f"a {info} literal holds {flat.size} values instead of {count}")
    return flat.reshape(info.shape)
