"""Walk a GGUF file's header with bounds checks before any reader trusts it.

gguf-py's reader believes every count, length and type it reads: a scalar key whose value type is changed to
ARRAY makes it loop over ~8e18 items, and offsets that overlap or point past the data are accepted. This module
reads the header itself, checking every number against the bytes that are left, and the tensor data layout
against the file size (the way llama.cpp's and gguf-py's writers lay it out: each tensor at an aligned offset,
one after the other, padded to the alignment). Only a file that passes is handed to ``gguf.GGUFReader``.
"""

from __future__ import annotations

import math
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from ramp.errors import RampError

MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ELEMENTS = 2**48  # per tensor: far above any real model, far below an overflow
MAX_KEY_BYTES = 65535
SCALARS: dict[int, tuple[str, str]] = {  # value type -> (struct format, name)
    0: ("<B", "UINT8"),
    1: ("<b", "INT8"),
    2: ("<H", "UINT16"),
    3: ("<h", "INT16"),
    4: ("<I", "UINT32"),
    5: ("<i", "INT32"),
    6: ("<f", "FLOAT32"),
    7: ("<?", "BOOL"),
    10: ("<Q", "UINT64"),
    11: ("<q", "INT64"),
    12: ("<d", "FLOAT64"),
}
STRING, ARRAY = 8, 9
INTEGER_TYPES = {0, 1, 2, 3, 4, 5, 10, 11}
FLOAT_TYPES = {6, 12}


