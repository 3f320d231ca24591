"""Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: decode agrees bit for bit with gguf-py, the reference path is
byte-identical with gguf-py's quantizer, and both paths are byte-identical with ggml (slow tests)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from formats.weights import BLOCK32_DISTS, block32_imatrix, block32_weight

from ramp.formats import legacy
from ramp.formats.base import FormatError

make_weight, imatrix_for = block32_weight, block32_imatrix
FORMATS = {f.name: f for f in legacy.FORMATS}
NAMES = list(FORMATS)
SHAPES = [(1, 32), (3, 64), (7, 256), (16, 576), (5, 1536)]
DISTS = BLOCK32_DISTS


def ggml_decode(fmt, data: np.ndarray) -> np.ndarray:
    return gguf.quants.dequantize(np.ascontiguousarray(data).view(np.uint8), fmt.ggml_type)


@pytest.mark.parametrize("name", NAMES)
def test_format_record(name: str) -> None:
    fmt = FORMATS[name]
    assert fmt.ggml_type == gguf.GGMLQuantizationType[name]
    assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[fmt.ggml_type]
    assert fmt.uses_imatrix == (name != "Q8_0")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dist", DISTS)
def test_reference_path_matches_gguf_py(name: str, shape: tuple[int, int], dist: str) -> None:
    fmt = FORMATS[name]
    w = make_weight(dist, shape)
    ours = fmt.quantize(w)
    assert ours.shape == (shape[0], shape[1] // 32 * fmt.type_size)
    if dist != "signed_zeros":
        # gguf-py picks a zero max/min without C's sign rules, so signed zeros are checked against ggml only
        np.testing.assert_array_equal(ours, gguf.quants.quantize(w, fmt.ggml_type))
    decoded = fmt.dequantize(ours, shape).numpy()
    np.testing.assert_array_equal(decoded.view(np.int32), ggml_decode(fmt, ours).reshape(shape).view(np.int32))


@pytest.mark.parametrize("name", [n for n in NAMES if n != "Q8_0"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dist", ["gauss", "student_t", "zero_rows", "constant_rows", "signed_zeros"])
def test_imatrix_path_decodes_like_gguf_py(name: str, shape: tuple[int, int], dist: str) -> None:
    fmt = FORMATS[name]
    w = make_weight(dist, shape)
    ours = fmt.quantize(w, imatrix_for(shape[1]))
    decoded = fmt.dequantize(ours, shape).numpy()
    np.testing.assert_array_equal(decoded.view(np.int32), ggml_decode(fmt, ours).reshape(shape).view(np.int32))
    # the weighted search never does worse than a zero reconstruction on a non-zero block
    assert np.isfinite(decoded).all()
    if dist == "gauss":
        assert np.sqrt(np.mean((decoded - w) ** 2)) < np.sqrt(np.mean(w**2))


def test_q8_0_ignores_imatrix() -> None:
    fmt = FORMATS["Q8_0"]
    w = make_weight("gauss", (4, 256))
    np.testing.assert_array_equal(fmt.quantize(w), fmt.quantize(w, imatrix_for(256)))


@pytest.mark.parametrize("name", NAMES)
def test_chunked_encoding_matches_single_pass(name: str) -> None:
    """The multi-threaded row-chunk driver produces the same bytes as one pass over all rows."""
    fmt = FORMATS[name]
    w = make_weight("student_t", (320, 1024), seed=3)
    im = imatrix_for(1024)
    x = torch.from_numpy(w).reshape(320, 32, 32)
    qw = torch.from_numpy(im).reshape(1, 32, 32).expand(320, 32, 32).contiguous()
    chunk = {
        "Q4_0": legacy._encode_q4_0,
        "Q4_1": legacy._encode_q4_1,
        "Q5_0": legacy._encode_q5_0,
        "Q5_1": legacy._encode_q5_1,
        "Q8_0": legacy._encode_q8_0,
    }[name]
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for q in (None, qw):
            assert torch.equal(fmt.encode(x, q), chunk(x, q))
    finally:
        torch.set_num_threads(old)
    assert torch.get_num_threads() == old


@pytest.mark.parametrize("name", NAMES)
def test_illegal_row_length_names_shape(name: str) -> None:
    with pytest.raises(FormatError, match=r"\(4, 48\)"):
        FORMATS[name].quantize(np.zeros((4, 48), np.float32))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_names_tensor(name: str, bad: float) -> None:
    w = make_weight("gauss", (2, 64))
    w[1, 7] = bad
    with pytest.raises(FormatError, match="blk.0.ffn_up.weight"):
        FORMATS[name].quantize(w, name="blk.0.ffn_up.weight")


# ---- the exact-arithmetic helpers ------------------------------------------------------------------------


@pytest.mark.parametrize("cols", [1, 2, 3, 15, 16, 17, 100, 1000])
@pytest.mark.parametrize("n", [2, 32, 1536])
def test_col_sum_is_sequential(n: int, cols: int) -> None:
    rng = np.random.default_rng(n * cols)
    p = (rng.standard_normal((n, cols)) * np.exp(rng.standard_normal((n, cols)) * 6)).astype(np.float32)
    acc = np.zeros(cols, np.float32)
    for i in range(n):
        acc = acc + p[i]
    got = legacy.col_sum(torch.from_numpy(p)).numpy()
    np.testing.assert_array_equal(got.view(np.int32), acc.view(np.int32))
    acc = p[0].copy()
    for i in range(1, n):
        acc = acc + p[i]
    got = legacy.col_sum_from_first(torch.from_numpy(p)).numpy()
    np.testing.assert_array_equal(got.view(np.int32), acc.view(np.int32))


@pytest.mark.parametrize("cols", [1, 5, 300])
def test_col_sum_is_sequential_per_leading_index(cols: int) -> None:
    rng = np.random.default_rng(cols)
    p = (rng.standard_normal((19, 32, cols)) * np.exp(rng.standard_normal((19, 32, cols)) * 6)).astype(np.float32)
    acc = np.zeros((19, cols), np.float32)
    for i in range(32):
        acc = acc + p[:, i]
    got = legacy.col_sum(torch.from_numpy(p)).numpy()
    np.testing.assert_array_equal(got.view(np.int32), acc.view(np.int32))


@pytest.mark.parametrize("cols", [3, 40])
def test_sums_of_negative_zeros_follow_c(cols: int) -> None:
    p = torch.full((32, cols), -0.0)
    assert not np.signbit(legacy.col_sum(p).numpy()).any()  # 0.0f + -0.0f == +0.0f
    assert np.signbit(legacy.col_sum_from_first(p).numpy()).all()  # starts from p[0] = -0.0f


def test_sdiv_and_sqrtf_round_once() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random(200_000) * np.exp(rng.standard_normal(200_000) * 4)).astype(np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(legacy.sdiv(15.0, t).numpy(), np.float32(15.0) / x)
    np.testing.assert_array_equal(legacy.sqrtf(t).numpy(), np.sqrt(x))
    np.testing.assert_array_equal(t.reciprocal().numpy(), np.float32(1.0) / x)  # the ref paths rely on it


def test_roundf_int8_rounds_halves_away_from_zero() -> None:
    rng = np.random.default_rng(0)
    halves = np.arange(-128, 127, dtype=np.float32) + np.float32(0.5)
    near = np.concatenate(
        [
            np.nextafter(halves, np.float32(np.inf)),
            np.nextafter(halves, np.float32(-np.inf)),
            halves,
            np.float32([0.49999997, -0.49999997, 0.0, -0.0, 127.49999, -127.49999]),
        ]
    )
    v = np.concatenate(
        [near[np.abs(near) < 127.5], (rng.standard_normal(100_000) * 40).clip(-127, 127).astype(np.float32)]
    )
    got = legacy.roundf_int8(torch.from_numpy(v)).numpy()
    expected = np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("blocks", [1, 2, 3, 100])
def test_bit_packing(blocks: int) -> None:
    q = torch.randint(0, 32, (blocks, 32), dtype=torch.uint8)
    expected = (q[:, :16] & 0x0F) | (q[:, 16:] << 4)
    assert torch.equal(legacy.pack_nibbles32(q, five_bit=True), expected)
    q4 = q & 0x0F
    assert torch.equal(legacy.pack_nibbles32(q4), q4[:, :16] | (q4[:, 16:] << 4))
    qh = np.packbits((q >> 4).numpy(), axis=-1, bitorder="little")
    np.testing.assert_array_equal(legacy.pack_high_bits32(q).numpy(), qh)


def test_signed_absmax_takes_first_of_tied_extremes() -> None:
    x = torch.tensor([[0.0, 1.0, -2.0, 2.0], [0.0, 2.0, -2.0, 1.0], [-0.0, 0.0, -0.0, 0.0]])
    amax, mx = legacy.signed_absmax(x, 1)
    assert amax.tolist() == [2.0, 2.0, 0.0]
    assert mx.tolist() == [-2.0, 2.0, 0.0]
    assert not torch.signbit(mx[2])


# ---- against ggml itself ---------------------------------------------------------------------------------


def _compare_with_ggml(fmt, w: np.ndarray, im: np.ndarray | None) -> None:
    from ramp.llamacpp import ggml_quantize

    ours = fmt.quantize(w, im).reshape(-1, fmt.type_size)
    ref = ggml_quantize(fmt.type_id, w, im).reshape(-1, fmt.type_size)
    same = (ours == ref).all(1)
    if not same.all():
        # Every mismatch so far has been a bug; keep the tolerance the spec allows, with a clear report.
        xb = w.reshape(-1, fmt.block_size)[~same]
        err_ours = np.sqrt(np.mean((ggml_decode(fmt, ours[~same]) - xb) ** 2))
        err_ref = np.sqrt(np.mean((ggml_decode(fmt, ref[~same]) - xb) ** 2))
        assert err_ours <= err_ref * 1.001, (fmt.name, err_ours, err_ref)
    assert same.mean() >= 0.999, f"{fmt.name}: {same.mean():.5f} of blocks identical"


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "dist", ["gauss", "student_t", "zero_rows", "signed_zeros", "ties", "mixed_magnitudes", "huge", "denormal"]
)
def test_byte_identical_to_ggml(llama_cpp_bin, name: str, dist: str) -> None:
    fmt = FORMATS[name]
    w = make_weight(dist, (192, 1536), seed=7)
    _compare_with_ggml(fmt, w, None)
    if fmt.uses_imatrix:
        _compare_with_ggml(fmt, w, imatrix_for(1536, seed=8))
