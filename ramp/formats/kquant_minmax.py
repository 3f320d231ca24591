"""Shared searches of the asymmetric K-quants (Q2_K, Q4_K, Q5_K): a scale and a min per sub-block, then
the 4/6-bit quantization of those scales and mins, in torch and bit-exact with ggml's float32 reference.

Layout convention of this module: a set of ``N`` independent groups of ``n`` values is held
*position-major*, as ``[n, N]`` (row ``i`` = the ``i``-th value of every group). Per-group sums add the
rows one after the other (:func:`seq_sum0`), which is the order, and so the rounding, of ggml's C loops;
a reduction such as ``torch.sum`` adds in another order and rounds differently. Loops run over positions
and search steps only, every op is vectorised over all groups.

Float32 fidelity rules followed throughout: the C expression order and grouping (``a*b + c`` as two
roundings: the reference library is built without FMA), strict comparisons so that the first best
candidate wins, ggml's ``nearest_int`` (round half to even), fp16 rounding of the stored super-block
scales and re-use of the rounded values where C reads them back. Division is always written
tensor / tensor: torch turns ``scalar / tensor`` into ``reciprocal * scalar``, which rounds differently.
Square roots go through float64 (see :func:`sqrt_f32`).

Every value here is float32 in the units of the weights (scales and mins are weight units per level).
Known limit: the scale search rounds with ``torch.round``, equal to ggml's ``nearest_int`` for
``|v| < 2^22``; only degenerate inputs (sub-normal ranges, or weights whose squares overflow float32)
could leave that range, where the C trick returns wrapped values.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numpy as np
import torch

T = TypeVar("T")

# ggml treats a group whose largest scale is below this as all zero (``GROUP_MAX_EPS``).
GROUP_MAX_EPS = float(np.float32(1e-15))

# Weights per chunk of super-blocks: big enough that per-op Python/dispatch overhead is small, small
# enough that the [n, chunk] work tensors stay in cache.
CHUNK = 1 << 18

_ZERO_IDX: dict[int, torch.Tensor] = {}
_F32: dict[float, torch.Tensor] = {}


def run_chunks(fn: Callable[[int, int], T], total: int, chunk: int) -> list[T]:
    """``[fn(a, b) for each chunk [a, b) of range(total)]``, spread over ``torch.get_num_threads()`` threads.

    Every chunk runs its torch ops single-threaded: ``torch.set_num_threads(1)`` in the thread that runs it
    (the process-wide setting is put back before returning). The search issues thousands of short ops; as
    OpenMP regions each would end in a barrier, which on cores shared with other processes can stall for
    milliseconds (``index_add_`` even opens a region for tiny inputs), while independent Python threads
    (torch releases the GIL inside kernels) just proceed.
    """
    nt = torch.get_num_threads()
    if nt > 1:  # at least one chunk per thread, but not so small that overhead dominates
        chunk = max(1, min(chunk, max(-(-total // nt), chunk // 8)))
    bounds = [(a, min(total, a + chunk)) for a in range(0, total, chunk)]
    if nt <= 1:
        return [fn(a, b) for a, b in bounds]

    def work(ab: tuple[int, int]) -> T:
        torch.get_num_threads()  # settle this thread's lazy thread-count initialisation first
        torch.set_num_threads(1)
        return fn(*ab)

    try:
        if len(bounds) <= 1:
            return [work(ab) for ab in bounds]
        with ThreadPoolExecutor(max_workers=min(nt, len(bounds))) as ex:
            return list(ex.map(work, bounds))
    finally:
        torch.set_num_threads(nt)


def f32(v: float) -> torch.Tensor:
    """A 0-d float32 tensor (so that ``f32(a) / t`` is a true float32 division); cached per value."""
    t = _F32.get(v)
    if t is None:
        t = _F32[v] = torch.tensor(v, dtype=torch.float32)
    return t


def c_nearest_int(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` bit for bit, as int32: add 1.5*2^23 in float32 and read the low mantissa bits.

    This is round-half-to-even for ``|v| < 2^22``; outside that range (and for NaN/inf) it returns the same
    wrapped value the C code does, so even degenerate inputs give ggml's bytes.
    """
    t = v.to(torch.float32) + 12582912.0
    return (t.view(torch.int32) & 0x007FFFFF) - 0x00400000


