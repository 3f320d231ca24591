"""Q6_K: 6-bit symmetric K-quant (16 sub-blocks of 16 weights, int8 sub-scales, fp16 super-scale).

One ``make_qx_quants`` search per sub-block (weights ``x^2``, or the imatrix), as ggml's
``quantize_row_q6_K_ref`` / ``quantize_row_q6_K_impl`` do, byte for byte; the int8 sub-scales are then
rounded against the largest one. Values are in the weight's own units; ``d`` and the sub-scales are per
super-block of 256 weights.
"""

from __future__ import annotations

import numpy as np
import torch

from ramp.formats.kernels import (
    F32,
    GROUP_MAX_EPS,
    f32,
    f32_div,
    fp16_bytes,
    fp16_from_bytes,
    make_qx_quants,
    nearest_int,
    position_major,
    signed_absmax,
    to_fp16,
)
from ramp.formats.kquant_symmetric import encode_by_tiles, requantize_, symmetric_kquant

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


_LOW4_OF_BYTES = np.uint64(0x0F0F0F0F0F0F0F0F)
_LOW2_OF_BYTES = np.uint64(0x0303030303030303)


def _pack(levels: torch.Tensor, scales: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """levels uint8[B, 256] (0..63), scales int8[B, 16], d float32[B] (fp16-exact) -> uint8[B, 210].

    The level bits are gathered on little-endian uint64 words, eight levels each, with masks, shifts and
    ORs that never move a bit across a byte (cheaper than byte-wise ops).
    """
    B = levels.shape[0]
    out = torch.empty(B, TYPE_SIZE, dtype=torch.uint8)
    o = out.numpy()
    words = levels.contiguous().numpy().view(np.uint64).reshape(B, 2, 4, 4)  # [B, h, q, j]: 8 levels per word
    lo = words & _LOW4_OF_BYTES
    ql = lo[:, :, 0:2] | (lo[:, :, 2:4] << np.uint64(4))  # [B, h, a, j]: q = a low, q = a + 2 high
    o[:, _OFF_QL:_OFF_QH] = ql.view(np.uint8).reshape(B, 128)
    hi = (words >> np.uint64(4)) & _LOW2_OF_BYTES
    qh = hi[:, :, 0] | (hi[:, :, 1] << np.uint64(2))
    qh |= hi[:, :, 2] << np.uint64(4)
    qh |= hi[:, :, 3] << np.uint64(6)  # [B, h, j]
    o[:, _OFF_QH:_OFF_SC] = qh.view(np.uint8).reshape(B, 64)
    out[:, _OFF_SC:_OFF_D] = scales.view(torch.uint8)
    out[:, _OFF_D:] = fp16_bytes(d)
    return out


def _encode_tile(xg: torch.Tensor, qg: torch.Tensor | None) -> torch.Tensor:
    """``xg[T, 16]`` weights (importances ``qg`` alike, or None) -> ``uint8[T // 16, 210]``."""
    xt = position_major(xg)  # [16 positions, T sub-blocks]
    # per-value weights: x^2 without an imatrix (rmse_type 1), the raw imatrix value with one
    w = xt * xt if qg is None else position_major(qg)
    sub_scale, L = make_qx_quants(xt, w, 32)  # [T], [16, T]
    return _finish(xg, sub_scale, L.t().contiguous())


def _finish(xg: torch.Tensor, sub_scale: torch.Tensor, L: torch.Tensor) -> torch.Tensor:
    """Super-scale, int8 sub-scales, second pass and packing of ``xg[T, 16]`` -> ``uint8[T/16, 210]``.

    ``sub_scale[T]`` and ``L[T, 16]`` (uint8 levels 0..63) come from the per-sub-block search.
    """
    Bt = xg.shape[0] // 16
    sc16 = sub_scale.view(Bt, 16).t()  # [16 sub-blocks, Bt]
    max_abs, max_scale = signed_absmax(sc16, 0)
    empty = max_abs < f32(GROUP_MAX_EPS)
    max_scale = torch.where(empty, f32(1.0), max_scale)
    iscale = f32_div(-128.0, max_scale)  # [Bt]
    d16 = to_fp16(f32_div(1.0, iscale)).to(F32)
    q = nearest_int(iscale * sc16).clamp_(max=127).to(torch.int8)  # [16, Bt]; >= -128 by construction
    d_sub = d16 * q.to(F32)  # the fp16 super-scale as stored, times the integer sub-scale
    requantize_(L, xg, d_sub.t().reshape(-1), 32)
    out = _pack(L.view(Bt, QK_K), q.t().contiguous(), d16)
    if bool(empty.any()):
        out[empty] = 0  # ggml zeroes the whole block (levels, scales and d) when every sub-scale is ~0
    return out


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


def _encode_groups(xg: torch.Tensor, qg: torch.Tensor | None) -> torch.Tensor:
    return encode_by_tiles(xg, qg, TYPE_SIZE, _encode_tile)


FORMATS = (symmetric_kquant("Q6_K", TYPE_SIZE, _encode_groups, decode),)
