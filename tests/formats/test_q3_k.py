"""Q3_K: decode agrees bit for bit with gguf-py, the vectorised make_q3_quants agrees with a scalar
float32 port of ggml's, and encode is byte-identical with ggml's own quantizer (slow tests)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from formats.weights import KQUANT_DISTS, kquant_imatrix, kquant_weight

from ramp.formats import q3_k
from ramp.formats.base import FormatError
from ramp.formats.kquant_symmetric import make_q3_quants

make_weight, imatrix_for = kquant_weight, kquant_imatrix
FMT = q3_k.FORMATS[0]
SHAPES = [(1, 256), (3, 512), (8, 1536), (2, 2048)]
DISTS = KQUANT_DISTS
f32 = np.float32


def test_format_record() -> None:
    assert FMT.name == "Q3_K" and FMT.ggml_type == gguf.GGMLQuantizationType.Q3_K
    assert (FMT.block_size, FMT.type_size) == gguf.GGML_QUANT_SIZES[FMT.ggml_type] == (256, 110)
    assert FMT.uses_imatrix


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_decode_matches_gguf_py(shape: tuple[int, int], dist: str, with_imatrix: bool) -> None:
    w = make_weight(dist, shape)
    im = imatrix_for(shape[1]) if with_imatrix else None
    data = FMT.quantize(w, im)
    assert data.shape == (shape[0], shape[1] // 256 * 110) and data.dtype == np.uint8
    ours = FMT.dequantize(data, shape).numpy()
    ref = gguf.quants.dequantize(data, FMT.ggml_type).astype(np.float32)
    assert ref.shape == shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    if dist not in ("outlier", "tiny"):  # sanity: 3 bits still track the weights
        rms = float(np.sqrt(np.mean(w**2)))
        assert np.sqrt(np.mean((ours - w) ** 2)) <= 0.3 * max(rms, 1e-30)


def test_scale_packing_roundtrip() -> None:
    """The 6-bit sub-scale packing inverts exactly (every value in every slot)."""
    rng = np.random.default_rng(5)
    sub = torch.from_numpy(rng.integers(0, 64, (64, 16)).astype(np.uint8))
    sub[0] = torch.arange(16, dtype=torch.uint8) * 4 + 3
    levels = torch.from_numpy(rng.integers(0, 8, (64, 256)).astype(np.uint8))
    d = torch.ones(64)
    blocks = q3_k._pack(levels, sub, d)
    got = FMT.decode(blocks).view(64, 16, 16)
    want = ((sub.float() - 32).view(64, 16, 1)) * (levels.float() - 4).view(64, 16, 16)
    assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(4, 576), (1, 100), (3, 255)])
def test_illegal_row_length(shape: tuple[int, int]) -> None:
    with pytest.raises(FormatError, match=rf"\({shape[0]}, {shape[1]}\)"):
        FMT.quantize(np.zeros(shape, dtype=np.float32))
    with pytest.raises(FormatError, match=rf"\({shape[0]}, {shape[1]}\)"):
        FMT.dequantize(np.zeros(110, np.uint8), shape)


# ---- make_q3_quants against a scalar float32 port of ggml's greedy search --------------------------------


def _nearest_int(v: np.float32) -> int:
    """ggml's magic-number rounding on a float32 scalar (also outside its nominal range)."""
    t = np.array([f32(v) + f32(12582912.0)], dtype=np.float32).view(np.int32)[0]
    return (int(t) & 0x007FFFFF) - 0x00400000


def scalar_make_q3_quants(x: np.ndarray, nmax: int) -> tuple[np.float32, list[int]]:
    """One group, position by position, in float32 scalars (weights x^2, up to 5 passes)."""
    n = len(x)
    amax, mx = f32(0), f32(0)
    for v in x:
        if abs(v) > amax:
            amax, mx = abs(v), v
    if amax < f32(1e-15):
        return f32(0), [0] * n
    iscale = f32(-nmax) / mx
    L = [max(-nmax, min(nmax - 1, _nearest_int(iscale * v))) for v in x]
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
                new = max(-nmax, min(nmax - 1, _nearest_int(v * sl2 / slx)))
                if new != L[i]:
                    slx = slx + w * v * f32(new)
                    sl2 = sl2 + w * f32(new) * f32(new)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new, slx, sl2
                        changed += 1
        if not changed:
            break
    return (sumlx / suml2 if suml2 > 0 else f32(0)), [q + nmax for q in L]


def _groups(seed: int, count: int) -> np.ndarray:
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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_make_q3_quants_matches_scalar_port(seed: int) -> None:
    x = _groups(seed, 160)
    scale, L = make_q3_quants(torch.from_numpy(x), 4, tile=48)  # several tiles, then the global rounds
    for g in range(x.shape[0]):
        s_ref, L_ref = scalar_make_q3_quants(x[g], 4)
        assert np.float32(scale[g].item()).view(np.uint32) == np.float32(s_ref).view(np.uint32), g
        assert L[g].tolist() == L_ref, g


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
