"""Symmetric-scale searches shared by the K-quants without a minimum (Q3_K, Q6_K), in float32 torch.

These are vectorised re-implementations of ggml's ``make_qx_quants`` (weighted RMSE search over 19
candidate inverse scales) and ``make_q3_quants`` (RMSE-weighted greedy refinement of the 3-bit levels).
They reproduce ggml's float32 arithmetic bit for bit, which is what makes our blocks byte-identical:

- Layout: a *group* is the run of values that share one scale (16 weights of a sub-block, or the 16
  sub-block scales of a super-block). Searches take groups **position-major**: ``x[n, S]`` holds
  position ``i`` of all ``S`` groups in the contiguous plane ``x[i]``; the weight tensor itself is
  group-major (``[S, n]``, a free view), and is transposed tile by tile. Every loop below runs over the
  ``n`` positions or over search steps; each step is one tensor op over all groups of a tile.
- Sums accumulate position by position (``acc = acc + term_i``), as a C ``for`` loop does; products keep
  C's left-to-right grouping (``w*x*l`` is ``(w*x)*l``); nothing uses fused multiply-add (ggml is built
  without FMA). Note ``torch.addcmul`` *is* fused on this CPU build, so it is avoided.
- ``nearest_int`` is ggml's magic-number rounding (add 1.5*2^23, keep the low mantissa bits). Inside its
  valid range (|v| <= 2^22) it equals round-half-to-even, which loops whose argument is provably small
  compute as ``(v + 1.5*2^23) - 1.5*2^23`` (two float adds; ``torch.round`` is avoided: it is a vector-math
  op that spawns a parallel region even for small tensors, which stalls for milliseconds whenever the
  other core is busy); elsewhere :func:`nearest_int_exact` / :func:`nearest_clamped_` reproduce the bit
  trick for every input.
- Ties keep the first best, as C's strict ``>`` does: the first maximal position wins, and a running best
  is replaced only on strict improvement, in C's candidate order.
- Constants are float32 0-dim tensors and divisions are tensor/tensor: ``scalar / tensor`` in torch is
  computed as ``reciprocal(tensor) * scalar``, which rounds differently from C's division. ``torch.sqrt``
  is not correctly rounded on float32 CPU tensors (see :func:`sqrt_f32`).
- Work is cut into tiles of ``TILE`` groups so temporaries stay small (cache-resident, and below the
  sizes that glibc serves with fresh ``mmap`` pages, whose page faults otherwise cost a third of the time).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch

F32 = torch.float32
GROUP_MAX_EPS = 1e-15  # ggml: a group whose largest |x| is below this (in float32) is all-zero
TILE = 16384  # groups (sub-blocks of 16 weights) per tile; a multiple of 16, so tiles hold whole super-blocks
_CHUNK = 8192  # groups per slice of make_qx_quants' candidate search ([19, chunk] work planes)
_MAGIC = 12582912.0  # 1.5 * 2^23, ggml's rounding constant


# Run the quantizers on one intra-op thread. The work is thousands of small tensor ops; with more threads
# each op above torch's grain size opens an OpenMP parallel region, and whenever another process holds a
# core every region waits for a descheduled worker (milliseconds each), making an encode 10-20x slower
# on a shared machine. Single-threaded it is predictable (and on an idle 2-core machine only ~20 % slower).
SERIAL = True


@contextmanager
def serial_torch() -> Iterator[None]:
    """Use one torch intra-op thread inside the block (when ``SERIAL``), restoring the count after."""
    n = torch.get_num_threads()
    if not SERIAL or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def tiles(S: int, tile: int = TILE) -> Iterator[tuple[int, int]]:
    """``[a, b)`` ranges covering ``range(S)`` in steps of ``tile``."""
    for a in range(0, S, tile):
        yield a, min(S, a + tile)


def f32(v: float) -> torch.Tensor:
    """A 0-dim float32 tensor holding ``float32(v)`` (so arithmetic stays in float32)."""
    return torch.tensor(np.float32(v), dtype=F32)


_EPS_T = f32(GROUP_MAX_EPS)
_MAGIC_T = f32(_MAGIC)
_ONE_T = f32(1.0)


def nearest_int_exact(v: torch.Tensor) -> torch.Tensor:
    """ggml's ``nearest_int`` bit for bit, for any float32 input (int32 result).

    Round-half-to-even for |v| <= 2^22; outside that range it returns what the bit trick returns.
    """
    t = v + _MAGIC_T  # float32 add (0-dim float32 operand)
    return (t.view(torch.int32) & 0x007FFFFF) - 0x00400000


def sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root (C ``sqrtf``).

    ``torch.sqrt`` on float32 CPU tensors is *not* correctly rounded in this build (it goes through a
    vector math library and is off by one ulp for ~15 % of inputs), which changes ggml's imatrix weights.
    numpy's float32 sqrt uses the IEEE hardware instruction.
    """
    xc = x.contiguous()
    return torch.from_numpy(np.sqrt(xc.numpy()))


