"""Stage quantize: every quantizable matrix of the folded model in its allocated GGUF type.

Writes ``data/quantize/`` (``tensors.safetensors``: one uint8 tensor ``[rows, row_bytes]`` per matrix holding
the GGUF block bytes exactly as they go into the file, attn_q/attn_k rows in llama.cpp's order; ``types.json``:
tensor name -> GGUF type).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from ramp.io import atomic_dir, write_json
from ramp.params import QuantizeParams
from ramp.pipeline.workspace import Timer, Workspace, gguf_heads

log = logging.getLogger("ramp.pipeline.quantize")


def quantized_tensors(lm: Any, allocation: dict[str, str], imatrix: dict) -> Iterator[tuple[str, np.ndarray]]:
    """(gguf_name, uint8 ``[rows, row_bytes]`` GGUF block bytes) of each matrix of ``lm`` in its allocated type, in
    model order, one matrix read and quantized at a time (attn_q/attn_k rows in llama.cpp's order); ``imatrix``
    (name -> float32[cols]) weighs the quantizers' error, ``{}`` for none."""
    import torch
    from tqdm import tqdm

    from ramp.formats import get_format
    from ramp.models.arch import permute_for_gguf

    for m in tqdm(lm.matrices(), desc="quantizing", unit="matrix"):
        fmt = get_format(allocation[m.gguf_name])
        w = lm.weight(m.hf_name).to(torch.float32)
        heads = gguf_heads(lm, m.role)
        if heads is not None:  # bytes as the file stores them: llama.cpp's q/k row order (rows quantize alone)
            w = permute_for_gguf(w, heads).contiguous()
        data = fmt.quantize(w, imatrix.get(m.gguf_name), name=m.gguf_name)
        if data.nbytes != fmt.bytes_for(m.shape):
            raise ValueError(f"{m.gguf_name}: {fmt.name} gave {data.nbytes} B, expected {fmt.bytes_for(m.shape)} B")
        yield m.gguf_name, data


def tensor_specs(lm: Any, allocation: dict[str, str]) -> list[tuple[str, np.dtype, tuple[int, int]]]:
    """(name, uint8, [rows, row_bytes]) of every matrix's block bytes, in the order :func:`quantized_tensors` gives."""
    from ramp.formats import get_format

    out = []
    for m in lm.matrices():
        nbytes = get_format(allocation[m.gguf_name]).bytes_for(m.shape)
        out.append((m.gguf_name, np.dtype(np.uint8), (m.shape[0], nbytes // m.shape[0])))
    return out


def quantize_allocation(lm: Any, allocation: dict[str, str], imatrix: dict) -> dict[str, Any]:
    """gguf_name -> uint8 tensor of :func:`quantized_tensors`, all in memory (for models that fit)."""
    import torch

    return {name: torch.from_numpy(data.copy()) for name, data in quantized_tensors(lm, allocation, imatrix)}


def quantize(params: QuantizeParams, ws: Workspace) -> dict[str, Any]:
    """Quantize the folded model to the allocate stage's allocation; returns the stage metrics."""
    from ramp.allocation import bits_per_weight, load_allocation, matrix_bytes, slots_for
    from ramp.models.stream import write_safetensors
    from ramp.pipeline.fold import folded_imatrix_of

    ws.begin("quantize")
    timer = Timer()
    lm = ws.folded_model(lazy=True)  # one matrix in memory at a time
    slots = slots_for(lm.matrices())
    allocation = load_allocation(ws.stage("allocate") / "allocation.json")
    expected_bytes = matrix_bytes(slots, allocation)  # validates: every matrix, legal formats only
    specs = tensor_specs(lm, allocation)
    data_bytes = sum(rows * row_bytes for _, _, (rows, row_bytes) in specs)
    with atomic_dir(ws.stage("quantize")) as tmp:
        tensors = quantized_tensors(lm, allocation, folded_imatrix_of(ws) if params.imatrix else {})
        write_safetensors(tmp / "tensors.safetensors", specs, tensors)
        write_json(tmp / "types.json", {s.gguf_name: allocation[s.gguf_name] for s in slots})
    bpw = bits_per_weight(slots, allocation)
    log.info("quantize done in %.1f s: %d matrices, %d B, %.3f bpw", timer.seconds, len(specs), data_bytes, bpw)
    return ws.write_metrics(
        "quantize",
        {
            "matrices": len(specs),
            "matrix_data_bytes": data_bytes,
            "matrix_bytes": expected_bytes,
            "bpw": bpw,
            "imatrix": params.imatrix,
            "seconds": timer.seconds,
        },
    )
