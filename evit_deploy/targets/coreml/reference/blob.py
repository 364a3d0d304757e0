"""Reader of Core ML weight files (``weights/weight.bin``, MIL blob storage version 2).

Layout: a 64-byte storage header (blob count, version), then for each blob a 64-byte
metadata record (sentinel ``0xDEADBEEF``, element type, size in bytes, offset of the data)
followed by the data, each 64-byte aligned. A program's ``BlobFileValue.offset`` points at
the metadata record, not at the data.

Sub-byte element types (uint1/2/3/4/6, int4) are packed least significant bit first,
the same packing the ML program uses for sub-byte immediate values.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

SENTINEL = 0xDEADBEEF
STORAGE_VERSION = 2
RECORD_BYTES = 64

_HEADER = np.dtype([("count", "<u4"), ("version", "<u4"), ("reserved", "<u8", (7,))])
_METADATA = np.dtype([("sentinel", "<u4"), ("dtype", "<u4"), ("size", "<u8"), ("offset", "<u8"),
                      ("reserved", "<u8", (5,))])

#: Element type codes of the blob format, by the names the ML program uses for them.
BLOB_TYPES = {1: "fp16", 2: "fp32", 3: "uint8", 4: "int8", 6: "int16", 7: "uint16", 8: "int4",
              9: "uint1", 10: "uint2", 11: "uint4", 12: "uint3", 13: "uint6", 14: "int32", 15: "uint32"}

#: numpy storage of each element type (sub-byte types are widened to one byte).
NUMPY_TYPES = {"fp16": np.float16, "fp32": np.float32, "fp64": np.float64, "bool": np.bool_,
               "int8": np.int8, "int16": np.int16, "int32": np.int32, "int64": np.int64,
               "uint8": np.uint8, "uint16": np.uint16, "uint32": np.uint32, "uint64": np.uint64,
               "int4": np.int8, "uint1": np.uint8, "uint2": np.uint8, "uint3": np.uint8,
               "uint4": np.uint8, "uint6": np.uint8}

SUBBYTE_BITS = {"int4": 4, "uint1": 1, "uint2": 2, "uint3": 3, "uint4": 4, "uint6": 6}


def unpack_subbyte(packed: np.ndarray, type_name: str, count: int) -> np.ndarray:
    """``count`` elements of a sub-byte type packed LSB-first into ``packed`` bytes."""
    nbits = SUBBYTE_BITS[type_name]
    bits = np.unpackbits(np.ascontiguousarray(packed, dtype=np.uint8), bitorder="little")
    if bits.size < count * nbits:
        raise ValueError(f"{packed.size} bytes hold fewer than {count} {type_name} elements")
    bits = bits[:count * nbits].reshape(count, nbits).astype(np.int16)
    values = (bits << np.arange(nbits, dtype=np.int16)).sum(axis=1)
    if type_name.startswith("int"):
        values = np.where(values >= 1 << (nbits - 1), values - (1 << nbits), values)
    return values.astype(NUMPY_TYPES[type_name])


def element_bytes(type_name: str, count: int) -> int:
    """Bytes that ``count`` packed elements of ``type_name`` occupy."""
    if type_name in SUBBYTE_BITS:
        return (count * SUBBYTE_BITS[type_name] + 7) // 8
    return count * np.dtype(NUMPY_TYPES[type_name]).itemsize


class BlobFile:
    """One weight file, read once; :meth:`read` decodes the blob at a metadata offset."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.data = self.path.read_bytes()
        if len(self.data) < RECORD_BYTES:
            raise ValueError(f"{self.path.name} is too short to be a Core ML weight file")
        header = np.frombuffer(self.data, _HEADER, count=1)[0]
        if int(header["version"]) != STORAGE_VERSION:
            raise ValueError(f"{self.path.name}: blob storage version {int(header['version'])} "
                             f"(only version {STORAGE_VERSION} is known)")
        self.count = int(header["count"])

    def metadata(self, offset: int) -> tuple[str, int, int]:
        """(element type, data offset, data size in bytes) of the blob recorded at ``offset``."""
        if offset < RECORD_BYTES or offset + RECORD_BYTES > len(self.data):
            raise ValueError(f"{self.path.name}: blob offset {offset} is outside the file")
        meta = np.frombuffer(self.data, _METADATA, count=1, offset=offset)[0]
        if int(meta["sentinel"]) != SENTINEL:
            raise ValueError(f"{self.path.name}: no blob metadata at offset {offset} (bad sentinel)")
        code = int(meta["dtype"])
        if code not in BLOB_TYPES:
            raise ValueError(f"{self.path.name}: blob at offset {offset} has unknown element type {code}")
        start, size = int(meta["offset"]), int(meta["size"])
        if start + size > len(self.data):
            raise ValueError(f"{self.path.name}: blob at offset {offset} runs past the end of the file")
        return BLOB_TYPES[code], start, size

    def read(self, offset: int, type_name: str, count: int) -> np.ndarray:
        """The ``count`` elements of the blob at ``offset``, whose type must be ``type_name``."""
        stored, start, size = self.metadata(offset)
        if stored != type_name:
            raise ValueError(f"{self.path.name}: blob at offset {offset} holds {stored}, "
                             f"the program declares {type_name}")
        expected = element_bytes(type_name, count)
        if size != expected:
            raise ValueError(f"{self.path.name}: blob at offset {offset} has {size} bytes, "
                             f"{count} {type_name} elements need {expected}")
        raw = np.frombuffer(self.data, np.uint8, count=size, offset=start)
        if type_name in SUBBYTE_BITS:
            return unpack_subbyte(raw, type_name, count)
        return raw.view(NUMPY_TYPES[type_name]).copy()
