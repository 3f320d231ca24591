"""Allocations: which GGUF type each quantizable matrix gets, and what that costs in exact bytes.

An allocation is a plain ``dict[str, str]``: GGUF tensor name (``blk.3.ffn_down.weight``) -> GGUF type name
(``"Q4_K"``). A :class:`Slot` is one quantizable matrix with the formats legal for its shape, ordered by
bits per weight; every allocator (uniform, presets, greedy, SAC) chooses from ``slot.formats`` only.

Budget accounting is in bytes *as stored in the file*: each tensor's data is padded to the GGUF alignment
(32 bytes), so ``Slot.file_bytes(fmt)`` is what choosing ``fmt`` adds to the exported file. Bytes of the
fixed tensors (embeddings, norms) and of the header come from :func:`ramp.gguf_export.file_overhead`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ramp.errors import RampError
from ramp.formats import QUANT_CHOICES, allowed_formats, get_format
from ramp.io import atomic_path, atomic_write_text

GGUF_ALIGNMENT = 32  # gguf-py's and llama.cpp's default ``general.alignment``

Allocation = dict[str, str]


class AllocationError(RampError, ValueError):
    """An allocation or budget that cannot be used (the message names the tensor, format or byte count)."""


def padded(nbytes: int, alignment: int = GGUF_ALIGNMENT) -> int:
    return -(-nbytes // alignment) * alignment


@dataclass(frozen=True)
class Slot:
    """One quantizable matrix: ``shape`` is ``[rows, cols]`` (cols = GGUF row length), ``formats`` by bpw."""

    gguf_name: str
    block: int
    role: str
    shape: tuple[int, int]
    formats: tuple[str, ...]

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]

    def data_bytes(self, fmt: str) -> int:
        """Bytes of the tensor data in format ``fmt`` (no padding)."""
        self.check(fmt)
        return get_format(fmt).bytes_for(self.shape)

    def file_bytes(self, fmt: str) -> int:
        """Bytes ``fmt`` costs in a GGUF file: the data padded to the alignment."""
        return padded(self.data_bytes(fmt))

    def check(self, fmt: str) -> None:
        if fmt not in self.formats:
            raise AllocationError(
                f"{self.gguf_name}: format {fmt!r} is not legal for shape {list(self.shape)}; "
                f"legal formats: {', '.join(self.formats)}"
            )


def slots_for(matrices: Iterable, choices: tuple[str, ...] = QUANT_CHOICES) -> list[Slot]:
    """Slots for ``LoadedModel.matrices()`` (anything with gguf_name, block, role, shape) in model order."""
    out = []
    for m in matrices:
        fmts = tuple(f.name for f in allowed_formats(tuple(m.shape), choices))
        if not fmts:
            raise AllocationError(f"{m.gguf_name}: no format in {choices} is legal for shape {list(m.shape)}")
        out.append(Slot(m.gguf_name, int(m.block), str(m.role), (int(m.shape[0]), int(m.shape[1])), fmts))
    return out


def validate(slots: list[Slot], allocation: Mapping[str, str]) -> None:
    """Raise :class:`AllocationError` unless ``allocation`` gives every slot exactly one legal format."""
    names = {s.gguf_name for s in slots}
    unknown = sorted(set(allocation) - names)
    if unknown:
        raise AllocationError(f"allocation names tensors that are not quantizable matrices: {unknown[:5]}")
    missing = [s.gguf_name for s in slots if s.gguf_name not in allocation]
    if missing:
        raise AllocationError(f"allocation leaves {len(missing)} matrices without a format, e.g. {missing[:3]}")
    for s in slots:
        s.check(allocation[s.gguf_name])


def matrix_bytes(slots: list[Slot], allocation: Mapping[str, str]) -> int:
    """File bytes of the quantizable matrices under ``allocation`` (validated first)."""
    validate(slots, allocation)
    return sum(s.file_bytes(allocation[s.gguf_name]) for s in slots)


def min_matrix_bytes(slots: list[Slot]) -> int:
    return sum(s.file_bytes(s.formats[0]) for s in slots)


def uniform(slots: list[Slot], fmt: str) -> Allocation:
    """Every slot in ``fmt``; raises naming the first slot where ``fmt`` is not legal (never falls back)."""
    for s in slots:
        s.check(fmt)
    return {s.gguf_name: fmt for s in slots}


def bits_per_weight(slots: list[Slot], allocation: Mapping[str, str]) -> float:
    """Mean bits per weight of the matrices (data bytes, block scales included, no padding)."""
    validate(slots, allocation)
    n = sum(s.params for s in slots)
    return 8.0 * sum(s.data_bytes(allocation[s.gguf_name]) for s in slots) / n


def allocation_hash(allocation: Mapping[str, str]) -> str:
    """A stable content hash of an allocation (sha256 of its sorted JSON), for caches and provenance."""
    blob = json.dumps(dict(sorted(allocation.items())), separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def tensor_type_recipe(allocation: Mapping[str, str]) -> str:
    """The allocation in ``llama-quantize --tensor-type-file`` format: one ``name=type`` line per tensor.

    Names are regex-escaped and anchored so that each line matches exactly one tensor.
    """
    lines = []
    for name, fmt in allocation.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else name
        lines.append(f"^{base.replace('.', '[.]')}[.]weight$={fmt.lower()}")
    return "\n".join(lines) + "\n"


_SCHEMA = pa.schema(
    [
        ("gguf_name", pa.string()),
        ("block", pa.int32()),
        ("role", pa.string()),
        ("rows", pa.int64()),
        ("cols", pa.int64()),
        ("format", pa.string()),
        ("data_bytes", pa.int64()),
        ("bpw", pa.float64()),
    ]
)


def save_allocation(path: str | Path, slots: list[Slot], allocation: Mapping[str, str]) -> Path:
    """Write ``allocation`` as Parquet (``.parquet``) or JSON (anything else), atomically, in slot order."""
    validate(slots, allocation)
    path = Path(path)
    if path.suffix == ".parquet":
        rows = [
            {
                "gguf_name": s.gguf_name,
                "block": s.block,
                "role": s.role,
                "rows": s.shape[0],
                "cols": s.shape[1],
                "format": allocation[s.gguf_name],
                "data_bytes": s.data_bytes(allocation[s.gguf_name]),
                "bpw": get_format(allocation[s.gguf_name]).bpw,
            }
            for s in slots
        ]
        table = pa.Table.from_pylist(rows, schema=_SCHEMA)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
    else:
        atomic_write_text(path, json.dumps({s.gguf_name: allocation[s.gguf_name] for s in slots}, indent=1) + "\n")
    return path


def _unique(path: Path, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object's pairs as a dict; a key given twice (json keeps the last silently) is an error."""
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise AllocationError(f"{path}: tensor {key!r} is named twice")
        seen.add(key)
    return dict(pairs)


