"""Write a (mixed-precision) GGUF file from a torch model with gguf-py's writer, and verify it by reading it back.

Every quantizable matrix is written in the type its allocation gives it, with RAMP's own quantizer bytes (or
bytes quantized earlier, e.g. by the quantize stage); norms stay F32 (they carry Scale Folding's scales);
token embeddings (and an untied output) get a fixed type that counts in the budget. ``attn_q``/``attn_k``
rows are permuted into llama.cpp's RoPE order (the loader's inverse) and Gemma norms are stored as ``1 + w``.
Metadata of a GGUF source is carried over key by key (tokenizer, chat template, rope settings, ...); a
Hugging Face source gets the architecture hyper-parameters from its config. Provenance keys ``ramp.*`` record
the allocation hash, the budget and the policy version.

The file is written to a temp name beside the target, read back (every tensor's name, type, shape and bytes
must equal what was planned, and the file size must equal :func:`file_overhead` + the matrix bytes), checked
against the budget, and only then renamed into place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from ramp.allocation import GGUF_ALIGNMENT, AllocationError, allocation_hash, padded, slots_for, validate
from ramp.errors import RampError
from ramp.formats import FormatError, get_format
from ramp.io import OutputPathError, atomic_path
from ramp.models.arch import permute_for_gguf
from ramp.models.loader import LoadedModel, read_gguf

log = logging.getLogger(__name__)

# Keys the writer sets itself or that describe the source file rather than the model.
_SKIP_KEYS = {"general.architecture", "general.file_type", "general.quantization_version", "general.alignment"}
RAMP_VERSION = "0.1.0"


class ExportError(RampError, ValueError):
    """An export that cannot be written or did not verify (the message names the tensor or value)."""


@dataclass(frozen=True)
class Provenance:
    """What the ``ramp.*`` keys of an exported file record."""

    policy_version: str = ""  # e.g. "models:/ramp-policy/3"; empty when no policy chose the allocation
    budget_file_bytes: int = 0  # target file size in bytes; 0 = no budget
    method: str = ""  # "ramp", "uniform-Q4_0", "greedy", ...

    def fields(self, alloc_hash: str) -> dict[str, tuple[Any, gguf.GGUFValueType]]:
        S, U = gguf.GGUFValueType.STRING, gguf.GGUFValueType.UINT64
        return {
            "ramp.version": (RAMP_VERSION, S),
            "ramp.allocation_hash": (alloc_hash, S),
            "ramp.budget_file_bytes": (int(self.budget_file_bytes), U),
            "ramp.policy_version": (self.policy_version, S),
            "ramp.method": (self.method, S),
        }


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    hf_name: str  # the weight's Hugging Face name (read when the tensor is written: one tensor in memory at a time)
    shape: tuple[int, ...]  # HF orientation [out, in] (or [n] for norms)
    type_name: str
    kind: str  # a matrix role, "norm", "token_embd" or "output"

    def nbytes(self) -> int:
        return get_format(self.type_name).bytes_for(self.shape)


@dataclass
class ExportResult:
    """The verified file: ``path``, exact ``file_bytes``, and per-tensor (type, shape, bytes) as read back."""

    path: Path
    file_bytes: int
    allocation_hash: str
    tensors: dict[str, tuple[str, tuple[int, ...], int]] = field(default_factory=dict)

    def __fspath__(self) -> str:
        return str(self.path)


def _config_metadata(lm: LoadedModel) -> dict[str, tuple[Any, gguf.GGUFValueType]]:
    c, a = lm.config, lm.arch.gguf_arch
    head_dim = int(getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads)
    rope = getattr(c, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", rope.get("full_attention", {}).get("rope_theta", 10000.0))
    U, F = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32
    return {
        f"{a}.block_count": (c.num_hidden_layers, U),
        f"{a}.context_length": (c.max_position_embeddings, U),
        f"{a}.embedding_length": (c.hidden_size, U),
        f"{a}.feed_forward_length": (c.intermediate_size, U),
        f"{a}.attention.head_count": (c.num_attention_heads, U),
        f"{a}.attention.head_count_kv": (c.num_key_value_heads, U),
        f"{a}.attention.key_length": (head_dim, U),
        f"{a}.attention.value_length": (head_dim, U),
        f"{a}.rope.dimension_count": (head_dim, U),
        f"{a}.rope.freq_base": (float(theta), F),
        f"{a}.attention.layer_norm_rms_epsilon": (float(c.rms_norm_eps), F),
        f"{a}.vocab_size": (c.vocab_size, U),
    }


def _source_metadata(lm: LoadedModel) -> list[tuple[str, Any, gguf.GGUFValueType, gguf.GGUFValueType | None]]:
    reader = read_gguf(lm.source)
    out = []
    for key, f in reader.fields.items():
        if key.startswith("GGUF.") or key.startswith("ramp.") or key in _SKIP_KEYS:
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, f.contents(), vtype, sub))
    return out


def plan_tensors(
    lm: LoadedModel, allocation: Mapping[str, str], embedding_type: str = "Q8_0", norm_type: str = "F32"
) -> list[PlannedTensor]:
    """Every tensor of the file in write order with its type; matrix types come from ``allocation``;
    ``embedding_type``: as :func:`ramp.presets.resolve_embedding_type` resolves it for the hidden size."""
    from ramp.presets import resolve_embedding_type

    arch, cfg = lm.arch, lm.config
    embedding_type = resolve_embedding_type(embedding_type, int(cfg.hidden_size))
    shapes = {k: tuple(int(d) for d in v.shape) for k, v in lm.model.state_dict().items()}  # meta for a lazy model
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    plan = []
    for i in range(cfg.num_hidden_layers):
        for key, tn in arch.block_tensors(i).items():
            if key in arch.matrices:
                plan.append(PlannedTensor(tn.gguf, tn.hf, shapes[tn.hf], allocation[tn.gguf], key))
            else:
                plan.append(PlannedTensor(tn.gguf, tn.hf, shapes[tn.hf], norm_type, "norm"))
    for key, tn in arch.globals.items():
        if key == "output" and tied:
            continue
        kind = "norm" if key.endswith("norm") else key
        type_name = norm_type if kind == "norm" else embedding_type
        plan.append(PlannedTensor(tn.gguf, tn.hf, shapes[tn.hf], type_name, kind))
    for p in plan:
        fmt = get_format(p.type_name)
        if not fmt.is_legal(p.shape):
            raise ExportError(
                f"{p.name}: format {fmt.name} is not legal for shape {list(p.shape)} "
                f"(row length must be a multiple of {fmt.block_size})"
            )
    return plan


def _gguf_weight(lm: LoadedModel, p: PlannedTensor) -> torch.Tensor:
    """The weight as llama.cpp stores it: q/k rows permuted, Gemma norms as ``1 + w``."""
    w = lm.weight(p.hf_name)
    if p.kind in ("q", "k") and lm.arch.permute_qk:
        cfg = lm.config
        w = permute_for_gguf(w, cfg.num_attention_heads if p.kind == "q" else cfg.num_key_value_heads)
    if p.kind == "norm" and lm.arch.norm_offset:
        w = w + lm.arch.norm_offset
    return w.contiguous()


def _vocab_metadata(lm: LoadedModel, tokenizer_pre: str) -> list[tuple[str, Any, Any, Any]]:
    """llama.cpp's tokenizer keys for a Hugging Face directory source (none for a model built in code)."""
    from ramp.hf_vocab import has_tokenizer, vocab_metadata

    source = Path(lm.source)
    if not source.is_dir():
        return []
    if not has_tokenizer(source):
        log.warning("%s has no tokenizer files: the GGUF gets no tokenizer, llama.cpp will refuse it", source)
        return []
    return vocab_metadata(source, tokenizer_pre)


