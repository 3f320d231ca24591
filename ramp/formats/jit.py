"""Compiled encoders (numba) for the K-quants and the legacy 32-weight formats, byte-identical to ggml.

Each encoder re-expresses ggml's C quantizer (``quantize_row_*_ref`` without an imatrix,
``quantize_row_*_impl`` with one) in exact float32 arithmetic:

- every constant is a ``np.float32`` (a Python float would promote the expression to float64 and round
  differently), every int that meets a float is converted to float32 first, as C converts it;
- each expression keeps C's grouping (``w*x*l`` is ``(w*x)*l``) and each sum adds its terms in C's order;
  there are no fast-math flags, so LLVM neither fuses a multiply-add nor reorders a sum;
- division and ``np.sqrt`` round once (IEEE), ``nearest_int`` is ggml's 1.5*2^23 trick read from the
  float32 bits, float -> int8 conversions behave as x86's truncating conversion, and the fp16 fields get
  ggml's conversions (its bit-level algorithm, or F16C's instruction, which gives the same bits).

Speed comes from lanes: the groups that run the same search (the sub-blocks of a super-block, or
neighbouring 32-weight blocks) are held position-major, ``X[n, G]`` (``X[i, g]`` = value ``i`` of group
``g``), and every loop runs over positions outside and groups inside. Each group keeps its own
accumulators, filled in C's order, so the bytes are unchanged while the inner loop over groups is
vectorised by LLVM. Blocks are independent: :func:`encode_blocks` runs chunks of them on the worker threads
of :func:`kernels.run_chunks` (as many as ``torch.get_num_threads()``; the compiled spans release the GIL),
and the bytes do not depend on the thread count or the chunking. (numba's own ``parallel=True`` loops were
3-4x slower than one thread on cores shared with another process: an OpenMP region ends in a spinning
barrier, the problem ``run_chunks`` exists to avoid.)

Inputs are float32 weights ``x[blocks, block_size]`` (finite: ``QuantFormat.quantize`` refuses others)
and, for the imatrix paths, per-weight importances of the same shape; outputs are the GGUF block bytes
``uint8[blocks, type_size]``, written in place. The byte layouts are documented beside each format's
record (``q2_k.py``, ``q3_k.py``, ``q4_k.py``, ``q6_k.py``, ``legacy.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from ramp.formats import kernels

_JIT = {"cache": True, "nogil": True, "error_model": "numpy"}  # numpy error model: x/0 is inf/NaN, as in C

F = np.float32
_ZERO, _ONE, _HALF, _TENTH = F(0.0), F(1.0), F(0.5), F(0.1)
_EPS = F(1e-15)  # GROUP_MAX_EPS: a group whose largest |x| is below this is all zero
_MAGIC = F(12582912.0)  # 1.5 * 2^23
_TWO31 = F(2147483648.0)
_TO_INF, _TO_ZERO, _FROM_HALF = F(2.0**112), F(2.0**-110), F(2.0**-112)
_QX_STEPS = np.array([0, -9, -8, -7, -6, -5, -4, -3, -2, -1, 1, 2, 3, 4, 5, 6, 7, 8, 9], dtype=np.float32)
_QP_STEPS = np.array([-4, -3, -2, -1, 1, 2, 3, 4], dtype=np.float32)
_HAS_F16C = "f16c" in {f[1:] for f in llvm.get_host_cpu_features().flatten().split(",") if f.startswith("+")}


# ---- bits, rounding, fp16 ---------------------------------------------------------------------------------


@intrinsic
def _f32_bits(typingctx, v):  # noqa: ARG001
    """The IEEE bits of a float32, as int32 (C's memcpy into an int)."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _bits_f32(typingctx, b):  # noqa: ARG001
    """The float32 whose IEEE bits are the int32 ``b``."""
    if b != types.int32:
        return None

    def codegen(context, builder, sig, args):  # noqa: ARG001
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@njit(**_JIT)
def nearest_int(v):
    """ggml's ``nearest_int`` on a float32: add 1.5*2^23, read the low mantissa bits (also out of range)."""
    return (_f32_bits(v + _MAGIC) & 0x007FFFFF) - 0x00400000


@intrinsic
def _level(typingctx, v, lo, hi):  # noqa: ARG001
    """``float(MAX(lo, MIN(hi, nearest_int(v))))`` for a float32 ``v`` and int bounds, all in 32-bit lanes
    (numba's own integer typing would widen the vectorised clamp to 64 bits)."""
    if v != types.float32 or not isinstance(lo, types.Integer) or not isinstance(hi, types.Integer):
        return None

    def codegen(context, builder, sig, args):  # noqa: ARG001
        i32 = ir.IntType(32)
        t = builder.fadd(args[0], ir.Constant(ir.FloatType(), float(_MAGIC)))
        q = builder.sub(
            builder.and_(builder.bitcast(t, i32), ir.Constant(i32, 0x007FFFFF)), ir.Constant(i32, 0x00400000)
        )
        bottom, top = (
            b if b.type.width == 32 else builder.trunc(b, i32) if b.type.width > 32 else builder.sext(b, i32)
            for b in args[1:]
        )
        q = builder.select(builder.icmp_signed(">", q, top), top, q)
        q = builder.select(builder.icmp_signed("<", q, bottom), bottom, q)
        return builder.sitofp(q, ir.FloatType())

    return types.float32(v, lo, hi), codegen


@njit(**_JIT)
def _trunc_int(v):
    """C's float -> int conversion as x86 does it (truncation; NaN and out-of-range values give INT_MIN)."""
    t = np.int64(v)  # (LLVM's conversion is undefined out of range; that result is never selected)
    return t if (v > -_TWO31) & (v < _TWO31) else -2147483648


@njit(**_JIT)
def _as_int8(q):
    """The low byte of an int, read as a C ``int8_t``."""
    return ((q & 0xFF) ^ 0x80) - 0x80


@intrinsic
def _half_bits(typingctx, v):  # noqa: ARG001
    """IEEE round-to-nearest-even float32 -> half (F16C's ``vcvtps2ph``), as int32 bits."""
    if v != types.float32:
        return None

    def codegen(context, builder, sig, args):  # noqa: ARG001
        h = builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))
        return builder.zext(h, ir.IntType(32))

    return types.int32(types.float32), codegen


@intrinsic
def _half_value(typingctx, b):  # noqa: ARG001
    """IEEE half bits (low 16 of an int32) -> float32 (exact)."""
    if b != types.int32:
        return None

    def codegen(context, builder, sig, args):  # noqa: ARG001
        return builder.fpext(builder.bitcast(builder.trunc(args[0], ir.IntType(16)), ir.HalfType()), ir.FloatType())

    return types.float32(types.int32), codegen


