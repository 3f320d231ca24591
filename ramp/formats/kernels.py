"""The torch kernel set of the quantizers that stay in torch (IQ4_NL, Q8_0, F16/BF16): exact float32
arithmetic as ggml's C reference does it, and the one chunk driver that runs every encoder, the compiled
ones of :mod:`ramp.formats.jit` included.

ggml's reference library is compiled for baseline x86-64: every float32 operation is rounded once, in
source order, with no fused multiply-add. To produce its bytes, these kernels keep C's expression order
and grouping (``w*x*l`` is ``(w*x)*l``) and avoid the torch CPU kernels that round differently:
``torch.sqrt`` (a vector-math approximation, 1 ulp off for ~20 % of inputs; :func:`sqrtf_`),
``scalar / tensor`` (``reciprocal() * scalar``, two roundings; :func:`f32_div`), ``torch.sum`` (pairwise,
not left to right; :func:`seq_sum`) and ``addcmul`` (fused).

Layout: a *group* is the run of values that share one scale. Searches take groups position-major,
``x[n, S]`` (row ``i`` = the ``i``-th value of every group); loops run over positions and search steps
only, each op is vectorised over all groups.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

from ramp.formats.base import Encoder

T = TypeVar("T")
F32 = torch.float32
GROUP_MAX_EPS = float(np.float32(1e-15))  # ggml: a group whose largest |x| is below this is all zero

# ---- scalars, division, square root, rounding -----------------------------------------------------------

_F32: dict[float, torch.Tensor] = {}


def f32(v: float) -> torch.Tensor:
    """A 0-d float32 tensor holding ``float32(v)`` (arithmetic with it stays float32); cached, read-only."""
    t = _F32.get(v)
    if t is None:
        t = _F32[v] = torch.tensor(np.float32(v), dtype=F32)
    return t


def f32_div(num: float | np.floating, den: torch.Tensor) -> torch.Tensor:
    """``float32(num) / den`` rounded once (torch's ``num / den`` multiplies by ``1 / den``)."""
    return torch.div(f32(float(num)).expand_as(den), den)


def sqrtf_(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C ``sqrtf``, numpy's hardware ``sqrt``) in place on a contiguous
    float32 ``x`` (returned)."""
    xn = x.numpy()
    np.sqrt(xn, out=xn)
    return x


def roundf_int8(v: torch.Tensor) -> torch.Tensor:
    """C ``(int8_t)roundf(v)`` (halves away from zero) for ``|v| < 128``.

    ``trunc(v + copysign(0.5 - 2^-25, v))`` is exact: below 0.5 the sum never reaches 1, and from 0.5 up
    the 2^-25 shortfall is under half an ulp of the sum, so it rounds back onto ``v + 0.5``; the int8
    conversion truncates.
    """
    c = torch.tensor(float(np.float32(0.5) - np.float32(2.0**-25)))
    return torch.copysign(c, v).add_(v).to(torch.int8)


# ---- fp16 fields -----------------------------------------------------------------------------------------


def to_fp16(x: torch.Tensor) -> torch.Tensor:
    """float32 -> IEEE half, round to nearest even (ggml's FP32_TO_FP16)."""
    return x.to(torch.float16)


def fp16_from_bytes(b: torch.Tensor) -> torch.Tensor:
    """uint8[..., 2] little-endian fp16 -> float32[...]."""
    return b.contiguous().view(torch.float16).squeeze(-1).to(F32)


def fp16_into(out: torch.Tensor, col: int, *vs: torch.Tensor) -> None:
    """Write float32 ``v[B]`` values as little-endian fp16 into bytes ``col, col + 2, ...`` of every row of
    ``out[B, type_size]`` (``col`` and ``type_size`` even)."""
    halves = out.view(torch.int16)
    for i, v in enumerate(vs):
        halves[:, col // 2 + i] = to_fp16(v).view(torch.int16)


# ---- layout ---------------------------------------------------------------------------------------------

_T_TILE = 256  # rows per tile of :func:`position_major`


def position_major(x: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``x.t()`` for a 2-D ``x[groups, n]`` (group-major -> position-major).

    For a float32 ``x`` with more rows than columns, numpy copies it in tiles of rows, about 1.5x faster
    than torch's transposing copy here (each tile's source lines stay in L1); a plain copy either way.
    """
    if x.dtype != F32 or x.shape[0] <= x.shape[1]:
        return x.t().contiguous()
    xn = x.numpy()
    out = np.empty((x.shape[1], x.shape[0]), dtype=np.float32)
    for a in range(0, x.shape[0], _T_TILE):
        out[:, a : a + _T_TILE] = xn[a : a + _T_TILE].T
    return torch.from_numpy(out)


# ---- ordered reductions (C's loops over the positions of a group) ---------------------------------------

_ZERO_IDX: dict[int, torch.Tensor] = {}


def _zero_idx(n: int) -> torch.Tensor:
    idx = _ZERO_IDX.get(n)
    if idx is None:
        idx = _ZERO_IDX[n] = torch.zeros(n, dtype=torch.long)
    return idx


def seq_sum(p: torch.Tensor, from_first: bool = False) -> torch.Tensor:
    """Sum over dimension 0 left to right in float32, as a C ``for`` loop accumulates: ``p[n, ...] -> [...]``.

    ``from_first=False``: ``float s = 0; for (i...) s += p[i];`` (an all ``-0.0`` sum is +0).
    ``from_first=True``: ``float s = p[0]; for (i = 1...) s += p[i];`` (keeps a lone ``-0.0``).
    ``index_add_`` of every slice into one slice: ATen's CPU kernel adds the source slices one after the
    other in index order, each a plain float32 add (``tests/formats/test_kernels.py`` checks the order).
    From +0 over a contiguous float32 ``p`` it takes :func:`seq_sum_np`'s faster route.
    """
    if from_first:
        out = p[0:1].clone()
        if p.shape[0] > 1:
            out.index_add_(0, _zero_idx(p.shape[0] - 1), p[1:])
        return out[0]
    if _np_reducible(p):
        return torch.from_numpy(seq_sum_np(p))
    out = torch.zeros((1, *p.shape[1:]), dtype=p.dtype)
    out.index_add_(0, _zero_idx(p.shape[0]), p)
    return out[0]


_ZERO32 = np.float32(0.0)


def _np_reducible(p: torch.Tensor) -> bool:
    return p.dtype == F32 and p.dim() >= 2 and p.numel() >= 2 * p.shape[0] and p.is_contiguous()


def seq_sum_np(p: torch.Tensor, out: np.ndarray | None = None) -> np.ndarray:
    """:func:`seq_sum` from +0 as a numpy float32 array (written into ``out`` when given).

    numpy reduces dimension 0 of a C-contiguous array whose slices hold two or more values as a plain
    running sum, row after row (the outer loop of its iterator; a reduction axis goes innermost, where
    numpy sums pairwise, only when the rest is a single value, which takes ``index_add_`` here instead).
    ``initial=0`` starts from +0, as C does.
    """
    if _np_reducible(p):
        with np.errstate(all="ignore"):  # C overflows silently too
            if out is None or out.flags.c_contiguous:  # (a strided ``out`` is much slower)
                return np.add.reduce(p.numpy(), axis=0, out=out, initial=_ZERO32)
            r = np.add.reduce(p.numpy(), axis=0, initial=_ZERO32)
    else:
        acc = torch.zeros((1, *p.shape[1:]), dtype=F32)
        acc.index_add_(0, _zero_idx(p.shape[0]), p)
        r = acc[0].numpy()
    if out is None:
        return r
    out[...] = r
    return out


def signed_absmax(x: torch.Tensor, dim: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(amax, max)`` along ``dim`` of a 2-D ``x``: the largest ``|x|`` and the signed value of its first
    occurrence.

    This is ggml's ``if (amax < fabsf(v)) { amax = fabsf(v); max = v; }`` loop from ``amax = max = 0``:
    an all-zero group gives ``max = +0``; when both ``+a`` and ``-a`` occur, the earlier one wins; a NaN
    (a scale from overflowing sums) never wins a comparison, so it counts as zero.
    """
    hi = x.amax(dim)
    if bool(hi.isnan().any()):  # amax propagates NaN; C's comparisons skip it
        x = torch.nan_to_num(x, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
        hi = x.amax(dim)
    lo = x.amin(dim)
    neg_lo = lo.neg()
    mx = torch.where(hi >= neg_lo, hi, lo)
    tie = hi == neg_lo  # +a and -a both present (or an all-zero group): the first occurrence decides
    if bool(tie.any()):
        idx = tie.nonzero().squeeze(1)
        sub = x.index_select(1 - dim % 2, idx)
        first = sub.abs().max(dim=dim, keepdim=True).indices  # torch returns the first maximal index
        mx[idx] = sub.gather(dim, first).squeeze(dim)
    return torch.maximum(hi, neg_lo), mx.add_(0.0)  # + 0.0: an all-zero group keeps max = +0


# ---- the chunk driver -----------------------------------------------------------------------------------

CHUNK_WEIGHTS = 1 << 21  # weights per work item (fewer, larger items: less Python overhead under the GIL)
_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}  # (workers, pid) -> pool; a forked child makes its own
_pool_lock = threading.Lock()


def _single_threaded_worker() -> None:
    # Settle this thread's lazy thread-count initialisation first: done later, it would copy the process
    # default back (which _get_pool restores); then set this thread's OpenMP setting to one.
    torch.get_num_threads()
    torch.set_num_threads(1)


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


def run_chunks(fn: Callable[[int, int], T], total: int, max_chunk: int) -> list[T]:
    """``[fn(a, b) for each chunk [a, b) of range(total)]`` over ``torch.get_num_threads()`` worker threads.

    Chunks are equal, at most ``max_chunk`` long, and a multiple of the thread count in number. Each worker
    runs its torch ops single-threaded: the work is thousands of short ops, and as OpenMP regions each would
    end in a barrier that stalls for milliseconds on cores shared with other processes, while independent
    threads (torch and numpy release the GIL inside kernels) just proceed. Even a single chunk goes to a
    worker for that reason. Called from a worker (one thread), it runs inline.
    """
    n = max(1, torch.get_num_threads())
    count = min(total, n * -(-total // (n * max(1, max_chunk))))
    step = max(1, -(-total // max(1, count)))
    bounds = [(a, min(total, a + step)) for a in range(0, total, step)]
    if n == 1:
        return [fn(a, b) for a, b in bounds]
    pool = _get_pool(n)
    return [f.result() for f in [pool.submit(fn, a, b) for a, b in bounds]]


def all_finite(x: torch.Tensor) -> bool:
    """Whether a 2-D ``x`` holds no NaN or Inf: the amax and amin of row chunks on the :func:`run_chunks` workers
    (amax and amin propagate NaN and expose an Inf). Run as OpenMP regions of the calling thread right after the
    workers' encoders, the same two reductions took ~3x the encoding itself (Q4_1, 1536 x 1536)."""

    def finite(a: int, b: int) -> bool:
        part = x[a:b]
        return bool(torch.isfinite(part.amax())) and bool(torch.isfinite(part.amin()))

    return all(run_chunks(finite, x.shape[0], max(1, CHUNK_WEIGHTS // max(1, x.shape[1]))))


def broadcast_rows(row: torch.Tensor, rows: int) -> torch.Tensor:
    """A contiguous ``[rows, *row.shape]`` of copies of ``row``, written by the :func:`run_chunks` workers."""
    out = torch.empty((rows, *row.shape), dtype=row.dtype)

    def fill(a: int, b: int) -> None:
        out[a:b] = row

    run_chunks(fill, rows, max(1, CHUNK_WEIGHTS // max(1, row.numel())))
    return out


def chunked_encoder(encode_chunk: Encoder, type_size: int, whole_rows: bool) -> Encoder:
    """Wrap ``encode_chunk(x[r, nb, bs], qw) -> uint8[r, nb, type_size]`` to run in chunks (:func:`run_chunks`).

    ``whole_rows``: chunks keep rows whole (an imatrix path that uses row statistics); otherwise blocks are
    independent and chunks cut anywhere. Either way the bytes are those of one pass over all rows.
    """

    def encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        rows, nb, bs = x.shape
        xs = x if whole_rows else x.reshape(rows * nb, 1, bs)
        qs = qw if qw is None or whole_rows else qw.reshape(rows * nb, 1, bs)
        out = torch.empty(xs.shape[0], xs.shape[1], type_size, dtype=torch.uint8)

        def work(a: int, b: int) -> None:
            out[a:b] = encode_chunk(xs[a:b], None if qs is None else qs[a:b])

        run_chunks(work, xs.shape[0], CHUNK_WEIGHTS // (xs.shape[1] * bs))
        return out.view(rows, nb, type_size)

    return encode
