"""Q4_K / Q5_K: the 12-byte packing of eight 6-bit scales and mins inverts exactly."""

from __future__ import annotations

import torch

from ramp.formats.kquant_minmax import pack_scale_min_k4, unpack_scale_min_k4


def test_scale_min_packing_roundtrip() -> None:
    g = torch.Generator().manual_seed(0)
    ls = torch.randint(0, 64, (50, 8), generator=g, dtype=torch.int32)
    lm = torch.randint(0, 64, (50, 8), generator=g, dtype=torch.int32)
    ls[0], lm[0] = torch.arange(8) * 9, 63 - torch.arange(8) * 9  # every slot sees high and low values
    sc, m = unpack_scale_min_k4(pack_scale_min_k4(ls, lm))
    assert torch.equal(sc, ls) and torch.equal(m, lm)