class GGUFFormatError(RampError, ValueError):
    """A GGUF file whose structure is invalid (the message names the file, the field and the byte offset)."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]  # GGUF order: ne0 (row length) first
    type_id: int
    offset: int  # relative to the data section
    nbytes: int

    @property
    def type_name(self) -> str:
        return gguf.GGMLQuantizationType(self.type_id).name


@dataclass(frozen=True)
class GGUFLayout:
    """What the header says, checked: scalar values and array summaries of every key, and the tensors."""

    version: int
    scalars: dict[str, Any]  # key -> value of every non-array key (strings decoded)
    value_types: dict[str, int]  # key -> GGUF value type
    arrays: dict[str, tuple[int, int]]  # key -> (element type, length)
    tensors: tuple[TensorEntry, ...]
    alignment: int
    data_offset: int
    file_size: int


class _Cursor:
    def __init__(self, buf: Any, size: int, path: Path, error: type[Exception]) -> None:
        self.buf, self.size, self.pos, self.path, self.error = buf, size, 0, path, error

    def fail(self, what: str) -> Exception:
        return self.error(f"{self.path}: invalid GGUF: {what} (at byte {self.pos} of {self.size})")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes, only {self.size - self.pos} left")

    def unpack(self, fmt: str, what: str) -> Any:
        n = struct.calcsize(fmt)
        self.need(n, what)
        (v,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return v

    def string(self, what: str, decode: bool = True, max_bytes: int | None = None) -> str | None:
        n = self.unpack("<Q", f"length of {what}")
        if max_bytes is not None and n > max_bytes:
            raise self.fail(f"{what} is {n} bytes long (at most {max_bytes})")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n]) if decode else None
        self.pos += n
        if raw is None:
            return None
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e.reason})") from e


def _skip_array(cur: _Cursor, key: str) -> tuple[int, int]:
    elem = cur.unpack("<I", f"element type of {key!r}")
    count = cur.unpack("<Q", f"length of array {key!r}")
    if elem == ARRAY:
        raise cur.fail(f"key {key!r} is an array of arrays (not supported)")
    if elem == STRING:
        if count * 8 > cur.size - cur.pos:  # every string has at least its 8-byte length
            raise cur.fail(f"array {key!r} claims {count} strings, more than the file can hold")
        for i in range(count):
            cur.string(f"{key}[{i}]", decode=False)
        return elem, count
    if elem not in SCALARS:
        raise cur.fail(f"array {key!r} has unknown element type {elem}")
    nbytes = count * struct.calcsize(SCALARS[elem][0])
    cur.need(nbytes, f"array {key!r} of {count} {SCALARS[elem][1]}")
    if elem in FLOAT_TYPES and count:
        import numpy as np

        values = np.frombuffer(cur.buf, dtype="<f4" if elem == 6 else "<f8", count=count, offset=cur.pos)
        if not np.isfinite(values).all():
            raise cur.fail(f"array {key!r} holds NaN or infinite values")
    cur.pos += nbytes
    return elem, count


def _tensor_nbytes(cur: _Cursor, name: str, dims: tuple[int, ...], type_id: int) -> int:
    try:
        qtype = gguf.GGMLQuantizationType(type_id)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise cur.fail(f"tensor {name!r} has unknown type {type_id}") from None
    if dims[0] % block:
        raise cur.fail(f"tensor {name!r}: row length {dims[0]} is not a multiple of {qtype.name}'s block {block}")
    return math.prod(dims) // block * type_size


def validate_gguf(path: str | Path, error: type[Exception] = GGUFFormatError) -> GGUFLayout:
    """Check ``path``'s GGUF structure without trusting any number in it; raise ``error`` naming what is wrong.

    Checked: magic and version; key/tensor counts, string and array lengths against the bytes left; value types
    (no unknown type, no array of arrays, finite float values); unique non-empty UTF-8 keys and tensor names;
    tensor ranks, dimensions, types and row lengths (a whole number of blocks); ``general.alignment``; tensor
    offsets aligned, inside the file, not overlapping, laid out one after the other from offset 0 with only
    alignment padding between them, and the data ending at the end of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file (expected a GGUF file)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise error(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    if size < 24:
        raise error(f"{path}: invalid GGUF: {size} bytes, shorter than the 24-byte header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        return _walk(_Cursor(buf, size, path, error))


def _walk(cur: _Cursor) -> GGUFLayout:
    cur.pos = 4  # the magic was checked by the caller
    version = cur.unpack("<I", "version")
    if version not in (2, 3):
        raise cur.fail(f"version {version} (supported: 2, 3)")
    n_tensors = cur.unpack("<Q", "tensor count")
    n_kv = cur.unpack("<Q", "key count")
    if n_kv * 13 > cur.size - cur.pos:  # a key/value takes at least 8 + 1 + 4 bytes
        raise cur.fail(f"key count {n_kv} is more than the file can hold")
    if n_tensors * 33 > cur.size - cur.pos:  # a tensor entry takes at least 8 + 1 + 4 + 8 + 4 + 8 bytes
        raise cur.fail(f"tensor count {n_tensors} is more than the file can hold")

    scalars: dict[str, Any] = {}
    value_types: dict[str, int] = {}
    arrays: dict[str, tuple[int, int]] = {}
    for i in range(n_kv):
        key = cur.string(f"key #{i}", max_bytes=MAX_KEY_BYTES)
        if not key:
            raise cur.fail(f"key #{i} is empty")
        if key in value_types:
            raise cur.fail(f"key {key!r} appears twice")
        vtype = cur.unpack("<I", f"value type of {key!r}")
        value_types[key] = vtype
        if vtype == STRING:
            scalars[key] = cur.string(f"value of {key!r}")
        elif vtype == ARRAY:
            arrays[key] = _skip_array(cur, key)
        elif vtype in SCALARS:
            v = cur.unpack(SCALARS[vtype][0], f"value of {key!r}")
            if vtype in FLOAT_TYPES and not math.isfinite(v):
                raise cur.fail(f"key {key!r} = {v} is not finite")
            scalars[key] = v
        else:
            raise cur.fail(f"key {key!r} has unknown value type {vtype}")

    alignment = 32
    if "general.alignment" in value_types:
        alignment = scalars.get("general.alignment", 0)
        if value_types["general.alignment"] != 4 or alignment <= 0 or alignment & (alignment - 1):
            raise cur.fail(f"general.alignment = {alignment!r} must be a UINT32 power of two")

    tensors: list[TensorEntry] = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = cur.string(f"name of tensor #{i}", max_bytes=MAX_KEY_BYTES)
        if not name or name in names:
            raise cur.fail(f"tensor #{i} name {name!r} is empty or repeated")
        names.add(name)
        n_dims = cur.unpack("<I", f"rank of tensor {name!r}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise cur.fail(f"tensor {name!r} has rank {n_dims} (1 to {MAX_DIMS})")
        dims = tuple(cur.unpack("<Q", f"dimension {d} of tensor {name!r}") for d in range(n_dims))
        if any(d < 1 for d in dims) or math.prod(dims) > MAX_ELEMENTS:
            raise cur.fail(f"tensor {name!r} has dimensions {list(dims)}")
        type_id = cur.unpack("<I", f"type of tensor {name!r}")
        offset = cur.unpack("<Q", f"data offset of tensor {name!r}")
        if offset % alignment:
            raise cur.fail(f"tensor {name!r} data offset {offset} is not a multiple of the alignment {alignment}")
        tensors.append(TensorEntry(name, dims, type_id, offset, _tensor_nbytes(cur, name, dims, type_id)))

    data_offset = -(-cur.pos // alignment) * alignment
    end = 0  # data laid out back to back from offset 0, each tensor padded to the alignment
    for t in sorted(tensors, key=lambda t: t.offset):
        if t.offset != end:
            what = "overlaps the tensor before it" if t.offset < end else f"leaves a gap of {t.offset - end} bytes"
            raise cur.fail(f"tensor {t.name!r} at data offset {t.offset} {what} (expected offset {end})")
        end = -(-(t.offset + t.nbytes) // alignment) * alignment
    if tensors:
        last = max(tensors, key=lambda t: t.offset)
        data_end = data_offset + last.offset + last.nbytes
        if data_end > cur.size:
            cur.pos = cur.size
            raise cur.fail(f"tensor {last.name!r} ends at byte {data_end}, past the end of the file")
        if cur.size > data_offset + end:
            cur.pos = data_offset + end
            raise cur.fail(f"{cur.size - data_offset - end} bytes after the last tensor's data")
    elif cur.size > data_offset:
        cur.pos = data_offset
        raise cur.fail(f"{cur.size - data_offset} bytes of data but no tensors")
    return GGUFLayout(version, scalars, value_types, arrays, tuple(tensors), alignment, data_offset, cur.size)
