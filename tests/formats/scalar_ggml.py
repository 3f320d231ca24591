"""Scalar float32 ports of ggml's per-group routines, one value at a time as the C code runs, to check the
vectorised kernels against (numpy float32 scalars round exactly as C's float does)."""

from __future__ import annotations

import numpy as np

f32 = np.float32


def nearest_int(v: float) -> int:
    """ggml's magic-number rounding on a float32 scalar (also outside its nominal range)."""
    with np.errstate(all="ignore"):
        t = np.array([f32(v) + f32(12582912.0)], dtype=np.float32).view(np.int32)[0]
    return (int(t) & 0x007FFFFF) - 0x00400000


def signed_absmax(x: np.ndarray) -> tuple[np.float32, np.float32]:
    """``(amax, max)``: ``if (fabsf(v) > amax) { amax = fabsf(v); max = v; }`` from zero."""
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    return amax, mx


def make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.float32, list[int]]:
    """``make_qx_quants`` with ``rmse_type = 1`` and explicit weights, for one group."""
    amax, mx = signed_absmax(x)
    if amax < f32(1e-15):
        return f32(0), [0] * len(x)

    def sums(iscale: np.float32) -> tuple[np.float32, np.float32, list[int]]:
        slx, sl2, ls = f32(0), f32(0), []
        for v, wv in zip(x, w, strict=True):
            q = max(-nmax, min(nmax - 1, nearest_int(iscale * v)))
            ls.append(q + nmax)
            slx = slx + wv * v * f32(q)
            sl2 = sl2 + wv * f32(q) * f32(q)
        return slx, sl2, ls

    slx, sl2, L = sums(f32(-nmax) / mx)
    scale = slx / sl2 if sl2 != 0 else f32(0)
    best = scale * slx
    for step in [s for s in range(-9, 10) if s != 0]:
        slx, sl2, ls = sums(-(f32(nmax) + f32(0.1) * f32(step)) / mx)
        if sl2 > 0 and slx * slx > best * sl2:
            L, scale = ls, slx / sl2
            best = scale * slx
    return scale, L


def make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.float32, list[int]]:
    """``make_q3_quants`` with ``do_rmse`` (weights x^2, up to 5 greedy passes), for one group."""
    amax, mx = signed_absmax(x)
    if amax < f32(1e-15):
        return f32(0), [0] * len(x)
    iscale = f32(-nmax) / mx
    L = [max(-nmax, min(nmax - 1, nearest_int(iscale * v))) for v in x]
    sumlx, suml2 = f32(0), f32(0)
    for v, q in zip(x, L, strict=True):
        w = v * v
        sumlx = sumlx + w * v * f32(q)
        suml2 = suml2 + w * f32(q) * f32(q)
    for _ in range(5):
        changed = 0
        for i, v in enumerate(x):
            w = v * v
            slx = sumlx - w * v * f32(L[i])
            if slx > 0:
                sl2 = suml2 - w * f32(L[i]) * f32(L[i])
                new = max(-nmax, min(nmax - 1, nearest_int(v * sl2 / slx)))
                if new != L[i]:
                    slx = slx + w * v * f32(new)
                    sl2 = sl2 + w * f32(new) * f32(new)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new, slx, sl2
                        changed += 1
        if not changed:
            break
    return (sumlx / suml2 if suml2 > 0 else f32(0)), [q + nmax for q in L]


def best_index_int8(values: tuple[int, ...], a: np.float32) -> int:
    """``best_index_int8``: binary search for the nearest codebook entry, float32 distances."""
    if a <= values[0]:
        return 0
    if a >= values[-1]:
        return len(values) - 1
    ml, mu = 0, len(values) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if a < values[mav]:
            mu = mav
        else:
            ml = mav
    lower = f32(a - f32(values[mu - 1])) < f32(f32(values[mu]) - a)
    return mu - 1 if lower else mu


def edge_groups(seed: int, count: int) -> np.ndarray:
    """``[count, 16]`` groups: random, with edge cases (zeros, ties of both signs, tiny, single values)."""
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((count, 16)).astype(np.float32)
    g[0] = 0
    g[1] = 1.0
    g[2, ::2], g[2, 1::2] = 2.5, -2.5  # equal magnitudes of both signs
    g[3] = np.round(g[3] * 4) / 4  # exact quarters: rounding ties
    g[4] *= 1e-20
    g[5] = 0
    g[5, 7] = -3.0  # a single non-zero
    g[6] *= 1e-8
    g[7] = rng.standard_t(2, 16)
    g[8] = rng.integers(-4, 4, 16)
    g[9, :8] = 0
    return g
