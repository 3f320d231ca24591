"""The one kernel set of the quantizers: exact float32 arithmetic as ggml's C reference does it, the two
scale searches several formats share, and the one chunk driver that runs every encoder.

ggml's reference library is compiled for baseline x86-64: every float32 operation is rounded once, in
source order, with no fused multiply-add. To produce its bytes, these kernels keep C's expression order
and grouping (``w*x*l`` is ``(w*x)*l``) and avoid the torch CPU kernels that round differently:
``torch.sqrt`` (a vector-math approximation, 1 ulp off for ~20 % of inputs; :func:`sqrtf`),
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
MAGIC = 12582912.0  # 1.5 * 2^23, ggml's nearest_int rounding constant
_TWO22, _TWO23, _TWO24 = float(1 << 22), float(1 << 23), float(1 << 24)

# ---- scalars, division, square root, rounding -----------------------------------------------------------

_F32: dict[float, torch.Tensor] = {}


def f32(v: float) -> torch.Tensor:
    """A 0-d float32 tensor holding ``float32(v)`` (arithmetic with it stays float32); cached, read-only."""
    t = _F32.get(v)
    if t is None:
        t = _F32[v] = torch.tensor(np.float32(v), dtype=F32)
    return t


_MAGIC_T = f32(MAGIC)


def f32_div(num: float | np.floating, den: torch.Tensor) -> torch.Tensor:
    """``float32(num) / den`` rounded once (torch's ``num / den`` multiplies by ``1 / den``)."""
    return torch.div(f32(float(num)).expand_as(den), den)


def sqrtf(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C ``sqrtf``), via numpy's hardware ``sqrt``."""
    return torch.from_numpy(np.sqrt(x.contiguous().numpy()))


def sqrtf_(x: torch.Tensor) -> torch.Tensor:
    """:func:`sqrtf` in place on a contiguous float32 ``x`` (returned)."""
    xn = x.numpy()
    np.sqrt(xn, out=xn)
    return x


def nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` bit for bit, as int32: add 1.5*2^23 in float32 and read the low mantissa bits.

    Round half to even for ``|v| < 2^22``; outside that range (and for NaN/inf) it returns the same wrapped
    value as the C code, so degenerate inputs give ggml's bytes too.
    """
    t = v.to(F32) + _MAGIC_T
    return (t.view(torch.int32) & 0x007FFFFF) - 0x00400000


def nearest_clamped_(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``float(clamp(nearest_int(v), lo, hi))`` in place over float32 ``v`` (returned, overwritten).

    When every ``v + 1.5*2^23`` lies in ``[2^23, 2^24)`` the low mantissa bits are exactly
    ``(v + 1.5*2^23) - 1.5*2^23``, so the clamp runs in the float domain (3 cheap ops, no ``torch.round``,
    which opens an OpenMP region even for small tensors); otherwise the integer bit trick is taken.
    """
    v.add_(_MAGIC_T)
    if v.numel() and bool(v.amin() >= _TWO23) and bool(v.amax() < _TWO24):  # NaN fails both tests
        return v.clamp_(MAGIC + lo, MAGIC + hi).sub_(_MAGIC_T)
    vi = v.view(torch.int32)
    vi.bitwise_and_(0x007FFFFF).sub_(0x00400000).clamp_(lo, hi)
    return vi.to(F32)


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


def fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """float32[n] -> uint8[n, 2]: the little-endian fp16 encoding of each value."""
    return to_fp16(x).contiguous().view(torch.uint8).reshape(*x.shape, 2)


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


def seq_max(p: torch.Tensor) -> torch.Tensor:
    """``m = 0; for i: if (p[i] > m) m = p[i]`` over dimension 0 (never below +0, as in C)."""
    m = torch.zeros_like(p[0])
    for i in range(p.shape[0]):
        m = torch.where(p[i] > m, p[i], m)
    return m


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


def first_min(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Minimum along ``dim`` of a 2-D ``x`` as C's ``if (v < min) min = v`` finds it: a zero minimum keeps
    the sign of the first zero (``-0.0`` and ``+0.0`` compare equal), which an fp16 field may store."""
    mn = x.amin(dim)
    zero = mn == 0
    if bool(zero.any()):
        idx = zero.nonzero().squeeze(1)
        sub = x.index_select(1 - dim % 2, idx)
        first = (sub == 0).to(torch.uint8).max(dim=dim, keepdim=True).indices
        mn[idx] = sub.gather(dim, first).squeeze(dim)
    return mn


# ---- make_qx_quants: symmetric scale, 19 trial scales ---------------------------------------------------

_QX_STEPS = [0] + [s for s in range(-9, 10) if s != 0]  # C's trial order
_QX_CHUNK = 19 << 15  # values x trials per slice of the sum planes ([n, 19, chunk // (19 n)] work planes)


def _qx_candidate_sums(
    iscale: torch.Tensor, x: torch.Tensor, w: torch.Tensor, nmax: int, chunk: int
) -> tuple[np.ndarray, np.ndarray]:
    """For every trial inverse scale ``iscale[C, S]``: sum_i (w*x)*l and sum_i (w*l)*l, in C order.

    ``l = clamp(nearest_int(iscale*x_i), -nmax, nmax-1)``; ``x, w`` are ``[n, S]``. All positions and trials of
    a slice of groups go through each op at once (``[n, C, s]`` planes); the position sums are
    :func:`seq_sum_np`'s ordered reductions.
    Returns numpy float32 ``(sumlx[C, S], suml2[C, S])``.
    """
    n, S = x.shape
    C = iscale.shape[0]
    wx = w * x
    s_max = chunk // (n * C)
    s_max = max(1, min(S, s_max - s_max % 16 if s_max >= 16 else s_max))  # whole 64-byte lines per plane row
    lt_b = torch.empty(n * C * s_max, dtype=F32)
    p_b = torch.empty(n * C * s_max, dtype=F32)
    sumlx = np.empty((C, S), dtype=np.float32)
    suml2 = np.empty((C, S), dtype=np.float32)
    for a in range(0, S, s_max):
        b = min(S, a + s_max)
        lt, p = (buf[: n * C * (b - a)].view(n, C, b - a) for buf in (lt_b, p_b))  # contiguous
        torch.mul(x[:, None, a:b], iscale[:, a:b], out=lt)
        # |iscale*x| <= nmax + 1 (|x| <= |max|): torch's round (half to even) is nearest_int there, and the
        # integer clamp bounds commute with rounding. A -0.0 level only flips the sign of zero products, which
        # sums from +0 never keep.
        lt.clamp_(-nmax, nmax - 1).round_()
        torch.mul(lt, wx[:, None, a:b], out=p)
        seq_sum_np(p, out=sumlx[:, a:b])
        torch.mul(lt, w[:, None, a:b], out=p).mul_(lt)
        seq_sum_np(p, out=suml2[:, a:b])
    return sumlx, suml2


def make_qx_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, chunk: int = _QX_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, w)`` for every group of position-major ``x[n, S]``.

    ``w[n, S]`` are the per-value weights (``x*x`` for ggml's ``qw == NULL``). Tries the inverse scales
    ``-nmax / max`` and ``-(nmax + 0.1 k) / max``, k = -9..9 (k != 0), keeping a later one only when it
    strictly improves the weighted fit (C's ``>``). Returns ``(scale[S], L uint8[n, S])`` with levels in
    ``[0, 2*nmax)`` (value = scale * (L - nmax)); an all-zero group (max |x| < 1e-15) gets 0 and L = 0.
    ``chunk`` bounds the values x trials of one slice of the candidate sums. The running-best scan over the
    trials runs in numpy float32 (the same IEEE operations, less call overhead).
    """
    n, S = x.shape
    f = np.float32
    num = torch.tensor([-(f(nmax) + f(0.1) * f(k)) for k in _QX_STEPS], dtype=F32)
    C = num.numel()
    amax, mx = signed_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, f32(1.0), mx)  # any finite non-zero stand-in; those groups are overwritten
    iscale = torch.div(num[:, None].expand(C, S), mx)
    sumlx, suml2 = _qx_candidate_sums(iscale, x, w, nmax, chunk)
    with np.errstate(all="ignore"):  # C divides by zero and overflows silently too
        # Everything not depending on the running best is computed for all trials at once.
        new_scale = sumlx / suml2  # [C, S]
        gain = new_scale * sumlx  # C's `best` after accepting a trial: scale*sumlx
        sq = sumlx * sumlx
        skip = ~(suml2 > 0)
        if skip.any():
            sq[skip] = -np.inf  # C's `suml2 > 0 &&`: -inf never compares greater
        scale0 = new_scale[0].copy()
        scale0[suml2[0] == 0] = 0  # C: suml2 ? sumlx/suml2 : 0
        best = scale0 * sumlx[0]
        t = np.empty(S, dtype=f)
        better = np.zeros((C, S), dtype=bool)  # better[c]: trial c was accepted
        for c in range(1, C):
            np.multiply(best, suml2[c], out=t)
            np.greater(sq[c], t, out=better[c])
            np.putmask(best, better[c], gain[c])
        # the last accepted trial (0 when none): one pass over the masks instead of a masked write per trial
        pick = (better.view(np.uint8) * np.arange(C, dtype=np.uint8)[:, None]).max(axis=0).astype(np.intp)
        scale = np.take_along_axis(new_scale, pick[None], 0)[0]
        np.putmask(scale, pick == 0, scale0)
    scale_out = torch.where(zero, 0.0, torch.from_numpy(scale)).add_(0.0)  # C's sums start from +0: no -0.0 scale
    isc = torch.from_numpy(np.take_along_axis(iscale.numpy(), pick[None], 0))  # the chosen trial's inverse scale
    # 1.5*2^23 + l + nmax is exact; its low byte is the level l + nmax (an int32 -> uint8 cast is cheap).
    L = (x * isc).add_(_MAGIC_T).clamp_(MAGIC - nmax, MAGIC + nmax - 1).add_(nmax).view(torch.int32).to(torch.uint8)
    if bool(zero.any()):
        L[:, zero] = 0
    return scale_out, L


# ---- make_qkx2_quants / make_qkx3_quants: scale and minimum, refitted over trial scales ------------------


def make_qkx_quants(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx2_quants`` / ``make_qkx3_quants`` (explicit weights) on position-major ``x, w[n, S]``.

    Per group a scale ``s >= 0`` and a minimum ``m <= 0`` with ``x ~ s * L + m``, ``L in [0, nmax]``: first
    from the group's range, then ``nstep + 1`` trial inverse scales ``(rmin + rdelta*k + nmax) / (max - m)``
    (``m`` the best minimum so far, as ggml overwrites it) with a weighted least-squares refit each, kept
    when the weighted error (squared, or absolute with ``use_mad``) is strictly smaller. qkx2 and qkx3
    differ only in giving up on ``max == min`` vs ``max <= min``, the same groups for finite weights.
    Returns ``(scale[S], min[S], L uint8[n, S])``; ``min`` keeps the sign of a zero minimum as C's scan
    finds it (ggml stores ``the_min = -min``). Per-group bookkeeping runs in numpy float32 (the same IEEE
    operations, less call overhead on ``[S]`` vectors); the ``[n, S]`` work planes are preallocated and
    the three sums of a trial are one ordered reduction (:func:`seq_sum_np`) of a ``[n, 3, S]`` plane.
    """
    f = np.float32
    n, S = x.shape
    lowest = first_min(x, 0).numpy()  # every x lies in [lowest, mx]: (x - m) * iscale lies between the ends'
    mx = x.amax(0).numpy()
    sum_w = seq_sum(w, from_first=True).numpy()
    sum_x = seq_sum(w * x, from_first=True).numpy()
    mn = np.where(lowest > 0, f(0), lowest)
    flat = mx <= mn
    mx = np.where(flat, mn + f(1), mx)  # keep the arithmetic finite; masked at the end
    lv_buf = torch.empty(n, S, dtype=F32)
    prods = torch.empty(n, 3, S, dtype=F32)  # w*l, (w*l)*x, (w*l)*l
    sums = np.empty((3, S), dtype=f)
    err_sum = np.empty(S, dtype=f)
    sum_l, sum_xl, sum_l2 = sums
    wl = prods[:, 0]

    def levels(iscale: np.ndarray, m: np.ndarray, span: np.ndarray) -> torch.Tensor:
        """clamp(nearest_int(iscale * (x - m)), 0, nmax) as float32 (in ``lv_buf``); plain rounding when the
        ends show every value within nearest_int's exact range, the bit-exact path otherwise (denormal
        ranges, overflow). ``span`` is ``mx - m``."""
        v = torch.sub(x, torch.from_numpy(m), out=lv_buf).mul_(torch.from_numpy(iscale))
        ends = max(np.abs((lowest - m) * iscale).max(), np.abs(span * iscale).max())
        return v.round_().clamp_(0, nmax) if ends < _TWO22 else nearest_clamped_(v, 0, nmax)  # NaN: exact path

    def error(lv: torch.Tensor, scale: np.ndarray, m: np.ndarray) -> np.ndarray:
        """sum_i w_i * f((scale * L_i + m) - x_i), f = |.| or square; overwrites ``lv``, returns a view of a
        buffer that the next call overwrites."""
        diff = lv.mul_(torch.from_numpy(scale)).add_(torch.from_numpy(m)).sub_(x)
        diff = diff.abs_() if use_mad else diff.mul_(diff)
        return seq_sum_np(diff.mul_(w), out=err_sum)

    with np.errstate(all="ignore"):  # C divides by zero and overflows silently too
        span = mx - mn
        iscale = f(nmax) / span
        scale = f(1) / iscale
        best = error(levels(iscale, mn, span), scale, mn).copy()
        cur_min = mn.copy()
        l_iscale, l_min = iscale.copy(), mn.copy()  # the trial that produced the current L
        for step in range(nstep + 1):
            span = mx - cur_min
            iscale = ((f(rmin) + f(rdelta) * f(step)) + f(nmax)) / span
            lv = levels(iscale, cur_min, span)
            torch.mul(w, lv, out=wl)
            torch.mul(wl, x, out=prods[:, 1])
            torch.mul(wl, lv, out=prods[:, 2])
            seq_sum_np(prods, out=sums)  # sum_l, sum_xl, sum_l2 (views of `sums`)
            D = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
            # Few groups change per step: index lists are much cheaper than masked numpy copies here.
            pos = np.flatnonzero(this_min > 0)
            if pos.size:
                this_min[pos] = 0
                this_scale[pos] = sum_xl[pos] / sum_l2[pos]
            err = error(lv, this_scale, this_min)
            better = np.flatnonzero((D > 0) & (err < best))
            l_iscale[better] = iscale[better]
            l_min[better] = cur_min[better]
            best[better] = err[better]
            scale[better] = this_scale[better]
            cur_min[better] = this_min[better]
        L = levels(l_iscale, l_min, mx - l_min)
    if flat.any():
        L[:, torch.from_numpy(flat)] = 0.0
        scale[flat] = 0
        np.copyto(cur_min, mn, where=flat)
    L = L.to(torch.int32).to(torch.uint8)  # (a direct float -> uint8 cast is several times slower)
    return torch.from_numpy(scale), torch.from_numpy(cur_min), L


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