def _new_writer(
    path: Path, lm: LoadedModel, alloc_hash: str, provenance: Provenance, tokenizer_pre: str = ""
) -> gguf.GGUFWriter:
    writer = gguf.GGUFWriter(str(path), lm.arch.gguf_arch)
    if lm.gguf_metadata:
        for key, val, vtype, sub in _source_metadata(lm):
            writer.add_key_value(key, val, vtype, sub_type=sub)
    else:
        for key, (val, vtype) in _config_metadata(lm).items():
            writer.add_key_value(key, val, vtype)
        for key, val, vtype, sub in _vocab_metadata(lm, tokenizer_pre):
            writer.add_key_value(key, val, vtype, sub_type=sub)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (val, vtype) in provenance.fields(alloc_hash).items():
        writer.add_key_value(key, val, vtype)
    return writer


def _header_bytes(
    lm: LoadedModel, plan: list[PlannedTensor], alloc_hash: str, provenance: Provenance, tokenizer_pre: str = ""
) -> int:
    """Bytes before the tensor data (header, metadata, tensor infos, alignment padding), measured by writing them."""
    fd, tmp = tempfile.mkstemp(suffix=".gguf-header")
    os.close(fd)
    try:
        os.unlink(tmp)
        writer = _new_writer(Path(tmp), lm, alloc_hash, provenance, tokenizer_pre)
        for p in plan:
            fmt = get_format(p.type_name)
            shape = list(p.shape)
            writer.add_tensor_info(p.name, shape, np.dtype(np.float32), p.nbytes(), raw_dtype=fmt.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        n = writer.fout[0].tell()
        writer.close()
        return padded(n)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def file_overhead(
    lm: LoadedModel,
    embedding_type: str = "Q8_0",
    norm_type: str = "F32",
    provenance: Provenance | None = None,
    tokenizer_pre: str = "",
) -> int:
    """Bytes of an exported file that do not depend on the allocation: everything but the matrices' data.

    The exported file's size is exactly ``file_overhead(...) + ramp.allocation.matrix_bytes(slots, allocation)``
    (header and tensor infos do not depend on the matrix types; the hash key has a fixed length).
    """
    slots = slots_for(lm.matrices())
    any_alloc = {s.gguf_name: s.formats[0] for s in slots}
    plan = plan_tensors(lm, any_alloc, embedding_type, norm_type)
    matrices = set(any_alloc)
    fixed = sum(padded(p.nbytes()) for p in plan if p.name not in matrices)
    return _header_bytes(lm, plan, "0" * 64, provenance or Provenance(), tokenizer_pre) + fixed


def export_model(
    lm: LoadedModel,
    path: str | Path,
    allocation: Mapping[str, str] | None = None,
    default_type: str = "F32",
    embedding_type: str | None = None,
    norm_type: str = "F32",
    imatrix: Mapping[str, np.ndarray] | None = None,
    provenance: Provenance | None = None,
    tensor_data: Mapping[str, np.ndarray] | None = None,
    tokenizer_pre: str = "",
) -> ExportResult:
    """Write ``lm`` as a verified GGUF file at ``path``.

    ``allocation`` (GGUF tensor name -> type) must name every quantizable matrix with a legal type; without it
    every matrix gets ``default_type`` (e.g. ``"F32"`` for the reference file). ``embedding_type`` defaults to
    ``"F32"`` for an all-F32 export and ``"Q8_0"`` otherwise (the type llama.cpp gives SmolLM2's tied embedding).
    ``imatrix`` maps tensor names to per-column importances for the quantizers; ``tensor_data`` may hold bytes
    quantized earlier (``uint8[rows, row_bytes]`` per tensor name), which are checked and written as they are.
    A ``provenance.budget_file_bytes`` above 0 is enforced: a file larger than it is an :class:`ExportError`.
    A Hugging Face directory source gets llama.cpp's tokenizer keys (:mod:`ramp.hf_vocab`; ``tokenizer_pre`` names
    a BPE pre-tokenizer llama.cpp's converter does not recognise).
    """
    path = Path(path)
    provenance = provenance or Provenance()
    slots = slots_for(lm.matrices())
    if allocation is None:
        allocation = {s.gguf_name: default_type for s in slots}
        for s in slots:
            if not get_format(default_type).is_legal(s.shape):
                raise ExportError(f"{s.gguf_name}: default type {default_type} is not legal for shape {list(s.shape)}")
    else:
        allocation = dict(allocation)
        try:
            validate(slots, allocation)
        except (AllocationError, FormatError) as e:
            raise ExportError(str(e)) from e
    if embedding_type is None:
        embedding_type = "F32" if set(allocation.values()) == {"F32"} else "Q8_0"
    alloc_hash = allocation_hash(allocation)
    plan = plan_tensors(lm, allocation, embedding_type, norm_type)
    header = _header_bytes(lm, plan, alloc_hash, provenance, tokenizer_pre)
    expected_size = header + sum(padded(p.nbytes()) for p in plan)
    if provenance.budget_file_bytes and expected_size > provenance.budget_file_bytes:
        raise ExportError(
            f"{path.name}: the file would be {expected_size:,} bytes, "
            f"above the budget of {provenance.budget_file_bytes:,}"
        )

    written: dict[str, str] = {}  # tensor name -> sha256 of the bytes written
    try:
        with atomic_path(path) as tmp:
            result = _write_and_verify(
                lm, tmp, path, plan, alloc_hash, provenance, imatrix, tensor_data, written, tokenizer_pre
            )
            result.file_bytes = _check_size(tmp, expected_size)
    except OutputPathError:
        raise
    except OSError as e:  # disk full, read-only folder, ...: the temp file is already gone
        raise OutputPathError(f"{path}: writing failed ({e}); no file was left behind") from e
    result.path = path
    log.info("wrote %s: %d tensors, %d bytes, allocation %s", path, len(plan), result.file_bytes, alloc_hash[:12])
    return result


def _write_and_verify(
    lm: LoadedModel,
    tmp: Path,
    path: Path,
    plan: list[PlannedTensor],
    alloc_hash: str,
    provenance: Provenance,
    imatrix: Mapping[str, np.ndarray] | None,
    tensor_data: Mapping[str, np.ndarray] | None,
    written: dict[str, str],
    tokenizer_pre: str = "",
) -> ExportResult:
    writer = _new_writer(tmp, lm, alloc_hash, provenance, tokenizer_pre)
    try:
        for p in plan:  # the tensor infos first; then each tensor is made, written and dropped (one in memory)
            fmt = get_format(p.type_name)
            writer.add_tensor_info(p.name, list(p.shape), np.dtype(np.float32), p.nbytes(), raw_dtype=fmt.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for p in tqdm(plan, desc=f"quantizing {path.name}", unit="tensor", leave=False):
            fmt = get_format(p.type_name)
            w = _gguf_weight(lm, p)
            data = w.numpy() if fmt.name == "F32" else _tensor_bytes(lm, p, w, imatrix, tensor_data)
            del w
            if data.nbytes != p.nbytes():
                raise ExportError(f"{p.name}: {fmt.name} gave {data.nbytes} B, expected {p.nbytes()} B")
            writer.write_tensor_data(np.ascontiguousarray(data))
            written[p.name] = hashlib.sha256(np.ascontiguousarray(data).view(np.uint8).data).hexdigest()
    finally:
        writer.close()
    return _verify(tmp, plan, written, alloc_hash)


def export_gguf(lm: LoadedModel, path: str | Path, **kwargs: Any) -> Path:
    """:func:`export_model`, returning only the verified file's path."""
    return export_model(lm, path, **kwargs).path


def _tensor_bytes(
    lm: LoadedModel,
    p: PlannedTensor,
    w: torch.Tensor,
    imatrix: Mapping[str, np.ndarray] | None,
    tensor_data: Mapping[str, np.ndarray] | None,
) -> np.ndarray:
    fmt = get_format(p.type_name)
    if tensor_data is not None and p.name in tensor_data:
        data = np.ascontiguousarray(tensor_data[p.name], dtype=np.uint8)
        want = (w.shape[0], fmt.bytes_for(w.shape) // w.shape[0]) if w.ndim == 2 else (fmt.bytes_for(w.shape),)
        if data.shape != want:
            raise ExportError(
                f"{p.name}: pre-quantized data has shape {list(data.shape)}, {fmt.name} needs {list(want)}"
            )
        return data
    im = None if imatrix is None else imatrix.get(p.name)
    try:
        return fmt.quantize(w.reshape(-1, w.shape[-1]), im, name=p.name)
    except FormatError as e:
        raise ExportError(str(e)) from e


def _check_size(tmp: Path, expected_size: int) -> int:
    size = tmp.stat().st_size
    if size != expected_size:
        raise ExportError(f"{tmp}: file is {size:,} bytes, the layout predicts {expected_size:,}")
    return size


def _file_digest(path: Path, offset: int, nbytes: int, chunk: int = 1 << 24) -> str:
    """sha256 of ``nbytes`` at ``offset`` of ``path``, read in chunks (nothing mapped: memory stays flat)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = nbytes
        while left:
            block = f.read(min(chunk, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def _verify(tmp: Path, plan: list[PlannedTensor], written: dict[str, str], alloc_hash: str) -> ExportResult:
    """Read the file back: every tensor's type, shape and bytes (sha256 of what was written) as planned."""
    reader = read_gguf(tmp)
    back = {t.name: t for t in reader.tensors}
    if [t.name for t in reader.tensors] != [p.name for p in plan]:
        raise ExportError(f"{tmp}: read back {len(back)} tensors, expected {len(plan)} in plan order")
    tensors = {}
    for p in plan:
        t = back[p.name]
        type_name = gguf.GGMLQuantizationType(int(t.tensor_type)).name
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if type_name != p.type_name or shape != p.shape or int(t.n_bytes) != p.nbytes():
            raise ExportError(
                f"{p.name}: read back {type_name} {list(shape)} {int(t.n_bytes)} bytes, "
                f"planned {p.type_name} {list(p.shape)} {p.nbytes()} bytes"
            )
        if _file_digest(tmp, int(t.data_offset), int(t.n_bytes)) != written[p.name]:
            raise ExportError(f"{p.name}: the bytes read back differ from the bytes written")
        tensors[p.name] = (type_name, p.shape, p.nbytes())
    field = reader.fields.get("ramp.allocation_hash")
    if field is None or field.contents() != alloc_hash:
        raise ExportError(f"{tmp}: provenance key ramp.allocation_hash missing or wrong")
    if reader.alignment != GGUF_ALIGNMENT:
        raise ExportError(f"{tmp}: alignment {reader.alignment}, expected {GGUF_ALIGNMENT}")
    return ExportResult(tmp, 0, alloc_hash, tensors)
