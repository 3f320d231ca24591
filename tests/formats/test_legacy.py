"""Q4_0 .. Q8_0: the word-wise bit packing equals the plain per-byte layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ramp.formats import legacy


@pytest.mark.parametrize("blocks", [1, 2, 3, 100])
def test_bit_packing(blocks: int) -> None:
    q = torch.randint(0, 32, (blocks, 32), dtype=torch.uint8)
    expected = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)
    assert torch.equal(legacy.pack_nibbles32(q, five_bit=True), expected)
    q4 = q & 0x0F
    assert torch.equal(legacy.pack_nibbles32(q4), q4[:, :16] | (q4[:, 16:] << 4))
    qh = np.packbits((q >> 4).numpy(), axis=-1, bitorder="little")
    np.testing.assert_array_equal(legacy.pack_high_bits32(q).numpy(), qh)
