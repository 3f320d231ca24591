"""Shared steps of the K-quants without a minimum (Q3_K, Q6_K), in float32 torch, bit-exact with ggml.

``make_q3_quants`` (RMSE-weighted greedy refinement of the 3-bit levels) and ``requantize_`` (the second
pass from the stored scales) live here; the 19-trial scale search ``make_qx_quants`` and the exact
float32 helpers are in :mod:`ramp.formats.kernels`. Groups are the 16 weights of a sub-block; the weight
tensor is group-major (``[S, 16]``, a free view) and transposed to position-major ``[16, S]`` tile by
tile. Work is cut into tiles of ``TILE`` groups so temporaries stay small (cache-resident, and below the
sizes that glibc serves with fresh ``mmap`` pages, whose page faults otherwise cost a third of the time).
"""

from __future__ import annotations

from collections.abc import Callable

import gguf
import numpy as np
import torch

from ramp.formats.base import FormatError, QuantFormat
from ramp.formats.kernels import (
    F32,
    GROUP_MAX_EPS,
    MAGIC,
    chunked_encoder,
    f32,
    f32_div,
    nearest_clamped_,
    position_major,
    seq_sum,
    signed_absmax,
)

_TWO23, _TWO24 = float(1 << 23), float(1 << 24)
TILE = 16384  # groups (sub-blocks of 16 weights) per tile; a multiple of 16, so tiles hold whole super-blocks


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
    amax, mx = signed_absmax(x, 0)
    zero = amax < GROUP_MAX_EPS
    mx = torch.where(zero, f32(1.0), mx)
    iscale = f32_div(-float(nmax), mx)
    lo, hi = -nmax, nmax - 1
    L = (x * iscale).add_(f32(MAGIC)).clamp_(MAGIC + lo, MAGIC + hi).sub_(f32(MAGIC))  # |x*iscale| <= nmax
    w = x * x
    tl = w * x
    tl.mul_(L)  # each position's term of sumlx, (w*x)*l
    tl2 = w.mul_(L)
    tl2.mul_(L)  # ... and of suml2, (w*l)*l
    sumlx = seq_sum(tl)  # C's sums over the positions, in order from +0
    suml2 = seq_sum(tl2)
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


