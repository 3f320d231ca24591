"""The legacy 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, as torch quantizers.

Every format stores one fp16 scale ``d`` per block of 32 weights (plus an fp16 offset ``m`` for the
``_1`` variants) and small integer codes. Weights and scales are in the model's own units; a decoded
weight is ``d * (q - offset)`` (``_0`` variants, symmetric) or ``d * q + m`` (``_1`` variants). The byte
layout of each block is written beside its encoder below (all multi-byte fields little-endian).

Two quantization paths, both byte-identical to ggml (exact float32 arithmetic from
:mod:`ramp.formats.kernels`):

* ``qw is None``: ggml's reference rounding (``quantize_row_q4_0_ref`` and friends), a single pass.
* ``qw`` given (imatrix): ggml's weighted search (``quantize_row_q4_0_impl`` and friends). Each weight's
  importance is ``qw * sqrt(sigma2 + x^2)`` with ``sigma2`` the mean square over the whole row; the
  symmetric formats then try 19 scales (``make_qx_quants``) and the min/scale formats 37 (min, scale)
  refits after a first guess (``make_qkx3_quants``).

Everything is vectorised over blocks, with no Python loop over blocks; bit packing works on
little-endian uint64 words. Tensors are encoded in row chunks by :func:`kernels.chunked_encoder` (the
imatrix paths need whole rows).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import gguf
import numpy as np
import torch

from ramp.formats.base import QuantFormat
from ramp.formats.kernels import (
    chunked_encoder,
    first_min,
    fp16_from_bytes,
    fp16_into,
    make_qkx_quants,
    make_qx_quants,
    position_major,
    roundf_int8,
    seq_sum,
    signed_absmax,
    sqrtf_,
)

QK = 32  # weights per block, all legacy formats


def row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """``sum_j x[j]^2 / n`` per row of ``x[rows, n]``, summed left to right in float32 -> ``[rows]``."""
    n = x.shape[-1]
    return seq_sum(position_major(x * x)) / float(n)  # (a transposed copy, then a contiguous ordered sum)


def importance(xt: torch.Tensor, qwt: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """ggml's per-weight importance ``qw * sqrtf(sigma2 + x*x)`` on position-major ``[32, B]`` planes."""
    return sqrtf_((xt * xt).add_(sigma2)).mul_(qwt)  # one work plane, updated in place


# ---- byte packing ---------------------------------------------------------------------------------------


_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_BIT0_OF_BYTES = np.uint64(0x0101010101010101)
_GATHER_BITS = np.uint64(0x0102040810204080)  # multiplier moving bit 0 of byte k to bit 56 + k


def pack_nibbles32(q: torch.Tensor, five_bit: bool = False) -> torch.Tensor:
    """``uint8[B, 32]`` codes -> ``uint8[B, 16]`` (a strided view): byte j = code j | code j+16 << 4.

    Works on the codes as one flat run of little-endian uint64 words, four per block (codes 0-7, 8-15,
    16-23, 24-31): ``word[i] | word[i + 2] << 4`` is the packed pair for words 0 and 1 of each block, so
    two whole-array ops do it and the block's first two result words are kept. Codes wider than four
    bits (``five_bit``) are masked to their low nibble first so that nothing crosses a byte.
    """
    n = q.shape[0]
    f = q.contiguous().numpy().reshape(-1).view(np.uint64)
    if five_bit:
        f = f & _LOW_NIBBLES
    t = np.empty_like(f)
    np.left_shift(f[2:], np.uint64(4), out=t[:-2])
    np.bitwise_or(t[:-2], f[:-2], out=t[:-2])
    t[-2:] = 0
    return torch.from_numpy(t.reshape(n, 4)[:, :2]).view(torch.uint8)


