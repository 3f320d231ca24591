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

Both readers trust no number in the file: the GGUF structure is walked with bounds checks first
(:func:`ramp.gguf_check.validate_gguf`), every legacy count and length is checked against the bytes left before
anything is read, and the contents must make sense (sums finite and >= 0, token counts whole numbers >= 1,
paired and shaped alike, no duplicates, no trailing bytes). Any problem is one :class:`ImatrixError` naming
the file and the entry or key.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ramp.errors import RampError
from ramp.gguf_check import GGUFLayout, TensorEntry, validate_gguf
from ramp.io import atomic_path

KEY_TYPE = "general.type"
STRING, UINT32 = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT32
SUM_SUFFIX = ".in_sum2"
COUNT_SUFFIX = ".counts"
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"


# llama-imatrix records the weights of matrix multiplications by their llama.cpp names ("blk.3.attn_q.weight"):
# an entry name must be one of gguf-py's tensor-name patterns (any architecture) plus ".weight".
KNOWN_NAME = re.compile(
    "^(?:"
    + "|".join(
        re.escape(n).replace(re.escape("{bid}"), "(?:0|[1-9][0-9]{0,4})")
        for n in sorted(set(gguf.TENSOR_NAMES.values()))
    )
    + r")\.weight$"
)


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
        if not KNOWN_NAME.match(name):  # the readers refuse other names
            raise ImatrixError(f"imatrix entry {name!r} is not a llama.cpp weight name (e.g. 'blk.0.attn_q.weight')")
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


def _check_entry(path: Path, name: str, sums: np.ndarray, counts: np.ndarray) -> None:
    """A llama.cpp weight name; sums of squares finite and >= 0; token counts whole numbers >= 1."""
    if not KNOWN_NAME.match(name):
        raise ImatrixError(
            f"{path}: imatrix entry {name!r} is not a llama.cpp weight name (e.g. 'blk.0.attn_q.weight')"
        )
    ok = np.isfinite(sums) & (sums >= 0)
    if not ok.all():
        raise ImatrixError(
            f"{path}: imatrix entry {name!r} holds {sums[~ok][0]} (sums of squares must be finite and >= 0)"
        )
    ok = np.isfinite(counts) & (counts >= 1) & (np.rint(counts) == counts)
    if not ok.all():
        raise ImatrixError(
            f"{path}: imatrix entry {name!r} has token count {counts[~ok][0]}; expected a whole number >= 1"
        )


def _imatrix_dims(path: Path, t: TensorEntry) -> tuple[int, int]:
    """(ne0, ne1) of an imatrix tensor; ggml drops trailing 1s from the rank, so ``[cols]`` means ``[cols, 1]``."""
    dims = t.shape + (1,) * (4 - len(t.shape))
    if any(d != 1 for d in dims[2:]):
        raise ImatrixError(f"{path}: tensor {t.name!r} has ggml shape {list(t.shape)}, expected [cols, n_mat]")
    return dims[0], dims[1]


def _check_gguf_layout(path: Path, layout: GGUFLayout) -> dict[str, tuple[TensorEntry, TensorEntry]]:
    """The keys llama-quantize reads, with its types; entry name -> (sums, counts) tensors, F32 and paired."""
    kind = layout.scalars.get(KEY_TYPE)
    if layout.value_types.get(KEY_TYPE) != STRING or kind != "imatrix":
        raise ImatrixError(f"{path}: GGUF key {KEY_TYPE!r} = {kind!r}, expected the string 'imatrix'")
    elem, n = layout.arrays.get(KEY_DATASETS, (None, 0))
    if elem != STRING or n < 1:
        raise ImatrixError(f"{path}: GGUF key {KEY_DATASETS!r} must be a non-empty array of strings")
    for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        value = layout.scalars.get(key)
        # llama-quantize reads both with gguf_get_val_u32, which aborts on any other type
        if layout.value_types.get(key) != UINT32 or not isinstance(value, int) or value < 1:
            raise ImatrixError(f"{path}: GGUF key {key!r} = {value!r} must be a UINT32 >= 1")
    found: dict[str, dict[str, TensorEntry]] = {}
    for t in layout.tensors:
        suffix = next((s for s in (SUM_SUFFIX, COUNT_SUFFIX) if t.name.endswith(s)), "")
        if not suffix or t.name == suffix:
            raise ImatrixError(
                f"{path}: tensor {t.name!r} is neither '<weight>{SUM_SUFFIX}' nor '<weight>{COUNT_SUFFIX}'"
            )
        if t.type_id != gguf.GGMLQuantizationType.F32:
            raise ImatrixError(f"{path}: tensor {t.name!r} is {t.type_name}, expected F32")
        found.setdefault(t.name.removesuffix(suffix), {})[suffix] = t
    if not found:
        raise ImatrixError(f"{path}: no imatrix entries")
    entries = {}
    for name, pair in sorted(found.items()):
        if len(pair) != 2:
            have, lack = (SUM_SUFFIX, COUNT_SUFFIX) if SUM_SUFFIX in pair else (COUNT_SUFFIX, SUM_SUFFIX)
            raise ImatrixError(f"{path}: imatrix entry {name!r} has {name + have!r} but no {name + lack!r}")
        (cols, n_mat), (one, n_counts) = _imatrix_dims(path, pair[SUM_SUFFIX]), _imatrix_dims(path, pair[COUNT_SUFFIX])
        if one != 1 or n_counts != n_mat:
            raise ImatrixError(
                f"{path}: tensor {name + COUNT_SUFFIX!r} has ggml shape [{one}, {n_counts}], expected [1, {n_mat}] "
                f"to match {name + SUM_SUFFIX!r} [{cols}, {n_mat}]"
            )
        entries[name] = (pair[SUM_SUFFIX], pair[COUNT_SUFFIX])
    return entries