def _nearest_clamped_np(v: np.ndarray, lo: np.int32, hi: np.int32) -> np.ndarray:
    """:func:`ramp.formats.kernels.nearest_clamped_` on a numpy float32 array (ggml's bit trick, then the
    clamp; overwrites ``v``, returns a new float32 array). ``np.maximum``/``np.minimum`` in place, with
    int32 bounds, cost a fraction of ``np.clip``'s call overhead on these short vectors."""
    v += np.float32(MAGIC)
    ti = v.view(np.int32)
    ti &= 0x007FFFFF
    ti -= 0x00400000
    np.maximum(ti, lo, out=ti)
    np.minimum(ti, hi, out=ti)
    return ti.astype(np.float32)


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
    that makes no move in a pass is final (C breaks out), the others go on, for at most 5 passes. The
    ``[A]``-vector arithmetic runs in numpy float32 (the same IEEE operations, less call overhead), and the
    few accepted moves are written through index lists. The per-group planes are rows of one array, so a
    compaction is one indexing call, and ``sumlx^2`` is kept (updated with each move) instead of recomputed.
    """
    n = x.shape[1]
    lo, hi = np.int32(-nmax), np.int32(nmax - 1)
    f = np.float32
    cid_n = cid.numpy()
    planes = np.empty((6, n, cid_n.size), dtype=f)  # x, w = x*x, w*x, L, and each position's terms of the sums
    xa, wa, wxa, La, ta, ta2 = planes
    xa[...] = x.numpy()[cid_n].T
    La[...] = L.numpy()[cid_n].T
    np.multiply(xa, xa, out=wa)
    np.multiply(wa, xa, out=wxa)
    np.multiply(wxa, La, out=ta)  # each position's current term of sumlx, (w*x)*l
    np.multiply(wa, La, out=ta2)
    ta2 *= La  # ... and of suml2, (w*l)*l
    sumlx_n, suml2_n, L_n = sumlx.numpy(), suml2.numpy(), L.numpy()
    sx, s2 = sumlx_n[cid_n], suml2_n[cid_n]
    sxx = sx * sx
    ids = cid_n
    start_n = start.numpy()  # first pass: positions before a group's start are not tested again
    live = None  # groups still searching, once the arrays also hold final ones (None: all are searching)
    with np.errstate(all="ignore"):  # C divides by zero and overflows silently too
        for p in range(5):
            changed = moved.numpy() > 0 if p == 0 else np.zeros(ids.size, dtype=bool)
            for i in range(n):
                slx = sx - ta[i]  # the sums without this position's term
                sl2 = s2 - ta2[i]
                v = xa[i] * sl2
                v /= slx
                nl = _nearest_clamped_np(v, lo, hi)  # the level that best fits the others (never NaN)
                t_n = wxa[i] * nl
                slx_n = slx + t_n
                t2_n = wa[i] * nl
                t2_n *= nl
                sl2_n = sl2 + t2_n
                slx2 = slx_n * slx_n
                gain = slx2 * s2
                v = np.multiply(sxx, sl2_n, out=v)
                gain -= v  # > 0  <=>  slx_n^2 * suml2 > sumlx^2 * sl2_n (NaN: false)
                dl = nl - La[i]
                np.abs(dl, out=dl)  # > 0  <=>  the level changes
                m = np.minimum(slx, dl, out=dl)  # C's tests slx > 0, new != old, sl2 > 0 and the gain, as one
                np.minimum(m, sl2_n, out=m)  # minimum
                np.minimum(m, gain, out=m)
                ok = (m > 0).nonzero()[0]
                if ok.size:
                    if p == 0:
                        ok = ok[start_n[ok] <= i]
                    elif live is not None:
                        ok = ok[live[ok]]
                    for dst, val in ((La[i], nl), (ta[i], t_n), (ta2[i], t2_n), (sx, slx_n), (s2, sl2_n), (sxx, slx2)):
                        dst[ok] = val[ok]
                    changed[ok] = True
            # groups without a move in this pass (and all groups after the 5th) are final
            if p == 4:
                fin = np.arange(ids.size) if live is None else live.nonzero()[0]
            else:
                fin = (~changed if live is None else live & ~changed).nonzero()[0]
            gid = ids[fin]
            L_n[gid] = La[:, fin].T.astype(np.int8)
            sumlx_n[gid] = sx[fin]
            suml2_n[gid] = s2[fin]
            keep = changed.nonzero()[0]
            if p == 4 or keep.size == 0:
                return
            if 4 * keep.size > 3 * ids.size:  # most go on: cheaper to skip the final ones than to compact
                live = changed
                continue
            live = None
            ids = ids[keep]
            planes = np.take(planes, keep, axis=2)  # (contiguous rows; planes[:, :, keep] would stride them)
            xa, wa, wxa, La, ta, ta2 = planes
            sx, s2, sxx = sx[keep], s2[keep], sxx[keep]


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
    for a in range(0, S, tile):
        b = min(S, a + tile)
        Lt, sumlx[a:b], suml2[a:b], zero[a:b], cid, start, moved = _q3_start(position_major(x[a:b]), nmax)
        L[a:b] = Lt.to(torch.int8).t()  # (cast first: a transposing float -> int8 copy is ~20x slower)
        cids.append(cid + a)
        starts.append(start)
        moveds.append(moved)
    cid = torch.cat(cids)
    if cid.numel():
        _q3_passes(x, L, sumlx, suml2, cid, torch.cat(starts), torch.cat(moveds), nmax)
    scale = torch.where(suml2 > 0, torch.div(sumlx, suml2), 0.0) + 0.0  # + 0.0: C never returns -0.0 here
    Lu = L.add_(nmax).view(torch.uint8)
    if bool(zero.any()):
        scale = torch.where(zero, 0.0, scale)
        Lu.masked_fill_(zero.unsqueeze(1), 0)
    return scale, Lu


def requantize_(L: torch.Tensor, x: torch.Tensor, d: torch.Tensor, nmax: int) -> torch.Tensor:
    """Second pass of the K-quants: ``L = clamp(nearest_int(x/d), -nmax, nmax-1) + nmax`` where ``d != 0``.

    ``L`` (uint8) and ``x`` are group-major ``[S, n]``; ``d[S]`` is each group's effective scale rebuilt
    from the stored fp16 super-scale and integer sub-scale, as C re-reads them. Groups with ``d == 0``
    keep their levels (C ``continue``s). Updates ``L`` in place and returns it.
    """
    dd = d.unsqueeze(1)
    v = torch.div(x, dd).add_(f32(MAGIC))  # nearest_int's rounding step
    if v.numel() and bool(v.amin() >= _TWO23) and bool(v.amax() < _TWO24):  # (NaN fails both tests)
        # 1.5*2^23 + l + nmax is exact and its low byte is the stored level (an int32 -> uint8 cast is cheap;
        # float -> uint8 is not)
        v.clamp_(MAGIC - nmax, MAGIC + nmax - 1).add_(nmax)
        q = v.view(torch.int32).to(torch.uint8)
    else:
        q = nearest_clamped_(torch.div(x, dd), -nmax, nmax - 1).add_(nmax).to(torch.uint8)  # the exact bit path
    if bool((d == 0).any()):
        return torch.where(dd == 0, L, q, out=L)
    return L.copy_(q)


GroupEncoder = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


def encode_by_tiles(
    xg: torch.Tensor,
    qg: torch.Tensor | None,
    type_size: int,
    encode_tile: Callable[..., torch.Tensor],
    *per_group: torch.Tensor,
) -> torch.Tensor:
    """``encode_tile(xg[a:b], qg[a:b] or None, *(t[a:b] for t in per_group)) -> uint8[(b - a) // 16, type_size]``
    over tiles of ``TILE`` sub-blocks (whole super-blocks) of group-major ``xg[S, 16]``, joined."""
    S = xg.shape[0]
    out = torch.empty(S // 16, type_size, dtype=torch.uint8)
    for a in range(0, S, TILE):
        b = min(S, a + TILE)
        out[a // 16 : b // 16] = encode_tile(xg[a:b], None if qg is None else qg[a:b], *(t[a:b] for t in per_group))
    return out


def symmetric_kquant(
    name: str, type_size: int, encode_groups: GroupEncoder, decode: Callable[[torch.Tensor], torch.Tensor]
) -> QuantFormat:
    """The registry record of a symmetric K-quant: ``encode_groups(xg[S, 16], qg or None) -> uint8[S // 16,
    type_size]`` runs on group-major sub-blocks, in chunks of whole super-blocks (``kernels.chunked_encoder``)."""

    def encode(x: torch.Tensor, qw: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != 256:
            raise FormatError(f"{name} needs blocks of 256 weights, got shape {tuple(x.shape)}")
        rows, nb, _ = x.shape
        xg = x.to(F32).reshape(rows * nb * 16, 16)  # group-major sub-blocks (a view of the input)
        qg = None if qw is None else qw.to(F32).reshape(rows * nb * 16, 16)
        return encode_groups(xg, qg).view(rows, nb, type_size)

    chunked = chunked_encoder(encode, type_size, whole_rows=False)
    return QuantFormat(name, gguf.GGMLQuantizationType[name], 256, type_size, chunked, decode)