def nearest_int_exact_(v: torch.Tensor) -> torch.Tensor:
    """In-place :func:`nearest_int_exact`: overwrites float32 ``v``, returns an int32 view of it."""
    v.add_(_MAGIC_T)
    vi = v.view(torch.int32)
    return vi.bitwise_and_(0x007FFFFF).sub_(0x00400000)


_TWO23 = float(1 << 23)
_TWO24 = float(1 << 24)


def nearest_clamped_(v: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """``float(clamp(nearest_int(v), lo, hi))`` exactly as C computes it, in place over float32 ``v``.

    ggml's rounding adds 1.5*2^23 and reads the low mantissa bits. Whenever every ``v + 1.5*2^23`` lies
    in [2^23, 2^24) those bits are exactly ``(v + 1.5*2^23) - 1.5*2^23``, so the clamp can run in the
    float domain (3 cheap ops); otherwise (|v| > ~2^22, inf or NaN somewhere) the bit-exact integer path
    is taken. Values are small integers, returned as float32 (``v`` itself, overwritten).
    """
    v.add_(_MAGIC_T)
    if v.numel() and bool(v.amin() >= _TWO23) and bool(v.amax() < _TWO24):  # NaN fails both tests
        return v.clamp_(_MAGIC + lo, _MAGIC + hi).sub_(_MAGIC_T)
    vi = v.view(torch.int32)
    vi.bitwise_and_(0x007FFFFF).sub_(0x00400000).clamp_(lo, hi)
    return vi.to(F32)


def f32_div(num: float, den: torch.Tensor) -> torch.Tensor:
    """``float32(num) / den`` as a true IEEE division (torch's ``num / den`` multiplies by 1/den)."""
    return torch.div(f32(num).expand_as(den), den)


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group of ``x[n, S]``: the signed value of largest magnitude (first one on ties) and its |.|.

    Matches ggml's ``if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); max = x[i]; }`` starting from 0.
    The sign only depends on position when +m and -m are both present at the largest magnitude m;
    those (rare) groups are resolved by a scan in position order.
    """
    hi = x.amax(dim=0)
    lo = x.amin(dim=0)
    neg = lo.neg()
    amax = torch.maximum(hi, neg)
    mx = torch.where(neg > hi, lo, hi)
    tie = (neg == hi) & (hi > 0)
    if bool(tie.any()):
        cols = tie.nonzero().squeeze(1)
        xt = x.index_select(1, cols)
        m = torch.zeros(cols.numel(), dtype=x.dtype)
        best = torch.zeros(cols.numel(), dtype=x.dtype)
        for i in range(x.shape[0]):
            ax = xt[i].abs()
            upd = ax > best
            best = torch.where(upd, ax, best)
            m = torch.where(upd, xt[i], m)
        mx[cols] = m
    return mx, amax


def _qx_candidate_sums(
    iscale: torch.Tensor, x: torch.Tensor, w: torch.Tensor, wx: torch.Tensor, nmax: int, bufs: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """For every candidate inverse scale ``iscale[C, s]``: sum_i (w*x)*l and sum_i (w*l)*l, in C order.

    ``l = clamp(round(iscale*x_i), -nmax, nmax-1)``; ``x, w, wx`` are ``[n, s]``; ``bufs`` are four
    preallocated ``[C, >= s]`` work planes (reused so that no op touches freshly mapped memory).
    Returns two ``[C, s]`` views into ``bufs``.
    """
    s = x.shape[1]
    lt, tmp, sumlx, suml2 = (b[:, :s] for b in bufs)
    sumlx.zero_()
    suml2.zero_()
    lo, hi = _MAGIC - nmax, _MAGIC + nmax - 1  # the clamp bounds, shifted by the rounding constant
    for i in range(x.shape[0]):
        torch.mul(iscale, x[i], out=lt)
        lt.add_(_MAGIC_T).clamp_(lo, hi).sub_(_MAGIC_T)  # |iscale*x| < nmax+1: exact nearest_int, clamped
        torch.mul(lt, wx[i], out=tmp)
        sumlx.add_(tmp)
        torch.mul(lt, w[i], out=tmp)
        tmp.mul_(lt)
        suml2.add_(tmp)
    return sumlx, suml2


def _qx_steps(nmax: int) -> torch.Tensor:
    """C's candidate numerators in its search order: -nmax, then -(nmax + 0.1*is), is = -9..-1, 1..9."""
    steps = [0] + [s for s in range(-9, 10) if s != 0]
    return torch.tensor([-(np.float32(nmax) + np.float32(0.1) * np.float32(s)) for s in steps], dtype=F32)


def make_qx_quants(
    x: torch.Tensor,
    nmax: int,
    w: torch.Tensor,
    chunk: int = _CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, w)`` for all groups of ``x[n, S]`` at once.

    ``w[n, S]`` are the per-value weights (pass ``x*x`` for ggml's ``qw == NULL`` with rmse_type 1).
    Returns ``(scale[S], L[n, S])``: the float32 scale (value = scale * (L - nmax)) and the levels
    ``L`` in ``[0, 2*nmax)`` as uint8; an all-zero group (max |x| < 1e-15) gets scale 0 and L = 0.
    The groups are processed in slices of ``chunk`` so the ``[19, chunk]`` work planes stay in cache.
    """
    n, S = x.shape
    num = _qx_steps(nmax)
    C = num.numel()
    width = min(S, chunk)
    bufs = tuple(torch.empty(C, width, dtype=F32) for _ in range(4))
    scale_out = torch.empty(S, dtype=F32)
    L_out = torch.empty(n, S, dtype=torch.uint8)
    for a in range(0, S, chunk):
        b = min(S, a + chunk)
        xc, wc = x[:, a:b], w[:, a:b]
        mx, amax = first_absmax(xc)
        zero = amax < _EPS_T
        mx = torch.where(zero, _ONE_T, mx)  # any finite non-zero stand-in; those groups are overwritten
        iscale = torch.div(num[:, None].expand(C, b - a), mx)
        sumlx, suml2 = _qx_candidate_sums(iscale, xc, wc, wc * xc, nmax, bufs)
        # Running best over the candidates in C's order, replaced only on strict improvement (C's '>').
        # Everything not depending on the running best is computed for all candidates at once.
        new_scale = torch.div(sumlx, suml2)  # [C, s]
        gain = new_scale * sumlx  # C's `best` after accepting a candidate: scale*sumlx
        sq = sumlx * sumlx
        pos = suml2 > 0
        s0, q0 = sumlx[0], suml2[0]
        scale0 = torch.where(q0 != 0, new_scale[0], 0.0)  # C: suml2 ? sumlx/suml2 : 0
        best = scale0 * s0
        pick = torch.zeros(b - a, dtype=torch.long)
        for c in range(1, C):
            better = sq[c] > best * suml2[c]
            better &= pos[c]
            best = torch.where(better, gain[c], best)
            pick.masked_fill_(better, c)
        scale = torch.where(pick == 0, scale0, new_scale.gather(0, pick.unsqueeze(0)).squeeze(0))
        # C's sums start from +0.0, so a zero scale is never -0.0
        scale_out[a:b] = torch.where(zero, 0.0, scale) + 0.0
        isc = torch.div(num[pick], mx)  # the chosen candidate's inverse scale, recomputed bit-identically
        L = (xc * isc).add_(_MAGIC_T).clamp_(_MAGIC - nmax, _MAGIC + nmax - 1).sub_(_MAGIC - nmax)
        L_out[:, a:b] = torch.where(zero, 0.0, L)
    return scale_out, L_out


# make_q3_quants, greedy passes. C visits the positions in order, up to 5 passes, stopping after a pass
# without a move; at a position it computes the level that best fits the other values and moves there if
# the weighted fit improves. Two phases here, both exact:
# - Round 0 (tile by tile, all groups): every position of a group is evaluated against the initial state
#   at once, and only the first position that proposes a change is tested. C evaluates the positions
#   before it with the very same state (nothing has changed yet) and finds nothing to do, so this is
#   exactly C's first move. ~80 % of groups have no candidate at all and are final.
# - The ~20 % still searching then go through C's passes position by position (_q3_passes), as
#   [n, A] planes, compacted after every pass.
# C's conjunction of strict '>' tests is written as one minimum of differences that must be > 0 (exact
# for finite floats; inf - inf = NaN counts as false, as C's inf > inf does): float ops are much cheaper
# than chains of bool masks in torch.


def _q3_evaluate(
    lo: int,
    hi: int,
    xa: torch.Tensor,
    La: torch.Tensor,
    ta: torch.Tensor,
    ta2: torch.Tensor,
    sumlx: torch.Tensor,
    suml2: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """Every position of every group against the group state: (slx, sl2, new level, candidate score).

    ``ta, ta2`` are each position's current terms of ``sumlx, suml2``; the score is > 0 exactly where C
    would go on to test a move (``slx > 0`` and the level changes).
    """
    slx = torch.sub(sumlx, ta)  # sums without this position's term
    sl2 = torch.sub(suml2, ta2)
    v = xa * sl2
    v.div_(slx)
    new_l = nearest_clamped_(v, lo, hi)  # level that best fits the others (never NaN)
    m = new_l - La
    m.abs_()
    torch.minimum(m, slx, out=m)
    return slx, sl2, new_l, m


def _q3_first(m: torch.Tensor) -> torch.Tensor:
    """First position with ``m > 0`` in each group of ``m[n, A]`` (``n`` when none); overwrites ``m``."""
    n = m.shape[0]
    rank = torch.arange(n, 0, -1, dtype=F32).unsqueeze(1)  # n - i: larger for earlier positions
    best = torch.sign(m, out=m).mul_(rank).amax(dim=0)
    return (float(n) - best.clamp_min_(0.0)).to(torch.int64)


def _q3_try(
    q: torch.Tensor,
    g: torch.Tensor,
    xa: torch.Tensor,
    slx: torch.Tensor,
    sl2: torch.Tensor,
    new_l: torch.Tensor,
    sumlx_g: torch.Tensor,
    suml2_g: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """C's remaining tests at one position per group, ``(q[k], g[k])`` in the ``[n, A]`` planes.

    Returns the accepted entries ``acc`` (indices into k), their flat plane indices, and for them the new
    level, its two sum terms and the two new sums.
    """
    lin = q * slx.shape[1] + g
    nl = new_l.view(-1).index_select(0, lin)
    xq = xa.view(-1).index_select(0, lin)
    w = xq * xq
    t_n = (w * xq) * nl  # (w*x)*l
    slx_n = slx.view(-1).index_select(0, lin) + t_n
    t2_n = (w * nl) * nl  # (w*l)*l
    sl2_n = sl2.view(-1).index_select(0, lin) + t2_n
    ok = (sl2_n > 0) & ((slx_n * slx_n) * suml2_g > (sumlx_g * sumlx_g) * sl2_n)
    acc = ok.nonzero().squeeze(1)
    return acc, lin.index_select(0, acc), [t.index_select(0, acc) for t in (nl, t_n, t2_n, slx_n, sl2_n)]


def _q3_start(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, ...]:
    """Initial levels and sums of one slice of groups ``x[n, s]``, and the first round of moves.

    Returns ``(L, sumlx, suml2, zero, cid, start, moved)``: float levels in ``[-nmax, nmax)``, the sums,
    the all-zero mask, and for the groups still searching (``cid``) the next position to test and whether
    this pass moved. ~80 % of groups have nothing to test and are final already.
    """
    n, S = x.shape
    mx, amax = first_absmax(x)
    zero = amax < _EPS_T
    mx = torch.where(zero, _ONE_T, mx)
    iscale = f32_div(-float(nmax), mx)
    lo, hi = -nmax, nmax - 1
    L = (x * iscale).add_(_MAGIC_T).clamp_(_MAGIC + lo, _MAGIC + hi).sub_(_MAGIC_T)  # |x*iscale| <= nmax
    w = x * x
    tl = w * x
    tl.mul_(L)  # each position's term of sumlx, (w*x)*l
    tl2 = w.mul_(L)
    tl2.mul_(L)  # ... and of suml2, (w*l)*l
    sumlx = torch.zeros(S, dtype=F32)
    suml2 = torch.zeros(S, dtype=F32)
    for i in range(n):
        sumlx = sumlx + tl[i]
        suml2 = suml2 + tl2[i]
    # iscale = -nmax/max makes every level the opposite sign of its weight when max > 0, so every term of
    # sumlx is <= 0, the float sums are <= each term, and C's "slx > 0" never holds: such groups are final.
    # Only groups whose largest-magnitude weight is negative are searched.
    nid = (mx < 0).nonzero().squeeze(1)
    xn, Ln = x.index_select(1, nid), L.index_select(1, nid)
    sxn, s2n = sumlx.index_select(0, nid), suml2.index_select(0, nid)
    slx, sl2, new_l, m = _q3_evaluate(lo, hi, xn, Ln, tl.index_select(1, nid), tl2.index_select(1, nid), sxn, s2n)
    q = _q3_first(m)
    hit = (q < n).nonzero().squeeze(1)
    qc = q.index_select(0, hit)
    acc, _, (nl, _, _, slx_n, sl2_n) = _q3_try(
        qc, hit, xn, slx, sl2, new_l, sxn.index_select(0, hit), s2n.index_select(0, hit)
    )
    cid = nid.index_select(0, hit)  # searching groups, as indices into this slice
    gacc = cid.index_select(0, acc)
    L.view(-1).index_copy_(0, qc.index_select(0, acc) * S + gacc, nl)
    sumlx.index_copy_(0, gacc, slx_n)
    suml2.index_copy_(0, gacc, sl2_n)
    moved = torch.zeros(cid.numel(), dtype=F32).index_fill_(0, acc, 1.0)
    return L, sumlx, suml2, zero, cid, qc.to(F32) + 1.0, moved


def _q3_passes(
    x: torch.Tensor,
    L: torch.Tensor,
    sumlx: torch.Tensor,
    suml2: torch.Tensor,
    cid: torch.Tensor,
    start: torch.Tensor,
    moved: torch.Tensor,
    nmax: int,
) -> None:
    """Finish C's passes for the groups ``cid``, position by position; updates ``L`` and the sums in place.

    ``x[S, n]`` (float32) and ``L[S, n]`` (int8 levels in ``[-nmax, nmax)``) are group-major; the first
    pass resumes at position ``start`` (after round 0's move) and ``moved`` (0/1) says whether it moved.
    Only these groups (~20 %) are worked on, as ``[n, A]`` planes compacted after every pass: a group
    that makes no move in a pass is final (C breaks out), the others go on, for at most 5 passes.
    """
    n = x.shape[1]
    lo, hi = -nmax, nmax - 1
    xa = x.index_select(0, cid).t().contiguous()
    La = L.index_select(0, cid).t().to(F32).contiguous()
    wa = xa * xa
    wxa = wa * xa
    ta = wxa * La  # each position's current term of sumlx, (w*x)*l
    ta2 = (wa * La) * La  # ... and of suml2, (w*l)*l
    sx, s2 = sumlx.index_select(0, cid), suml2.index_select(0, cid)
    ids = cid
    first = start - 0.5  # "i > first" <=> "i >= start" for the first pass
    for p in range(5):
        changed = moved > 0 if p == 0 else torch.zeros(ids.numel(), dtype=torch.bool)
        for i in range(n):
            slx = sx - ta[i]  # the sums without this position's term
            sl2 = s2 - ta2[i]
            v = xa[i] * sl2
            v.div_(slx)
            nl = nearest_clamped_(v, lo, hi)  # the level that best fits the others (never NaN)
            t_n = wxa[i] * nl
            slx_n = slx + t_n
            t2_n = wa[i] * nl
            t2_n.mul_(nl)
            sl2_n = sl2 + t2_n
            gain = slx_n * slx_n
            gain.mul_(s2)
            gain.sub_((sx * sx) * sl2_n)  # > 0  <=>  slx_n^2 * suml2 > sumlx^2 * sl2_n (NaN: false)
            dl = nl - La[i]
            dl.abs_()  # > 0  <=>  the level changes
            m = torch.minimum(slx, dl)  # C's tests slx > 0, new != old, sl2 > 0 and the gain, as one minimum
            torch.minimum(m, sl2_n, out=m)
            torch.minimum(m, gain, out=m)
            if p == 0:
                torch.minimum(m, float(i) - first, out=m)
            ok = m > 0
            for dst, val in ((La[i], nl), (ta[i], t_n), (ta2[i], t2_n), (sx, slx_n), (s2, sl2_n)):
                torch.where(ok, val, dst, out=dst)
            changed |= ok
        # groups without a move in this pass (and all groups after the 5th) are final
        fin = torch.arange(ids.numel()) if p == 4 else (~changed).nonzero().squeeze(1)
        gid = ids.index_select(0, fin)
        L.index_copy_(0, gid, La.index_select(1, fin).t().to(torch.int8))
        sumlx.index_copy_(0, gid, sx.index_select(0, fin))
        suml2.index_copy_(0, gid, s2.index_select(0, fin))
        keep = changed.nonzero().squeeze(1)
        if p == 4 or keep.numel() == 0:
            return
        ids = ids.index_select(0, keep)
        xa, wa, wxa, La, ta, ta2 = (t.index_select(1, keep) for t in (xa, wa, wxa, La, ta, ta2))
        sx, s2 = sx.index_select(0, keep), s2.index_select(0, keep)


def make_q3_quants(x: torch.Tensor, nmax: int, tile: int = TILE) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` for every group of a group-major ``x[S, n]``.

    Start from ``l = round(-nmax/max * x)`` and greedily move single levels while the weighted
    (w = x^2) fit improves, up to 5 passes. Returns ``(scale[S], L[S, n])``, group-major: the float32
    scale (value = scale * (L - nmax)) and uint8 levels in ``[0, 2*nmax)``; all-zero groups (max |x| <
    1e-15) get scale 0 and L = 0. Round 0 runs tile by tile; the ~20 % of groups that go on searching
    are then finished together.
    """
    S, n = x.shape
    L = torch.empty(S, n, dtype=torch.int8)
    sumlx = torch.empty(S, dtype=F32)
    suml2 = torch.empty(S, dtype=F32)
    zero = torch.empty(S, dtype=torch.bool)
    cids, starts, moveds = [], [], []
    for a, b in tiles(S, tile):
        Lt, sumlx[a:b], suml2[a:b], zero[a:b], cid, start, moved = _q3_start(x[a:b].t().contiguous(), nmax)
        L[a:b] = Lt.t()
        cids.append(cid + a)
        starts.append(start)
        moveds.append(moved)
    cid = torch.cat(cids)
    if cid.numel():
        _q3_passes(x, L, sumlx, suml2, cid, torch.cat(starts), torch.cat(moveds), nmax)
    scale = torch.where(suml2 > 0, torch.div(sumlx, suml2), 0.0) + 0.0  # + 0.0: C never returns -0.0 here
    scale = torch.where(zero, 0.0, scale)
    Lu = torch.where(zero.unsqueeze(1), 0, L.add_(nmax)).view(torch.uint8)
    return scale, Lu


def requantize_(L: torch.Tensor, x: torch.Tensor, d: torch.Tensor, nmax: int) -> torch.Tensor:
    """Second pass of the K-quants: ``L = clamp(nearest_int(x/d), -nmax, nmax-1) + nmax`` where ``d != 0``.

    ``L`` (uint8) and ``x`` are group-major ``[S, n]``; ``d[S]`` is each group's effective scale rebuilt
    from the stored fp16 super-scale and integer sub-scale, as C re-reads them. Groups with ``d == 0``
    keep their levels (C ``continue``s). Updates ``L`` in place and returns it.
    """
    dd = d.unsqueeze(1)
    q = nearest_clamped_(torch.div(x, dd), -nmax, nmax - 1).add_(nmax).to(torch.uint8)
    return torch.where(dd == 0, L, q, out=L)


def seq_sum_rows(x: torch.Tensor) -> torch.Tensor:
    """Sum of a position-major ``x[n, S]`` over positions, left to right from +0 (C loop order)."""
    acc = torch.zeros(x.shape[1], dtype=x.dtype)
    for i in range(x.shape[0]):
        acc = acc + x[i]
    return acc
