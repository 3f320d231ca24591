"""F32, F16, BF16 storage types: bytes as ggml writes them, decode as gguf-py reads them."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from ramp.formats import float_types
from ramp.formats.base import FormatError

FORMATS = {f.name: f for f in float_types.FORMATS}
SHAPES = [(1, 32), (3, 64), (7, 256), (16, 576), (5, 1536), (4, 7)]
DISTS = ["gauss", "student_t", "zero_rows", "constant_rows", "tiny", "extremes"]


def make_weight(dist: str, shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    g = rng.standard_normal(shape).astype(np.float32) * 0.02
    if dist == "gauss":
        return g
    if dist == "student_t":
        return (rng.standard_t(3, shape) * 0.02).astype(np.float32)
    if dist == "zero_rows":
        g[::2] = 0.0
        g[1::4] = -0.0
        return g
    if dist == "constant_rows":
        g[:] = np.float32(0.1)
        return g
    if dist == "tiny":  # fp16 subnormals and underflow
        return g * np.float32(1e-4)
    if dist == "extremes":  # fp16 overflow, ties at fp16 / bf16 rounding points, big and small magnitudes
        vals = np.array(
            [
                65504.0,
                65519.99,
                65520.0,
                -70000.0,
                1.0 + 2.0**-11,
                1.0 + 3 * 2.0**-11,
                1.0 + 2.0**-8,
                1.0 + 3 * 2.0**-8,
                3.0e38,
                -3.0e38,
                1e-40,
                6e-8,
                3e-8,
            ],
            dtype=np.float32,
        )
        return rng.choice(vals, size=shape)
    raise ValueError(dist)


@pytest.mark.parametrize("name", list(FORMATS))
def test_format_record(name: str) -> None:
    fmt = FORMATS[name]
    assert fmt.ggml_type == gguf.GGMLQuantizationType[name]
    assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[fmt.ggml_type]
    assert not fmt.uses_imatrix


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dist", DISTS)
def test_bytes_and_decode(name: str, shape: tuple[int, int], dist: str) -> None:
    fmt = FORMATS[name]
    w = make_weight(dist, shape)
    ours = fmt.quantize(w)
    assert ours.shape == (shape[0], shape[1] * fmt.type_size)
    if name == "F32":
        expected = w.view(np.uint8).reshape(ours.shape)
    elif name == "F16":
        with np.errstate(over="ignore"):  # |x| >= 65520 -> inf, as ggml
            expected = w.astype(np.float16).view(np.uint8).reshape(ours.shape)  # IEEE round to nearest even
    else:
        expected = gguf.quants.quantize(w, fmt.ggml_type).view(np.uint8).reshape(ours.shape)
    np.testing.assert_array_equal(ours, expected)
    decoded = fmt.dequantize(ours, shape).numpy()
    theirs = gguf.quants.dequantize(ours.view(np.uint8), fmt.ggml_type).reshape(shape)
    np.testing.assert_array_equal(decoded.view(np.int32), np.asarray(theirs, np.float32).view(np.int32))


def test_bf16_quiets_nan_like_ggml() -> None:
    bits = np.array([0x7F800001, 0xFFC00000, 0x7FFFFFFF, 0x7F800000], dtype=np.uint32)
    got = float_types.fp32_to_bf16_bits(torch.from_numpy(bits.view(np.float32))).numpy() & 0xFFFF
    assert got.tolist() == [0x7FC0, 0xFFC0, 0x7FFF, 0x7F80]


@pytest.mark.parametrize("name", list(FORMATS))
def test_non_finite_weight_names_tensor(name: str) -> None:
    w = np.ones((2, 8), np.float32)
    w[1, 1] = np.nan
    with pytest.raises(FormatError, match="token_embd.weight"):
        FORMATS[name].quantize(w, name="token_embd.weight")


def test_imatrix_is_ignored() -> None:
    w = make_weight("gauss", (4, 64))
    for fmt in FORMATS.values():
        np.testing.assert_array_equal(fmt.quantize(w), fmt.quantize(w, np.ones(64, np.float32)))


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("dist", ["gauss", "student_t", "tiny", "extremes"])
def test_byte_identical_to_ggml(llama_cpp_bin, name: str, dist: str) -> None:
    from ramp.llamacpp import ggml_quantize

    fmt = FORMATS[name]
    w = make_weight(dist, (256, 1536), seed=5)
    np.testing.assert_array_equal(fmt.quantize(w), ggml_quantize(fmt.type_id, w))
