"""Q6_K: decode agrees bit for bit with gguf-py, the shared make_qx_quants search agrees with a scalar
float32 port of ggml's, and encode is byte-identical with ggml's own quantizer (slow tests)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from formats.weights import KQUANT_DISTS, kquant_imatrix, kquant_weight

from ramp.formats import q6_k
from ramp.formats.base import FormatError
from ramp.formats.kquant_symmetric import make_qx_quants

make_weight, imatrix_for = kquant_weight, kquant_imatrix
FMT = q6_k.FORMATS[0]
SHAPES = [(1, 256), (3, 512), (8, 1536), (2, 2048)]
DISTS = KQUANT_DISTS
f32 = np.float32


def test_format_record() -> None:
    assert FMT.name == "Q6_K" and FMT.ggml_type == gguf.GGMLQuantizationType.Q6_K
    assert (FMT.block_size, FMT.type_size) == gguf.GGML_QUANT_SIZES[FMT.ggml_type] == (256, 210)
    assert FMT.uses_imatrix


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_decode_matches_gguf_py(shape: tuple[int, int], dist: str, with_imatrix: bool) -> None:
    w = make_weight(dist, shape)
    im = imatrix_for(shape[1]) if with_imatrix else None
    data = FMT.quantize(w, im)
    assert data.shape == (shape[0], shape[1] // 256 * 210) and data.dtype == np.uint8
    ours = FMT.dequantize(data, shape).numpy()
    ref = gguf.quants.dequantize(data, FMT.ggml_type).astype(np.float32)
    assert ref.shape == shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    if dist not in ("outlier", "tiny"):  # sanity: 6 bits are close to the weights
        rms = float(np.sqrt(np.mean(w**2)))
        assert np.sqrt(np.mean((ours - w) ** 2)) <= 0.03 * max(rms, 1e-30)


def test_zero_and_tiny_blocks() -> None:
    w = np.zeros((2, 512), np.float32)
    w[1, 256:] = 1e-20  # below ggml's 1e-15 "all zero" threshold
    data = FMT.quantize(w)
    assert not data.any()  # ggml zeroes the whole block, d included


@pytest.mark.parametrize("shape", [(4, 576), (1, 100), (3, 255)])
def test_illegal_row_length(shape: tuple[int, int]) -> None:
    with pytest.raises(FormatError, match=rf"\({shape[0]}, {shape[1]}\)"):
        FMT.quantize(np.zeros(shape, dtype=np.float32))
    with pytest.raises(FormatError, match=rf"\({shape[0]}, {shape[1]}\)"):
        FMT.dequantize(np.zeros(210, np.uint8), shape)


# ---- make_qx_quants against a scalar float32 port of ggml's search ---------------------------------------


def _nearest_int(v: np.float32) -> int:
    """ggml's magic-number rounding on a float32 scalar."""
    t = np.array([f32(v) + f32(12582912.0)], dtype=np.float32).view(np.int32)[0]
    return (int(t) & 0x007FFFFF) - 0x00400000


def scalar_make_qx_quants(x: np.ndarray, nmax: int, w: np.ndarray) -> tuple[np.float32, list[int]]:
    """One group, element by element, in float32 scalars (rmse_type 1 with explicit weights)."""
    n = len(x)
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < f32(1e-15):
        return f32(0), [0] * n

    def sums(iscale: np.float32) -> tuple[np.float32, np.float32, list[int]]:
        slx, sl2, ls = f32(0), f32(0), []
        for v, wv in zip(x, w, strict=True):
            q = max(-nmax, min(nmax - 1, _nearest_int(iscale * v)))
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


def _groups(seed: int, count: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal((count, 16)).astype(np.float32)
    g[0] = 0
    g[1] = 1.0
    g[2, ::2], g[2, 1::2] = 2.5, -2.5  # equal magnitudes of both signs
    g[3] = np.round(g[3] * 4) / 4  # exact quarters: rounding ties for some candidates
    g[4] *= 1e-20
    g[5] = 0
    g[5, 7] = -3.0  # a single non-zero
    g[6] *= 1e-8
    g[7] = rng.standard_t(2, 16)
    return g


@pytest.mark.parametrize("nmax", [4, 32])
@pytest.mark.parametrize("weights", ["x2", "imatrix", "with_zeros"])
def test_make_qx_quants_matches_scalar_port(nmax: int, weights: str) -> None:
    x = _groups(nmax, 48)
    rng = np.random.default_rng(7)
    if weights == "x2":
        w = x * x
    else:
        w = np.exp(rng.standard_normal(x.shape)).astype(np.float32)
        if weights == "with_zeros":
            w[rng.random(x.shape) < 0.5] = 0
            w[10] = 0
    xt = torch.from_numpy(x).t().contiguous()
    scale, L = make_qx_quants(xt, nmax, torch.from_numpy(w).t().contiguous(), chunk=20)  # several slices
    for g in range(x.shape[0]):
        s_ref, L_ref = scalar_make_qx_quants(x[g], nmax, w[g])
        assert np.float32(scale[g].item()).view(np.uint32) == np.float32(s_ref).view(np.uint32), g
        assert L[:, g].tolist() == L_ref, g


# ---- byte-identity with ggml (needs the llama.cpp build) -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["gauss", "student_t"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_bytes_match_ggml(llama_cpp_bin, dist: str, with_imatrix: bool) -> None:
    from ramp.llamacpp import ggml_quantize

    shape = (384, 2048)
    w = make_weight(dist, shape, seed=3)
    im = imatrix_for(shape[1], seed=4) if with_imatrix else None
    ref = ggml_quantize(FMT.type_id, w, im).reshape(-1, FMT.type_size)
    ours = FMT.quantize(w, im).reshape(-1, FMT.type_size)
    same = (ref == ours).all(axis=1)
    assert same.mean() >= 0.999, f"only {same.mean():.4%} of blocks identical"
    if not same.all():  # any residual difference must not cost accuracy
        wb = w.reshape(-1, 256)[~same]
        err = lambda q: float(np.sqrt(np.mean((gguf.quants.dequantize(q, FMT.ggml_type) - wb) ** 2)))  # noqa: E731
        assert err(ours[~same]) <= 1.001 * err(ref[~same])
