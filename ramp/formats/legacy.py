"""The legacy 32-weight block formats Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0, as torch quantizers.

Every format stores one fp16 scale ``d`` per block of 32 weights (plus an fp16 offset ``m`` for the
``_1`` variants) and small integer codes. Weights and scales are in the model's own units; a decoded
weight is ``d * (q - offset)`` (``_0`` variants, symmetric) or ``d * q + m`` (``_1`` variants). The byte
layout of each block is written beside its encoder below (all multi-byte fields little-endian).

Two quantization paths, both byte-identical to ggml (libggml-base is compiled for baseline x86-64, so
every float32 operation is rounded once, in source order, with no fused multiply-add):

* ``qw is None``: ggml's reference rounding (``quantize_row_q4_0_ref`` and friends), a single pass.
* ``qw`` given (imatrix): ggml's weighted search (``quantize_row_q4_0_impl`` and friends). Each weight's
  importance is ``qw * sqrt(sigma2 + x^2)`` with ``sigma2`` the mean square over the whole row; the
  symmetric formats then try 19 scales (``make_qx_quants``) and the min/scale formats 37 (min, scale)
  refits after a first guess (``make_qkx3_quants``).

Everything is vectorised over blocks, with no Python loop over blocks. Sums that ggml accumulates in a
``for`` loop are accumulated in the same order (:func:`col_sum`: numpy's reduction over a leading axis of
a position-major ``[32, blocks]`` copy adds one position after another). Some torch CPU kernels are not
exact enough and are avoided: ``torch.sqrt`` (a vector-math approximation, 1 ulp off for ~20 % of
inputs; :func:`sqrtf`), ``scalar / tensor`` (``reciprocal() * scalar``, two roundings; :func:`sdiv`) and
``addcmul`` (fused multiply-add). Small per-block bookkeeping runs in numpy float32 (the same IEEE
operations, with less call overhead), and bit packing works on little-endian uint64 words.

Tensors are encoded in row chunks by ``torch.get_num_threads()`` worker threads that each run
single-threaded torch ops (:func:`parallel_rows`): the work is many cheap element-wise passes, and on a
busy machine an OpenMP barrier per op costs more than the op.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import gguf
import numpy as np
import torch

from ramp.formats.base import QuantFormat, fp16_from_bytes

QK = 32  # weights per block, all legacy formats
GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml: a block whose largest |x| is below this is all zero

# ---- exact float32 helpers (shared with iq4_nl) ---------------------------------------------------------


def sdiv(num: float | np.floating, t: torch.Tensor) -> torch.Tensor:
    """``num / t`` rounded once in float32 (``num`` must be exactly representable in float32)."""
    return torch.div(torch.full_like(t, float(num)), t)


def sqrtf(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C ``sqrtf``), via numpy's hardware ``sqrt``."""
    return torch.from_numpy(np.sqrt(x.contiguous().numpy()))


_NUMPY_REDUCE_MIN_COLS = 16


def _ordered_col_sum(p: torch.Tensor, start: float) -> torch.Tensor:
    """``float s = start; for (i = 0; i < n; ++i) s += p[..., i, b];`` for ``p[..., n, B]`` -> ``[..., B]``.

    numpy reduces a C-contiguous array over an axis that is not the last one elementwise across the
    trailing axis, one index after another -- the C loop's order -- in a single call. With a single
    column it would switch to pairwise summation, so narrow inputs are padded with zero columns first.
    ``tests/formats/test_legacy.py`` checks this.
    """
    cols = p.shape[-1]
    a = p.contiguous().numpy()
    if cols < _NUMPY_REDUCE_MIN_COLS:
        pad = np.zeros((*a.shape[:-1], _NUMPY_REDUCE_MIN_COLS - cols), np.float32)
        a = np.concatenate([a, pad], axis=-1)
    with np.errstate(all="ignore"):  # inf - inf -> NaN, as in C (and silently)
        return torch.from_numpy(np.add.reduce(a, axis=-2, initial=start)[..., :cols])


def col_sum(p: torch.Tensor) -> torch.Tensor:
    """``float s = 0; for (i...) s += p[..., i, b];`` per column of ``p[..., n, B]`` (an all ``-0.0``
    column sums to +0)."""
    return _ordered_col_sum(p, 0.0)


