"""Stage quantize: every quantizable matrix of the folded model in its allocated GGUF type.

Reads params ``quantize``. Reads ``data/fold/`` (folded model, folded imatrix) and ``data/allocate/``
(allocation). Writes ``data/quantize/`` (``tensors.safetensors``: one uint8 tensor ``[rows, row_bytes]`` per
matrix holding the GGUF block bytes exactly as they go into the file, attn_q/attn_k rows in llama.cpp's order;
``types.json``: tensor name -> GGUF type)
and ``data/metrics/quantize.json`` (matrix data bytes, bits per weight).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from stages._common import (
    DATA,
    Timer,
    atomic_dir,
    gguf_heads,
    load_folded_model,
    load_params,
    setup_logging,
    write_json,
    write_metrics,
)

log = logging.getLogger("stages.quantize")
OUT = DATA / "quantize"


@dataclass(frozen=True)
class QuantizeParams:
    """``imatrix``: weigh the quantizers' error by the (folded) calibration imatrix, as llama-quantize does."""

    imatrix: bool


def load_imatrix() -> dict:
    """The folded model's imatrix (tensor name -> float32[cols]) written by the fold stage."""
    from safetensors.numpy import load_file

    return load_file(str(DATA / "fold" / "imatrix.safetensors"))


def main() -> None:
    setup_logging()
    timer = Timer()
    params = load_params("quantize", QuantizeParams)

    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm

    from ramp.allocation import bits_per_weight, load_allocation, matrix_bytes, slots_for
    from ramp.formats import get_format
    from ramp.models.arch import permute_for_gguf

    lm = load_folded_model()
    slots = slots_for(lm.matrices())
    allocation = load_allocation(DATA / "allocate" / "allocation.json")
    expected_bytes = matrix_bytes(slots, allocation)  # validates: every matrix, legal formats only
    imatrix = load_imatrix() if params.imatrix else {}
    weights = dict(lm.model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    data_bytes = 0
    for m in tqdm(lm.matrices(), desc="quantizing", unit="matrix"):
        fmt = get_format(allocation[m.gguf_name])
        im = imatrix.get(m.gguf_name)
        w = weights[m.hf_name].detach().to(torch.float32)
        heads = gguf_heads(lm, m.role)
        if heads is not None:  # bytes as the file stores them: llama.cpp's q/k row order (rows quantize alone)
            w = permute_for_gguf(w, heads).contiguous()
        data = fmt.quantize(w, im, name=m.gguf_name)
        if data.nbytes != fmt.bytes_for(m.shape):
            raise ValueError(f"{m.gguf_name}: {fmt.name} gave {data.nbytes} B, expected {fmt.bytes_for(m.shape)} B")
        out[m.gguf_name] = torch.from_numpy(data.copy())
        data_bytes += data.nbytes
    with atomic_dir(OUT) as tmp:
        save_file(out, str(tmp / "tensors.safetensors"))
        write_json(tmp / "types.json", {s.gguf_name: allocation[s.gguf_name] for s in slots})
    bpw = bits_per_weight(slots, allocation)
    write_metrics(
        "quantize",
        {
            "matrices": len(out),
            "matrix_data_bytes": data_bytes,
            "matrix_file_bytes": expected_bytes,
            "bpw": bpw,
            "imatrix": params.imatrix,
            "seconds": timer.seconds,
        },
    )
    log.info(
        "quantize done in %.1f s: %d matrices, %d B, %.3f bpw -> %s", timer.seconds, len(out), data_bytes, bpw, OUT
    )


if __name__ == "__main__":
    main()
