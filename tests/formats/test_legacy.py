"""Q4_0 .. Q8_0: the word-wise nibble packing equals the plain per-byte layout."""

from __future__ import annotations

import pytest
import torch

from ramp.formats import legacy


@pytest.mark.parametrize("blocks", [1, 2, 3, 100])
def test_bit_packing(blocks: int) -> None:
    q = torch.randint(0, 16, (blocks, 32), dtype=torch.uint8)
    assert torch.equal(legacy.pack_nibbles32(q), q[:, :16] | (q[:, 16:] << 4))
