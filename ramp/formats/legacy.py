"""The legacy 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0.

Every format stores one fp16 scale ``d`` per block of 32 weights (plus an fp16 offset ``m`` for the
``_1`` variants) and small integer codes. Weights and scales are in the model's own units; a decoded
weight is ``d * (q - offset)`` (``_0`` variants, symmetric) or ``d * q + m`` (``_1`` variants). The byte
layout of each block is written beside its encoder below (all multi-byte fields little-endian).

Two quantization paths, both byte-identical to ggml:

* ``qw is None``: ggml's reference rounding (``quantize_row_q4_0_ref`` and friends), a single pass.
* ``qw`` given (imatrix): ggml's weighted search (``quantize_row_q4_0_impl`` and friends). Each weight's
  importance is ``qw * sqrt(sigma2 + x^2)`` with ``sigma2`` the mean square over the whole row; the
  symmetric formats then try 19 scales (``make_qx_quants``) and the min/scale formats 37 (min, scale)
  refits after a first guess (``make_qkx3_quants``).

Q4_0 .. Q5_1 run the compiled encoders of :mod:`ramp.formats.jit` (the imatrix path in whole rows); Q8_0
and the helpers IQ4_NL shares (importance, piecewise searches, nibble packing) are torch, vectorised over
blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import gguf
import numpy as np
import torch

from ramp.formats import jit
from ramp.formats.base import QuantFormat
from ramp.formats.kernels import (
    chunked_encoder,
    fp16_from_bytes,
    fp16_into,
    position_major,
    roundf_int8,
    sqrtf_,
)

QK = 32  # weights per block, all legacy formats


def importance(xt: torch.Tensor, qwt: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """ggml's per-weight importance ``qw * sqrtf(sigma2 + x*x)`` on position-major ``[32, B]`` planes."""
    return sqrtf_((xt * xt).add_(sigma2)).mul_(qwt)  # one work plane, updated in place


# ---- byte packing ---------------------------------------------------------------------------------------


def pack_nibbles32(q: torch.Tensor) -> torch.Tensor:
    """``uint8[B, 32]`` 4-bit codes -> ``uint8[B, 16]`` (a strided view): byte j = code j | code j+16 << 4.

    Works on the codes as one flat run of little-endian uint64 words, four per block (codes 0-7, 8-15,
    16-23, 24-31): ``word[i] | word[i + 2] << 4`` is the packed pair for words 0 and 1 of each block, so
    two whole-array ops do it and the block's first two result words are kept.
    """
    n = q.shape[0]
    f = q.contiguous().numpy().reshape(-1).view(np.uint64)
    t = np.empty_like(f)
    np.left_shift(f[2:], np.uint64(4), out=t[:-2])
    np.bitwise_or(t[:-2], f[:-2], out=t[:-2])
    t[-2:] = 0
    return torch.from_numpy(t.reshape(n, 4)[:, :2]).view(torch.uint8)


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


# ---- Q4_0 / Q5_0 / Q4_1 / Q5_1: one layout, four variants ----------------------------------------------
# Block bytes (little-endian):
#   Q4_0 (18): d fp16 |        |                 | 16 bytes of nibbles (byte j: weight j low, weight j+16 high)
#   Q5_0 (22): d fp16 |        | qh uint32 (bit i = fifth bit of weight i) | 16 bytes of low nibbles
#   Q4_1 (20): d fp16 | m fp16 |                 | 16 bytes of nibbles
#   Q5_1 (24): d fp16 | m fp16 | qh uint32       | 16 bytes of low nibbles
# Decoded weight = d * (q - 8) (Q4_0), d * (q - 16) (Q5_0), d * q + m (Q4_1, Q5_1).


def pack_block32(q: torch.Tensor, *fp16_fields: torch.Tensor) -> torch.Tensor:
    """Codes ``q[B, 32]`` (4-bit) and float32 ``[B]`` fields -> ``uint8[B, type_size]``: the fields as fp16, then
    16 bytes of nibbles."""
    head = 2 * len(fp16_fields)
    out = torch.empty(q.shape[0], head + 16, dtype=torch.uint8)
    fp16_into(out, 0, *fp16_fields)
    out[:, -16:] = pack_nibbles32(q)
    return out


def _encode_block32(x: torch.Tensor, qw: torch.Tensor | None, bits: int, has_min: bool) -> torch.Tensor:
    type_size = 2 + 2 * has_min + 4 * (bits == 5) + 16
    if qw is None:
        return jit.encode_blocks(jit.legacy_ref_span, x, None, type_size, bits, has_min)
    return jit.encode_blocks(jit.legacy_imatrix_rows, x, qw, type_size, bits, has_min, whole_rows=True)


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
    encode = partial(_encode_block32, bits=bits, has_min=has_min)
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
