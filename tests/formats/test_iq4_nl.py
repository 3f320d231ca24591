"""IQ4_NL: decode agrees bit for bit with gguf-py, the codebook lookup reproduces ggml's search, and
encoding is byte-identical with ggml with and without an imatrix (slow tests)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from formats.weights import BLOCK32_DISTS, block32_imatrix, block32_weight

from ramp.formats import iq4_nl
from ramp.formats.base import FormatError

make_weight, imatrix_for = block32_weight, block32_imatrix
FMT = iq4_nl.FORMATS[0]
SHAPES = [(1, 32), (3, 64), (7, 256), (16, 576), (5, 1536)]
DISTS = BLOCK32_DISTS


def ggml_decode(data: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(np.ascontiguousarray(data).view(np.uint8), FMT.ggml_type)


def ggml_best_index(a: np.float32) -> int:
    """Scalar replica of ggml's best_index_int8 (binary search, float32 distances)."""
    vals = iq4_nl.CODEBOOK
    if a <= vals[0]:
        return 0
    if a >= vals[-1]:
        return len(vals) - 1
    ml, mu = 0, len(vals) - 1
    while mu - ml > 1:
        mav = (ml + mu) // 2
        if a < vals[mav]:
            mu = mav
        else:
            ml = mav
    lower = np.float32(a - np.float32(vals[mu - 1])) < np.float32(np.float32(vals[mu]) - a)
    return mu - 1 if lower else mu


def test_format_record() -> None:
    assert FMT.name == "IQ4_NL"
    assert FMT.ggml_type == gguf.GGMLQuantizationType.IQ4_NL
    assert (FMT.block_size, FMT.type_size) == gguf.GGML_QUANT_SIZES[FMT.ggml_type]
    assert FMT.uses_imatrix
    assert gguf.quants.IQ4_NL.kvalues == iq4_nl.CODEBOOK


def test_best_index_matches_ggml_search() -> None:
    rng = np.random.default_rng(0)
    edges = np.array([*iq4_nl.CODEBOOK, *iq4_nl._MIDPOINTS, 0.0, -128.0, 128.0, 127.5, -127.5], np.float32)
    near = [edges]
    for _ in range(1, 40):  # a few ulps either side of every boundary
        near.append(np.nextafter(near[-1], np.float32(np.inf)))
    down = [edges]
    for _ in range(1, 40):
        down.append(np.nextafter(down[-1], np.float32(-np.inf)))
    a = np.concatenate(
        [
            *near,
            *down,
            (rng.standard_normal(5_000) * 70).astype(np.float32),
            np.float32([-0.0, 1e-30, -1e-30, 300.0, -300.0]),
        ]
    )
    got = iq4_nl.best_index(torch.from_numpy(a)).numpy()
    expected = np.array([ggml_best_index(v) for v in a])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_decode_matches_gguf_py(shape: tuple[int, int], dist: str, with_imatrix: bool) -> None:
    w = make_weight(dist, shape)
    ours = FMT.quantize(w, imatrix_for(shape[1]) if with_imatrix else None)
    assert ours.shape == (shape[0], shape[1] // 32 * 18)
    decoded = FMT.dequantize(ours, shape).numpy()
    np.testing.assert_array_equal(decoded.view(np.int32), ggml_decode(ours).reshape(shape).view(np.int32))
    if dist == "gauss" and not with_imatrix:  # (blocks without importance may be fitted arbitrarily)
        assert np.sqrt(np.mean((decoded - w) ** 2)) < 0.2 * np.sqrt(np.mean(w**2))


def test_zero_block_encodes_like_ggml() -> None:
    # amax below 1e-15: scale 0 and every index at the entry nearest zero (index 8, value 1)
    out = FMT.quantize(np.zeros((1, 32), np.float32)).reshape(-1)
    assert out[:2].tolist() == [0, 0]
    assert (out[2:] == 0x88).all()


def test_chunked_encoding_matches_single_pass() -> None:
    w = make_weight("student_t", (320, 1024), seed=3)
    x = torch.from_numpy(w).reshape(320, 32, 32)
    qw = torch.from_numpy(imatrix_for(1024)).reshape(1, 32, 32).expand(320, 32, 32).contiguous()
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for q in (None, qw):
            assert torch.equal(FMT.encode(x, q), iq4_nl._encode(x, q))
    finally:
        torch.set_num_threads(old)


def test_illegal_row_length_names_shape() -> None:
    with pytest.raises(FormatError, match=r"\(2, 80\)"):
        FMT.quantize(np.zeros((2, 80), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weight_names_tensor(bad: float) -> None:
    w = make_weight("gauss", (2, 64))
    w[0, 3] = bad
    with pytest.raises(FormatError, match="blk.3.attn_q.weight"):
        FMT.quantize(w, name="blk.3.attn_q.weight")


@pytest.mark.slow
@pytest.mark.parametrize(
    "dist", ["gauss", "student_t", "zero_rows", "signed_zeros", "ties", "mixed_magnitudes", "huge", "denormal"]
)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_byte_identical_to_ggml(llama_cpp_bin, dist: str, with_imatrix: bool) -> None:
    from ramp.llamacpp import ggml_quantize

    w = make_weight(dist, (192, 1536), seed=11)
    im = imatrix_for(1536, seed=12) if with_imatrix else None
    ours = FMT.quantize(w, im).reshape(-1, 18)
    ref = ggml_quantize(FMT.type_id, w, im).reshape(-1, 18)
    same = (ours == ref).all(1)
    if not same.all():
        xb = w.reshape(-1, 32)[~same]
        err_ours = np.sqrt(np.mean((ggml_decode(ours[~same]) - xb) ** 2))
        err_ref = np.sqrt(np.mean((ggml_decode(ref[~same]) - xb) ** 2))
        assert err_ours <= err_ref * 1.001, (err_ours, err_ref)
    assert same.mean() >= 0.999, f"{same.mean():.5f} of blocks identical"
