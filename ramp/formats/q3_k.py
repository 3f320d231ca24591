"""Q3_K: 3-bit symmetric K-quant (16 sub-blocks of 16 weights, 6-bit sub-scales, fp16 super-scale).

Byte-identical to ggml's ``quantize_row_q3_K_ref`` (greedy ``make_q3_quants`` per sub-block, no imatrix)
and ``quantize_row_q3_K_impl`` (``make_qx_quants`` at both levels, with one). Values are in the weight's
own units; ``d`` and the sub-scales are per super-block of 256 weights.
"""

from __future__ import annotations

import numpy as np
import torch

from ramp.formats.kernels import (
    F32,
    f32,
    f32_div,
    fp16_bytes,
    fp16_from_bytes,
    make_qx_quants,
    nearest_int,
    position_major,
    seq_sum,
    signed_absmax,
    sqrtf_,
    to_fp16,
)
from ramp.formats.kquant_symmetric import encode_by_tiles, make_q3_quants, requantize_, symmetric_kquant

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


_BIT2_OF_BYTES = np.uint64(0x0404040404040404)
_LOW2_OF_BYTES = np.uint64(0x0303030303030303)


def _pack(levels: torch.Tensor, sub: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """levels uint8[B, 256] (0..7), sub-scales uint8[B, 16] (0..63), d float32[B] -> uint8[B, 110].

    The level bits are gathered on little-endian uint64 words, eight levels each (word ``j`` of a run of 32
    levels holds levels ``8j..8j+7``): one mask, then a shift and an OR per source run, with no bit
    crossing a byte, instead of byte-wise ops.
    """
    B = levels.shape[0]
    out = torch.empty(B, TYPE_SIZE, dtype=torch.uint8)
    o = out.numpy()
    words = levels.contiguous().numpy().view(np.uint64).reshape(B, 8, 4)  # [B, k, j]: weights 32k + 8j + 0..7
    hb = words & _BIT2_OF_BYTES  # bit 2 of each level, in place in its byte; run k goes to bit k
    hm = hb[:, 0] >> np.uint64(2)
    hm |= hb[:, 1] >> np.uint64(1)
    hm |= hb[:, 2]
    for k in range(3, 8):
        hm |= hb[:, k] << np.uint64(k - 2)
    o[:, _OFF_HM:_OFF_QS] = hm.view(np.uint8)
    low = (words & _LOW2_OF_BYTES).reshape(B, 2, 4, 4)  # [B, h, q, j]: run q of half h goes to bits 2q
    qs = low[:, :, 0].copy()
    for q in range(1, 4):
        qs |= low[:, :, q] << np.uint64(2 * q)
    o[:, _OFF_QS:_OFF_SC] = qs.view(np.uint8).reshape(B, 64)
    s = sub.contiguous().numpy()
    lo = s & 0x0F
    o[:, _OFF_SC : _OFF_SC + 8] = lo[:, :8] | (lo[:, 8:] << 4)
    hi = (s >> 4).reshape(B, 4, 4)  # [B, p, m] = s[4p + m] >> 4, to bits 2p of byte m
    o[:, _OFF_SC + 8 : _OFF_D] = hi[:, 0] | (hi[:, 1] << 2) | (hi[:, 2] << 4) | (hi[:, 3] << 6)
    out[:, _OFF_D:] = fp16_bytes(d)
    return out


def _encode_groups(xg: torch.Tensor, qg: torch.Tensor | None) -> torch.Tensor:
    """``xg[S, 16]`` weights (importances ``qg`` alike, or None) -> ``uint8[S // 16, 110]``."""
    if qg is not None:
        return encode_by_tiles(xg, qg, TYPE_SIZE, _encode_imatrix)
    # reference path: greedy 3-bit fit per sub-block (all tiles in one call: its last rounds are global)
    sub_scale, L = make_q3_quants(xg, 4)  # [S], [S, 16]
    return encode_by_tiles(xg, None, TYPE_SIZE, _finish_ref, sub_scale, L)


def _finish_ref(xg: torch.Tensor, _: None, sub_scale: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Reference path for ``xg[T, 16]``: 6-bit sub-scales relative to the largest one, then second pass."""
    Bt = xg.shape[0] // 16
    sc16 = sub_scale.view(Bt, 16).t()  # [16 sub-blocks, Bt]
    _, max_scale = signed_absmax(sc16, 0)
    has = max_scale != 0
    iscale = f32_div(-32.0, torch.where(has, max_scale, f32(1.0)))
    # C stores nearest_int into an int8 before clamping to [-32, 31]
    l6 = nearest_int(iscale * sc16).to(torch.int8).clamp_(-32, 31).to(torch.int32) + 32
    l6 = torch.where(has, l6, 0).to(torch.uint8)  # [16, Bt]; scale bytes stay zero without a scale
    d = torch.where(has, f32_div(1.0, iscale), f32(0.0))
    return _requant_pack(xg, L, l6, d)


def _encode_imatrix(xg: torch.Tensor, qg: torch.Tensor) -> torch.Tensor:
    """imatrix path for ``xg[T, 16]`` with importances ``qg[T, 16]``: weighted searches at both levels."""
    T = xg.shape[0]
    Bt = T // 16
    xt = position_major(xg)  # [16 positions, T sub-blocks]
    xx = xt * xt
    # sigma2 = 2 * sumx2 / 256, sumx2 summed over the super-block in weight order (sub-block, position)
    xx_blocks = xx.view(16, Bt, 16).permute(2, 0, 1).contiguous().view(QK_K, Bt)  # row 16*sub + pos
    sigma2 = (f32(2.0) * seq_sum(xx_blocks)) / f32(QK_K)
    sig = sigma2.repeat_interleave(16).unsqueeze(0)  # [1, T]: each sub-block's super-block sigma2
    w = sqrtf_(xx + sig).mul_(position_major(qg))  # qw * sqrtf(sigma2 + x*x)
    sw = seq_sum(w)  # [T]: each sub-block's weight sum, in order
    sub_scale, L = make_qx_quants(xt, w, 4)  # [T], [16, T]
    # the 16 sub-scales of a super-block are quantized with the same weighted search (nmax 32, weights sw)
    d, l6 = make_qx_quants(sub_scale.view(Bt, 16).t().contiguous(), sw.view(Bt, 16).t().contiguous(), 32)
    return _requant_pack(xg, L.t().contiguous(), l6, d)


def _requant_pack(xg: torch.Tensor, L: torch.Tensor, l6: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """Second pass from the stored scales, then packing.

    ``xg, L`` are ``[T, 16]`` (weights, uint8 levels), ``l6`` the stored sub-scales ``uint8[16, Bt]``
    (0..63) and ``d[Bt]`` the super-scale before fp16 rounding.
    """
    Bt = xg.shape[0] // 16
    d16 = to_fp16(d).to(F32)
    d_sub = d16 * (l6.to(torch.int32) - 32).to(F32)  # [16, Bt], rebuilt from the stored values as C does
    requantize_(L, xg, d_sub.t().reshape(-1), 4)
    return _pack(L.view(Bt, QK_K), l6.t().contiguous(), d16)


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


FORMATS = (symmetric_kquant("Q3_K", TYPE_SIZE, _encode_groups, decode),)