@njit(**_JIT)
def fp16_bits_soft(f):
    """float32 -> IEEE half bits (0..65535), ggml's bit-level ``ggml_compute_fp32_to_fp16``: nearest even,
    overflow to inf, every NaN to ``0x7E00`` with its sign."""
    base = (abs(f) * _TO_INF) * _TO_ZERO
    w = np.int64(_f32_bits(f)) & 0xFFFFFFFF
    shl1 = (w + w) & 0xFFFFFFFF
    sign = w & 0x80000000
    bias = shl1 & 0xFF000000
    if bias < 0x71000000:
        bias = 0x71000000
    base = _bits_f32(np.int32((bias >> 1) + 0x07800000)) + base
    b = np.int64(_f32_bits(base)) & 0xFFFFFFFF
    nonsign = ((b >> 13) & 0x7C00) + (b & 0x0FFF)
    return ((sign >> 16) | (0x7E00 if shl1 > 0xFF000000 else nonsign)) & 0xFFFF


@njit(**_JIT)
def fp16_value_soft(h):
    """IEEE half bits -> float32, ggml's bit-level ``ggml_compute_fp16_to_fp32`` (exact)."""
    w = np.int64(h) << 16
    sign = w & 0x80000000
    two_w = (w + w) & 0xFFFFFFFF
    normal = _bits_f32(np.int32((two_w >> 4) + 0x70000000)) * _FROM_HALF
    subnormal = _bits_f32(np.int32((two_w >> 17) | 0x3F000000)) - _HALF
    r = _f32_bits(subnormal) if two_w < 0x08000000 else _f32_bits(normal)
    return _bits_f32(np.int32(sign | (np.int64(r) & 0xFFFFFFFF)))


@njit(**_JIT)
def fp16_bits(f):
    """:func:`fp16_bits_soft`, by F16C's conversion where the CPU has it (the same bits for every non-NaN
    float; a NaN still becomes ``0x7E00`` with its sign)."""
    if _HAS_F16C:
        h = np.int64(_half_bits(f))
        return h if f == f else 0x7E00 | ((np.int64(_f32_bits(f)) >> 16) & 0x8000)
    return fp16_bits_soft(f)


@njit(**_JIT)
def fp16_value(h):
    """:func:`fp16_value_soft`, by F16C's conversion where the CPU has it (the same bits for all 65536)."""
    if _HAS_F16C:
        return _half_value(np.int32(h))
    return fp16_value_soft(h)


@njit(**_JIT)
def _put_fp16(o, at, v):
    """Store float32 ``v`` as a little-endian fp16 at bytes ``at, at+1`` of ``o``; returns the stored value."""
    h = fp16_bits(v)
    o[at] = h & 0xFF
    o[at + 1] = h >> 8
    return fp16_value(h)


# ---- the searches, on lanes ---------------------------------------------------------------------------------


@njit(**_JIT)
def _signed_absmax(X, amax, mx):
    """Per lane: ``amax`` = largest |x| and ``mx`` = its signed value, first occurrence (C's ``>`` scan from 0)."""
    n, G = X.shape
    for g in range(G):
        amax[g] = _ZERO
        mx[g] = _ZERO
    for i in range(n):
        for g in range(G):
            v = X[i, g]
            av = abs(v)
            big = av > amax[g]
            amax[g] = av if big else amax[g]
            mx[g] = v if big else mx[g]


@njit(**_JIT)
def make_qx_quants(X, W, nmax, L, scale, S, T):
    """ggml's ``make_qx_quants(n, nmax, x, L, rmse_type=1, w)`` on every lane of ``X[n, G]``, weights ``W``.

    Tries the inverse scales ``-nmax / max`` and ``-(nmax + 0.1 k) / max`` (k = -9..9, k != 0) in C's
    order, keeping a later one only when it strictly improves ``sumlx^2 / suml2``. Writes ``scale[G]`` and
    the levels ``L[n, G]`` (float, in ``[0, 2*nmax)``; value = scale * (L - nmax)); an all-zero lane gets 0
    and L = 0. ``S[8, G]`` and ``T[n, G]`` are scratch.
    """
    n, G = X.shape
    amax, mx, isc, lx, l2, best, bisc = S[0], S[1], S[2], S[3], S[4], S[5], S[6]
    _signed_absmax(X, amax, mx)
    for i in range(n):
        for g in range(G):
            T[i, g] = W[i, g] * X[i, g]
    fn = F(nmax)
    for t in range(_QX_STEPS.size):
        num = -(fn + _TENTH * _QX_STEPS[t])
        for g in range(G):
            isc[g] = num / mx[g]
            lx[g] = _ZERO
            l2[g] = _ZERO
        for i in range(n):
            for g in range(G):
                q = _level(isc[g] * X[i, g], -nmax, nmax - 1)
                lx[g] += T[i, g] * q
                l2[g] += (W[i, g] * q) * q
        if t == 0:
            for g in range(G):
                s = lx[g] / l2[g] if l2[g] != _ZERO else _ZERO
                scale[g] = s
                best[g] = s * lx[g]
                bisc[g] = isc[g]
        else:
            for g in range(G):
                take = l2[g] > _ZERO and lx[g] * lx[g] > best[g] * l2[g]
                s = lx[g] / l2[g]
                scale[g] = s if take else scale[g]
                best[g] = s * lx[g] if take else best[g]
                bisc[g] = isc[g] if take else bisc[g]
    for i in range(n):
        for g in range(G):
            L[i, g] = _level(bisc[g] * X[i, g], -nmax, nmax - 1) + fn
    for g in range(G):
        if amax[g] < _EPS:
            scale[g] = _ZERO
            for i in range(n):
                L[i, g] = _ZERO


