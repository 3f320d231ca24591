"""Q3_K: the lane-wise make_q3_quants against a scalar port of ggml's."""

from __future__ import annotations

import numpy as np
import pytest
from formats import scalar_ggml
from formats.scalar_ggml import edge_groups

from ramp.formats import jit


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_make_q3_quants_matches_scalar_port(seed: int) -> None:
    x = edge_groups(seed, 160)
    X = np.ascontiguousarray(x.T)  # lanes: one group per column
    L = np.empty_like(X)
    scale = np.empty(X.shape[1], np.float32)
    jit.make_q3_quants(X, 4, L, scale, np.empty((8, X.shape[1]), np.float32))
    for g in range(x.shape[0]):
        s_ref, L_ref = scalar_ggml.make_q3_quants(x[g], 4)
        assert scale[g].view(np.uint32) == np.float32(s_ref).view(np.uint32), g
        assert L[:, g].astype(int).tolist() == L_ref, g
