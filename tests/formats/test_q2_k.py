"""Q2_K: decode agrees bit for bit with gguf-py; encode is byte-identical with ggml (slow tests)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from formats.weights import KQUANT_DISTS, kquant_imatrix, kquant_weight

from ramp.formats import q2_k
from ramp.formats.base import FormatError

make_weight, imatrix_for = kquant_weight, kquant_imatrix
FMT = q2_k.FORMATS[0]
SHAPES = [(1, 256), (3, 512), (8, 1536), (2, 2048)]
DISTS = KQUANT_DISTS


def test_format_record() -> None:
    assert FMT.name == "Q2_K"
    assert FMT.ggml_type == gguf.GGMLQuantizationType.Q2_K
    assert (FMT.block_size, FMT.type_size) == gguf.GGML_QUANT_SIZES[FMT.ggml_type]
    assert FMT.uses_imatrix


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_decode_matches_gguf_py(shape: tuple[int, int], dist: str, with_imatrix: bool) -> None:
    w = make_weight(dist, shape)
    im = imatrix_for(shape[1]) if with_imatrix else None
    data = FMT.quantize(w, im)
    assert data.shape == (shape[0], shape[1] // 256 * 84) and data.dtype == np.uint8
    ours = FMT.dequantize(data, shape).numpy()
    ref = gguf.quants.dequantize(data, FMT.ggml_type)
    assert ref.shape == shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.astype(np.float32).view(np.uint32))
    # sanity: 2-bit levels still track the weights (relative to the row scale)
    err = np.sqrt(np.mean((ours - w) ** 2))
    # (outliers dominate the error; ~1e-8 weights underflow the fp16 super-block scales, as in ggml)
    assert dist in ("outlier", "tiny") or err <= 0.6 * max(float(np.sqrt(np.mean(w**2))), 1e-30)


def test_illegal_row_length() -> None:
    with pytest.raises(FormatError, match=r"\(4, 576\)"):
        FMT.quantize(np.zeros((4, 576), dtype=np.float32))


# ---- byte-identity with ggml (needs the built libggml-base.so) ----------------------------------------


def _compare_with_ggml(w: np.ndarray, im: np.ndarray | None) -> None:
    from ramp.llamacpp import ggml_quantize

    ref = ggml_quantize(FMT.type_id, w, im)
    ours = FMT.quantize(w, im)
    a = ref.reshape(-1, FMT.type_size)
    b = ours.reshape(-1, FMT.type_size)
    same = (a == b).all(axis=1)
    frac = float(same.mean())
    if not same.all():
        wb = w.reshape(-1, 256)
        dq_ref = gguf.quants.dequantize(a[~same], FMT.ggml_type).reshape(-1, 256)
        dq_our = gguf.quants.dequantize(b[~same], FMT.ggml_type).reshape(-1, 256)
        rmse_ref = np.sqrt(np.mean((dq_ref - wb[~same]) ** 2))
        rmse_our = np.sqrt(np.mean((dq_our - wb[~same]) ** 2))
        assert rmse_our <= rmse_ref * 1.001, (rmse_our, rmse_ref)
    assert frac >= 0.999, f"Q2_K: only {frac:.4%} of blocks byte-identical with ggml"


@pytest.mark.slow
@pytest.mark.parametrize("dist", ["gauss", "student_t"])
@pytest.mark.parametrize("with_imatrix", [False, True])
def test_byte_identical_with_ggml(llama_cpp_bin, dist: str, with_imatrix: bool) -> None:
    w = make_weight(dist, (512, 2048), seed=7)
    im = imatrix_for(2048, seed=8) if with_imatrix else None
    _compare_with_ggml(w, im)