def _read_gguf(path: Path) -> ImatrixFile:
    layout = validate_gguf(path, error=ImatrixError)  # bounds, types and data layout before gguf-py sees it
    entries = _check_gguf_layout(path, layout)
    try:
        reader = gguf.GGUFReader(path)
        data = {t.name: np.array(t.data, dtype=np.float32).reshape(-1) for t in reader.tensors}
        datasets = [str(x) for x in reader.fields[KEY_DATASETS].contents()]
    except Exception as e:  # noqa: BLE001 - anything the structural check let through is still one clear error
        raise ImatrixError(f"{path}: corrupt GGUF imatrix ({type(e).__name__}: {e})") from e
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for name, (s, c) in entries.items():
        sums[name], count = data[s.name], data[c.name].astype(np.float64)
        _check_entry(path, name, sums[name], count)
        counts[name] = count.astype(np.int64)
    return ImatrixFile(
        sums=sums,
        counts=counts,
        datasets=datasets,
        chunk_count=int(layout.scalars[KEY_CHUNK_COUNT]),
        chunk_size=int(layout.scalars[KEY_CHUNK_SIZE]),
    )


class _Bytes:
    """A cursor over a legacy imatrix that checks every read against the bytes left."""

    def __init__(self, path: Path, raw: bytes) -> None:
        self.path, self.raw, self.pos = path, raw, 0

    @property
    def left(self) -> int:
        return len(self.raw) - self.pos

    def fail(self, what: str) -> ImatrixError:
        return ImatrixError(f"{self.path}: legacy imatrix: {what} (at byte {self.pos} of {len(self.raw)})")

    def int32(self, what: str) -> int:
        if self.left < 4:
            raise self.fail(f"truncated: {what} needs 4 bytes, {self.left} left")
        (v,) = struct.unpack_from("<i", self.raw, self.pos)
        self.pos += 4
        return v

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.left:
            raise self.fail(f"{what} claims {n} bytes, {self.left} left")
        out = self.raw[self.pos : self.pos + n]
        self.pos += n
        return out

    def text(self, n: int, what: str) -> str:
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} is not UTF-8 ({e.reason})") from e


LEGACY_MIN_ENTRY = 4 + 1 + 4 + 4 + 4  # name length, a 1-byte name, ncall, nval, one float


def _read_legacy(path: Path) -> ImatrixFile:
    cur = _Bytes(path, path.read_bytes())
    n_entries = cur.int32("entry count")
    if not 1 <= n_entries <= cur.left // LEGACY_MIN_ENTRY:
        raise cur.fail(f"entry count {n_entries}: expected 1 to {cur.left // LEGACY_MIN_ENTRY} for the file's size")
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for i in range(n_entries):
        n = cur.int32(f"name length of entry #{i}")
        if n < 1:
            raise cur.fail(f"entry #{i} has name length {n}; expected >= 1")
        name = cur.text(n, f"name of entry #{i}")
        if name in sums:
            raise cur.fail(f"entry {name!r} appears twice")
        ncall = cur.int32(f"call count of {name!r}")
        nval = cur.int32(f"value count of {name!r}")
        if ncall < 1 or nval < 1:
            raise cur.fail(f"entry {name!r} has ncall={ncall}, nval={nval}; expected both >= 1")
        values = np.frombuffer(cur.take(4 * nval, f"{nval} values of {name!r}"), dtype="<f4").astype(np.float32)
        _check_entry(path, name, values, np.array([ncall], dtype=np.float64))
        sums[name], counts[name] = values, np.array([ncall], dtype=np.int64)
    chunks, datasets = 0, []
    if cur.left:  # the newest legacy files end with the chunk count and the dataset name
        chunks = cur.int32("chunk count")
        if chunks < 1:
            raise cur.fail(f"chunk count {chunks}; expected >= 1")
        n = cur.int32("dataset name length")
        dataset = cur.text(n, "dataset name")
        if cur.left:
            raise cur.fail(f"{cur.left} bytes of trailing garbage after the dataset name")
        datasets = [dataset] if dataset else []
    return ImatrixFile(sums, counts, datasets, chunks, 0, legacy=True)


def read_imatrix_file(path: str | Path) -> ImatrixFile:
    """Everything in a GGUF or legacy ``.dat`` imatrix file."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(f"{path}: no such imatrix file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
        return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    except OSError as e:
        raise ImatrixError(f"{path}: cannot read the imatrix file ({e.strerror})") from e


def read_imatrix(path: str | Path) -> dict[str, np.ndarray]:
    """gguf_name -> mean squared activation per input column (float32), as llama-quantize uses it."""
    return read_imatrix_file(path).means()
