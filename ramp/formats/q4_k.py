"""Q4_K and Q5_K: 256-weight super-blocks of eight 32-weight sub-blocks, each with its own 6-bit scale and
6-bit min, ``w ~ d * sc_j * q - dmin * m_j`` with 4-bit (Q4_K) or 5-bit (Q5_K) levels ``q``.

Encoded by the compiled ports of ggml's ``quantize_row_q{4,5}_K_ref`` (no imatrix) and
``quantize_row_q{4,5}_K_impl`` (imatrix) in :mod:`ramp.formats.jit`, byte for byte. Block layouts
(little-endian), per super-block of 256 weights:

    Q4_K, 144 bytes                          Q5_K, 176 bytes
    [0:2)    d     fp16 scale of the scales  [0:2)    d     fp16
    [2:4)    dmin  fp16 scale of the mins    [2:4)    dmin  fp16
    [4:16)   12 bytes: 8 scales + 8 mins,    [4:16)   scales/mins, as Q4_K
             6 bits each (see                [16:48)  qh: bit t of byte l = high (5th) bit of
             unpack_scale_min_k4)                     weight l of sub-block t
    [16:144) qs: byte 32*c + l holds weight  [48:176) qs: low 4 bits, packed as Q4_K
             l of sub-block 2c (low nibble)
             and of sub-block 2c+1 (high)

Weights are float32 in model units; ``d * sc`` and ``dmin * m`` are in the same units.
"""

from __future__ import annotations

import gguf
import torch

from ramp.formats import jit
from ramp.formats.base import QuantFormat
from ramp.formats.kernels import fp16_from_bytes

QK_K = 256
SUB = 32
NSUB = QK_K // SUB


def encode_q4_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Weights ``float32[rows, nb, 256]`` (+ imatrix weights alike, or None) -> ``uint8[rows, nb, 144]``.

    ``qw=None`` follows ggml's reference quantizer, otherwise ggml's imatrix quantizer.
    """
    return jit.encode_blocks(jit.k4_span, x, qw, 144, 4, qw is not None)


def encode_q5_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Weights ``float32[rows, nb, 256]`` (+ imatrix weights alike, or None) -> ``uint8[rows, nb, 176]``.

    ``qw=None`` follows ggml's reference quantizer, otherwise ggml's imatrix quantizer.
    """
    return jit.encode_blocks(jit.k4_span, x, qw, 176, 5, qw is not None)


def unpack_scale_min_k4(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 ``scales`` bytes ``uint8[M, 12]`` -> ``(sc, m)`` int32 ``[M, 8]`` (ggml's ``get_scale_min_k4``).

    Bytes 0-3 hold scales 0-3 in their low 6 bits and bytes 4-7 mins 0-3 likewise; bytes 8-11 hold the low
    nibbles of scale ``j`` (bits 0-3) and min ``j`` (bits 4-7) for ``j = 4..7``, whose top two bits are
    bits 6-7 of bytes ``j-4`` (scale) and ``j`` (min).
    """
    q = q.to(torch.int32)
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


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
