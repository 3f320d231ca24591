"""The exact float32 kernels (torch and compiled): each rounds as C's float does, against numpy scalars or a
scalar ggml port."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from formats import scalar_ggml
from formats.scalar_ggml import edge_groups
from numba import njit

from ramp.formats import jit, kernels


def _wide(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Values over many magnitudes: any other summation order rounds differently."""
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(shape) * np.exp(rng.standard_normal(shape) * 6)).astype(np.float32)


@pytest.mark.parametrize(
    "shape", [(2, 1), (32, 1), (32, 2), (32, 3), (32, 1000), (16, 17), (1536, 5), (32, 3, 40), (32, 1, 5), (1, 7)]
)
def test_seq_sum_adds_left_to_right(shape: tuple[int, ...]) -> None:
    p = _wide(shape, seed=sum(shape))
    acc = np.zeros(shape[1:], np.float32)
    for i in range(shape[0]):
        acc = acc + p[i]
    got = kernels.seq_sum(torch.from_numpy(p)).numpy()
    np.testing.assert_array_equal(got.view(np.int32), acc.view(np.int32))
    acc = p[0].copy()
    for i in range(1, shape[0]):
        acc = acc + p[i]
    got = kernels.seq_sum(torch.from_numpy(p), from_first=True).numpy()
    np.testing.assert_array_equal(got.view(np.int32), acc.view(np.int32))


def test_seq_sum_np_adds_left_to_right_into_any_out() -> None:
    p = _wide((32, 3, 40), seed=5)
    acc = np.zeros((3, 40), np.float32)
    for i in range(32):
        acc = acc + p[i]
    t = torch.from_numpy(p)
    np.testing.assert_array_equal(kernels.seq_sum_np(t).view(np.int32), acc.view(np.int32))
    out = np.empty((3, 80), np.float32)  # a strided destination
    kernels.seq_sum_np(t, out=out[:, 20:60])
    np.testing.assert_array_equal(out[:, 20:60].view(np.int32), acc.view(np.int32))
    # a non-contiguous source and single-value slices (numpy would sum those pairwise) take index_add_
    pt = torch.from_numpy(np.ascontiguousarray(p.transpose(2, 1, 0))).permute(2, 1, 0)
    np.testing.assert_array_equal(kernels.seq_sum_np(pt).view(np.int32), acc.view(np.int32))
    col = _wide((32, 1), seed=6)
    ref = np.float32(0)
    for v in col[:, 0]:
        ref = np.float32(ref + v)
    assert kernels.seq_sum_np(torch.from_numpy(col))[0].view(np.int32) == ref.view(np.int32)


@pytest.mark.parametrize("shape", [(1000, 16), (513, 32), (16, 1000), (7, 7)])
def test_position_major_is_the_transpose(shape: tuple[int, int]) -> None:
    x = torch.from_numpy(_wide(shape, seed=shape[0]))
    assert torch.equal(kernels.position_major(x), x.t().contiguous())
    assert torch.equal(kernels.position_major(x[::2]), x[::2].t().contiguous())  # strided rows too


def test_seq_sum_of_negative_zeros_follows_c() -> None:
    p = torch.full((32, 40), -0.0)
    assert not torch.signbit(kernels.seq_sum(p)).any()  # 0.0f + -0.0f == +0.0f
    assert torch.signbit(kernels.seq_sum(p, from_first=True)).all()  # starts from p[0] = -0.0f


def test_division_and_sqrt_round_once() -> None:
    x = np.abs(_wide((200_000,), seed=0))
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(kernels.f32_div(15.0, t).numpy(), np.float32(15.0) / x)
    np.testing.assert_array_equal(kernels.sqrtf_(t.clone()).numpy(), np.sqrt(x))
    np.testing.assert_array_equal(t.reciprocal().numpy(), np.float32(1.0) / x)  # the reference paths rely on it


