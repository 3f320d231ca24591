"""Q4_K / Q5_K: the 12-byte packing of eight 6-bit scales and mins decodes back exactly."""

from __future__ import annotations

import numpy as np
import torch

from ramp.formats import jit
from ramp.formats.q4_k import unpack_scale_min_k4


def test_scale_min_packing_roundtrip() -> None:
    rng = np.random.default_rng(0)
    ls = rng.integers(0, 64, (50, 8))
    lm = rng.integers(0, 64, (50, 8))
    ls[0], lm[0] = np.arange(8) * 9, 63 - np.arange(8) * 9  # every slot sees high and low values
    packed = np.zeros((50, 12), np.uint8)
    for i in range(50):
        jit._put_k4_scales(packed[i], 0, ls[i], lm[i])
        assert [jit._get_k4_scale_min(packed[i], 0, j) for j in range(8)] == list(zip(ls[i], lm[i], strict=True))
    sc, m = unpack_scale_min_k4(torch.from_numpy(packed))
    assert np.array_equal(sc.numpy(), ls) and np.array_equal(m.numpy(), lm)
