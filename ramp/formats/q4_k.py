"""Q4_K and Q5_K: 256-weight super-blocks of eight 32-weight sub-blocks, each with its own 6-bit scale and
6-bit min, ``w ~ d * sc_j * q - dmin * m_j`` with 4-bit (Q4_K) or 5-bit (Q5_K) levels ``q``.

Bit-exact torch ports of ggml's ``quantize_row_q{4,5}_K_ref`` (no imatrix) and ``quantize_row_q{4,5}_K_impl``
(imatrix). Block layouts (little-endian), per super-block of 256 weights:

    Q4_K, 144 bytes                          Q5_K, 176 bytes
    [0:2)    d     fp16 scale of the scales  [0:2)    d     fp16
    [2:4)    dmin  fp16 scale of the mins    [2:4)    dmin  fp16
    [4:16)   12 bytes: 8 scales + 8 mins,    [4:16)   scales/mins, as Q4_K
             6 bits each (see                [16:48)  qh: bit t of byte l = high (5th) bit of
             kquant_minmax.pack_scale_min_k4)         weight l of sub-block t
    [16:144) qs: byte 32*c + l holds weight  [48:176) qs: low 4 bits, packed as Q4_K
             l of sub-block 2c (low nibble)
             and of sub-block 2c+1 (high)

Weights are float32 in model units; ``d * sc`` and ``dmin * m`` are in the same units.
"""

from __future__ import annotations

from functools import partial

import gguf
import torch

from ramp.formats.base import QuantFormat
from ramp.formats.kernels import (
    f32,
    fp16_bytes,
    fp16_from_bytes,
    make_qkx_quants,
    nearest_int,
    seq_max,
    seq_sum,
    sqrtf,
)
from ramp.formats.kquant_minmax import (
    from_position_major,
    imatrix_search,
    minmax_superblocks,
    pack_scale_min_k4,
    requantize,
    to_position_major,
    unpack_scale_min_k4,
)

QK_K = 256
SUB = 32
NSUB = QK_K // SUB


def _finish(
    x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, ls: torch.Tensor, lm: torch.Tensor, bits: int
) -> torch.Tensor:
    """Store the super-block scales, re-derive the levels from the stored values, pack the block bytes.

    ``x`` ``[S, 256]`` weights, ``L`` ``[S, 256]`` search levels, ``d``/``dmin`` ``[S]`` float32 super-block
    scales (before fp16 rounding), ``ls``/``lm`` ``[S, 8]`` 6-bit scale/min bytes.
    Returns ``uint8[S, 144]`` (Q4_K) or ``uint8[S, 176]`` (Q5_K).
    """
    nmax = (1 << bits) - 1
    S = x.shape[0]
    packed = pack_scale_min_k4(ls, lm)
    d16 = d.to(torch.float16)
    dmin16 = dmin.to(torch.float16)
    sc, m = unpack_scale_min_k4(packed)  # re-read from the bytes, as ggml does
    dd = d16.to(torch.float32).unsqueeze(1) * sc.to(torch.float32)
    dm = dmin16.to(torch.float32).unsqueeze(1) * m.to(torch.float32)
    Lq = requantize(x.view(S, NSUB, SUB), L.view(S, NSUB, SUB), dd, dm, nmax).to(torch.uint8)
    head = [fp16_bytes(d16), fp16_bytes(dmin16), packed]
    if bits == 4:
        Lv = Lq.view(S, 4, 2, SUB)
        return torch.cat([*head, (Lv[:, :, 0] | (Lv[:, :, 1] << 4)).reshape(S, 128)], dim=1)
    lo = Lq & 0xF
    qs = (lo[:, 0::2] | (lo[:, 1::2] << 4)).reshape(S, 128)
    hi = (Lq >> 4) & 1
    qh = hi[:, 0].clone()
    for t in range(1, NSUB):
        qh |= hi[:, t] << t
    return torch.cat([*head, qh, qs], dim=1)