@njit(**_JIT)
def make_q3_quants(X, nmax, L, scale, S):
    """ggml's ``make_q3_quants(n, nmax, x, L, do_rmse=true)`` on every lane of ``X[n, G]``.

    Levels start at ``nearest_int(-nmax/max * x)``; then up to five passes over the positions, in order,
    move one level at a time to the value that best fits the others when that strictly improves the
    weighted (``x^2``) fit; a lane whose pass moves nothing is final (C breaks out). Writes ``scale[G]``
    and ``L[n, G]`` (float levels in ``[0, 2*nmax)``); an all-zero lane gets 0 and L = 0.
    """
    n, G = X.shape
    amax, mx, isc, sx, s2, last = S[0], S[1], S[2], S[3], S[4], S[5]
    _signed_absmax(X, amax, mx)
    fn = F(nmax)
    for g in range(G):
        isc[g] = -fn / mx[g]
        sx[g] = _ZERO
        s2[g] = _ZERO
        last[g] = _ZERO  # a lane searches in pass p while last >= p: it moved in pass p - 1 (or moves now)
    for i in range(n):
        for g in range(G):
            x = X[i, g]
            q = _level(isc[g] * x, -nmax, nmax - 1)
            L[i, g] = q
            w = x * x
            sx[g] += (w * x) * q
            s2[g] += (w * q) * q
    for p in range(5):
        fp = F(p)
        for i in range(n):
            for g in range(G):
                x = X[i, g]
                w = x * x
                old = L[i, g]
                slx = sx[g] - (w * x) * old
                sl2 = s2[g] - (w * old) * old
                new = _level((x * sl2) / slx, -nmax, nmax - 1)
                slx_n = slx + (w * x) * new
                sl2_n = sl2 + (w * new) * new
                take = (
                    (last[g] >= fp)
                    & (slx > _ZERO)
                    & (new != old)
                    & (sl2_n > _ZERO)
                    & ((slx_n * slx_n) * s2[g] > (sx[g] * sx[g]) * sl2_n)
                )
                L[i, g] = new if take else old
                sx[g] = slx_n if take else sx[g]
                s2[g] = sl2_n if take else s2[g]
                last[g] = fp + _ONE if take else last[g]
        anyone = False
        for g in range(G):
            anyone = anyone or last[g] > fp
        if not anyone:
            break
    for g in range(G):
        zero = amax[g] < _EPS
        scale[g] = _ZERO if zero or not s2[g] > _ZERO else sx[g] / s2[g]
        for i in range(n):
            L[i, g] = _ZERO if zero else L[i, g] + fn


@njit(**_JIT)
def make_qkx_quants(X, W, nmax, rmin, rdelta, nstep, use_mad, L, Laux, scale, the_min, S):
    """ggml's ``make_qkx2_quants`` / ``make_qkx3_quants`` (explicit weights) on every lane of ``X[n, G]``.

    Per lane a scale ``s >= 0`` and a minimum ``m <= 0`` with ``x ~ s * L + m``, ``L in [0, nmax]``: first
    from the lane's range, then ``nstep + 1`` trial inverse scales ``(rmin + rdelta*k + nmax) / (max - m)``
    (``m`` the best minimum so far) with a weighted least-squares refit each, kept when the weighted error
    (squared, or absolute with ``use_mad``) is strictly smaller. Writes ``scale[G]``, ggml's
    ``the_min[G] = -m`` and ``L[n, G]`` (float levels); a flat lane (max == min after ``min <= 0``; for
    finite weights qkx2's and qkx3's tests agree) gets scale 0 and L = 0. ``Laux`` and ``S[16, G]`` are
    scratch.
    """
    n, G = X.shape
    mn, mx, sw, sx, isc, best = S[0], S[1], S[2], S[3], S[4], S[5]
    sl, sl2, sxl, err, ts, tm, take, flat = S[6], S[7], S[8], S[9], S[10], S[11], S[12], S[13]
    for g in range(G):
        x = X[0, g]
        w = W[0, g]
        mn[g] = x
        mx[g] = x
        sw[g] = w
        sx[g] = w * x
    for i in range(1, n):
        for g in range(G):
            x = X[i, g]
            w = W[i, g]
            mn[g] = x if x < mn[g] else mn[g]
            mx[g] = x if x > mx[g] else mx[g]
            sw[g] += w
            sx[g] += w * x
    fn = F(nmax)
    for g in range(G):
        mn[g] = _ZERO if mn[g] > _ZERO else mn[g]
        flat[g] = _ONE if mx[g] == mn[g] else _ZERO
        isc[g] = fn / (mx[g] - mn[g])
        scale[g] = _ONE / isc[g]
        best[g] = _ZERO
    for i in range(n):
        for g in range(G):
            x = X[i, g]
            q = _level(isc[g] * (x - mn[g]), 0, nmax)
            L[i, g] = q
            diff = (scale[g] * q + mn[g]) - x
            diff = abs(diff) if use_mad else diff * diff
            best[g] += W[i, g] * diff
    for step in range(nstep + 1):
        num = (rmin + rdelta * F(step)) + fn
        for g in range(G):
            isc[g] = num / (mx[g] - mn[g])
            sl[g] = _ZERO
            sl2[g] = _ZERO
            sxl[g] = _ZERO
        for i in range(n):
            for g in range(G):
                x = X[i, g]
                q = _level(isc[g] * (x - mn[g]), 0, nmax)
                Laux[i, g] = q
                wl = W[i, g] * q
                sl[g] += wl
                sl2[g] += wl * q
                sxl[g] += wl * x
        for g in range(G):
            D = sw[g] * sl2[g] - sl[g] * sl[g]
            s = (sw[g] * sxl[g] - sx[g] * sl[g]) / D
            m = (sl2[g] * sx[g] - sl[g] * sxl[g]) / D
            pos = m > _ZERO
            ts[g] = sxl[g] / sl2[g] if pos else s
            tm[g] = _ZERO if pos else m
            take[g] = _ONE if D > _ZERO and flat[g] == _ZERO else _ZERO
            err[g] = _ZERO
        for i in range(n):
            for g in range(G):
                diff = (ts[g] * Laux[i, g] + tm[g]) - X[i, g]
                diff = abs(diff) if use_mad else diff * diff
                err[g] += W[i, g] * diff
        for g in range(G):
            ok = take[g] > _ZERO and err[g] < best[g]
            take[g] = _ONE if ok else _ZERO
            best[g] = err[g] if ok else best[g]
            scale[g] = ts[g] if ok else scale[g]
            mn[g] = tm[g] if ok else mn[g]
        for i in range(n):
            for g in range(G):
                L[i, g] = Laux[i, g] if take[g] > _ZERO else L[i, g]
    for g in range(G):
        the_min[g] = -mn[g]
        if flat[g] > _ZERO:
            scale[g] = _ZERO
            for i in range(n):
                L[i, g] = _ZERO


