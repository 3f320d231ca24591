"""Every format of the registry: byte-identical to ggml's own quantizer (0 differing blocks) with and
without an imatrix over every test weight, decoded bit for bit as gguf-py decodes, and the record's
layout and errors."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from formats.weights import DISTS, make_imatrix, make_weight

from ramp.formats import FORMATS, QUANT_CHOICES, allowed_formats, get_format, kernels
from ramp.formats.base import FormatError, QuantFormat

NAMES = list(FORMATS)
IMATRIX_NAMES = [n for n in NAMES if FORMATS[n].uses_imatrix]
STORAGE_ONLY = {"F32", "F16", "BF16", "Q8_0"}  # ggml ignores an imatrix for these
SHAPE = (64, 1536)  # 1536 = 6 super-blocks of 256 = 48 blocks of 32 per row


def _differing_blocks(fmt: QuantFormat, w: np.ndarray, im: np.ndarray | None) -> int:
    from ramp.llamacpp import ggml_quantize

    ours = fmt.quantize(w, im).reshape(-1, fmt.type_size)
    with np.errstate(all="ignore"):
        ref = ggml_quantize(fmt.type_id, w, im).reshape(-1, fmt.type_size)
    return int((ours != ref).any(axis=1).sum())


@pytest.mark.slow
@pytest.mark.parametrize("dist", DISTS)
@pytest.mark.parametrize(("name", "with_imatrix"), [(n, False) for n in NAMES] + [(n, True) for n in IMATRIX_NAMES])
def test_bytes_identical_to_ggml(llama_cpp_bin, name: str, with_imatrix: bool, dist: str) -> None:
    fmt = FORMATS[name]
    w = make_weight(dist, SHAPE, seed=3)
    im = make_imatrix(SHAPE[1], seed=4) if with_imatrix else None
    assert _differing_blocks(fmt, w, im) == 0


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(1, 256), (3, 768), (5, 1280)])
@pytest.mark.parametrize(("name", "with_imatrix"), [(n, False) for n in NAMES] + [(n, True) for n in IMATRIX_NAMES])
def test_bytes_identical_to_ggml_on_odd_block_counts(
    llama_cpp_bin, name: str, with_imatrix: bool, shape: tuple[int, int]
) -> None:
    """Block and super-block counts that leave the compiled encoders' lane tiles part-filled."""
    fmt = FORMATS[name]
    w = make_weight("student_t", shape, seed=5)
    im = make_imatrix(shape[1], seed=6) if with_imatrix else None
    assert _differing_blocks(fmt, w, im) == 0


@pytest.mark.parametrize("name", NAMES)
def test_format_record(name: str) -> None:
    fmt = FORMATS[name]
    assert fmt.ggml_type == gguf.GGMLQuantizationType[name] and get_format(name.lower()) is fmt
    assert (fmt.block_size, fmt.type_size) == gguf.GGML_QUANT_SIZES[fmt.ggml_type]
    assert fmt.uses_imatrix == (name not in STORAGE_ONLY)
    assert fmt.bytes_for((3, 2 * fmt.block_size)) == 6 * fmt.type_size


@pytest.mark.parametrize("dist", ["student_t", "zero_rows", "signed_zeros", "tiny"])
@pytest.mark.parametrize("name", NAMES)
def test_decode_matches_gguf_py(name: str, dist: str) -> None:
    fmt = FORMATS[name]
    for shape in [(1, fmt.block_size), (3, 2 * fmt.block_size), (2, 1536)]:
        w = make_weight(dist, shape)
        for im in (None, make_imatrix(shape[1])):
            data = fmt.quantize(w, im)
            assert data.shape == (shape[0], shape[1] // fmt.block_size * fmt.type_size) and data.dtype == np.uint8
            ours = fmt.dequantize(data, shape).numpy()
            ref = np.asarray(gguf.quants.dequantize(data, fmt.ggml_type), dtype=np.float32).reshape(shape)
            np.testing.assert_array_equal(ours.view(np.int32), ref.view(np.int32))


@pytest.mark.parametrize("name", NAMES)
def test_imatrix_changes_only_imatrix_formats(name: str) -> None:
    fmt = FORMATS[name]
    w = make_weight("student_t", (4, 512))
    same = np.array_equal(fmt.quantize(w), fmt.quantize(w, make_imatrix(512)))
    assert same == (not fmt.uses_imatrix)


@pytest.mark.parametrize("name", NAMES)
def test_chunking_and_threads_do_not_change_bytes(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """One chunk on one thread, and many small chunks spread over two threads, give the same bytes."""
    fmt = FORMATS[name]
    w = make_weight("student_t", (40, 1536), seed=9)
    im = make_imatrix(1536)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        monkeypatch.setattr(kernels, "CHUNK_WEIGHTS", 1 << 30)
        whole = [fmt.quantize(w, q) for q in (None, im)]
        torch.set_num_threads(2)
        monkeypatch.setattr(kernels, "CHUNK_WEIGHTS", 3072)
        for q, expected in zip((None, im), whole, strict=True):
            np.testing.assert_array_equal(fmt.quantize(w, q), expected)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("name", [n for n in NAMES if FORMATS[n].block_size > 1])
def test_illegal_row_length_names_shape(name: str) -> None:
    fmt = FORMATS[name]
    shape = (4, fmt.block_size * 3 // 2)
    with pytest.raises(FormatError, match=rf"\(4, {shape[1]}\)"):
        fmt.quantize(np.zeros(shape, np.float32))
    with pytest.raises(FormatError, match=rf"\(4, {shape[1]}\)"):
        fmt.dequantize(np.zeros(fmt.type_size, np.uint8), shape)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", NAMES)
def test_non_finite_weight_names_tensor(name: str, bad: float) -> None:
    w = make_weight("gauss", (2, 512))
    w[1, 7] = bad
    with pytest.raises(FormatError, match="blk.0.ffn_up.weight"):
        FORMATS[name].quantize(w, name="blk.0.ffn_up.weight")


def test_bad_imatrix_is_refused() -> None:
    fmt = FORMATS["Q4_K"]
    w = make_weight("gauss", (2, 512))
    with pytest.raises(FormatError, match="256 entries, expected one per column \\(512\\)"):
        fmt.quantize(w, np.ones(256, np.float32))
    with pytest.raises(FormatError, match="finite and non-negative"):
        fmt.quantize(w, -np.ones(512, np.float32))


def test_registry_lookups() -> None:
    with pytest.raises(FormatError, match="unknown format 'Q9_K'"):
        get_format("Q9_K")
    assert set(QUANT_CHOICES) <= set(FORMATS)
    legal = allowed_formats((8, 96))  # a multiple of 32, not of 256: no K-quant
    assert [f.name for f in legal] == sorted(
        (n for n in QUANT_CHOICES if FORMATS[n].block_size in (1, 32)), key=lambda n: (FORMATS[n].bpw, n)
    )
    bpw = [f.bpw for f in allowed_formats((8, 512))]
    assert bpw == sorted(bpw) and len(bpw) == len(QUANT_CHOICES)
