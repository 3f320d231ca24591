"""Q2_K: 256-weight super-blocks of sixteen 16-weight sub-blocks, ``w ~ d * sc_j * q - dmin * m_j`` with
2-bit levels ``q`` and 4-bit per-sub-block scale ``sc_j`` and min ``m_j``.

Bit-exact torch port of ggml's ``quantize_row_q2_K_ref`` (no imatrix) and ``quantize_row_q2_K_impl``
(imatrix). Block layout (84 bytes, little-endian), per super-block of 256 weights:

    [0:16)   one byte per sub-block j: scale sc_j in the low nibble, min m_j in the high nibble
    [16:80)  qs: two 32-byte halves; byte 32*h + l holds, in bit pairs 0-1, 2-3, 4-5, 6-7, the levels of
             weights 128*h + l, +32, +64, +96 (i.e. sub-blocks 8h + 2k + l//16 for k = 0..3)
    [80:82)  d     fp16 scale of the 4-bit scales
    [82:84)  dmin  fp16 scale of the 4-bit mins

Weights are float32 in model units; ``d * sc_j`` and ``dmin * m_j`` are in the same units.
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
)
from ramp.formats.kquant_minmax import (
    from_position_major,
    imatrix_search,
    minmax_superblocks,
    requantize,
    to_position_major,
)

QK_K = 256
SUB = 16
NSUB = QK_K // SUB


def _finish(
    x: torch.Tensor, L: torch.Tensor, d: torch.Tensor, dmin: torch.Tensor, ls: torch.Tensor, lm: torch.Tensor
) -> torch.Tensor:
    """Store scales, re-derive the levels from the stored (fp16-rounded) values, pack ``uint8[S, 84]``.

    ``x`` ``[S, 256]`` weights, ``L`` ``[S, 256]`` search levels, ``d``/``dmin`` ``[S]`` float32 super-block
    scales before fp16 rounding, ``ls``/``lm`` int ``[S, 16]`` 4-bit scale/min codes.
    """
    S = x.shape[0]
    sbytes = ((ls | (lm << 4)) & 0xFF).to(torch.int32)  # a C uint8_t keeps the low 8 bits
    d16 = d.to(torch.float16)
    dmin16 = dmin.to(torch.float16)
    dd = d16.to(torch.float32).unsqueeze(1) * (sbytes & 0xF).to(torch.float32)
    dm = dmin16.to(torch.float32).unsqueeze(1) * (sbytes >> 4).to(torch.float32)
    Lq = requantize(x.view(S, NSUB, SUB), L.view(S, NSUB, SUB), dd, dm, 3).to(torch.uint8)
    Lv = Lq.view(S, 2, 4, 32)
    qs = Lv[:, :, 0] | (Lv[:, :, 1] << 2) | (Lv[:, :, 2] << 4) | (Lv[:, :, 3] << 6)
    return torch.cat([sbytes.to(torch.uint8), qs.reshape(S, 64), fp16_bytes(d16), fp16_bytes(dmin16)], dim=1)


def _ref_encode(x: torch.Tensor) -> torch.Tensor:
    """ggml's ``quantize_row_q2_K_ref`` on ``[S, 256]`` weights -> ``uint8[S, 84]``."""
    S = x.shape[0]
    xt = to_position_major(x, SUB)  # [16, S*16]
    # |x| as weights, absolute-error search
    scales, m, L = make_qkx_quants(xt, xt.abs(), 3, -0.5, 0.1, 15, True)
    mins = -m  # ggml's the_min
    scales = scales.view(S, NSUB)
    mins = mins.view(S, NSUB)
    max_scale = seq_max(scales.t())
    max_min = seq_max(mins.t())
    zero_i = torch.zeros((S, NSUB), dtype=torch.int32)
    zero_f = torch.zeros_like(max_scale)
    pos_s = max_scale > 0
    pos_m = max_min > 0
    isc = torch.where(pos_s, f32(15.0) / max_scale, zero_f).unsqueeze(1)
    imn = torch.where(pos_m, f32(15.0) / max_min, zero_f).unsqueeze(1)
    ls = torch.where(pos_s.unsqueeze(1), nearest_int(isc * scales), zero_i)
    lm = torch.where(pos_m.unsqueeze(1), nearest_int(imn * mins), zero_i)
    d = torch.where(pos_s, max_scale / 15.0, zero_f)
    dmin = torch.where(pos_m, max_min / 15.0, zero_f)
    return _finish(x, from_position_major(L, S, NSUB).reshape(S, QK_K), d, dmin, ls, lm)


def encode_q2_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Weights ``float32[rows, nb, 256]`` (+ imatrix weights alike, or None) -> ``uint8[rows, nb, 84]``.

    ``qw=None`` follows ggml's reference quantizer, otherwise ggml's imatrix quantizer.
    """
    return minmax_superblocks(
        x,
        qw,
        84,
        NSUB,
        15,
        ref_encode=_ref_encode,
        im_search=partial(imatrix_search, sub=SUB, nmax=3, sigma2_factor=1.0),
        im_finish=_finish,
    )


def decode_q2_k(b: torch.Tensor) -> torch.Tensor:
    """Q2_K bytes ``uint8[n, 84]`` -> float32 ``[n, 256]``."""
    n = b.shape[0]
    sc = b[:, 0:16]
    d = fp16_from_bytes(b[:, 80:82].reshape(-1, 2))
    dmin = fp16_from_bytes(b[:, 82:84].reshape(-1, 2))
    dl = (d.unsqueeze(1) * (sc & 0xF).to(torch.float32)).unsqueeze(2)
    ml = (dmin.unsqueeze(1) * (sc >> 4).to(torch.float32)).unsqueeze(2)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 4, 1)
    q = ((b[:, 16:80].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, NSUB, SUB).to(torch.float32)
    return (dl * q - ml).reshape(n, QK_K)


FORMATS = (QuantFormat("Q2_K", gguf.GGMLQuantizationType.Q2_K, QK_K, 84, encode_q2_k, decode_q2_k, uses_imatrix=True),)