def col_sum_from_first(p: torch.Tensor) -> torch.Tensor:
    """``float s = p[0]; for (i = 1...) s += p[i];`` per column of ``p[n, B]``.

    Starting from ``-0.0`` is the same thing: ``-0.0f + v == v`` for every float ``v``, zeros included.
    """
    return _ordered_col_sum(p, -0.0)


def signed_absmax(x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax, max)`` along ``dim``: the largest ``|x|`` and the signed value of its first occurrence.

    This is ggml's ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` loop from ``amax = max = 0``:
    an all-zero block gives ``max = +0``; when both ``+a`` and ``-a`` occur, the earlier one wins.
    """
    hi = x.amax(dim)
    lo = x.amin(dim)
    neg_lo = lo.neg()
    mx = torch.where(hi >= neg_lo, hi, lo)
    tie = hi == neg_lo  # +a and -a both present (or an all-zero block): the first occurrence decides
    if bool(tie.any()):
        idx = tie.nonzero().squeeze(1)
        sub = x.index_select(1 - dim % 2, idx)
        first = sub.abs().max(dim=dim, keepdim=True).indices  # torch returns the first maximal index
        mx[idx] = sub.gather(dim, first).squeeze(dim)
    return torch.maximum(hi, neg_lo), mx.add_(0.0)  # + 0.0: an all-zero block keeps max = +0


def first_min(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Minimum along ``dim`` as C's ``if (v < min) min = v`` finds it: a zero minimum keeps the sign
    of the first zero in the block (``-0.0`` and ``+0.0`` compare equal), which fp16 ``m`` stores."""
    mn = x.amin(dim)
    zero = mn == 0
    if bool(zero.any()):
        idx = zero.nonzero().squeeze(1)
        sub = x.index_select(1 - dim % 2, idx)
        first = (sub == 0).to(torch.uint8).max(dim=dim, keepdim=True).indices
        mn[idx] = sub.gather(dim, first).squeeze(dim)
    return mn


def roundf_int8(v: torch.Tensor) -> torch.Tensor:
    """C ``(int8_t)roundf(v)`` (halves away from zero) for ``|v| < 128``.

    ``trunc(v + copysign(0.5 - 2^-25, v))`` is exact: below 0.5 the sum never reaches 1, and from 0.5 up
    the 2^-25 shortfall is under half an ulp of the sum, so it rounds back onto ``v + 0.5``; the int8
    conversion truncates.
    """
    c = torch.tensor(float(np.float32(0.5) - np.float32(2.0**-25)))
    return torch.copysign(c, v).add_(v).to(torch.int8)


def row_sigma2(x: torch.Tensor) -> torch.Tensor:
    """``sum_j x[j]^2 / n`` per row of ``x[rows, n]``, summed left to right in float32 -> ``[rows]``."""
    n = x.shape[-1]
    return col_sum((x * x).t().contiguous()) / float(n)


def importance(xt: torch.Tensor, qwt: torch.Tensor, sigma2: torch.Tensor) -> torch.Tensor:
    """ggml's per-weight importance ``qw * sqrtf(sigma2 + x*x)`` on position-major ``[32, B]`` planes."""
    return qwt * sqrtf(xt * xt + sigma2)