def load_allocation(path: str | Path) -> Allocation:
    """Read an allocation written by :func:`save_allocation` (Parquet for ``.parquet``, JSON otherwise); a file
    that is not one is an :class:`AllocationError` naming it."""
    path = Path(path)
    if not path.is_file():
        raise AllocationError(f"{path}: {'a folder, not an' if path.is_dir() else 'no such'} allocation file")
    if path.suffix == ".parquet":
        try:
            t = pq.read_table(path, columns=["gguf_name", "format"]).to_pydict()
        except (pa.ArrowException, OSError) as e:  # not Parquet, truncated, no such columns
            raise AllocationError(f"{path}: not an allocation Parquet file ({' '.join(str(e).split())[:200]})") from e
        names, formats = t["gguf_name"], t["format"]
        if len(set(names)) != len(names):
            raise AllocationError(f"{path}: a tensor is named twice in column gguf_name")
        data = dict(zip(names, formats, strict=True))
        kind = "table with string columns gguf_name and format"
    else:
        try:
            data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=lambda kv: _unique(path, kv))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:  # RecursionError: nested too deep
            raise AllocationError(f"{path}: not JSON ({e}); expected an object of tensor name -> format") from e
        kind = "JSON object mapping tensor names to format names"
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise AllocationError(f"{path}: expected a {kind}")
    return data


def read_tensor_type_recipe(text: str) -> Allocation:
    """The allocation of a :func:`tensor_type_recipe` (``^name[.]weight$=type`` lines); other lines are an error."""
    out: dict[str, str] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        pattern, sep, fmt = line.rpartition("=")
        if not sep or not pattern.startswith("^") or not pattern.endswith("[.]weight$"):
            raise AllocationError(f"recipe line {i}: {line!r} is not '^<tensor>[.]weight$=<type>'")
        name = pattern[1 : -len("[.]weight$")].replace("[.]", ".") + ".weight"
        out[name] = fmt.upper()
    return out
