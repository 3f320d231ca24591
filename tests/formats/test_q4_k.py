"""Q4_K and Q5_K: decode agrees bit for bit with gguf-py; encode is byte-identical with ggml (slow tests)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from formats.weights import KQUANT_DISTS, kquant_imatrix, kquant_weight

from ramp.formats import q4_k
from ramp.formats.base import FormatError
from ramp.formats.kquant_minmax import pack_scale_min_k4, seq_sum0, seq_sum_loop, unpack_scale_min_k4

make_weight, imatrix_for = kquant_weight, kquant_imatrix
FMTS = {f.name: f for f in q4_k.FORMATS}
SHAPES = [(1, 256), (3, 512), (8, 1536), (2, 2048)]
DISTS = KQUANT_DISTS


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_format_record(name: str) -> None:
    f = FMTS[name]
    assert f.ggml_type == gguf.GGMLQuantizationType[name]
    assert (f.block_size, f.type_size) == gguf.GGML_QUANT_SIZES[f.ggml_type]
    assert f.uses_imatrix


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_decode_matches_gguf_py(name: str, shape: tuple[int, int], dist: str, with_imatrix: bool) -> None:
    f = FMTS[name]
    w = make_weight(dist, shape)
    im = imatrix_for(shape[1]) if with_imatrix else None
    data = f.quantize(w, im)
    assert data.shape == (shape[0], shape[1] // 256 * f.type_size) and data.dtype == np.uint8
    ours = f.dequantize(data, shape).numpy()
    ref = gguf.quants.dequantize(data, f.ggml_type)
    assert ref.shape == shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))
    # sanity: the quantization is close to the weights (relative to the row scale)
    err = np.sqrt(np.mean((ours - w) ** 2))
    # (outliers dominate the error; ~1e-8 weights underflow the fp16 super-block scales, as in ggml)
    assert dist in ("outlier", "tiny") or err <= 0.2 * max(float(np.sqrt(np.mean(w**2))), 1e-30)


@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
def test_illegal_row_length(name: str) -> None:
    f = FMTS[name]
    with pytest.raises(FormatError, match=r"\(4, 576\)"):
        f.quantize(np.zeros((4, 576), dtype=np.float32))


def test_scale_min_packing_roundtrip() -> None:
    g = torch.Generator().manual_seed(0)
    ls = torch.randint(0, 64, (50, 8), generator=g, dtype=torch.int32)
    lm = torch.randint(0, 64, (50, 8), generator=g, dtype=torch.int32)
    sc, m = unpack_scale_min_k4(pack_scale_min_k4(ls, lm))
    assert torch.equal(sc, ls) and torch.equal(m, lm)


@pytest.mark.parametrize("shape", [(32, 1000), (16, 1), (3, 7), (8, 5000)])
def test_sequential_sum_order(shape: tuple[int, int]) -> None:
    # seq_sum0 relies on index_add_ adding slices strictly in order; values spanning many magnitudes make
    # any other order round differently
    g = torch.Generator().manual_seed(1)
    p = torch.randn(shape, generator=g) * torch.exp(torch.randn(shape, generator=g) * 6)
    assert torch.equal(seq_sum0(p).view(torch.int32), seq_sum_loop(p).view(torch.int32))


# ---- byte-identity with ggml (needs the built libggml-base.so) ----------------------------------------


def _compare_with_ggml(name: str, w: np.ndarray, im: np.ndarray | None) -> None:
    from ramp.llamacpp import ggml_quantize

    f = FMTS[name]
    ref = ggml_quantize(f.type_id, w, im)
    ours = f.quantize(w, im)
    a = ref.reshape(-1, f.type_size)
    b = ours.reshape(-1, f.type_size)
    same = (a == b).all(axis=1)
    frac = float(same.mean())
    if not same.all():
        wb = w.reshape(-1, 256)
        dq_ref = gguf.quants.dequantize(a[~same], f.ggml_type).reshape(-1, 256)
        dq_our = gguf.quants.dequantize(b[~same], f.ggml_type).reshape(-1, 256)
        rmse_ref = np.sqrt(np.mean((dq_ref - wb[~same]) ** 2))
        rmse_our = np.sqrt(np.mean((dq_our - wb[~same]) ** 2))
        assert rmse_our <= rmse_ref * 1.001, (rmse_our, rmse_ref)
    assert frac >= 0.999, f"{name}: only {frac:.4%} of blocks byte-identical with ggml"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["Q4_K", "Q5_K"])
@pytest.mark.parametrize("dist", ["gauss", "student_t"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_byte_identical_with_ggml(llama_cpp_bin, name: str, dist: str, with_imatrix: bool) -> None:
    w = make_weight(dist, (512, 2048), seed=7)
    im = imatrix_for(2048, seed=8) if with_imatrix else None
    _compare_with_ggml(name, w, im)