@njit(**_JIT)
def make_qp_quants(x, w, nmax, L):
    """ggml's ``make_qp_quants``: quantize the non-negative ``x[n]`` (sub-block scales or mins) to
    ``[0, nmax]`` with weights ``w``; writes ``L[n]`` (the bytes C stores, a ``uint8_t`` each) and returns
    the scale (0 for an all-zero group)."""
    n = x.shape[0]
    mx = _ZERO
    for i in range(n):
        mx = mx if mx > x[i] else x[i]
    if mx < _EPS:
        for i in range(n):
            L[i] = 0
        return _ZERO
    fn = F(nmax)
    iscale = fn / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = _ONE / iscale
    best = _ZERO
    for i in range(n):
        diff = x[i] - scale * F(L[i])
        best += (w[i] * diff) * diff
    for k in range(_QP_STEPS.size):
        isc = (_TENTH * _QP_STEPS[k] + fn) / mx
        sc = _ONE / isc
        mse = _ZERO
        for i in range(n):
            q = min(nmax, nearest_int(isc * x[i]))
            diff = x[i] - sc * F(q)
            mse += (w[i] * diff) * diff
        if mse < best:
            best = mse
            iscale = isc
    sumlx = _ZERO
    suml2 = _ZERO
    for i in range(n):
        q = min(nmax, nearest_int(iscale * x[i]))
        L[i] = q & 0xFF
        sumlx += (w[i] * x[i]) * F(q)
        suml2 += (w[i] * F(q)) * F(q)
    for _ in range(5):
        changed = False
        for i in range(n):
            wi = w[i]
            old = F(L[i])
            slx = sumlx - (wi * x[i]) * old
            sl2 = suml2 - (wi * old) * old
            if slx > _ZERO and sl2 > _ZERO:
                q = min(nmax, nearest_int((x[i] * sl2) / slx))
                if q != L[i]:
                    slx += (wi * x[i]) * F(q)
                    sl2 += (wi * F(q)) * F(q)
                    if (slx * slx) * suml2 > (sumlx * sumlx) * sl2:
                        L[i] = q & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        changed = True
        if not changed:
            break
    return sumlx / suml2 if suml2 > _ZERO else _ZERO


# ---- layout helpers -----------------------------------------------------------------------------------------


@njit(**_JIT)
def _to_lanes(x, n, X):
    """``x[n*G]`` -> ``X[n, G]``: group ``g`` is the run ``x[n*g : n*g + n]``."""
    G = X.shape[1]
    for g in range(G):
        for i in range(n):
            X[i, g] = x[n * g + i]


@njit(**_JIT)
def _from_lanes(X, out):
    """Inverse of :func:`_to_lanes` into int levels ``out[n*G]``."""
    n, G = X.shape
    for g in range(G):
        for i in range(n):
            out[n * g + i] = np.int64(X[i, g])


@njit(**_JIT)
def _pack_block32(q, out, blk, head, five_bit):
    """Codes ``q[32]`` -> nibbles (and the uint32 of fifth bits) of ``out[blk]``, after ``head`` bytes of fp16
    fields."""
    if five_bit:
        for k in range(4):  # byte k of the little-endian uint32: bit 4 of codes 8k .. 8k + 7
            hb = 0
            for t in range(8):
                hb |= ((q[8 * k + t] >> 4) & 1) << t
            out[blk, head + k] = hb
        head += 4
        for j in range(16):
            out[blk, head + j] = (q[j] & 0x0F) | ((q[j + 16] & 0x0F) << 4)
    else:
        for j in range(16):
            out[blk, head + j] = (q[j] | (q[j + 16] << 4)) & 0xFF


# Per-block helpers index the parent arrays (``x[blk, j]``) rather than taking a view of the block: a call with
# a view argument costs two atomic reference-count updates per block, more than the block's arithmetic.


@njit(**_JIT)
def _order_key(v):
    """An int32 whose order is the float order of a non-NaN float32 (``-0.0`` sorts just below ``+0.0``);
    :func:`_key_value` inverts it."""
    b = _f32_bits(v)
    return np.int32(b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF)))


@njit(**_JIT)
def _key_value(k):
    return _bits_f32(np.int32(k ^ ((k >> np.int32(31)) & np.int32(0x7FFFFFFF))))


@njit(**_JIT)
def _block_range(x, blk):
    """The smallest and largest value of a finite block ``x[blk]``, from order keys: an integer reduction that
    LLVM vectorises (C's chain of float compares, unrolled, runs one value at a time)."""
    lo = np.int32(2147483647)
    hi = np.int32(-2147483648)
    for j in range(x.shape[1]):
        k = _order_key(x[blk, j])
        lo = k if k < lo else lo
        hi = k if k > hi else hi
    return _key_value(lo), _key_value(hi)


@njit(**_JIT)
def _first_zero(x, blk):
    """The first zero of block ``x[blk]`` (C keeps the first of equal values and -0 == +0: its sign is the one
    C's compare chain ends with)."""
    for j in range(x.shape[1]):
        if x[blk, j] == _ZERO:
            return x[blk, j]
    return _ZERO


@njit(**_JIT)
def _first_of_abs(x, blk, a):
    """The first value of block ``x[blk]`` with ``|v| == a``."""
    for j in range(x.shape[1]):
        if abs(x[blk, j]) == a:
            return x[blk, j]
    return a


@njit(**_JIT)
def _put_qh(o, blk, at, qh):
    for k in range(4):
        o[blk, at + k] = (qh >> (8 * k)) & 0xFF


@njit(**_JIT)
def _codes_q4_0(x, blk, inv, o):
    for j in range(16):  # codes j and j + 16 share a byte: MIN(15, (int8_t)(x * id + 8.5f))
        c0 = _as_int8(_trunc_int(x[blk, j] * inv + F(8.5)))
        c1 = _as_int8(_trunc_int(x[blk, j + 16] * inv + F(8.5)))
        o[blk, 2 + j] = (((15 if c0 > 15 else c0) & 0xFF) | ((15 if c1 > 15 else c1) << 4)) & 0xFF


@njit(**_JIT)
def _codes_q5_0(x, blk, inv, o):
    qh = 0
    for j in range(16):  # MIN(31, (int8_t)(x * id + 16.5f)); the fifth bits go to qh
        c0 = _as_int8(_trunc_int(x[blk, j] * inv + F(16.5)))
        c1 = _as_int8(_trunc_int(x[blk, j + 16] * inv + F(16.5)))
        c0 = (31 if c0 > 31 else c0) & 0xFF
        c1 = (31 if c1 > 31 else c1) & 0xFF
        o[blk, 6 + j] = (c0 & 0x0F) | ((c1 & 0x0F) << 4)
        qh |= (((c0 >> 4) & 1) << j) | (((c1 >> 4) & 1) << (j + 16))
    _put_qh(o, blk, 2, qh)


