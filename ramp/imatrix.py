"""Importance-matrix files in the format the pinned llama.cpp (llama-cpp-python 0.3.36) reads and writes.

``llama-imatrix`` writes GGUF by default (``--output-format dat`` gives the legacy binary); ``llama-quantize
--imatrix`` reads both (it tries GGUF first). We write the GGUF form, as ``llama-imatrix`` does:

- key ``general.type`` = ``"imatrix"``; ``imatrix.datasets`` (array of strings), ``imatrix.chunk_count``
  (uint32, chunks the sums cover), ``imatrix.chunk_size`` (uint32, tokens per chunk). llama-quantize refuses
  a GGUF imatrix without these three keys.
- per weight tensor ``<gguf_name>`` two F32 tensors: ``<gguf_name>.in_sum2`` with ggml shape
  ``[cols, n_mat]`` (sum over tokens of x_j^2; ``n_mat`` = 1 for dense matrices, experts for MoE) and
  ``<gguf_name>.counts`` with shape ``[1, n_mat]`` (tokens summed). Tensors are sorted by name.

llama-quantize divides ``in_sum2`` by ``counts``, so it uses the mean squared activation per input column: the
vector :meth:`ramp.calib.CalibrationStats.imatrix` returns. :func:`read_imatrix` also reads the legacy
``.dat`` form (``int32 n_entries``; per entry ``int32 len, name, int32 ncall, int32 nval, float32[nval]``
holding mean x^2 times ncall; optional trailing ``int32 chunks, int32 len, dataset``).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ramp.errors import RampError
from ramp.io import atomic_path

SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


class ImatrixError(RampError, ValueError):
    """An imatrix that cannot be written or read (the message names the entry and what was expected)."""


@dataclass
class ImatrixFile:
    """Contents of an imatrix file: raw sums and counts per tensor, and the metadata."""

    sums: dict[str, np.ndarray]  # gguf_name -> float32[n_mat * cols], sum of x^2 (legacy: mean * ncall)
    counts: dict[str, np.ndarray]  # gguf_name -> int64[n_mat], tokens (legacy: [ncall])
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    legacy: bool = False

    def means(self) -> dict[str, np.ndarray]:
        """Mean squared activation per input column (float32), as llama-quantize derives it."""
        out = {}
        for name, s in self.sums.items():
            c = self.counts[name].astype(np.float64)
            per = s.reshape(len(c), -1).astype(np.float64)
            # llama-quantize: a matrix with zero count gets weight 1 (legacy: the sums as they are).
            fill = 1.0 if not self.legacy else per
            with np.errstate(invalid="ignore", divide="ignore"):
                mean = np.where(c[:, None] > 0, per / np.maximum(c[:, None], 1), fill)
            out[name] = mean.reshape(-1).astype(np.float32)
        return out


def write_imatrix(
    path: str | Path,
    imatrix: Mapping[str, np.ndarray],
    n_chunks: int,
    dataset: str | Sequence[str],
    chunk_size: int = 512,
    counts: Mapping[str, int] | None = None,
) -> Path:
    """Write mean squared activations ``imatrix`` (gguf_name -> float32[cols]) as a GGUF imatrix, atomically.

    ``n_chunks`` chunks of ``chunk_size`` tokens produced it; each entry's token count is ``counts[name]``
    (default ``n_chunks * chunk_size``) and the stored sum is mean x count, so llama-quantize recovers the mean.
    """
    if n_chunks < 1 or chunk_size < 1:
        raise ImatrixError(f"n_chunks={n_chunks} and chunk_size={chunk_size} must be >= 1")
    if not imatrix:
        raise ImatrixError("imatrix is empty: no entries to write")
    datasets = [dataset] if isinstance(dataset, str) else list(dataset)
    if not datasets or not all(datasets):
        raise ImatrixError(f"dataset {dataset!r} must name the calibration text (llama-quantize needs the key)")
    writer = gguf.GGUFWriter(None, "imatrix")
    # llama-imatrix files carry no general.architecture; keep ours the same.
    writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
    writer.add_type(gguf.GGUFType.IMATRIX)
    writer.add_array(KEY_DATASETS, datasets)
    writer.add_uint32(KEY_CHUNK_COUNT, int(n_chunks))
    writer.add_uint32(KEY_CHUNK_SIZE, int(chunk_size))
    for name in sorted(imatrix):
        v = np.asarray(imatrix[name], dtype=np.float32).reshape(-1)
        if v.size == 0 or not np.isfinite(v).all() or (v < 0).any():
            raise ImatrixError(f"imatrix entry {name!r} must be a non-empty, finite, non-negative vector")
        n = int(counts[name]) if counts is not None else n_chunks * chunk_size
        if n < 1:
            raise ImatrixError(f"imatrix entry {name!r} has token count {n}; expected >= 1")
        writer.add_tensor(name + SUM_SUFFIX, (v.astype(np.float64) * n).astype(np.float32).reshape(1, -1))
        writer.add_tensor(name + COUNT_SUFFIX, np.array([[float(n)]], dtype=np.float32))
    path = Path(path)
    with atomic_path(path) as tmp:
        writer.path = tmp
        writer.write_header_to_file(path=tmp)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return path


def _read_gguf(path: Path) -> ImatrixFile:
    reader = gguf.GGUFReader(path)
    fields = reader.fields
    for key in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        if key not in fields:
            raise ImatrixError(f"{path}: GGUF imatrix lacks the {key!r} key (llama-quantize would refuse it)")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor {t.name} is {t.tensor_type.name}, expected F32")
        if t.name.endswith(SUM_SUFFIX):
            sums[t.name.removesuffix(SUM_SUFFIX)] = np.array(t.data, dtype=np.float32).reshape(-1)
        elif t.name.endswith(COUNT_SUFFIX):
            counts[t.name.removesuffix(COUNT_SUFFIX)] = np.rint(np.array(t.data, dtype=np.float64)).reshape(-1)
    unpaired = sorted(set(sums) ^ set(counts))
    if unpaired:
        raise ImatrixError(f"{path}: sums and counts do not pair up for {unpaired[:5]}")
    if not sums:
        raise ImatrixError(f"{path}: no imatrix entries")
    return ImatrixFile(
        sums=sums,
        counts={k: v.astype(np.int64) for k, v in counts.items()},
        datasets=[str(x) for x in fields[KEY_DATASETS].contents()],
        chunk_count=int(fields[KEY_CHUNK_COUNT].contents()),
        chunk_size=int(fields[KEY_CHUNK_SIZE].contents()),
    )


def _read_legacy(path: Path) -> ImatrixFile:
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise ImatrixError(f"{path}: truncated legacy imatrix at byte {pos}")
        out = struct.unpack_from(fmt, raw, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1:
        raise ImatrixError(f"{path}: legacy imatrix with {n_entries} entries")
    sums, counts = {}, {}
    for _ in range(n_entries):
        (n,) = take("<i")
        name = take(f"<{n}s")[0].decode()
        ncall, nval = take("<ii")
        sums[name] = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        counts[name] = np.array([ncall], dtype=np.int64)
    chunks, datasets = 0, []
    if pos < len(raw):
        (chunks,) = take("<i")
        (n,) = take("<i")
        if n > 0:
            datasets.append(take(f"<{n}s")[0].decode())
    return ImatrixFile(sums, counts, datasets, chunks, 0, legacy=True)


def read_imatrix_file(path: str | Path) -> ImatrixFile:
    """Everything in a GGUF or legacy ``.dat`` imatrix file."""
    path = Path(path)
    if not path.exists():
        raise ImatrixError(f"{path}: no such imatrix file")
    with open(path, "rb") as f:
        magic = f.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """gguf_name -> mean squared activation per input column (float32), as llama-quantize uses it."""
    return read_imatrix_file(path).means()
