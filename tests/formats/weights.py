"""Test weights and the importance matrix shared by the format tests: every format meets every case."""

from __future__ import annotations

import numpy as np

DISTS = [
    "gauss",
    "student_t",
    "zero_rows",
    "constant_rows",
    "outlier",
    "tiny",
    "underflow",
    "signed_zeros",
    "ties",
    "mixed_magnitudes",
    "huge",
    "denormal",
    "extremes",
]

# Values at the edges of fp16/bf16: overflow, ties at their rounding points, big and subnormal magnitudes.
_EXTREMES = np.array(
    [65504.0, 65519.99, 65520.0, -70000.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-8, 1.0 + 3 * 2.0**-8]
    + [3.0e38, -3.0e38, 1e-40, 6e-8, 3e-8],
    dtype=np.float32,
)


def make_weight(dist: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """A float32 ``[rows, cols]`` weight of one edge case (``DISTS``), the same for a given seed."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    g = rng.standard_normal(shape).astype(np.float32) * 0.02
    if dist == "gauss":
        return g
    if dist == "student_t":
        return (rng.standard_t(3, shape) * 0.02).astype(np.float32)
    if dist == "zero_rows":  # all-zero blocks, of both signs
        g[::2] = 0.0
        g[1::4] = -0.0
        return g
    if dist == "constant_rows":
        g[0] = 0.375
        g[1::2] = -1.25
        return g
    if dist == "outlier":  # one huge weight per row dominates its block's scale
        g[np.arange(rows), rng.integers(0, cols, rows)] = 1e3
        return g
    if dist == "tiny":  # ~1e-8: K-quant super-block scales underflow in fp16, as in ggml
        return g * np.float32(5e-7)
    if dist == "underflow":  # ~1e-20: every fp16 scale underflows to zero
        return g * np.float32(1e-18)
    if dist == "signed_zeros":  # +0 / -0 mixes decide the sign bit of zero scales and minima
        vals = np.array([0.0, -0.0, 0.5, -0.5, 1.0], dtype=np.float32)
        return rng.choice(vals, size=shape, p=[0.4, 0.4, 0.08, 0.08, 0.04])
    if dist == "ties":  # +a and -a in one block: the first one fixes the sign of the scale
        return rng.choice(np.array([-2, -1, 0, 1, 2], dtype=np.float32), size=shape)
    if dist == "mixed_magnitudes":  # 1e-35 .. 1 inside one block: subnormal products in the sums
        return (g * np.exp(rng.uniform(-80, 0, shape))).astype(np.float32)
    if dist == "huge":  # squares overflow to inf: ggml's sums go inf/NaN and its comparisons fail
        return g * np.float32(1e32)
    if dist == "denormal":  # float32 subnormals: scales overflow to inf in ggml's searches
        return g * np.float32(1e-39)
    if dist == "extremes":
        return rng.choice(_EXTREMES, size=shape)
    raise ValueError(f"unknown weight distribution {dist!r}; known: {', '.join(DISTS)}")


def make_imatrix(cols: int, seed: int = 1) -> np.ndarray:
    """Positive importances spread over several orders of magnitude, some exactly zero."""
    rng = np.random.default_rng(seed)
    im = np.exp(rng.standard_normal(cols) * 2.0).astype(np.float32)
    im[rng.random(cols) < 0.05] = 0.0
    im[64:128] = 0.0  # two 32-blocks without importance
    im[160:192] *= np.float32(1e-30)
    return im