def fp16_into(out: torch.Tensor, col: int, *vs: torch.Tensor) -> None:
    """Write float32 ``v[B]`` values as little-endian fp16 (round to nearest even) into bytes
    ``col, col + 2, ...`` of every row of ``out[B, type_size]`` (``col`` and ``type_size`` even)."""
    halves = out.view(torch.int16)
    for i, v in enumerate(vs):
        halves[:, col // 2 + i] = v.to(torch.float16).view(torch.int16)


# ---- chunked multi-threaded driver ----------------------------------------------------------------------

_CHUNK_WEIGHTS = 1 << 21  # weights per work item (fewer, larger items: less Python overhead under the GIL)
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (workers, pid) -> pool; a forked child makes its own
_pool_lock = threading.Lock()


def _single_threaded_worker() -> None:
    torch.set_num_threads(1)  # this thread's OpenMP setting (and torch's default for threads started later)


def _get_pool(n: int) -> ThreadPoolExecutor:
    with _pool_lock:
        key = (n, os.getpid())
        pool = _pools.get(key)
        if pool is None:
            pool = ThreadPoolExecutor(n, thread_name_prefix="ramp-quant", initializer=_single_threaded_worker)
            # Start all n workers now (the barrier keeps each task until n run at once), then restore torch's
            # default for new threads, which the workers' set_num_threads(1) changed; the calling thread's
            # own setting is untouched either way.
            barrier = threading.Barrier(n)
            list(pool.map(lambda _: barrier.wait(), range(n)))
            torch.set_num_threads(n)
            _pools[key] = pool
        return pool


ChunkEncoder = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def parallel_rows(encode_chunk: ChunkEncoder, type_size: int) -> ChunkEncoder:
    """Wrap ``encode_chunk(x[r, nb, bs], qw) -> uint8[r, nb, type_size]`` to run over row chunks.

    Rows are independent in every legacy/IQ4_NL path (the imatrix paths need whole rows, which chunks
    keep), so the result is the same bytes whatever the chunking.
    """

    def encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        rows, nb, bs = x.shape
        n = max(1, torch.get_num_threads())
        per_worker = -(-rows * nb * bs // (n * _CHUNK_WEIGHTS))  # chunks per worker, rounded up
        step = -(-rows // min(rows, n * per_worker))  # equal row ranges, a multiple of n of them
        out = torch.empty(rows, nb, type_size, dtype=torch.uint8)

        def work(r0: int) -> None:
            r1 = min(rows, r0 + step)
            out[r0:r1] = encode_chunk(x[r0:r1], None if qw is None else qw[r0:r1])

        if n == 1:
            for r0 in range(0, rows, step):
                work(r0)
        else:
            # Even a single chunk goes to a (single-threaded) worker: some torch CPU kernels (round, floor)
            # split tensors of a few thousand elements across OpenMP threads, and on a loaded machine each
            # such split can wait a whole scheduler slice at its barrier.
            for f in [_get_pool(n).submit(work, r0) for r0 in range(0, rows, step)]:
                f.result()
        return out

    return encode


# ---- byte packing ---------------------------------------------------------------------------------------


_LOW_NIBBLES = np.uint64(0x0F0F0F0F0F0F0F0F)
_BIT0_OF_BYTES = np.uint64(0x0101010101010101)
_GATHER_BITS = np.uint64(0x0102040810204080)  # multiplier moving bit 0 of byte k to bit 56 + k


def pack_nibbles32(q: torch.Tensor, five_bit: bool = False) -> torch.Tensor:
    """``uint8[B, 32]`` codes -> ``uint8[B, 16]`` (a strided view): byte j = code j | code j+16 << 4.

    Works on the codes as one flat run of little-endian uint64 words, four per block (codes 0-7, 8-15,
    16-23, 24-31): ``word[i] | word[i + 2] << 4`` is the packed pair for words 0 and 1 of each block, so
    two whole-array ops do it and the block's first two result words are kept. Codes wider than four
    bits (``five_bit``) are masked to their low nibble first so that nothing crosses a byte.
    """
    n = q.shape[0]
    f = q.contiguous().numpy().reshape(-1).view(np.uint64)
    if five_bit:
        f = f & _LOW_NIBBLES
    t = np.empty_like(f)
    np.left_shift(f[2:], np.uint64(4), out=t[:-2])
    np.bitwise_or(t[:-2], f[:-2], out=t[:-2])
    t[-2:] = 0
    return torch.from_numpy(t.reshape(n, 4)[:, :2]).view(torch.uint8)


def pack_high_bits32(q: torch.Tensor) -> torch.Tensor:
    """``uint8[B, 32]`` 5-bit codes -> ``uint8[B, 4]``: bit i of the little-endian uint32 is bit 4 of q[i].

    Per uint64 word (8 codes): isolate bit 4 of each byte as 0/1 bytes, then one wrapping multiply
    gathers the eight bits into the top byte (each product bit lands on its own position, no carries).
    """
    f = q.contiguous().numpy().reshape(-1).view(np.uint64)
    bits = (f >> np.uint64(4)) & _BIT0_OF_BYTES
    return torch.from_numpy(((bits * _GATHER_BITS) >> np.uint64(56)).astype(np.uint8).reshape(-1, 4))


def _unpack_nibbles(qs: torch.Tensor) -> torch.Tensor:
    """``uint8[B, 16]`` -> ``int32[B, 32]`` low nibbles then high nibbles."""
    q = qs.to(torch.int32)
    return torch.cat([q & 0x0F, q >> 4], dim=-1)


def _unpack_high_bits(qh: torch.Tensor) -> torch.Tensor:
    """``uint8[B, 4]`` -> ``int32[B, 32]`` holding 16 where the weight's fifth bit is set."""
    bits = (qh.to(torch.int32).unsqueeze(-1) >> torch.arange(8, dtype=torch.int32)) & 1
    return bits.reshape(-1, 32) << 4


# ---- ggml's weighted searches, vectorised over blocks ---------------------------------------------------


# make_qx_quants' trials, in ggml's order: k = 0, then -9..9 without 0; iscale = -(nmax + 0.1 k) / max
_QX_STEPS = [0] + [k for k in range(-9, 10) if k != 0]
_QX_SUB_BLOCKS = 1024  # [19, 32, sub] float planes of about 2.5 MB


def make_qx_quants(xt: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qx_quants`` (``rmse_type = 1`` with weights) on position-major ``xt, w: [32, B]``.

    Returns ``(scale[B], L[32, B] uint8)`` with codes in ``[0, 2*nmax - 1]`` (weight = scale * (L - nmax)).
    The 19 trial scales are evaluated together on ``[19, 32, sub]`` planes (``sub`` blocks at a time, to
    stay in cache); the choice among them then follows ggml's sequence exactly, once for all blocks (an
    earlier trial wins ties, as C's strict ``>``).
    """
    amax, mx = signed_absmax(xt, 0)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, torch.ones_like(mx), mx)  # keep the arithmetic finite; masked at the end
    nums = np.array(
        [-nmax if k == 0 else -(np.float32(nmax) + np.float32(0.1) * np.float32(k)) for k in _QX_STEPS],
        dtype=np.float32,
    )
    iscale = torch.div(torch.from_numpy(nums).unsqueeze(1), mx)  # [19, B], one rounding each
    nblocks = xt.shape[1]
    sumlx = np.empty((len(nums), nblocks), np.float32)
    suml2 = np.empty_like(sumlx)
    for b0 in range(0, nblocks, _QX_SUB_BLOCKS):
        sl = slice(b0, b0 + _QX_SUB_BLOCKS)
        x, wb = xt[:, sl], w[:, sl]
        # |iscale * x| <= nmax + 1 (|x| <= |max| >= 1e-15), so plain rounding is ggml's nearest_int
        l = (x * iscale[:, sl].unsqueeze(1)).round_().clamp_(-nmax, nmax - 1)  # [19, 32, sub]
        sumlx[:, sl] = col_sum((wb * x) * l).numpy()  # w*x[i]*l in C's order
        suml2[:, sl] = col_sum((wb * l).mul_(l)).numpy()  # w*l*l
    with np.errstate(all="ignore"):
        scales = sumlx / suml2
        bests = scales * sumlx
        squares = sumlx * sumlx
        positive = suml2 > 0
        scale = np.where(suml2[0] != 0, scales[0], np.float32(0))
        best = scale * sumlx[0]
        choice = np.zeros(nblocks, dtype=np.int64)
        for t in range(1, len(_QX_STEPS)):
            better = squares[t] > best * suml2[t]
            better &= positive[t]
            np.copyto(scale, scales[t], where=better)
            np.copyto(best, bests[t], where=better)
            np.copyto(choice, t, where=better)
    chosen = iscale.gather(0, torch.from_numpy(choice).unsqueeze(0))  # [1, B]
    L = (xt * chosen).round_().clamp_(-nmax, nmax - 1).add_(nmax)
    L[:, zero] = 0.0
    scale = torch.from_numpy(scale)
    scale[zero] = 0.0
    return scale, L.to(torch.uint8)


RMIN, RDELTA, NSTEP = np.float32(-0.9), np.float32(0.05), 36  # make_qkx3_quants arguments of Q4_1/Q5_1


def nearest_int_(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` in place, float result: round half to even; for non-finite input the
    ``+ 1.5 * 2^23`` bit trick yields -2^22 (from +-inf) or 0 (from a NaN), which this reproduces."""
    v.round_()
    bad = ~torch.isfinite(v)
    if bool(bad.any()):
        v[bad] = torch.where(torch.isnan(v[bad]), 0.0, -4194304.0)
    return v


def make_qkx3_quants(xt: torch.Tensor, w: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx3_quants`` (rmin -0.9, rdelta 0.05, 36 steps, squared error) on ``[32, B]`` planes.

    Returns ``(scale[B], min[B], L[32, B] uint8)`` with codes in ``[0, nmax]`` and ``min <= 0``
    (weight = scale * L + min). Planes are torch; the per-block float32 bookkeeping between them is
    numpy (same IEEE float32 operations, far less call overhead on ``[B]`` vectors).
    """
    f32 = np.float32
    mn_t = first_min(xt, 0)
    lowest = mn_t.numpy()  # every x lies in [lowest, mx], so (x - m) * iscale lies between the ends' values
    mx = xt.amax(0).numpy()
    sum_w = col_sum_from_first(w).numpy()
    sum_x = col_sum_from_first(w * xt).numpy()
    mn = np.where(lowest > 0, f32(0), lowest)
    flat = mx <= mn
    mx = np.where(flat, mn + f32(1), mx)  # keep the arithmetic finite; masked at the end

    def codes(iscale: np.ndarray, m: np.ndarray) -> torch.Tensor:
        """clamp(nearest_int(iscale * (x - m)), 0, nmax); the exact non-finite rule only when needed
        (an overflowing iscale from a denormal range, or an overflowing x - m)."""
        v = (xt - torch.from_numpy(m)).mul_(torch.from_numpy(iscale))
        finite = np.isfinite((lowest - m) * iscale).all() and np.isfinite((mx - m) * iscale).all()
        return (v.round_() if finite else nearest_int_(v)).clamp_(0, nmax)

    with np.errstate(all="ignore"):  # C divides by zero and overflows silently too
        iscale = f32(nmax) / (mx - mn)
        scale = f32(1) / iscale
        diff = codes(iscale, mn).mul_(torch.from_numpy(scale)).add_(torch.from_numpy(mn)).sub_(xt)
        best_mad = col_sum(diff.mul_(diff).mul_(w)).numpy()
        cur_min = mn.copy()
        l_iscale, l_min = iscale.copy(), mn.copy()  # the trial that produced the current L
        for step in range(NSTEP + 1):
            # ggml overwrites `min` with each accepted fit, so later trials measure from the current best min
            iscale = ((RMIN + RDELTA * f32(step)) + f32(nmax)) / (mx - cur_min)
            l = codes(iscale, cur_min)
            wl = w * l
            sum_l = col_sum(wl).numpy()
            sum_xl = col_sum(wl * xt).numpy()
            sum_l2 = col_sum(wl.mul_(l)).numpy()
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            pos = this_min > 0
            this_min[pos] = 0
            np.copyto(this_scale, sum_xl / sum_l2, where=pos)
            diff = l.mul_(torch.from_numpy(this_scale)).add_(torch.from_numpy(this_min)).sub_(xt)
            mad = col_sum(diff.mul_(diff).mul_(w)).numpy()
            better = (D > 0) & (mad < best_mad)
            np.copyto(l_iscale, iscale, where=better)
            np.copyto(l_min, cur_min, where=better)
            np.copyto(best_mad, mad, where=better)
            np.copyto(scale, this_scale, where=better)
            np.copyto(cur_min, this_min, where=better)
        L = codes(l_iscale, l_min)
    flat_t = torch.from_numpy(flat)
    L[:, flat_t] = 0.0
    scale[flat] = 0
    np.copyto(cur_min, mn, where=flat)
    return torch.from_numpy(scale), torch.from_numpy(cur_min), L.to(torch.uint8)


_PIECE_BLOCKS = 4096  # blocks per search piece: its [32, piece] float planes stay in a core's L2 cache


def search_pieces(
    x: torch.Tensor,
    qw: torch.Tensor | None,
    weigh: Callable[..., torch.Tensor],
    search: Callable[..., tuple[torch.Tensor, ...]],
    *args: object,
    piece: int = _PIECE_BLOCKS,
) -> list[torch.Tensor]:
    """Run a per-block search over position-major pieces of ``x[rows, nb, 32]`` and join the results.

    ``weigh(xt, qwt, block_index)`` gives the importance planes of a piece (``qwt`` is None without an
    imatrix); ``search(xt, w, *args)`` returns per-block tensors ``[B]`` or code planes ``[32, B]``,
    returned joined over all blocks as ``[B]`` or ``[B, 32]`` (codes go back to block-major).
    """
    xb = x.reshape(-1, x.shape[-1])
    qb = None if qw is None else qw.reshape(xb.shape)
    parts: list[list[torch.Tensor]] = []
    for b0 in range(0, xb.shape[0], piece):
        sl = slice(b0, b0 + piece)
        xt = xb[sl].t().contiguous()
        w = weigh(xt, None if qb is None else qb[sl].t().contiguous(), sl)
        parts.append([r.t() if r.ndim == 2 else r for r in search(xt, w, *args)])
    return [torch.cat(p) for p in zip(*parts, strict=True)]


def _row_importance(x: torch.Tensor) -> Callable[..., torch.Tensor]:
    """ggml's legacy imatrix weights ``qw * sqrt(sigma2 + x^2)``, ``sigma2`` the mean square of the row."""
    rows, nb, _ = x.shape
    sigma2 = row_sigma2(x.reshape(rows, -1)).repeat_interleave(nb)
    return lambda xt, qwt, sl: importance(xt, qwt, sigma2[sl])


# ---- Q4_0 / Q5_0: symmetric, d = max / -2^(bits-1) ------------------------------------------------------
# Q4_0 block (18 bytes): d fp16 | 16 bytes of nibbles (byte j: weight j low, weight j+16 high).
# Q5_0 block (22 bytes): d fp16 | qh uint32 LE (bit i = fifth bit of weight i) | 16 bytes of low nibbles.
# Decoded weight = d * (q - 8) for Q4_0, d * (q - 16) for Q5_0.


def _symmetric_codes(x: torch.Tensor, qw: torch.Tensor | None, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``x[r, nb, 32]`` -> ``(d[B] float32, q[B, 32] uint8 in [0, 2*nmax - 1])``."""
    if qw is not None:
        d, q = search_pieces(x, qw, _row_importance(x), make_qx_quants, nmax)
        return d, q
    xb = x.reshape(-1, QK)
    _, mx = signed_absmax(xb, 1)
    d = mx / float(-nmax)
    inv = torch.where(d != 0, d.reciprocal(), 0.0)  # id = d ? 1/d : 0 (reciprocal is exact)
    v = torch.mul(xb, inv.unsqueeze(1)).add_(float(nmax) + 0.5)
    q = v.to(torch.int8).clamp_(max=2 * nmax - 1)  # (int8_t) truncation, then MIN
    return d, q.view(torch.uint8)


def _encode_q4_0(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows, nb, _ = x.shape
    d, q = _symmetric_codes(x, qw, 8)
    out = torch.empty(rows * nb, 18, dtype=torch.uint8)
    fp16_into(out, 0, d)
    out[:, 2:18] = pack_nibbles32(q)
    return out.reshape(rows, nb, 18)


def _decode_q4_0(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    q = (_unpack_nibbles(b[:, 2:18]) - 8).to(torch.float32)
    return d.unsqueeze(-1) * q


def _encode_q5_0(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows, nb, _ = x.shape
    d, q = _symmetric_codes(x, qw, 16)
    out = torch.empty(rows * nb, 22, dtype=torch.uint8)
    fp16_into(out, 0, d)
    out[:, 2:6] = pack_high_bits32(q)
    out[:, 6:22] = pack_nibbles32(q, five_bit=True)
    return out.reshape(rows, nb, 22)


def _decode_q5_0(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    q = (_unpack_nibbles(b[:, 6:22]) | _unpack_high_bits(b[:, 2:6])) - 16
    return d.unsqueeze(-1) * q.to(torch.float32)


# ---- Q4_1 / Q5_1: scale and minimum ---------------------------------------------------------------------
# Q4_1 block (20 bytes): d fp16 | m fp16 | 16 bytes of nibbles (as Q4_0).
# Q5_1 block (24 bytes): d fp16 | m fp16 | qh uint32 LE | 16 bytes of low nibbles (as Q5_0).
# Decoded weight = d * q + m.


def _affine_codes(
    x: torch.Tensor, qw: torch.Tensor | None, nmax: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x[r, nb, 32]`` -> ``(d[B], m[B] float32, q[B, 32] uint8 in [0, nmax])``."""
    if qw is not None:
        d, mn, q = search_pieces(x, qw, _row_importance(x), make_qkx3_quants, nmax)
        return d, mn, q  # ggml stores m = -(the_min) = min
    xb = x.reshape(-1, QK)
    mn = first_min(xb, 1)
    d = (xb.amax(1) - mn).add_(0.0).div_(float(nmax))  # + 0.0: equal ends give +0 as in C, zeros' signs aside
    inv = torch.where(d != 0, d.reciprocal(), 0.0)  # id = d ? 1/d : 0 (reciprocal is exact)
    v = torch.sub(xb, mn.unsqueeze(1)).mul_(inv.unsqueeze(1)).add_(0.5)
    q = v.to(torch.int8)  # (int8_t) / (uint8_t) truncation of a value in [0.5, nmax + 0.5]
    if nmax == 15:  # Q4_1 clamps with MIN(15, ...); Q5_1 casts without a clamp
        q.clamp_(max=15)
    return d, mn, q.view(torch.uint8)


def _encode_q4_1(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows, nb, _ = x.shape
    d, mn, q = _affine_codes(x, qw, 15)
    out = torch.empty(rows * nb, 20, dtype=torch.uint8)
    fp16_into(out, 0, d, mn)
    out[:, 4:20] = pack_nibbles32(q)
    return out.reshape(rows, nb, 20)


def _decode_q4_1(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    m = fp16_from_bytes(b[:, 2:4])
    q = _unpack_nibbles(b[:, 4:20]).to(torch.float32)
    return d.unsqueeze(-1) * q + m.unsqueeze(-1)


def _encode_q5_1(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    rows, nb, _ = x.shape
    d, mn, q = _affine_codes(x, qw, 31)
    out = torch.empty(rows * nb, 24, dtype=torch.uint8)
    fp16_into(out, 0, d, mn)
    out[:, 4:8] = pack_high_bits32(q)
    out[:, 8:24] = pack_nibbles32(q, five_bit=True)
    return out.reshape(rows, nb, 24)


def _decode_q5_1(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    m = fp16_from_bytes(b[:, 2:4])
    q = (_unpack_nibbles(b[:, 8:24]) | _unpack_high_bits(b[:, 4:8])).to(torch.float32)
    return d.unsqueeze(-1) * q + m.unsqueeze(-1)


# ---- Q8_0 -----------------------------------------------------------------------------------------------
# Q8_0 block (34 bytes): d fp16 | 32 signed bytes. Decoded weight = d * q. ggml has no imatrix path.


def _encode_q8_0(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
    del qw  # quantize_q8_0 ignores quant_weights
    rows, nb, _ = x.shape
    xb = x.reshape(-1, QK)
    amax = torch.maximum(xb.amax(1), xb.amin(1).neg_()).add_(0.0)  # C's MAX from +0: never -0
    d = amax / 127.0
    inv = torch.where(d != 0, d.reciprocal(), 0.0)  # id = d ? 1/d : 0 (reciprocal is exact)
    q = roundf_int8(xb * inv.unsqueeze(1))
    out = torch.empty(rows * nb, 34, dtype=torch.uint8)
    fp16_into(out, 0, d)
    out[:, 2:34] = q.view(torch.uint8)
    return out.reshape(rows, nb, 34)


def _decode_q8_0(b: torch.Tensor) -> torch.Tensor:
    d = fp16_from_bytes(b[:, 0:2])
    q = b[:, 2:34].contiguous().view(torch.int8).to(torch.float32)
    return q * d.unsqueeze(-1)


T = gguf.GGMLQuantizationType
FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat("Q4_0", T.Q4_0, QK, 18, parallel_rows(_encode_q4_0, 18), _decode_q4_0),
    QuantFormat("Q4_1", T.Q4_1, QK, 20, parallel_rows(_encode_q4_1, 20), _decode_q4_1),
    QuantFormat("Q5_0", T.Q5_0, QK, 22, parallel_rows(_encode_q5_0, 22), _decode_q5_0),
    QuantFormat("Q5_1", T.Q5_1, QK, 24, parallel_rows(_encode_q5_1, 24), _decode_q5_1),
    QuantFormat("Q8_0", T.Q8_0, QK, 34, parallel_rows(_encode_q8_0, 34), _decode_q8_0, uses_imatrix=False),
)