def sqrt_f32(v: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 ``sqrtf``.

    torch's vectorised float32 ``sqrt`` is not always correctly rounded (it differs from C ``sqrtf`` in the
    last bit for some inputs), so take the square root in float64 (exact enough that rounding the result to
    float32 gives the correctly rounded value) and round once.
    """
    return torch.sqrt(v.to(torch.float64)).to(torch.float32)


def _zero_idx(n: int) -> torch.Tensor:
    idx = _ZERO_IDX.get(n)
    if idx is None:
        idx = _ZERO_IDX[n] = torch.zeros(n, dtype=torch.long)
    return idx


def seq_sum0(p: torch.Tensor) -> torch.Tensor:
    """``acc = 0; for i: acc += p[i]`` over the first dimension, in float32 (C's accumulation order).

    Done by ``index_add_`` of every slice into one zero slice: ATen's CPU kernel adds the source slices one
    after the other in index order, each a plain float32 add, so the result is the left-to-right sum
    (``tests/formats/test_q4_k.py`` checks this against a Python loop). Starting from +0 also reproduces
    the sign C gives an all-zero sum.
    """
    out = torch.zeros((1, *p.shape[1:]), dtype=torch.float32)
    out.index_add_(0, _zero_idx(p.shape[0]), p)
    return out[0]


def seq_sum_loop(p: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`seq_sum0`: the same sum as an explicit Python loop of vector adds."""
    acc = p[0] + 0.0
    for i in range(1, p.shape[0]):
        acc = acc + p[i]
    return acc


def seq_sum_first(p: torch.Tensor) -> torch.Tensor:
    """``acc = p[0]; for i >= 1: acc += p[i]`` over the first dimension (a C sum seeded with element 0)."""
    out = p[0:1].clone()
    if p.shape[0] > 1:
        out.index_add_(0, _zero_idx(p.shape[0] - 1), p[1:])
    return out[0]


def seq_max(p: torch.Tensor) -> torch.Tensor:
    """``m = 0; for i: if (p[i] > m) m = p[i]`` over the first dimension (never below +0, as in C)."""
    m = torch.zeros_like(p[0])
    for i in range(p.shape[0]):
        m = torch.where(p[i] > m, p[i], m)
    return m


def make_qkx_quants(
    x: torch.Tensor,
    w: torch.Tensor,
    nmax: int,
    rmin: float,
    rdelta: float,
    nstep: int,
    use_mad: bool,
    strict_degenerate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ggml's ``make_qkx2_quants`` / ``make_qkx3_quants`` (with explicit weights) on ``N`` groups at once.

    ``x``, ``w``: float32 ``[n, N]`` position-major groups (values in weight units, importance weights).
    Finds per group a scale ``s >= 0`` and an offset ``m <= 0`` so that ``x ~ s * L + m`` with integer levels
    ``L in [0, nmax]``: first from the group range, then trying ``nstep + 1`` candidate inverse scales
    ``(nmax + rmin + rdelta * k) / (max - min)`` with a weighted least-squares fit of ``s, m`` for each, and
    keeping a candidate only when its weighted error (squared, or absolute with ``use_mad``) is strictly
    smaller. As in ggml the offset used to place the levels of later candidates is the best one so far.

    ``strict_degenerate``: qkx2 gives up when ``max == min``, qkx3 when ``max <= min`` (same groups in
    practice; both kept for fidelity).

    Returns ``(scale[N], the_min[N], L[n, N])``: the scale, ``-m`` (>= 0, what ggml stores as the min) and the
    levels as float32 integers.
    """
    x, w = x.contiguous(), w.contiguous()
    n, N = x.shape
    fmax = float(nmax)
    # group minimum / maximum (C scans with strict comparisons; only the sign of a zero extreme could
    # differ here, and it cannot change any output)
    mn, mx = torch.aminmax(x, dim=0)
    sum_w = seq_sum_first(w)
    sum_x = seq_sum_first(w * x)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)
    degenerate = (mx == mn) if strict_degenerate else (mx <= mn)

    diff = torch.empty_like(x)

    def err_of(sc: torch.Tensor, off: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        # sum_i w_i * f((sc * lv_i + off) - x_i), f = |.| or square, accumulated left to right
        torch.mul(lv, sc, out=diff)
        diff.add_(off).sub_(x)
        if use_mad:
            diff.abs_()
        else:
            diff.mul_(diff)
        diff.mul_(w)
        return seq_sum0(diff)

    def levels(isc: torch.Tensor, off: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        torch.sub(x, off, out=out)
        return out.mul_(isc).round_().clamp_(0.0, fmax)

    mn0 = mn
    iscale = f32(fmax) / (mx - mn)
    scale = f32(1.0) / iscale
    laux = torch.empty_like(x)
    best = err_of(scale, mn, levels(iscale, mn, laux))
    # per-group search state, one row each: best error, its scale, its inverse scale and the offset its
    # levels were placed with (the levels are re-derived from those two at the end), current offset
    state = torch.stack([best, scale, iscale, mn, mn])

    prods = torch.empty((n, 3, N), dtype=torch.float32)
    wl, wll, wlx = prods[:, 0], prods[:, 1], prods[:, 2]
    rm, rd, nm = np.float32(rmin), np.float32(rdelta), np.float32(nmax)
    for k in range(nstep + 1):
        num = float(rm + rd * np.float32(k) + nm)  # float32 arithmetic in C order
        mn = state[4]
        isc = f32(num) / (mx - mn)
        levels(isc, mn, laux)
        torch.mul(w, laux, out=wl)
        torch.mul(wl, laux, out=wll)
        torch.mul(wl, x, out=wlx)
        sum_l, sum_l2, sum_xl = seq_sum0(prods)
        D = sum_w * sum_l2 - sum_l * sum_l
        num_s = sum_w * sum_xl - sum_x * sum_l
        num_m = sum_l2 * sum_x - sum_l * sum_xl
        this_scale, this_min = torch.stack([num_s, num_m]) / D
        pos = this_min > 0
        this_min = this_min.masked_fill(pos, 0.0)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = err_of(this_scale, this_min, laux)
        better = (D > 0) & (cur < state[0])  # strict: the earliest of equal errors wins, as in C
        state = torch.where(better, torch.stack([cur, this_scale, isc, mn, this_min]), state)

    L = levels(state[2], state[3], laux)
    scale = state[1].masked_fill(degenerate, 0.0)
    mn = torch.where(degenerate, mn0, state[4])
    L = L.masked_fill(degenerate, 0.0)
    return scale, -mn, L


def make_qp_quants(x: torch.Tensor, qw: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qp_quants`` on ``N`` groups at once: quantize non-negative values to ``[0, nmax]``.

    ``x``: float32 ``[n, N]`` (sub-block scales or mins, weight units); ``qw``: ``[n, N]`` weights.
    Picks the best of nine inverse scales ``(nmax + 0.1 k) / max`` by weighted squared error, then runs
    up to five passes of coordinate descent on single levels, accepting a change only when it raises
    ``sumlx^2 / suml2``. Returns ``(scale[N], L int32[n, N])`` with ``scale = sumlx / suml2`` (0 for an
    all-zero group). ``L`` holds the byte ggml stores (values are taken modulo 256 as a C ``uint8_t``).
    """
    n, N = x.shape
    x = x.contiguous()
    qw = qw.contiguous()
    fmax = float(nmax)
    mx = torch.zeros(N, dtype=torch.float32)
    for i in range(n):
        mx = torch.where(mx > x[i], mx, x[i])
    zero_group = mx < GROUP_MAX_EPS

    iscale = f32(fmax) / mx
    L0 = (c_nearest_int(iscale * x) & 0xFF).to(torch.float32)
    sc = f32(1.0) / iscale
    diff = x - sc * L0
    best = seq_sum0(qw * diff * diff)
    for k in (-4, -3, -2, -1, 1, 2, 3, 4):
        num = float(np.float32(0.1) * np.float32(k) + np.float32(nmax))
        isc = f32(num) / mx
        sck = f32(1.0) / isc
        lk = torch.clamp_max(c_nearest_int(isc * x), nmax).to(torch.float32)
        diff = x - sck * lk
        mse = seq_sum0(qw * diff * diff)
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isc, iscale)

    li = torch.clamp_max(c_nearest_int(iscale * x), nmax)
    lf = li.to(torch.float32)
    wx = qw * x
    sumlx = seq_sum0(wx * lf)
    suml2 = seq_sum0(qw * lf * lf)
    Lb = li & 0xFF  # stored bytes
    Lf = Lb.to(torch.float32)
    rows = [Lf[i].clone() for i in range(n)]
    rowsb = [Lb[i].clone() for i in range(n)]
    for _ in range(5):
        # a pass that changes nothing leaves the state unchanged, so later passes change nothing either:
        # running all five equals ggml's early exit
        for i in range(n):
            wi, xi, wxi, li_f = qw[i], x[i], wx[i], rows[i]
            slx = sumlx - wxi * li_f
            sl2 = suml2 - wi * li_f * li_f
            ok = (slx > 0) & (sl2 > 0)
            new_l = torch.clamp_max(c_nearest_int(xi * sl2 / slx), nmax)
            new_f = new_l.to(torch.float32)
            ok &= new_l != rowsb[i]
            slx = slx + wxi * new_f
            sl2 = sl2 + wi * new_f * new_f
            ok &= slx * slx * suml2 > sumlx * sumlx * sl2
            nb = new_l & 0xFF
            rowsb[i] = torch.where(ok, nb, rowsb[i])
            rows[i] = torch.where(ok, nb.to(torch.float32), li_f)
            sumlx = torch.where(ok, slx, sumlx)
            suml2 = torch.where(ok, sl2, suml2)
    Lout = torch.stack(rowsb)
    scale = torch.where(suml2 > 0, sumlx / suml2, torch.zeros_like(sumlx))
    scale = torch.where(zero_group, torch.zeros_like(scale), scale)
    Lout = torch.where(zero_group, torch.zeros_like(Lout), Lout)
    return scale, Lout


def minmax_superblocks(
    x: torch.Tensor,
    qw: torch.Tensor | None,
    type_size: int,
    nsub: int,
    qp_nmax: int,
    ref_encode: Callable[[torch.Tensor], torch.Tensor],
    im_search: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]],
    im_finish: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Chunked driver shared by Q2_K/Q4_K/Q5_K: ``x``, ``qw`` ``[M, 256]`` -> ``uint8[M, type_size]`` bytes.

    Without an imatrix, ``ref_encode(x_chunk)`` does a whole chunk of super-blocks. With one it runs in three
    passes so that the short per-super-block step (``make_qp_quants`` on the ``nsub`` scales and mins) works
    on large batches: ``im_search(x, qw) -> (scales, mins, sw [S, nsub], L uint8[S, 256])`` per chunk, then
    ``make_qp_quants`` for scales and mins together, then ``im_finish(x, L, d, dmin, ls, lm)`` per chunk.
    """
    M = x.shape[0]
    S = max(1, CHUNK // x.shape[1])
    out = torch.empty((M, type_size), dtype=torch.uint8)
    if qw is None:

        def ref_job(a: int, b: int) -> None:
            out[a:b] = ref_encode(x[a:b])

        run_chunks(ref_job, M, S)
        return out
    scales = torch.empty((M, nsub), dtype=torch.float32)
    mins = torch.empty_like(scales)
    sw = torch.empty_like(scales)
    L = torch.empty((M, x.shape[1]), dtype=torch.uint8)

    def search_job(a: int, b: int) -> None:
        scales[a:b], mins[a:b], sw[a:b], L[a:b] = im_search(x[a:b], qw[a:b])

    run_chunks(search_job, M, S)

    d = torch.empty(M, dtype=torch.float32)
    dmin = torch.empty_like(d)
    ls = torch.empty((M, nsub), dtype=torch.int32)
    lm = torch.empty_like(ls)

    def qp_job(a: int, b: int) -> None:
        n = b - a
        vals = torch.cat([scales[a:b], mins[a:b]]).t()
        wts = torch.cat([sw[a:b], sw[a:b]]).t()
        dq, lq = make_qp_quants(vals, wts, qp_nmax)
        d[a:b], dmin[a:b] = dq[:n], dq[n:]
        ls[a:b], lm[a:b] = lq[:, :n].t(), lq[:, n:].t()

    run_chunks(qp_job, M, max(1, CHUNK // (2 * nsub)))

    def finish_job(a: int, b: int) -> None:
        out[a:b] = im_finish(x[a:b], L[a:b], d[a:b], dmin[a:b], ls[a:b], lm[a:b])

    run_chunks(finish_job, M, S)
    return out


def pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """Eight 6-bit scales and eight 6-bit mins per super-block -> the 12 ``scales`` bytes of Q4_K/Q5_K.

    ``ls``, ``lm``: int ``[M, 8]`` (the bytes ggml holds; normally 0..63). Byte layout, for sub-block
    ``j``: bytes 0-3 hold scales 0-3 in their low 6 bits and bytes 4-7 mins 0-3 likewise; bytes 8-11 hold
    the low nibbles of scale ``j`` (bits 0-3) and min ``j`` (bits 4-7) for ``j = 4..7``, whose top two bits
    go to bits 6-7 of bytes ``j-4`` (scale) and ``j`` (min). Returns uint8 ``[M, 12]``.
    """
    ls = ls.to(torch.int32)
    lm = lm.to(torch.int32)
    out = torch.zeros((ls.shape[0], 12), dtype=torch.int32)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return (out & 0xFF).to(torch.uint8)


def unpack_scale_min_k4(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The 12 ``scales`` bytes ``uint8[M, 12]`` -> ``(sc, m)`` int32 ``[M, 8]`` (``get_scale_min_k4``)."""
    q = q.to(torch.int32)
    sc = torch.cat([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


def requantize(
    x: torch.Tensor,
    L: torch.Tensor,
    d: torch.Tensor,
    dm: torch.Tensor,
    nmax: int,
) -> torch.Tensor:
    """ggml's final pass: levels from the stored (fp16-rounded) per-sub-block scale ``d`` and min ``dm``.

    ``x``, ``L``: ``[..., nsub, sub]`` weights and the search's levels; ``d``, ``dm``: float32
    ``[..., nsub]``. Where ``d == 0`` the search's levels are kept, as in ggml. Returns int32 levels
    clamped to ``[0, nmax]``.
    """
    dd = d.unsqueeze(-1)
    lv = c_nearest_int((x + dm.unsqueeze(-1)) / dd).clamp_(0, nmax)
    return torch.where(dd != 0, lv, L.to(torch.int32))


def to_position_major(x: torch.Tensor, sub: int) -> torch.Tensor:
    """``[..., 256]`` super-blocks -> ``[sub, N]``: the N sub-blocks of ``sub`` weights, as columns."""
    return x.reshape(-1, sub).t().contiguous()


def from_position_major(L: torch.Tensor, M: int, nsub: int) -> torch.Tensor:
    """Inverse of :func:`to_position_major`: ``[sub, M * nsub]`` -> ``[M, nsub, sub]``."""
    sub = L.shape[0]
    return L.t().reshape(M, nsub, sub)
