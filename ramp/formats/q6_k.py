"""Q6_K: 6-bit symmetric K-quant (16 sub-blocks of 16 weights, int8 sub-scales, fp16 super-scale).

One ``make_qx_quants`` search per sub-block (weights ``x^2``, or the imatrix), as ggml's
``quantize_row_q6_K_ref`` / ``quantize_row_q6_K_impl`` do, then int8 sub-scales rounded against the largest
one: the compiled port in :mod:`ramp.formats.jit`, byte for byte. Values are in the weight's own units;
``d`` and the sub-scales are per super-block of 256 weights.
"""

from __future__ import annotations

import gguf
import torch

from ramp.formats import jit
from ramp.formats.base import QuantFormat
from ramp.formats.kernels import F32, fp16_from_bytes

QK_K = 256
TYPE_SIZE = 210

# Block layout, 210 bytes per 256 weights. Weight e = 128*h + 32*q + l (h 0..1, q 0..3, l 0..31) has a
# 6-bit level v[e] in 0..63 and decodes to d * scales[e // 16] * (v[e] - 32):
#   bytes   0..127  ql, low nibbles: byte 64h + l      = low4(v[128h + l])      | low4(v[128h + 64 + l]) << 4
#                                    byte 64h + 32 + l = low4(v[128h + 32 + l]) | low4(v[128h + 96 + l]) << 4
#   bytes 128..191  qh, top two bits: byte 32h + l has v[128h + 32q + l] >> 4 at bits 2q..2q+1
#   bytes 192..207  scales: one signed int8 per 16-weight sub-block
#   bytes 208..209  d: fp16 super-block scale, little-endian
_OFF_QL, _OFF_QH, _OFF_SC, _OFF_D = 0, 128, 192, 208
_SHIFT2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)


def encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Weights ``float32[rows, nb, 256]`` (+ imatrix weights alike, or None) -> ``uint8[rows, nb, 210]``."""
    return jit.encode_blocks(jit.q6_k_span, x, qw, TYPE_SIZE, qw is not None)


def decode(blocks: torch.Tensor) -> torch.Tensor:
    """``uint8[n, 210]`` Q6_K blocks -> ``float32[n, 256]``: ``(d * scale) * (v - 32)``, as gguf-py."""
    n = blocks.shape[0]
    ql = blocks[:, _OFF_QL:_OFF_QH].reshape(n, 2, 2, 32)
    qh = blocks[:, _OFF_QH:_OFF_SC].reshape(n, 2, 1, 32)
    lo = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [n, h, q, l], q = 0..3
    hi = (qh >> _SHIFT2.view(1, 1, 4, 1)) & 0x03
    v = (lo | (hi << 4)).to(torch.int8) - 32
    sc = blocks[:, _OFF_SC:_OFF_D].contiguous().view(torch.int8).to(F32)
    d = fp16_from_bytes(blocks[:, _OFF_D:].reshape(n, 1, 2)) * sc  # [n, 16]
    return (d.view(n, 16, 1) * v.reshape(n, 16, 16).to(F32)).reshape(n, QK_K)


FORMATS = (QuantFormat("Q6_K", gguf.GGMLQuantizationType.Q6_K, QK_K, TYPE_SIZE, encode, decode),)