@njit(**_JIT)
def _codes_q4_1(x, blk, mn, inv, o):
    for j in range(16):  # MIN(15, (int8_t)((x - min) * id + 0.5f))
        c0 = _as_int8(_trunc_int((x[blk, j] - mn) * inv + _HALF))
        c1 = _as_int8(_trunc_int((x[blk, j + 16] - mn) * inv + _HALF))
        o[blk, 4 + j] = (((15 if c0 > 15 else c0) & 0xFF) | ((15 if c1 > 15 else c1) << 4)) & 0xFF


@njit(**_JIT)
def _codes_q5_1(x, blk, mn, inv, o):
    qh = 0
    for j in range(16):  # (uint8_t)((x - min) * id + 0.5f), no clamp
        c0 = _trunc_int((x[blk, j] - mn) * inv + _HALF) & 0xFF
        c1 = _trunc_int((x[blk, j + 16] - mn) * inv + _HALF) & 0xFF
        o[blk, 8 + j] = (c0 & 0x0F) | ((c1 & 0x0F) << 4)
        qh |= (((c0 >> 4) & 1) << j) | (((c1 >> 4) & 1) << (j + 16))
    _put_qh(o, blk, 4, qh)


@njit(**_JIT)
def _put_fp16_at(o, blk, at, v):
    """:func:`_put_fp16` into row ``blk`` of ``o``."""
    h = fp16_bits(v)
    o[blk, at] = h & 0xFF
    o[blk, at + 1] = h >> 8


@njit(**_JIT)
def legacy_ref_span(x, qw, out, a, b, bits, has_min):  # noqa: ARG001 (no imatrix)
    """``quantize_row_q{4,5}_{0,1}_ref`` on blocks ``[a, b)`` of finite ``x[blocks, 32]``. ``_0``: d = max / -2^(bits-1)
    with ``max`` the signed value of the first largest |x|; ``_1``: d = (max - min) / (2^bits - 1), m = min; codes
    truncated.

    C finds the extremes with chains of float compares; here one vectorised pass finds ``min`` and ``max`` and
    decides without a data-dependent branch. Only ties need C's scan (kept in this loop's body: a helper holding
    the rare call costs more than the block): a zero extreme takes the sign of the block's first zero, and +a
    beside -a gives the first of them.
    """
    for blk in range(a, b):
        mn, mx = _block_range(x, blk)
        if has_min:
            if mn == _ZERO:
                mn = _first_zero(x, blk)
            if mx == _ZERO:
                mx = _first_zero(x, blk)
            d = (mx - mn) / F((1 << bits) - 1)
            inv = _ONE / d if d != _ZERO else _ZERO
            _put_fp16_at(out, blk, 0, d)
            _put_fp16_at(out, blk, 2, mn)
            if bits == 4:
                _codes_q4_1(x, blk, mn, inv, out)
            else:
                _codes_q5_1(x, blk, mn, inv, out)
        else:
            top = mx if mx > -mn else mn
            if mx == -mn:  # +a and -a (or an all-zero block, where C keeps max = +0)
                top = _ZERO if mx == _ZERO else _first_of_abs(x, blk, mx)
            d = top / F(-(1 << (bits - 1)))
            inv = _ONE / d if d != _ZERO else _ZERO
            _put_fp16_at(out, blk, 0, d)
            if bits == 4:
                _codes_q4_0(x, blk, inv, out)
            else:
                _codes_q5_0(x, blk, inv, out)