def pack_high_bits32(q: torch.Tensor) -> torch.Tensor:
    """``uint8[B, 32]`` 5-bit codes -> ``uint8[B, 4]``: bit i of the little-endian uint32 is bit 4 of q[i].

    Per uint64 word (8 codes): isolate bit 4 of each byte as 0/1 bytes, then one wrapping multiply
    gathers the eight bits into the top byte (each product bit lands on its own position, no carries).
    """
    f = q.contiguous().numpy().reshape(-1).view(np.uint64)
    bits = (f >> np.uint64(4)) & _BIT0_OF_BYTES
    return torch.from_numpy(((bits * _GATHER_BITS) >> np.uint64(56)).astype(np.uint8).reshape(-1, 4))


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``uint8[B, 16]`` -> ``int32[B, 32]`` low nibbles then high nibbles."""
    q = qs.to(torch.int32)
    return torch.cat([q & 0x0F, q >> 4], dim=-1)


def _unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """``uint8[B, 4]`` -> ``int32[B, 32]`` holding 16 where the weight's fifth bit is set."""
    bits = (qh.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(-1, 32) << 4


# ---- imatrix searches over pieces of blocks ----------------------------------------------------------


_PIECE_BLOCKS = 8192  # blocks per search piece: fewer per-piece steps; its [32, piece] float planes are 1 MiB


def search_pieces(
    x: torch.Tensor,
    qw: torch.Tensor | None,
    weigh: Callable[..., torch.Tensor],
    search: Callable[..., tuple[torch.Tensor, ...]],
    *args: object,
    piece: int = _PIECE_BLOCKS,
) -> list[torch.Tensor]:
    """Run a per-block search over position-major pieces of ``x[rows, nb, 32]`` and join the results.

    ``weigh(xt, qwt, block_index)`` gives the importance planes of a piece (``qwt`` is None without an
    imatrix); ``search(xt, w, *args)`` returns per-block tensors ``[B]`` or code planes ``[32, B]``,
    returned joined over all blocks as ``[B]`` or ``[B, 32]`` (codes go back to block-major).
    """
    xb = x.reshape(-1, x.shape[-1])
    qb = None if qw is None else qw.reshape(xb.shape)
    B = xb.shape[0]
    outs: list[torch.Tensor] = []
    for b0 in range(0, B, piece):
        sl = slice(b0, b0 + piece)
        xt = position_major(xb[sl])
        w = weigh(xt, None if qb is None else position_major(qb[sl]), sl)
        res = search(xt, w, *args)
        if not outs:  # joined results, written piece by piece (a cat of transposed uint8 views is slow)
            outs = [torch.empty((B, *r.shape[:-1]), dtype=r.dtype) for r in res]
        for o, r in zip(outs, res, strict=True):
            o[sl].copy_(r.t() if r.ndim == 2 else r)
    return outs


def _row_importance(x: torch.Tensor) -> Callable[..., torch.Tensor]:
    """ggml's legacy imatrix weights ``qw * sqrt(sigma2 + x^2)``, ``sigma2`` the mean square of the row."""
    rows, nb, _ = x.shape
    sigma2 = row_sigma2(x.reshape(rows, -1)).repeat_interleave(nb)
    return lambda xt, qwt, sl: importance(xt, qwt, sigma2[sl])


# ---- Q4_0 / Q5_0 / Q4_1 / Q5_1: one layout, four variants ----------------------------------------------
# Block bytes (little-endian):
#   Q4_0 (18): d fp16 |        |                 | 16 bytes of nibbles (byte j: weight j low, weight j+16 high)
#   Q5_0 (22): d fp16 |        | qh uint32 (bit i = fifth bit of weight i) | 16 bytes of low nibbles
#   Q4_1 (20): d fp16 | m fp16 |                 | 16 bytes of nibbles
#   Q5_1 (24): d fp16 | m fp16 | qh uint32       | 16 bytes of low nibbles
# Decoded weight = d * (q - 8) (Q4_0), d * (q - 16) (Q5_0), d * q + m (Q4_1, Q5_1).


def _symmetric_codes(x: torch.Tensor, qw: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[r, nb, 32]`` -> ``(d[B] float32, q[B, 32] uint8 in [0, 2*nmax - 1])``; d = max / -nmax."""
    if qw is not None:
        d, q = search_pieces(x, qw, _row_importance(x), make_qx_quants, nmax)
        return d, q
    xb = x.reshape(-1, QK)
    _, mx = signed_absmax(xb, 1)
    d = mx / float(-nmax)
    inv = torch.where(d != 0, d.reciprocal(), 0.0)  # id = d ? 1/d : 0 (reciprocal is exact)
    v = torch.mul(xb, inv.unsqueeze(1)).add_(float(nmax) + 0.5)
    q = v.to(torch.int8).clamp_(max=2 * nmax - 1)  # (int8_t) truncation, then MIN
    return d, q.view(torch.uint8)


def _make_qkx3_quants(xt: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, ...]:
    """ggml's ``make_qkx3_quants`` as ``quantize_row_q4_1_impl`` calls it (rmin -0.9, rdelta 0.05, 36 steps)."""
    return make_qkx_quants(xt, w, nmax, rmin=-0.9, rdelta=0.05, nstep=36, use_mad=False)


def _affine_codes(
    x: torch.Tensor, qw: torch.Tensor | None, nmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x[r, nb, 32]`` -> ``(d[B], m[B] float32, q[B, 32] uint8 in [0, nmax])``."""
    if qw is not None:
        d, mn, q = search_pieces(x, qw, _row_importance(x), _make_qkx3_quants, nmax)
        return d, mn, q  # ggml stores m = -(the_min) = min
    xb = x.reshape(-1, QK)
    mn = first_min(xb, 1)
    d = (xb.amax(1) - mn).add_(0.0).div_(float(nmax))  # + 0.0: equal ends give +0 as in C, zeros' signs aside
    inv = torch.where(d != 0, d.reciprocal(), 0.0)  # id = d ? 1/d : 0 (reciprocal is exact)
    v = torch.sub(xb, mn.unsqueeze(1)).mul_(inv.unsqueeze(1)).add_(0.5)
    q = v.to(torch.int8)  # (int8_t) / (uint8_t) truncation of a value in [0.5, nmax + 0.5]
    if nmax == 15:  # Q4_1 clamps with MIN(15, ...); Q5_1 casts without a clamp
        q.clamp_(max=15)
    return d, mn, q.view(torch.uint8)


def pack_block32(q: torch.Tensor, *fp16_fields: torch.Tensor, five_bit: bool = False) -> torch.Tensor:
    """Codes ``q[B, 32]`` and float32 ``[B]`` fields -> ``uint8[B, type_size]``: the fields as fp16, then
    (``five_bit``) the uint32 of fifth bits, then 16 bytes of nibbles."""
    head = 2 * len(fp16_fields)
    out = torch.empty(q.shape[0], head + 4 * five_bit + 16, dtype=torch.uint8)
    fp16_into(out, 0, *fp16_fields)
    if five_bit:
        out[:, head : head + 4] = pack_high_bits32(q)
    out[:, -16:] = pack_nibbles32(q, five_bit=five_bit)
    return out


def _encode_block32(x: torch.Tensor, qw: torch.Tensor | None, bits: int, has_min: bool) -> torch.Tensor:
    rows, nb, _ = x.shape
    if has_min:
        d, mn, q = _affine_codes(x, qw, (1 << bits) - 1)
        out = pack_block32(q, d, mn, five_bit=bits == 5)
    else:
        d, q = _symmetric_codes(x, qw, 1 << (bits - 1))
        out = pack_block32(q, d, five_bit=bits == 5)
    return out.reshape(rows, nb, -1)


def _decode_block32(b: torch.Tensor, bits: int, has_min: bool) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2]).unsqueeze(-1)
    q = _unpack_nibbles(b[:, -16:])
    head = 4 if has_min else 2
    if bits == 5:
        q = q | _unpack_high_bits(b[:, head : head + 4])
    if has_min:
        return d * q.to(torch.float32) + fp16_from_bytes(b[:, 2:4]).unsqueeze(-1)
    return d * (q - (1 << (bits - 1))).to(torch.float32)


def _variant(name: str, bits: int, has_min: bool) -> QuantFormat:
    type_size = 2 + 2 * has_min + 4 * (bits == 5) + 16
    encode = chunked_encoder(partial(_encode_block32, bits=bits, has_min=has_min), type_size, whole_rows=True)
    decode = partial(_decode_block32, bits=bits, has_min=has_min)
    return QuantFormat(name, gguf.GGMLQuantizationType[name], QK, type_size, encode, decode)


# ---- Q8_0 -----------------------------------------------------------------------------------------------
# Q8_0 block (34 bytes): d fp16 | 32 signed bytes. Decoded weight = d * q. ggml has no imatrix path.


def _encode_q8_0(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    del qw  # quantize_q8_0 ignores quant_weights
    rows, nb, _ = x.shape
    xb = x.reshape(-1, QK)
    amax = torch.maximum(xb.amax(1), xb.amin(1).neg_()).add_(0.0)  # C's MAX from +0: never -0
    d = amax / 127.0
    inv = torch.where(d != 0, d.reciprocal(), 0.0)  # id = d ? 1/d : 0 (reciprocal is exact)
    q = roundf_int8(xb * inv.unsqueeze(1))
    out = torch.empty(rows * nb, 34, dtype=torch.uint8)
    fp16_into(out, 0, d)
    out[:, 2:34] = q.view(torch.uint8)
    return out.reshape(rows, nb, 34)


def _decode_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    q = b[:, 2:34].contiguous().view(torch.int8).to(torch.float32)
    return q * d.unsqueeze(-1)


FORMATS: tuple[QuantFormat, ...] = (
    _variant("Q4_0", bits=4, has_min=False),
    _variant("Q4_1", bits=4, has_min=True),
    _variant("Q5_0", bits=5, has_min=False),
    _variant("Q5_1", bits=5, has_min=True),
    QuantFormat(
        "Q8_0",
        gguf.GGMLQuantizationType.Q8_0,
        QK,
        34,
        chunked_encoder(_encode_q8_0, 34, whole_rows=True),
        _decode_q8_0,
        uses_imatrix=False,
    ),
)
