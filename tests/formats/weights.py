"""Test weights and importance matrices shared by the quantizer tests (two families of edge cases)."""

from __future__ import annotations

import numpy as np

KQUANT_DISTS = ["gauss", "student_t", "zero_rows", "constant_rows", "outlier", "tiny"]
BLOCK32_DISTS = ["gauss", "student_t", "zero_rows", "constant_rows", "tiny", "signed_zeros", "ties"]


def kquant_weight(dist: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """256-block (K-quant) edge cases: outlier weights and a super-block scale that underflows in fp16."""
    rng = np.random.default_rng(seed)
    rows, cols = shape
    g = rng.standard_normal(shape).astype(np.float32) * 0.02
    if dist == "gauss":
        return g
    if dist == "student_t":
        return (rng.standard_t(3, shape) * 0.02).astype(np.float32)
    if dist == "zero_rows":
        g[::2] = 0.0
        return g
    if dist == "constant_rows":
        g[0] = 0.375
        g[1::2] = -1.25
        return g
    if dist == "outlier":
        g[np.arange(rows), rng.integers(0, cols, rows)] = 1e3
        return g
    if dist == "tiny":
        return g * 5e-7  # ~1e-8: the fp16 super-block scale underflows, as in ggml
    raise ValueError(dist)


def kquant_imatrix(cols: int, seed: int = 1) -> np.ndarray:
    """Positive importances with a spread of magnitudes, exp(N(0, 1))."""
    return np.exp(np.random.default_rng(seed).standard_normal(cols)).astype(np.float32)


def block32_weight(dist: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """32-block edge cases: signed zeros, ties and magnitudes that stress float32 sums and fp16 scales."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(shape).astype(np.float32) * 0.02
    if dist == "gauss":
        return g
    if dist == "student_t":
        return (rng.standard_t(3, shape) * 0.02).astype(np.float32)
    if dist == "zero_rows":
        g[::2] = 0.0
        return g
    if dist == "constant_rows":
        g[0] = 0.375
        g[1::2] = -1.25
        return g
    if dist == "tiny":
        return g * np.float32(1e-18)  # ~1e-20: scales underflow to fp16 zero
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
    raise ValueError(dist)


def block32_imatrix(cols: int, seed: int = 1) -> np.ndarray:
    """Positive importances spread over several orders of magnitude, a few exactly zero."""
    rng = np.random.default_rng(seed)
    im = np.exp(rng.standard_normal(cols) * 2.0).astype(np.float32)
    im[rng.random(cols) < 0.05] = 0.0
    im[64:128] = 0.0  # two whole blocks without importance
    im[160:192] *= np.float32(1e-30)
    return im
