"""Write a (mixed-precision) GGUF file from a torch model with gguf-py's writer.

Every quantizable matrix is written in the type the allocation gives it, with RAMP's own quantizer bytes;
norms stay F32; embeddings/output get a fixed type. ``attn_q``/``attn_k`` rows are permuted into
llama.cpp's RoPE order (the loader's inverse) and Gemma norms are stored as ``1 + w``. Metadata of a GGUF
source is carried over key by key; a Hugging Face source gets the architecture hyper-parameters from its
config. The file is written to a temp name and renamed only after it has been read back and verified.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm

from ramp.formats import FormatError, get_format
from ramp.io import atomic_path
from ramp.models.arch import permute_for_gguf
from ramp.models.loader import LoadedModel, read_gguf

log = logging.getLogger(__name__)

# Keys the writer sets itself or that describe the source file rather than the model.
_SKIP_KEYS = {"general.architecture", "general.file_type", "general.quantization_version"}


class ExportError(ValueError):
    pass


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
        if key.startswith("GGUF.") or key in _SKIP_KEYS:
            continue
        vtype = f.types[0]
        sub = f.types[1] if vtype == gguf.GGUFValueType.ARRAY else None
        out.append((key, f.contents(), vtype, sub))
    return out


def export_gguf(
    lm: LoadedModel,
    path: str | Path,
    allocation: dict[str, str] | None = None,
    default_type: str = "F32",
    embedding_type: str = "F32",
    norm_type: str = "F32",
    imatrix: dict[str, np.ndarray] | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``lm`` as GGUF: matrix types from ``allocation`` (GGUF tensor name -> type name), others fixed.

    ``imatrix`` maps GGUF tensor names to per-column importances for the quantizers. Returns ``path``.
    """
    path = Path(path)
    allocation = dict(allocation or {})
    matrices = {m.gguf_name: m for m in lm.matrices()}
    unknown = sorted(set(allocation) - set(matrices))
    if unknown:
        raise ExportError(f"allocation names tensors that are not quantizable matrices of this model: {unknown[:5]}")
    arch, cfg = lm.arch, lm.config
    hf_params = dict(lm.model.state_dict())
    tied = bool(getattr(cfg, "tie_word_embeddings", False))

    plan: list[tuple[str, torch.Tensor, str, str]] = []  # (gguf name, weight, type, kind)
    for i in range(cfg.num_hidden_layers):
        for key, tn in arch.block_tensors(i).items():
            if key in arch.matrices:
                plan.append((tn.gguf, hf_params[tn.hf], allocation.get(tn.gguf, default_type), key))
            else:
                plan.append((tn.gguf, hf_params[tn.hf], norm_type, "norm" if key.endswith("norm") else key))
    for key, tn in arch.globals.items():
        if key == "output" and tied:
            continue
        kind = "norm" if key.endswith("norm") else key
        plan.append((tn.gguf, hf_params[tn.hf], norm_type if kind == "norm" else embedding_type, kind))

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch.gguf_arch)
        if lm.gguf_metadata:
            for key, val, vtype, sub in _source_metadata(lm):
                writer.add_key_value(key, val, vtype, sub_type=sub)
        else:
            for key, (val, vtype) in _config_metadata(lm).items():
                writer.add_key_value(key, val, vtype)
        for key, val in (extra_metadata or {}).items():
            writer.add_string(key, val)
        for name, w, type_name, kind in tqdm(plan, desc=f"writing {path.name}", unit="tensor", leave=False):
            w = w.detach().to(torch.float32)
            if kind in ("q", "k") and arch.permute_qk:
                n_head = cfg.num_attention_heads if kind == "q" else cfg.num_key_value_heads
                w = permute_for_gguf(w, n_head)
            if kind == "norm" and arch.norm_offset:
                w = w + arch.norm_offset
            fmt = get_format(type_name)
            try:
                if fmt.name == "F32":
                    writer.add_tensor(name, w.contiguous().numpy())
                    continue
                if not fmt.is_legal(tuple(w.shape)):
                    raise FormatError(
                        f"{name}: format {fmt.name} is not legal for shape {tuple(w.shape)} "
                        f"(row length must be a multiple of {fmt.block_size})"
                    )
                im = None if imatrix is None else imatrix.get(name)
                data = fmt.quantize(w.reshape(-1, w.shape[-1]), im, name=name)
            except FormatError as e:
                raise ExportError(str(e)) from e
            writer.add_tensor(name, data, raw_shape=list(w.shape), raw_dtype=fmt.ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        read_gguf(tmp)  # the file must open before it is renamed into place
    log.info("wrote %s (%d tensors, %d bytes)", path, len(plan), path.stat().st_size)
    return path
