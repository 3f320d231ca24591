"""IQ4_NL: 32-weight blocks with one fp16 scale and 4-bit indices into a fixed non-linear codebook.

Block layout (18 bytes): ``d`` fp16 | 16 bytes of nibbles, byte j holding the index of weight j (low
nibble) and of weight j+16 (high nibble). Decoded weight = ``d * CODEBOOK[index]`` in the model's units.

ggml quantizes IQ4_NL through ``quantize_iq4_nl`` -> ``quantize_row_iq4_nl_impl`` with ``ntry = 7`` for
every block, with or without an imatrix. Per block: importance ``qw * sqrt(sigma2 + x^2)`` (imatrix;
``sigma2 = 2 * mean(x^2)`` over the block) or ``x^2`` (no imatrix); a first scale ``d = -max / 127`` and
its weighted least-squares refit; then 15 more trials with inverse scales ``(k - 127) / max``,
k = -7..7, keeping the best refit; finally every weight is mapped to its nearest codebook entry using the
chosen (unrounded) scale, while the stored scale is its fp16 rounding.
"""

from __future__ import annotations

import gguf
import numpy as np
import torch

from ramp.formats.base import QuantFormat
from ramp.formats.kernels import (
    GROUP_MAX_EPS,
    chunked_encoder,
    f32_div,
    fp16_from_bytes,
    seq_sum,
    signed_absmax,
)
from ramp.formats.legacy import importance, pack_block32, search_pieces

QK = 32
NTRY = 7
CODEBOOK = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)  # kvalues_iq4nl
_VALUES = torch.tensor(CODEBOOK, dtype=torch.float32)

# Nearest-entry lookup. ggml brackets a value a between neighbours v[m-1] <= a < v[m] by binary search and
# picks m-1 only when fl(a - v[m-1]) < fl(v[m] - a). Both sides are monotone in a, so each bracket switches
# at one float threshold; for this codebook every threshold is the exact midpoint (v[m-1] + v[m]) / 2 (ties
# go up), a multiple of 0.5 (tests/formats/test_iq4_nl.py checks this against a scalar replica of the
# search). So the index depends only on floor(2a): a table over the half-integer cells [k/2, (k+1)/2)
# for k = -256..255 (cells outside clamp, as ggml clamps at the ends) gives it in a few tensor ops.
_MIDPOINTS = [(lo + hi) / 2 for lo, hi in zip(CODEBOOK[:-1], CODEBOOK[1:], strict=True)]
_CELL_LO = torch.arange(-256, 256, dtype=torch.float64) / 2
_CELL_INDEX = (torch.tensor(_MIDPOINTS, dtype=torch.float64).unsqueeze(0) <= _CELL_LO.unsqueeze(1)).sum(1)
_CELL_VALUE = _VALUES[_CELL_INDEX]


def _cells(xt: torch.Tensor, inv: torch.Tensor) -> torch.Tensor:
    """Table row (int32) of ``a = inv * x`` (ggml's value): its half-integer cell, clamped to the table.

    ``2a`` is computed as ``(2 * inv) * x``, which equals ``2 * (inv * x)`` (scaling by 2 commutes with
    rounding; in the subnormal range both stay in the cell next to 0). When ``2 * inv`` is not finite the
    slow, literal form is used, and a NaN ``a`` goes to the last cell: ggml's search ends on the last
    entry when every comparison is false.
    """
    inv2 = inv * 2
    if bool(torch.isfinite(inv2).all()):
        al2 = xt * inv2
    else:
        al2 = (xt * inv).mul_(2).nan_to_num_(nan=511.0, posinf=511.0, neginf=-512.0)
    return al2.floor_().clamp_(-256, 255).add_(256).to(torch.int32)


def best_index(al: torch.Tensor) -> torch.Tensor:
    """Index (int64) of the codebook entry ggml's ``best_index_int8`` picks for each value of ``al``."""
    return _CELL_INDEX[_cells(torch.nan_to_num(al, nan=255.5), torch.ones(1)).long()]


def _quantize_blocks(xt: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale search on position-major ``xt, w: [32, B]`` -> ``(d[B] float32, index[32, B] uint8)``."""
    amax, mx = signed_absmax(xt, 0)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)  # keep the arithmetic finite; masked below

    def fit(inv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cells = _cells(xt, inv).view(-1)
        q = _CELL_VALUE.index_select(0, cells).view_as(xt)
        wq = w * q
        return seq_sum(wq * xt), seq_sum(wq.mul_(q))

    d0 = -mx / float(CODEBOOK[0])  # ntry > 0: d = -max / values[0]
    sumqx, sumq2 = fit(f32_div(1.0, d0))
    d = torch.where(sumq2 > 0, sumqx / sumq2, torch.zeros_like(sumqx))
    best = d * sumqx
    for k in range(-NTRY, NTRY + 1):
        sumqx, sumq2 = fit(f32_div(np.float32(k + CODEBOOK[0]), mx))
        better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
        d = torch.where(better, sumqx / sumq2, d)
        best = torch.where(better, d * sumqx, best)
    d = torch.where(zero, torch.zeros_like(d), d)
    inv = torch.where(d != 0, f32_div(1.0, d), torch.zeros_like(d))
    cells = _cells(xt, inv).view(-1)
    return d, _CELL_INDEX.to(torch.uint8).index_select(0, cells).view_as(xt)


def _block_importance(xt: torch.Tensor, qwt: torch.Tensor | None, sl: slice) -> torch.Tensor:
    """``x^2`` without an imatrix, else ``qw * sqrt(sigma2 + x^2)`` with ``sigma2 = 2 * mean(x^2)`` of the
    block (summed in order)."""
    if qwt is None:
        return xt * xt
    sigma2 = seq_sum(xt * xt) * float(np.float32(2.0 / QK))
    return importance(xt, qwt, sigma2)


def _encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows, nb, _ = x.shape
    d, idx = search_pieces(x, qw, _block_importance, _quantize_blocks)
    return pack_block32(idx, d).reshape(rows, nb, 18)


def _decode(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    qs = b[:, 2:18].to(torch.int64)
    idx = torch.cat([qs & 0x0F, qs >> 4], dim=-1)
    return d.unsqueeze(-1) * _VALUES[idx]


FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat(
        "IQ4_NL", gguf.GGMLQuantizationType.IQ4_NL, QK, 18, chunked_encoder(_encode, 18, whole_rows=False), _decode
    ),
)
