"""IQ4_NL: the codebook is ggml's, and the table lookup picks the entry ggml's binary search picks."""

from __future__ import annotations

import gguf
import numpy as np
import torch
from formats import scalar_ggml

from ramp.formats import iq4_nl


def test_codebook_is_ggmls() -> None:
    assert gguf.quants.IQ4_NL.kvalues == iq4_nl.CODEBOOK


def test_best_index_matches_ggml_search() -> None:
    rng = np.random.default_rng(0)
    edges = np.array([*iq4_nl.CODEBOOK, *iq4_nl._MIDPOINTS, 0.0, -128.0, 128.0, 127.5, -127.5], np.float32)
    up, down = [edges], [edges]
    for _ in range(1, 40):  # a few ulps either side of every boundary
        up.append(np.nextafter(up[-1], np.float32(np.inf)))
        down.append(np.nextafter(down[-1], np.float32(-np.inf)))
    a = np.concatenate(
        [*up, *down, (rng.standard_normal(5_000) * 70).astype(np.float32), np.float32([-0.0, 1e-30, -1e-30, 300.0])]
    )
    got = iq4_nl.best_index(torch.from_numpy(a)).numpy()
    expected = np.array([scalar_ggml.best_index_int8(iq4_nl.CODEBOOK, v) for v in a])
    np.testing.assert_array_equal(got, expected)
