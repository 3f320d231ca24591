"""Unquantized storage types F32, F16 and BF16 (one weight per "block").

Layouts (little-endian, one value per weight, in the model's units):
- F32: 4 bytes, the IEEE single itself.
- F16: 2 bytes, IEEE half, rounded to nearest even (ggml's FP32_TO_FP16; |x| >= 65520 becomes inf).
- BF16: 2 bytes, the top half of the IEEE single, rounded to nearest even (ggml_compute_fp32_to_bf16:
  ``(bits + 0x7fff + ((bits >> 16) & 1)) >> 16``; a NaN keeps its top half with the quiet bit forced).
None of them uses an imatrix. F16/BF16 conversion runs in the single-threaded row-chunk workers of
:func:`ramp.formats.kernels.chunked_encoder`, like the quantizers.
"""

from __future__ import annotations

import gguf
import torch

from ramp.formats.base import QuantFormat
from ramp.formats.kernels import chunked_encoder


def _encode_f32(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    del qw
    rows, nb, _ = x.shape
    return x.to(torch.float32).contiguous().view(torch.uint8).reshape(rows, nb, 4).clone()  # no aliasing


def _decode_f32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float32).reshape(-1, 1).clone()


def _encode_f16(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    del qw
    rows, nb, _ = x.shape
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(rows, nb, 2)


def _decode_f16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.float16).to(torch.float32).reshape(-1, 1)


def fp32_to_bf16_bits(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int32 whose low 16 bits are ggml's bfloat16 (round to nearest even, quiet NaN).

    int32 arithmetic wraps like C's uint32 here and only the low 16 bits of the shifted sum are kept, so
    the signed view gives the same bits.
    """
    u = x.contiguous().view(torch.int32)
    rounded = (u + (0x7FFF + ((u >> 16) & 1))) >> 16
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    return torch.where(nan, (u >> 16) | 64, rounded)


def _encode_bf16(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    del qw
    rows, nb, _ = x.shape
    bits = fp32_to_bf16_bits(x.to(torch.float32)).to(torch.int16)  # keeps the low 16 bits
    return bits.view(torch.uint8).reshape(rows, nb, 2)


def _decode_bf16(b: torch.Tensor) -> torch.Tensor:
    bits = b.contiguous().view(torch.int16).to(torch.int32) << 16
    return bits.view(torch.float32).reshape(-1, 1)


T = gguf.GGMLQuantizationType
FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat("F32", T.F32, 1, 4, _encode_f32, _decode_f32, uses_imatrix=False),
    QuantFormat("F16", T.F16, 1, 2, chunked_encoder(_encode_f16, 2, whole_rows=False), _decode_f16, uses_imatrix=False),
    QuantFormat(
        "BF16", T.BF16, 1, 2, chunked_encoder(_encode_bf16, 2, whole_rows=False), _decode_bf16, uses_imatrix=False
    ),
)
