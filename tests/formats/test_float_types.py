"""F32 / F16 / BF16: BF16 rounding of the values quantize never sees (NaN), as ggml's converter does."""

from __future__ import annotations

import numpy as np
import torch

from ramp.formats import float_types


def test_bf16_quiets_nan_like_ggml() -> None:
    bits = np.array([0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0x7F800000], dtype=np.uint32)
    got = float_types.fp32_to_bf16_bits(torch.from_numpy(bits.view(np.float32))).numpy() & 0xFFFF
    assert got.tolist() == [0x7FC0, 0xFFC0, 0x7FFF, 0x7F80]
