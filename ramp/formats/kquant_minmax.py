"""Shared steps of the asymmetric K-quants (Q2_K, Q4_K, Q5_K): ggml's ``make_qp_quants`` (the weighted
quantization of the sub-block scales and mins), the 6-bit scale/min packing, the final requantization
and the chunked three-pass driver, in torch and bit-exact with ggml's float32 reference.

Groups are held position-major, ``[n, N]`` (see :mod:`ramp.formats.kernels`, which also holds the
sub-block search ``make_qkx_quants`` and the exact float32 helpers used here). Every value is float32 in
the units of the weights (scales and mins are weight units per level).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from ramp.formats.kernels import (
    GROUP_MAX_EPS,
    MAGIC,
    make_qkx_quants,
    nearest_int,
    position_major,
    run_chunks,
    seq_sum,
    sqrtf_,
)

# Weights per chunk of super-blocks: big enough that per-op Python/dispatch overhead is small, small
# enough that the [n, chunk] work tensors stay in cache.
CHUNK = 1 << 18


def _nearest_int_np(v: np.ndarray) -> np.ndarray:
    """:func:`ramp.formats.kernels.nearest_int` on a numpy float32 array (int32 result)."""
    t = v + np.float32(MAGIC)
    return (t.view(np.int32) & 0x007FFFFF) - 0x00400000


def make_qp_quants(x: torch.Tensor, qw: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ggml's ``make_qp_quants`` on ``N`` groups at once: quantize non-negative values to ``[0, nmax]``.

    ``x``: float32 ``[n, N]`` (sub-block scales or mins, weight units); ``qw``: ``[n, N]`` weights.
    Picks the best of nine inverse scales ``(nmax + 0.1 k) / max`` by weighted squared error, then runs
    up to five passes of coordinate descent on single levels, accepting a change only when it raises
    ``sumlx^2 / suml2``. Returns ``(scale[N], L int32[n, N])`` with ``scale = sumlx / suml2`` (0 for an
    all-zero group). ``L`` holds the byte ggml stores (values are taken modulo 256 as a C ``uint8_t``).
    The ``[N]``-vector arithmetic runs in numpy float32 (the same IEEE operations, in C's order, with less
    call overhead); a group whose pass changes nothing is final (C breaks out) and leaves the later passes.
    """
    f = np.float32
    n, N = x.shape
    x = np.ascontiguousarray(x.numpy(), dtype=f)
    qw = np.ascontiguousarray(qw.numpy(), dtype=f)
    with np.errstate(all="ignore"):  # C divides by zero and overflows silently too
        mx = np.zeros(N, dtype=f)
        for i in range(n):
            mx = np.where(mx > x[i], mx, x[i])
        zero_group = mx < f(GROUP_MAX_EPS)

        def wsum(p: np.ndarray) -> np.ndarray:  # float s = 0; for (i...) s += p[i]
            s = np.zeros(N, dtype=f)
            for i in range(n):
                s += p[i]
            return s

        t = np.empty((n, N), dtype=f)  # work planes, reused (fresh pages cost more than the arithmetic)
        ti = t.view(np.int32)
        lv = np.empty((n, N), dtype=f)

        def trial_mse(isc: np.ndarray, clamp: bool) -> np.ndarray:
            # sum_i (w*diff)*diff, diff = x - (1/isc)*l, l = nearest_int(isc*x) (MIN(nmax, l) or as a uint8)
            np.multiply(isc, x, out=t)
            np.add(t, f(MAGIC), out=t)
            np.bitwise_and(ti, 0x007FFFFF, out=ti)
            np.subtract(ti, 0x00400000, out=ti)
            if clamp:
                np.minimum(ti, nmax, out=ti)
            else:
                np.bitwise_and(ti, 0xFF, out=ti)
            np.copyto(lv, ti, casting="unsafe")
            np.multiply(f(1.0) / isc, lv, out=lv)
            np.subtract(x, lv, out=lv)
            np.multiply(qw, lv, out=t)
            np.multiply(t, lv, out=t)
            return wsum(t)

        iscale = f(nmax) / mx
        best = trial_mse(iscale, clamp=False)
        for k in (-4, -3, -2, -1, 1, 2, 3, 4):
            isc = (f(0.1) * f(k) + f(nmax)) / mx
            mse = trial_mse(isc, clamp=True)
            better = mse < best
            best = np.where(better, mse, best)
            iscale = np.where(better, isc, iscale)

        li = np.minimum(_nearest_int_np(iscale * x), nmax)
        lf = li.astype(f)
        wx = qw * x
        sumlx = wsum(wx * lf)
        suml2 = wsum(qw * lf * lf)
        Lb = li & 0xFF  # stored bytes
        act = np.arange(N)  # groups whose last pass moved a level
        for _ in range(5):
            xa, wa, wxa, Lba = x[:, act], qw[:, act], wx[:, act], Lb[:, act]
            Lfa = Lba.astype(f)
            sx, s2 = sumlx[act], suml2[act]
            changed = np.zeros(act.size, dtype=bool)
            for i in range(n):
                li_f = Lfa[i]
                slx = sx - wxa[i] * li_f
                sl2 = s2 - wa[i] * li_f * li_f
                ok = (slx > 0) & (sl2 > 0)
                new_l = np.minimum(_nearest_int_np(xa[i] * sl2 / slx), nmax)
                new_f = new_l.astype(f)
                ok &= new_l != Lba[i]
                slx = slx + wxa[i] * new_f
                sl2 = sl2 + wa[i] * new_f * new_f
                ok &= slx * slx * s2 > sx * sx * sl2
                nb = new_l & 0xFF
                np.copyto(Lba[i], nb, where=ok)
                np.copyto(Lfa[i], nb.astype(f), where=ok)
                np.copyto(sx, slx, where=ok)
                np.copyto(s2, sl2, where=ok)
                changed |= ok
            Lb[:, act] = Lba
            sumlx[act] = sx
            suml2[act] = s2
            act = act[changed]
            if act.size == 0:
                break
        scale = np.where(suml2 > 0, sumlx / suml2, f(0))
    scale[zero_group] = 0
    Lb[:, zero_group] = 0
    return torch.from_numpy(scale), torch.from_numpy(Lb)


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
    """Chunked encoder shared by Q2_K/Q4_K/Q5_K: weights ``x`` (and imatrix weights ``qw``, or None)
    ``float32[rows, nb, 256]`` -> ``uint8[rows, nb, type_size]``.

    Without an imatrix, ``ref_encode(x_chunk)`` does a whole chunk of super-blocks. With one it runs in three
    passes so that the short per-super-block step (``make_qp_quants`` on the ``nsub`` scales and mins) works
    on large batches: ``im_search(x, qw) -> (scales, mins, sw [S, nsub], L uint8[S, 256])`` per chunk, then
    ``make_qp_quants`` for scales and mins together, then ``im_finish(x, L, d, dmin, ls, lm)`` per chunk.
    """
    rows, nb, _ = x.shape
    x = x.reshape(rows * nb, -1).contiguous()
    qw = None if qw is None else qw.reshape(rows * nb, -1).contiguous()
    M = x.shape[0]
    S = max(1, CHUNK // x.shape[1])
    out = torch.empty((M, type_size), dtype=torch.uint8)
    if qw is None:

        def ref_job(a: int, b: int) -> None:
            out[a:b] = ref_encode(x[a:b])

        run_chunks(ref_job, M, S)
        return out.view(rows, nb, type_size)
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
    return out.view(rows, nb, type_size)


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
    lv = nearest_int((x + dm.unsqueeze(-1)) / dd).clamp_(0, nmax)
    return torch.where(dd != 0, lv, L.to(torch.int32))


def to_position_major(x: torch.Tensor, sub: int) -> torch.Tensor:
    """``[..., 256]`` super-blocks -> ``[sub, N]``: the N sub-blocks of ``sub`` weights, as columns."""
    return position_major(x.reshape(-1, sub))


def from_position_major(L: torch.Tensor, M: int, nsub: int) -> torch.Tensor:
    """Inverse of :func:`to_position_major`: ``[sub, M * nsub]`` -> ``[M, nsub, sub]``."""
    sub = L.shape[0]
    return L.t().reshape(M, nsub, sub)


def imatrix_search(
    x: torch.Tensor, qw: torch.Tensor, sub: int, nmax: int, sigma2_factor: float
) -> tuple[torch.Tensor, ...]:
    """Sub-block search of ``quantize_row_q{2,4,5}_K_impl`` on ``[S, 256]`` weights and imatrix weights.

    Importances ``qw * sqrtf(sigma2 + x^2)``, ``sigma2 = sigma2_factor * sum(x^2) / 256`` over the
    super-block (ggml: 1 for Q2_K, 2 for Q4_K/Q5_K), then ``make_qkx3_quants`` (-0.9, 0.05, 36 steps) per
    sub-block of ``sub`` weights. Returns ``(scales, mins, sw)`` as ``[S, 256 // sub]`` (``mins`` is ggml's
    ``the_min >= 0``, ``sw`` the sub-block's importance sum) and the levels ``uint8[S, 256]``.
    """
    S, n = x.shape
    nsub = n // sub
    xt = to_position_major(x, sub)
    xT = x.t()
    sigma2 = seq_sum(xT * xT) * sigma2_factor / 256.0
    w = sqrtf_((xt * xt).add_(sigma2.repeat_interleave(nsub))).mul_(to_position_major(qw, sub))
    sw = seq_sum(w)
    scales, m, L = make_qkx_quants(xt, w, nmax, -0.9, 0.05, 36, use_mad=False)
    return scales.view(S, nsub), (-m).view(S, nsub), sw.view(S, nsub), from_position_major(L, S, nsub).reshape(S, n)
