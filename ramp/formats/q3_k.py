"""Q3_K: 3-bit symmetric K-quant (16 sub-blocks of 16 weights, 6-bit sub-scales, fp16 super-scale).

Encoded by the compiled ports of ggml's ``quantize_row_q3_K_ref`` (greedy ``make_q3_quants`` per
sub-block, no imatrix) and ``quantize_row_q3_K_impl`` (``make_qx_quants`` at both levels, with one) in
:mod:`ramp.formats.jit`, byte for byte. Values are in the weight's own units; ``d`` and the sub-scales
are per super-block of 256 weights.
"""

from __future__ import annotations

import gguf
import torch

from ramp.formats import jit
from ramp.formats.base import QuantFormat
from ramp.formats.kernels import F32, fp16_from_bytes

QK_K = 256
TYPE_SIZE = 110

# Block layout, 110 bytes per 256 weights. Weight e = 128*h + 32*q + l (h 0..1, q 0..3, l 0..31) has a
# 3-bit level v[e] in 0..7 and decodes to d * (s[e // 16] - 32) * (v[e] - 4):
#   bytes   0..31   hmask: bit 2 of the levels. Byte m has, at bit k, that bit of weight 32*k + m
#   bytes  32..95   qs: low two bits. Byte 32*h + l has v[128h + 32q + l] & 3 at bits 2q..2q+1
#   bytes  96..107  scales: sixteen 6-bit sub-scales s[j] (stored with a +32 offset):
#                   byte k (0..7) = low4(s[k]) | low4(s[k + 8]) << 4;
#                   byte 8 + m (m 0..3) has s[4p + m] >> 4 at bits 2p..2p+1 (p 0..3)
#   bytes 108..109  d: fp16 super-block scale, little-endian
_OFF_HM, _OFF_QS, _OFF_SC, _OFF_D = 0, 32, 96, 108
_SHIFT2 = torch.tensor([0, 2, 4, 6], dtype=torch.uint8)
_SHIFT1 = torch.arange(8, dtype=torch.uint8)


def encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Weights ``float32[rows, nb, 256]`` (+ imatrix weights alike, or None) -> ``uint8[rows, nb, 110]``."""
    return jit.encode_blocks(jit.q3_k_span, x, qw, TYPE_SIZE, qw is not None)


def decode(blocks: torch.Tensor) -> torch.Tensor:
    """``uint8[n, 110]`` Q3_K blocks -> ``float32[n, 256]``: ``(d * (s - 32)) * (v - 4)``, as gguf-py."""
    n = blocks.shape[0]
    sc = blocks[:, _OFF_SC:_OFF_D]
    lo = torch.cat([sc[:, :8] & 0x0F, sc[:, :8] >> 4], dim=1)  # [n, 16]
    hi = ((sc[:, 8:].reshape(n, 1, 4) >> _SHIFT2.view(1, 4, 1)) & 0x03).reshape(n, 16)
    s = (lo | (hi << 4)).to(torch.int8) - 32
    d = fp16_from_bytes(blocks[:, _OFF_D:].reshape(n, 1, 2)) * s.to(F32)  # [n, 16]
    qs = blocks[:, _OFF_QS:_OFF_SC].reshape(n, 2, 1, 32)
    low = (qs >> _SHIFT2.view(1, 1, 4, 1)) & 0x03  # [n, h, q, l]
    hm = blocks[:, _OFF_HM:_OFF_QS].reshape(n, 1, 32)
    bit = (hm >> _SHIFT1.view(1, 8, 1)) & 0x01  # [n, k, m]
    v = low.reshape(n, QK_K).to(torch.int8) - ((bit ^ 1) << 2).reshape(n, QK_K).to(torch.int8)
    return (d.view(n, 16, 1) * v.reshape(n, 16, 16).to(F32)).reshape(n, QK_K)


FORMATS = (QuantFormat("Q3_K", gguf.GGMLQuantizationType.Q3_K, QK_K, TYPE_SIZE, encode, decode),)