@njit(**_JIT)
def legacy_imatrix_rows(x, qw, out, r0, r1, nb, bits, has_min):
    """``quantize_row_q{4,5}_{0,1}_impl`` on rows ``[r0, r1)`` of ``nb`` blocks each: importances
    ``qw * sqrtf(sigma2 + x^2)`` with ``sigma2`` the row's mean square (summed in order), then
    make_qx_quants (``_0``) or make_qkx3_quants (-0.9, 0.05, 36 steps; ``_1``), on lanes of 32 blocks (a
    tile may span rows: each block is weighed with its own row's ``sigma2``)."""
    G = 32
    X = np.zeros((32, G), dtype=np.float32)  # (zeros: a part-filled last tile leaves lanes unused)
    W = np.zeros((32, G), dtype=np.float32)
    L = np.empty((32, G), dtype=np.float32)
    Laux = np.empty((32, G), dtype=np.float32)
    T = np.empty((32, G), dtype=np.float32)
    S = np.empty((16, G), dtype=np.float32)
    scale = np.empty(G, dtype=np.float32)
    the_min = np.empty(G, dtype=np.float32)
    q = np.empty(32, dtype=np.int64)
    sigma2 = np.empty(r1 - r0, dtype=np.float32)
    nmax = (1 << bits) - 1 if has_min else 1 << (bits - 1)
    for r in range(r0, r1):
        sum_x2 = _ZERO
        for blk in range(r * nb, r * nb + nb):
            for i in range(32):
                sum_x2 += x[blk, i] * x[blk, i]
        sigma2[r - r0] = sum_x2 / F(nb * 32)
    for t0 in range(r0 * nb, r1 * nb, G):
        cnt = min(G, r1 * nb - t0)
        for g in range(cnt):
            s2 = sigma2[(t0 + g) // nb - r0]
            for i in range(32):
                v = x[t0 + g, i]
                X[i, g] = v
                W[i, g] = qw[t0 + g, i] * np.sqrt(s2 + v * v)
        if has_min:
            make_qkx_quants(X, W, nmax, F(-0.9), F(0.05), 36, False, L, Laux, scale, the_min, S)
        else:
            make_qx_quants(X, W, nmax, L, scale, S, T)
        for g in range(cnt):
            _put_fp16_at(out, t0 + g, 0, scale[g])
            if has_min:
                _put_fp16_at(out, t0 + g, 2, -the_min[g])
            for i in range(32):
                q[i] = np.int64(L[i, g])
            _pack_block32(q, out, t0 + g, 4 if has_min else 2, bits == 5)


# ---- Q2_K, Q4_K, Q5_K: super-blocks of sub-blocks with a scale and a minimum -----------------------------------


@njit(**_JIT)
def _sumsq(x, a, b):
    s = _ZERO
    for j in range(a, b):
        s += x[j] * x[j]
    return s


@njit(**_JIT)
def _imatrix_weights(xb, qwb, sigma2, sub, X, W, sw):
    """Lanes of one super-block with importances ``qw * sqrtf(sigma2 + x^2)`` and their sums per sub-block."""
    _to_lanes(xb, sub, X)
    G = X.shape[1]
    for g in range(G):
        sw[g] = _ZERO
    for i in range(sub):
        for g in range(G):
            v = X[i, g]
            w = qwb[sub * g + i] * np.sqrt(sigma2 + v * v)
            W[i, g] = w
    for g in range(G):  # C sums the weights after computing them, in position order
        s = _ZERO
        for i in range(sub):
            s += W[i, g]
        sw[g] = s


@njit(**_JIT)
def _put_k4_scales(o, at, ls, lm):
    """Eight 6-bit scales and mins -> the 12 bytes of Q4_K/Q5_K at ``o[at:]`` (C's packing, bytes wrap)."""
    for j in range(8):
        s = ls[j] & 0xFF
        m = lm[j] & 0xFF
        if j < 4:
            o[at + j] = s
            o[at + j + 4] = m
        else:
            o[at + j + 4] = ((s & 0xF) | ((m & 0xF) << 4)) & 0xFF
            o[at + j - 4] |= ((s >> 4) << 6) & 0xFF
            o[at + j] |= ((m >> 4) << 6) & 0xFF


@njit(**_JIT)
def _get_k4_scale_min(o, at, j):
    """``get_scale_min_k4``: sub-block ``j``'s scale and min from the 12 bytes at ``o[at:]``."""
    if j < 4:
        return np.int64(o[at + j]) & 63, np.int64(o[at + j + 4]) & 63
    lo, hs, hm = np.int64(o[at + j + 4]), np.int64(o[at + j - 4]), np.int64(o[at + j])
    return (lo & 0xF) | ((hs >> 6) << 4), (lo >> 4) | ((hm >> 6) << 4)


@njit(**_JIT)
def _k4_finish(xb, L, o, d, dmin, ls, lm, nmax, lv):
    """Q4_K/Q5_K: store scales, re-derive the levels from the stored values (``lv[256]``), pack the levels."""
    _put_k4_scales(o, 4, ls, lm)
    dd = _put_fp16(o, 0, d)
    dm = _put_fp16(o, 2, dmin)
    _from_lanes(L, lv)
    n = L.shape[0]
    for j in range(8):
        sc, m = _get_k4_scale_min(o, 4, j)
        dj = dd * F(sc)
        if dj == _ZERO:  # C's `if (!d) continue;` keeps the search's levels
            continue
        mj = dm * F(m)
        for i in range(n * j, n * j + n):  # (n = 32 at run time: a loop LLVM vectorises, not unrolls)
            lv[i] = np.int64(_level((xb[i] + mj) / dj, 0, nmax))
    if nmax == 15:
        for c in range(4):
            for i in range(32):
                o[16 + 32 * c + i] = (lv[64 * c + i] | (lv[64 * c + 32 + i] << 4)) & 0xFF
    else:  # qh: bits 2c and 2c + 1 of byte i are the fifth bits of weights 64c + i and 64c + 32 + i
        for i in range(32):
            hb = 0
            for c in range(4):
                l1 = lv[64 * c + i]
                l2 = lv[64 * c + 32 + i]
                hb |= ((l1 >> 4) << (2 * c)) | ((l2 >> 4) << (2 * c + 1))
                o[48 + 32 * c + i] = ((l1 & 0xF) | ((l2 & 0xF) << 4)) & 0xFF
            o[16 + i] = hb


@njit(**_JIT)
def k4_span(x, qw, out, a, b, bits, imatrix):
    """Q4_K/Q5_K super-blocks ``[a, b)``: ``quantize_row_q{4,5}_K_ref`` or, with ``imatrix``, ``_impl``. Two
    super-blocks share one search (16 lanes: their 8 sub-blocks each)."""
    nmax = (1 << bits) - 1
    X = np.zeros((32, 16), dtype=np.float32)  # (zeros: a lone last super-block leaves lanes 8..15 unused)
    W = np.zeros((32, 16), dtype=np.float32)
    L = np.empty((32, 16), dtype=np.float32)
    Laux = np.empty((32, 16), dtype=np.float32)
    S = np.empty((16, 16), dtype=np.float32)
    scales = np.empty(16, dtype=np.float32)
    mins = np.empty(16, dtype=np.float32)
    sw = np.empty(16, dtype=np.float32)
    ls = np.empty(8, dtype=np.int64)
    lm = np.empty(8, dtype=np.int64)
    lv = np.empty(256, dtype=np.int64)
    for b0 in range(a, b, 2):
        pair = min(2, b - b0)
        for h in range(pair):
            xb = x[b0 + h]
            Xh, Wh = X[:, 8 * h : 8 * h + 8], W[:, 8 * h : 8 * h + 8]
            if imatrix:
                sigma2 = (F(2.0) * _sumsq(xb, 0, 256)) / F(256.0)
                _imatrix_weights(xb, qw[b0 + h], sigma2, 32, Xh, Wh, sw[8 * h : 8 * h + 8])
            else:
                _to_lanes(xb, 32, Xh)
                for g in range(8):
                    av = np.sqrt(_sumsq(xb, 32 * g, 32 * g + 32) / F(32.0))
                    for i in range(32):
                        Wh[i, g] = av + abs(Xh[i, g])
        if imatrix:
            make_qkx_quants(X, W, nmax, F(-0.9), F(0.05), 36, False, L, Laux, scales, mins, S)
        elif bits == 4:
            make_qkx_quants(X, W, nmax, F(-1.0), _TENTH, 20, False, L, Laux, scales, mins, S)
        else:
            make_qkx_quants(X, W, nmax, F(-0.5), _TENTH, 15, False, L, Laux, scales, mins, S)
        for h in range(pair):
            sc, mn = scales[8 * h : 8 * h + 8], mins[8 * h : 8 * h + 8]
            if imatrix:
                d = make_qp_quants(sc, sw[8 * h : 8 * h + 8], 63, ls)
                dmin = make_qp_quants(mn, sw[8 * h : 8 * h + 8], 63, lm)
                if bits == 5:  # the Q5_K impl clamps the 6-bit values once more; Q4_K's does not
                    for j in range(8):
                        ls[j] = min(63, ls[j])
                        lm[j] = min(63, lm[j])
            else:
                max_scale = _ZERO
                max_min = _ZERO
                for j in range(8):
                    if sc[j] > max_scale:
                        max_scale = sc[j]
                    if mn[j] > max_min:
                        max_min = mn[j]
                inv_scale = F(63.0) / max_scale if max_scale > _ZERO else _ZERO
                inv_min = F(63.0) / max_min if max_min > _ZERO else _ZERO
                for j in range(8):
                    ls[j] = min(63, nearest_int(inv_scale * sc[j]) & 0xFF)
                    lm[j] = min(63, nearest_int(inv_min * mn[j]) & 0xFF)
                d = max_scale / F(63.0)
                dmin = max_min / F(63.0)
            _k4_finish(x[b0 + h], L[:, 8 * h : 8 * h + 8], out[b0 + h], d, dmin, ls, lm, nmax, lv)


@njit(**_JIT)
def q2_k_span(x, qw, out, a, b, imatrix):
    """Q2_K super-blocks ``[a, b)``: ``quantize_row_q2_K_ref`` or, with ``imatrix``, ``_impl``."""
    X = np.empty((16, 16), dtype=np.float32)
    W = np.empty((16, 16), dtype=np.float32)
    L = np.empty((16, 16), dtype=np.float32)
    Laux = np.empty((16, 16), dtype=np.float32)
    S = np.empty((16, 16), dtype=np.float32)
    scales = np.empty(16, dtype=np.float32)
    mins = np.empty(16, dtype=np.float32)
    sw = np.empty(16, dtype=np.float32)
    ls = np.empty(16, dtype=np.int64)
    lm = np.empty(16, dtype=np.int64)
    lv = np.empty(256, dtype=np.int64)
    q4scale = F(15.0)
    for blk in range(a, b):
        xb = x[blk]
        o = out[blk]
        if imatrix:
            sigma2 = _sumsq(xb, 0, 256) / F(256.0)
            _imatrix_weights(xb, qw[blk], sigma2, 16, X, W, sw)
            make_qkx_quants(X, W, 3, F(-0.9), F(0.05), 36, False, L, Laux, scales, mins, S)
            dm = _put_fp16(o, 80, make_qp_quants(scales, sw, 15, ls))
            mm = _put_fp16(o, 82, make_qp_quants(mins, sw, 15, lm))
            for j in range(16):
                o[j] = (ls[j] | (lm[j] << 4)) & 0xFF
        else:
            _to_lanes(xb, 16, X)
            for i in range(16):
                for g in range(16):
                    W[i, g] = abs(X[i, g])
            make_qkx_quants(X, W, 3, F(-0.5), _TENTH, 15, True, L, Laux, scales, mins, S)
            max_scale = _ZERO
            max_min = _ZERO
            for j in range(16):
                if scales[j] > max_scale:
                    max_scale = scales[j]
                if mins[j] > max_min:
                    max_min = mins[j]
            if max_scale > _ZERO:
                iscale = q4scale / max_scale
                for j in range(16):
                    o[j] = nearest_int(iscale * scales[j]) & 0xFF
                dm = _put_fp16(o, 80, max_scale / q4scale)
            else:
                for j in range(16):
                    o[j] = 0
                dm = _put_fp16(o, 80, _ZERO)
            if max_min > _ZERO:
                iscale = q4scale / max_min
                for j in range(16):
                    o[j] |= (nearest_int(iscale * mins[j]) << 4) & 0xFF
                mm = _put_fp16(o, 82, max_min / q4scale)
            else:
                mm = _put_fp16(o, 82, _ZERO)
        _from_lanes(L, lv)
        n = L.shape[0]
        for j in range(16):
            sb = np.int64(o[j])
            dj = dm * F(sb & 0xF)
            if dj == _ZERO:
                continue
            mj = mm * F(sb >> 4)
            for i in range(n * j, n * j + n):  # (n = 16 at run time: a loop LLVM vectorises, not unrolls)
                lv[i] = np.int64(_level((xb[i] + mj) / dj, 0, 3))
        for h in range(2):
            for i in range(32):
                e = 128 * h + i
                o[16 + 32 * h + i] = (lv[e] | (lv[e + 32] << 2) | (lv[e + 64] << 4) | (lv[e + 96] << 6)) & 0xFF


# ---- Q3_K, Q6_K: symmetric super-blocks of 16 sub-blocks ----------------------------------------------------


@njit(**_JIT)
def _q3_k_finish(xb, o, L, scales, sw, imatrix, SX, SW, SL, ST, SS, d_block, l6, lv):
    """One Q3_K super-block after its sub-block search (levels ``L[16, 16]``, ``scales``, ``sw``): the 6-bit
    sub-scales (rounded against the largest, or by make_qx_quants with an imatrix), the fp16 ``d``, the second
    pass from the stored scales and the packing."""
    for j in range(96, 108):
        o[j] = 0
    if imatrix:
        for j in range(16):
            SX[j, 0] = scales[j]
            SW[j, 0] = sw[j]
        make_qx_quants(SX, SW, 32, SL, d_block, SS, ST)
        for j in range(16):
            l6[j] = np.int64(SL[j, 0])
        has_scale = True
        d = d_block[0]
    else:
        amax = _ZERO
        max_scale = _ZERO
        for j in range(16):
            s = abs(scales[j])
            if s > amax:
                amax = s
                max_scale = scales[j]
        has_scale = max_scale != _ZERO
        d = _ZERO
        if has_scale:
            iscale = F(-32.0) / max_scale
            for j in range(16):
                c = _as_int8(nearest_int(iscale * scales[j]))
                l6[j] = max(-32, min(31, c)) + 32
            d = _ONE / iscale
    if has_scale:
        for j in range(16):
            l = l6[j]
            if j < 8:
                o[96 + j] = l & 0xF
            else:
                o[96 + j - 8] |= ((l & 0xF) << 4) & 0xFF
            o[96 + 8 + j % 4] |= ((l >> 4) << (2 * (j // 4))) & 0xFF
    dd = _put_fp16(o, 108, d)
    _from_lanes(L, lv)
    n = L.shape[0]
    for j in range(16):
        lo = np.int64(o[96 + j]) & 0xF if j < 8 else np.int64(o[96 + j - 8]) >> 4
        sc = _as_int8((lo | (((np.int64(o[104 + j % 4]) >> (2 * (j // 4))) & 3) << 4)) - 32)
        dj = dd * F(sc)
        if dj == _ZERO:
            continue
        for i in range(n * j, n * j + n):  # (n = 16 at run time: a loop LLVM vectorises, not unrolls)
            lv[i] = np.int64(_level(xb[i] / dj, -4, 3)) + 4
    for m in range(32):  # hmask: bit k of byte m is bit 2 of the level of weight 32k + m
        hb = 0
        for k in range(8):
            hb |= ((lv[32 * k + m] >> 2) & 1) << k
        o[m] = hb
    for h in range(2):  # qs: the low two bits
        for i in range(32):
            e = 128 * h + i
            q = (lv[e] & 3) | ((lv[e + 32] & 3) << 2) | ((lv[e + 64] & 3) << 4) | ((lv[e + 96] & 3) << 6)
            o[32 + 32 * h + i] = q


@njit(**_JIT)
def q3_k_span(x, qw, out, a, b, imatrix):
    """Q3_K super-blocks ``[a, b)``: ``quantize_row_q3_K_ref`` (make_q3_quants per sub-block) or, with
    ``imatrix``, ``_impl`` (make_qx_quants for the sub-blocks, then for their 16 scales). Two super-blocks
    share one sub-block search (32 lanes)."""
    X = np.zeros((16, 32), dtype=np.float32)  # (zeros: a lone last super-block leaves lanes 16..31 unused)
    W = np.zeros((16, 32), dtype=np.float32)
    L = np.empty((16, 32), dtype=np.float32)
    T = np.empty((16, 32), dtype=np.float32)
    S = np.empty((16, 32), dtype=np.float32)
    scales = np.empty(32, dtype=np.float32)
    sw = np.empty(32, dtype=np.float32)
    SX = np.empty((16, 1), dtype=np.float32)  # the 16 sub-block scales of a super-block as one lane
    SW = np.empty((16, 1), dtype=np.float32)
    SL = np.empty((16, 1), dtype=np.float32)
    ST = np.empty((16, 1), dtype=np.float32)
    SS = np.empty((16, 1), dtype=np.float32)
    d_block = np.empty(1, dtype=np.float32)
    l6 = np.empty(16, dtype=np.int64)
    lv = np.empty(256, dtype=np.int32)
    for b0 in range(a, b, 2):
        pair = min(2, b - b0)
        for h in range(pair):
            xb = x[b0 + h]
            if imatrix:
                sigma2 = (F(2.0) * _sumsq(xb, 0, 256)) / F(256.0)
                lanes = slice(16 * h, 16 * h + 16)
                _imatrix_weights(xb, qw[b0 + h], sigma2, 16, X[:, lanes], W[:, lanes], sw[lanes])
            else:
                _to_lanes(xb, 16, X[:, 16 * h : 16 * h + 16])
        if imatrix:
            make_qx_quants(X, W, 4, L, scales, S, T)
        else:
            make_q3_quants(X, 4, L, scales, S)
        for h in range(pair):
            lanes = slice(16 * h, 16 * h + 16)
            xb, o = x[b0 + h], out[b0 + h]
            _q3_k_finish(xb, o, L[:, lanes], scales[lanes], sw[lanes], imatrix, SX, SW, SL, ST, SS, d_block, l6, lv)


@njit(**_JIT)
def q6_k_span(x, qw, out, a, b, imatrix):
    """Q6_K super-blocks ``[a, b)``: make_qx_quants per sub-block (weights ``x^2``, or the raw imatrix as
    ggml's ``_impl`` passes it), then int8 sub-scales against the largest one."""
    X = np.empty((16, 16), dtype=np.float32)
    W = np.empty((16, 16), dtype=np.float32)
    L = np.empty((16, 16), dtype=np.float32)
    T = np.empty((16, 16), dtype=np.float32)
    S = np.empty((16, 16), dtype=np.float32)
    scales = np.empty(16, dtype=np.float32)
    lv = np.empty(256, dtype=np.int64)
    for blk in range(a, b):
        xb = x[blk]
        o = out[blk]
        _to_lanes(xb, 16, X)
        if imatrix:
            _to_lanes(qw[blk], 16, W)
        else:
            for i in range(16):
                for g in range(16):
                    W[i, g] = X[i, g] * X[i, g]
        make_qx_quants(X, W, 32, L, scales, S, T)
        max_abs = _ZERO
        max_scale = _ZERO
        for j in range(16):
            s = abs(scales[j])
            if s > max_abs:
                max_abs = s
                max_scale = scales[j]
        if max_abs < _EPS:  # ggml zeroes the whole block
            for j in range(210):
                o[j] = 0
            continue
        iscale = F(-128.0) / max_scale
        dd = _put_fp16(o, 208, _ONE / iscale)
        for j in range(16):
            o[192 + j] = min(127, nearest_int(iscale * scales[j])) & 0xFF
        _from_lanes(L, lv)
        n = L.shape[0]
        for j in range(16):
            dj = dd * F(_as_int8(o[192 + j]))
            if dj == _ZERO:
                continue
            for i in range(n * j, n * j + n):  # (n = 16 at run time: a loop LLVM vectorises, not unrolls)
                lv[i] = np.int64(_level(xb[i] / dj, -32, 31)) + 32
        for h in range(2):
            for i in range(32):
                e = 128 * h + i
                q1, q2, q3, q4 = lv[e], lv[e + 32], lv[e + 64], lv[e + 96]
                o[64 * h + i] = ((q1 & 0xF) | ((q3 & 0xF) << 4)) & 0xFF
                o[64 * h + 32 + i] = ((q2 & 0xF) | ((q4 & 0xF) << 4)) & 0xFF
                o[128 + 32 * h + i] = ((q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)) & 0xFF


# ---- the torch-facing entry -----------------------------------------------------------------------------------


_NO_WEIGHTS = np.zeros((1, 1), dtype=np.float32)


def encode_blocks(
    span: Callable[..., None],
    x: torch.Tensor,
    qw: torch.Tensor | None,
    type_size: int,
    *params: int | bool,
    whole_rows: bool = False,
) -> torch.Tensor:
    """Run a compiled span over ``x[rows, nb, bs]`` (and ``qw`` alike, or None) -> ``uint8[rows, nb, type_size]``.

    ``span(x, qw, out, a, b, *params)`` encodes blocks ``[a, b)`` of the flattened ``x[rows * nb, bs]``, or with
    ``whole_rows`` rows ``[a, b)`` (it then also gets ``nb``). The spans release the GIL, so the chunks run in
    parallel on :func:`kernels.run_chunks`'s ``torch.get_num_threads()`` workers; the bytes do not depend on the
    chunks or the thread count.
    """
    rows, nb, bs = x.shape
    xs = np.ascontiguousarray(x.detach().reshape(rows * nb, bs).numpy(), dtype=np.float32)
    qs = _NO_WEIGHTS if qw is None else np.ascontiguousarray(qw.detach().reshape(rows * nb, bs).numpy(), np.float32)
    out = torch.empty((rows, nb, type_size), dtype=torch.uint8)
    o = out.numpy().reshape(rows * nb, type_size)
    if whole_rows:
        kernels.run_chunks(lambda a, b: span(xs, qs, o, a, b, nb, *params), rows, kernels.CHUNK_WEIGHTS // (nb * bs))
    else:
        kernels.run_chunks(lambda a, b: span(xs, qs, o, a, b, *params), rows * nb, kernels.CHUNK_WEIGHTS // bs)
    return out