def _ref_encode(x: torch.Tensor, bits: int) -> torch.Tensor:
    """ggml's ``quantize_row_q{4,5}_K_ref`` on ``[S, 256]`` weights -> block bytes."""
    nmax = (1 << bits) - 1
    S = x.shape[0]
    xt = to_position_major(x, SUB)  # [32, S*8]
    # weights av_x + |x| with av_x the RMS of the sub-block
    av_x = sqrtf(seq_sum(xt * xt) / 32.0)
    w = av_x + xt.abs()
    rmin, rdelta, nstep = (-1.0, 0.1, 20) if bits == 4 else (-0.5, 0.1, 15)
    scales, m, L = make_qkx_quants(xt, w, nmax, rmin, rdelta, nstep, False)
    mins = -m  # ggml's the_min
    scales = scales.view(S, NSUB)
    mins = mins.view(S, NSUB)
    max_scale = seq_max(scales.t())
    max_min = seq_max(mins.t())
    zero = torch.zeros_like(max_scale)
    inv_scale = torch.where(max_scale > 0, f32(63.0) / max_scale, zero)
    inv_min = torch.where(max_min > 0, f32(63.0) / max_min, zero)
    ls = (nearest_int(inv_scale.unsqueeze(1) * scales) & 0xFF).clamp_max(63)
    lm = (nearest_int(inv_min.unsqueeze(1) * mins) & 0xFF).clamp_max(63)
    return _finish(x, from_position_major(L, S, NSUB).reshape(S, QK_K), max_scale / 63.0, max_min / 63.0, ls, lm, bits)


def _im_finish(
    x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, ls: torch.Tensor, lm: torch.Tensor, bits: int
) -> torch.Tensor:
    """Last pass of ``quantize_row_q{4,5}_K_impl`` (arguments as :func:`_finish`)."""
    if bits == 5:  # the Q5_K impl clamps the stored 6-bit values once more; Q4_K's does not
        ls, lm = ls.clamp_max(63), lm.clamp_max(63)
    return _finish(x, L, d, dmin, ls, lm, bits)


def _encode(x: torch.Tensor, qw: torch.Tensor | None, bits: int) -> torch.Tensor:
    nmax = (1 << bits) - 1
    return minmax_superblocks(
        x,
        qw,
        144 if bits == 4 else 176,
        NSUB,
        63,
        ref_encode=partial(_ref_encode, bits=bits),
        im_search=partial(imatrix_search, sub=SUB, nmax=nmax, sigma2_factor=2.0),
        im_finish=partial(_im_finish, bits=bits),
    )


def encode_q4_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Weights ``float32[rows, nb, 256]`` (+ imatrix weights alike, or None) -> ``uint8[rows, nb, 144]``.

    ``qw=None`` follows ggml's reference quantizer, otherwise ggml's imatrix quantizer.
    """
    return _encode(x, qw, 4)


def encode_q5_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Weights ``float32[rows, nb, 256]`` (+ imatrix weights alike, or None) -> ``uint8[rows, nb, 176]``.

    ``qw=None`` follows ggml's reference quantizer, otherwise ggml's imatrix quantizer.
    """
    return _encode(x, qw, 5)


def _scales(b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d = fp16_from_bytes(b[:, 0:2].reshape(-1, 2))
    dmin = fp16_from_bytes(b[:, 2:4].reshape(-1, 2))
    sc, m = unpack_scale_min_k4(b[:, 4:16])
    dl = (d.unsqueeze(1) * sc.to(torch.float32)).unsqueeze(2)
    ml = (dmin.unsqueeze(1) * m.to(torch.float32)).unsqueeze(2)
    return dl, ml


def decode_q4_k(b: torch.Tensor) -> torch.Tensor:
    """Q4_K bytes ``uint8[n, 144]`` -> float32 ``[n, 256]``."""
    n = b.shape[0]
    dl, ml = _scales(b)
    qs = b[:, 16:144].reshape(n, 4, 1, 32)
    q = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, NSUB, SUB).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


def decode_q5_k(b: torch.Tensor) -> torch.Tensor:
    """Q5_K bytes ``uint8[n, 176]`` -> float32 ``[n, 256]``."""
    n = b.shape[0]
    dl, ml = _scales(b)
    qh = b[:, 16:48].reshape(n, 1, 32)
    qs = b[:, 48:176].reshape(n, 4, 1, 32)
    lo = torch.cat([qs & 0xF, qs >> 4], dim=2).reshape(n, NSUB, SUB)
    shifts = torch.arange(NSUB, dtype=torch.uint8).view(1, NSUB, 1)
    hi = (qh >> shifts) & 1
    q = (lo | (hi << 4)).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


FORMATS = (
    QuantFormat("Q4_K", gguf.GGMLQuantizationType.Q4_K, QK_K, 144, encode_q4_k, decode_q4_k, uses_imatrix=True),
    QuantFormat("Q5_K", gguf.GGMLQuantizationType.Q5_K, QK_K, 176, encode_q5_k, decode_q5_k, uses_imatrix=True),
)