@njit
def _nearest_and_levels(v: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    near = np.empty(v.size, np.int64)
    level = np.empty(v.size, np.float32)
    for i in range(v.size):
        near[i] = jit.nearest_int(v[i])
        level[i] = jit._level(v[i], lo, hi)
    return near, level


def test_nearest_int_is_ggmls_bit_trick() -> None:
    rng = np.random.default_rng(1)
    v = np.concatenate(
        [
            (rng.standard_normal(5000) * 40).astype(np.float32),
            np.arange(-20, 20, dtype=np.float32) + np.float32(0.5),  # ties go to even
            np.float32([4194303.0, 4194304.0, -4194305.0, 3e9, -1e20, np.inf, -np.inf, np.nan]),
        ]
    )
    expected = np.array([scalar_ggml.nearest_int(x) for x in v])
    near, level = _nearest_and_levels(v, -4, 3)
    np.testing.assert_array_equal(near, expected)
    np.testing.assert_array_equal(level, np.clip(expected, -4, 3).astype(np.float32))


@njit
def _fp16_roundtrip(v: np.ndarray, soft: bool) -> tuple[np.ndarray, np.ndarray]:
    bits = np.empty(v.size, np.int64)
    back = np.empty(v.size, np.float32)
    for i in range(v.size):
        bits[i] = jit.fp16_bits_soft(v[i]) if soft else jit.fp16_bits(v[i])
        back[i] = jit.fp16_value_soft(bits[i]) if soft else jit.fp16_value(bits[i])
    return bits, back


@pytest.mark.parametrize("soft", [True, False])
def test_fp16_conversions_are_ggmls(soft: bool) -> None:
    """Nearest even with overflow to inf and subnormals (numpy's float16 for non-NaN), NaN -> 0x7E00 | sign;
    ggml's bit-level algorithm and the F16C path (where the CPU has it) alike."""
    rng = np.random.default_rng(2)
    v = np.concatenate(
        [
            rng.integers(0, 2**32, 300_000, dtype=np.uint64).astype(np.uint32).view(np.float32),  # every exponent
            np.float32([65504, 65519.99, 65520, 1 + 2**-11, 1 + 3 * 2**-11, 6e-8, 3e-8, 2.98e-8, 0.0, -0.0]),
            np.float32([np.inf, -np.inf, np.nan, -np.nan]),
        ]
    )
    bits, back = _fp16_roundtrip(v, soft)
    nan = np.isnan(v)
    with np.errstate(over="ignore"):  # (numpy warns where the half overflows to inf, as it should)
        half = v[~nan].astype(np.float16)
    np.testing.assert_array_equal(bits[~nan], half.view(np.uint16))
    np.testing.assert_array_equal(bits[nan], 0x7E00 | ((v[nan].view(np.uint32) >> 16) & 0x8000))
    np.testing.assert_array_equal(back[~nan], half.astype(np.float32))


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
    expected = np.sign(v) * np.floor(np.abs(v).astype(np.float64) + 0.5)
    np.testing.assert_array_equal(kernels.roundf_int8(torch.from_numpy(v)).numpy(), expected)


def test_signed_absmax_follows_cs_scan() -> None:
    x = torch.tensor(
        [[0.0, 1.0, -2.0, 2.0], [0.0, 2.0, -2.0, 1.0], [-0.0, 0.0, -0.0, 0.0], [float("nan"), -3.0, 1.0, 3.0]]
    )
    amax, mx = kernels.signed_absmax(x, 1)
    assert amax.tolist() == [2.0, 2.0, 0.0, 3.0]
    assert mx.tolist() == [-2.0, 2.0, 0.0, -3.0]  # the first of tied extremes; NaN never wins
    assert not torch.signbit(mx[2])
    amax_t, mx_t = kernels.signed_absmax(x.t().contiguous(), 0)
    assert torch.equal(amax_t, amax) and torch.equal(mx_t, mx)


@pytest.mark.parametrize("nmax", [4, 8, 16, 32])
@pytest.mark.parametrize("weights", ["x2", "imatrix", "with_zeros"])
def test_make_qx_quants_matches_scalar_port(nmax: int, weights: str) -> None:
    x = edge_groups(nmax, 48)
    rng = np.random.default_rng(7)
    if weights == "x2":
        w = x * x
    else:
        w = np.exp(rng.standard_normal(x.shape)).astype(np.float32)
        if weights == "with_zeros":
            w[rng.random(x.shape) < 0.5] = 0
            w[10] = 0
    X, W = np.ascontiguousarray(x.T), np.ascontiguousarray(w.T)  # lanes: one group per column
    L = np.empty_like(X)
    scale = np.empty(X.shape[1], np.float32)
    jit.make_qx_quants(X, W, nmax, L, scale, np.empty((8, X.shape[1]), np.float32), np.empty_like(X))
    for g in range(x.shape[0]):
        s_ref, L_ref = scalar_ggml.make_qx_quants(x[g], nmax, w[g])
        assert scale[g].view(np.uint32) == np.float32(s_ref).view(np.uint32), g
        assert L[:, g].astype(int).tolist() == L_ref, g


def test_run_chunks_covers_range_in_order_on_single_threaded_workers() -> None:
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        seen: list[tuple[int, int, int, str]] = []

        def job(a: int, b: int) -> tuple[int, int]:
            seen.append((a, b, torch.get_num_threads(), threading.current_thread().name))
            return a, b

        bounds = kernels.run_chunks(job, 103, 10)
        assert bounds[0][0] == 0 and bounds[-1][1] == 103 and len(bounds) % 2 == 0
        assert all(b0[1] == b1[0] for b0, b1 in zip(bounds, bounds[1:], strict=False))
        assert all(n == 1 and name.startswith("ramp-quant") for _, _, n, name in seen)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("row", [0, 63])
def test_quantize_refuses_a_non_finite_weight_in_any_row_chunk(bad: float, row: int) -> None:
    from ramp.errors import RampError
    from ramp.formats import FORMATS

    w = torch.randn(64, 256)
    assert kernels.all_finite(w)
    w[row, 7] = bad
    assert not kernels.all_finite(w)
    with pytest.raises(RampError, match="blk.3.ffn_up.weight: weight has 1 NaN/Inf values; cannot quantize to Q4_K"):
        FORMATS["Q4_K"].quantize(w, name="blk.3.ffn_up.weight")


def test_broadcast_rows_is_the_expanded_row() -> None:
    row = torch.randn(8, 32)
    out = kernels.broadcast_rows(row, 37)
    assert out.is_contiguous() and torch.equal(out, row.expand(37, 8, 32))
