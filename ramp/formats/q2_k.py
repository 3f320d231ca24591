"""Q2_K: 256-weight super-blocks of sixteen 16-weight sub-blocks, ``w ~ d * sc_j * q - dmin * m_j`` with
2-bit levels ``q`` and 4-bit per-sub-block scale ``sc_j`` and min ``m_j``.

Encoded by the compiled port of ggml's ``quantize_row_q2_K_ref`` (no imatrix) and
``quantize_row_q2_K_impl`` (imatrix) in :mod:`ramp.formats.jit`, byte for byte. Block layout (84 bytes,
little-endian), per super-block of 256 weights:

    [0:16)   one byte per sub-block j: scale sc_j in the low nibble, min m_j in the high nibble
    [16:80)  qs: two 32-byte halves; byte 32*h + l holds, in bit pairs 0-1, 2-3, 4-5, 6-7, the levels of
             weights 128*h + l, +32, +64, +96 (i.e. sub-blocks 8h + 2k + l//16 for k = 0..3)
    [80:82)  d     fp16 scale of the 4-bit scales
    [82:84)  dmin  fp16 scale of the 4-bit mins

Weights are float32 in model units; ``d * sc_j`` and ``dmin * m_j`` are in the same units.
"""

from __future__ import annotations

import gguf
import torch

from ramp.formats import jit
from ramp.formats.base import QuantFormat
from ramp.formats.kernels import fp16_from_bytes

QK_K = 256
SUB = 16
NSUB = QK_K // SUB


def encode_q2_k(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    """Weights ``float32[rows, nb, 256]`` (+ imatrix weights alike, or None) -> ``uint8[rows, nb, 84]``.

    ``qw=None`` follows ggml's reference quantizer, otherwise ggml's imatrix quantizer.
    """
    return jit.encode_blocks(jit.q2_k_span, x, qw, 84, qw is not None)


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
