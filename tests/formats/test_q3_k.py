"""Q3_K: the 6-bit sub-scale packing, and the vectorised make_q3_quants against a scalar port of ggml's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from formats import scalar_ggml
from formats.scalar_ggml import edge_groups

from ramp.formats import q3_k
from ramp.formats.kquant_symmetric import make_q3_quants


def test_scale_packing_roundtrip() -> None:
    """Every 6-bit sub-scale in every slot decodes back exactly."""
    rng = np.random.default_rng(5)
    sub = torch.from_numpy(rng.integers(0, 64, (64, 16)).astype(np.uint8))
    sub[0] = torch.arange(16, dtype=torch.uint8) * 4 + 3
    levels = torch.from_numpy(rng.integers(0, 8, (64, 256)).astype(np.uint8))
    blocks = q3_k._pack(levels, sub, torch.ones(64))
    got = q3_k.FORMATS[0].decode(blocks).view(64, 16, 16)
    want = ((sub.float() - 32).view(64, 16, 1)) * (levels.float() - 4).view(64, 16, 16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_make_q3_quants_matches_scalar_port(seed: int) -> None:
    x = edge_groups(seed, 160)
    scale, L = make_q3_quants(torch.from_numpy(x), 4, tile=48)  # several tiles, then the global rounds
    for g in range(x.shape[0]):
        s_ref, L_ref = scalar_ggml.make_q3_quants(x[g], 4)
        assert np.float32(scale[g].item()).view(np.uint32) == np.float32(s_ref).view(np.uint32), g
        assert L[g].tolist() == L_ref, g
