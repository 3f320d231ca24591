"""Allocations from a per-matrix cost table: the Pareto-pruned action space, greedy and
Lagrangian knapsacks, the demonstrations SAC starts from, and the imatrix-weighted error table.

Costs are a table ``cost[(gguf_name, fmt)]`` = degradation when that one matrix is stored in ``fmt`` (lower is
better). All byte counts are file bytes of the quantizable matrices (:func:`ramp.allocation.matrix_bytes`,
padded to the GGUF alignment); a whole file is ``ramp.gguf_export.file_overhead(...)`` bytes more.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ramp.allocation import Allocation, AllocationError, Slot, matrix_bytes, min_matrix_bytes
from ramp.formats import get_format

CostTable = Mapping[tuple[str, str], float]


# ---------------------------------------------------------------------------------------------------------
# greedy knapsack
# ---------------------------------------------------------------------------------------------------------


def _slot_cost(cost: CostTable, s: Slot, fmt: str) -> float:
    try:
        return float(cost[(s.gguf_name, fmt)])
    except KeyError:
        raise AllocationError(f"cost table has no entry for ({s.gguf_name!r}, {fmt!r})") from None


def _check_budget(slots: Sequence[Slot], budget_matrix_bytes: int) -> None:
    floor = min_matrix_bytes(list(slots))
    if budget_matrix_bytes < floor:
        raise AllocationError(
            f"budget {budget_matrix_bytes} bytes is below the smallest legal allocation {floor} bytes "
            f"({8.0 * budget_matrix_bytes / sum(s.params for s in slots):.3f} < "
            f"{8.0 * floor / sum(s.params for s in slots):.3f} bits per weight of padded file bytes)"
        )


def _cheapest(slots: Sequence[Slot], cost: CostTable) -> Allocation:
    """Per slot the format with the fewest file bytes (ties: the lower cost)."""
    return {s.gguf_name: min(s.formats, key=lambda f, s=s: (s.file_bytes(f), _slot_cost(cost, s, f), f)) for s in slots}


def pareto_slots(slots: Sequence[Slot], cost: CostTable) -> list[Slot]:
    """Each slot with only its formats that no other legal format beats at equal or fewer file bytes.

    A format is dropped when another one of the slot costs no more bytes and has a strictly lower table cost
    (e.g. Q4_0 next to IQ4_NL with the same 4.5 bpw): no budget ever prefers it, and for the RL agent every
    dropped format is a slice of the action axis it no longer has to learn to avoid. Order (by bpw) is kept.
    """
    out = []
    for s in slots:
        priced = [(f, s.file_bytes(f), _slot_cost(cost, s, f)) for f in s.formats]
        keep = tuple(f for f, b, c in priced if not any(bb <= b and cc < c for g, bb, cc in priced if g != f))
        out.append(replace(s, formats=keep))
    return out


def greedy_knapsack(
    slots: Sequence[Slot], cost: CostTable, budget_matrix_bytes: int, start: Mapping[str, str] | None = None
) -> Allocation:
    """Spend ``budget_matrix_bytes`` of matrix file bytes greedily by cost reduction per extra byte.

    Starts from ``start`` (default: the cheapest legal format per slot), then repeatedly applies the upgrade
    (any slot to any legal format with more bytes and lower cost) with the largest ``(cost drop) / (extra
    bytes)`` that still fits, until none fits. A heap holds every candidate upgrade; entries of a slot that
    changed are dropped lazily, and an upgrade that does not fit now never will (the slack only shrinks).
    The result's :func:`ramp.allocation.matrix_bytes` is ``<= budget_matrix_bytes``.
    """
    slots = list(slots)
    _check_budget(slots, budget_matrix_bytes)
    alloc = dict(start) if start is not None else _cheapest(slots, cost)
    used = matrix_bytes(slots, alloc)
    if used > budget_matrix_bytes:
        raise AllocationError(f"start allocation uses {used} bytes, above the budget {budget_matrix_bytes} bytes")
    by_name = {s.gguf_name: s for s in slots}
    table = {s.gguf_name: [(f, s.file_bytes(f), _slot_cost(cost, s, f)) for f in s.formats] for s in slots}
    version = dict.fromkeys(by_name, 0)
    heap: list[tuple[float, int, str, str, int]] = []

    def push(name: str) -> None:
        cur = alloc[name]
        cb, cc = next((b, c) for f, b, c in table[name] if f == cur)
        for f, b, c in table[name]:
            if b > cb and c < cc:
                # ratio first (max-heap via negation), then fewer extra bytes, then names for determinism
                heapq.heappush(heap, (-(cc - c) / (b - cb), b - cb, name, f, version[name]))

    for name in by_name:
        push(name)
    while heap:
        _, extra, name, fmt, ver = heapq.heappop(heap)
        if ver != version[name] or used + extra > budget_matrix_bytes:
            continue
        alloc[name] = fmt
        used += extra
        version[name] += 1
        push(name)
    assert used == matrix_bytes(slots, alloc) <= budget_matrix_bytes
    return {s.gguf_name: alloc[s.gguf_name] for s in slots}


def knapsack_starts(
    slots: Sequence[Slot], cost: CostTable, budget_matrix_bytes: int, kinds: Sequence[str] = ("greedy", "uniform")
) -> dict[str, Allocation]:
    """Good allocations to start a search from (SAC's demonstrations), by kind, each within ``budget_matrix_bytes``:

    * ``greedy``: :func:`greedy_knapsack` from the cheapest formats;
    * ``uniform``: every slot at its highest format not above one common bpw level (the highest level that
      fits; slots with nothing that low take their cheapest), then the same greedy fill to the budget.
    """
    out = {}
    for kind in kinds:
        if kind == "greedy":
            out[kind] = greedy_knapsack(slots, cost, budget_matrix_bytes)
        elif kind == "uniform":
            _check_budget(slots, budget_matrix_bytes)
            for level in sorted({get_format(f).bpw for s in slots for f in s.formats}, reverse=True):
                start = {}
                for s in slots:
                    low = [f for f in s.formats if get_format(f).bpw <= level]
                    start[s.gguf_name] = low[-1] if low else s.formats[0]  # formats are ordered by bpw
                if matrix_bytes(slots, start) <= budget_matrix_bytes:
                    out[kind] = greedy_knapsack(slots, cost, budget_matrix_bytes, start=start)
                    break
        else:
            raise ValueError(f"unknown start {kind!r}; expected 'greedy' or 'uniform'")
    return out


def lagrangian_knapsack(
    slots: Sequence[Slot], cost: CostTable, budget_matrix_bytes: int, iterations: int = 60
) -> Allocation:
    """Lagrangian relaxation then greedy fill: the best ``lambda`` whose per-slot ``argmin cost + lambda * bytes``
    fits the budget (bisection on ``lambda``), then :func:`greedy_knapsack` spends what is left."""
    slots = list(slots)
    _check_budget(slots, budget_matrix_bytes)
    table = {s.gguf_name: [(f, s.file_bytes(f), _slot_cost(cost, s, f)) for f in s.formats] for s in slots}

    def solve(lam: float) -> tuple[Allocation, int]:
        alloc, used = {}, 0
        for name, rows in table.items():
            f, b, _ = min(rows, key=lambda r: (r[2] + lam * r[1], r[1], r[0]))
            alloc[name] = f
            used += b
        return alloc, used

    lo, hi = 0.0, 1.0
    while solve(hi)[1] > budget_matrix_bytes and hi < 1e30:
        hi *= 4.0
    best, used = solve(hi)
    if used > budget_matrix_bytes:
        best = _cheapest(slots, cost)
    else:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            alloc, used = solve(mid)
            if used <= budget_matrix_bytes:
                hi, best = mid, alloc
            else:
                lo = mid
    return greedy_knapsack(slots, cost, budget_matrix_bytes, start=best)


def allocation_cost(slots: Sequence[Slot], cost: CostTable, allocation: Mapping[str, str]) -> float:
    """Sum of the table's costs over an allocation (the knapsack objective)."""
    return sum(_slot_cost(cost, s, allocation[s.gguf_name]) for s in slots)


# ---------------------------------------------------------------------------------------------------------
# cost tables
# ---------------------------------------------------------------------------------------------------------


def dequantize_direct(weight: torch.Tensor, name: str, fmt: str, imatrix: np.ndarray | None) -> torch.Tensor:
    """``weight`` quantized to ``fmt`` by RAMP's quantizers (with ``imatrix`` where the format takes one) and back."""
    f = get_format(fmt)
    data = f.quantize(weight, imatrix if f.uses_imatrix else None, name=name)
    return f.dequantize(data, tuple(weight.shape))


def weighted_error_table(
    lm: object,
    slots: Sequence[Slot],
    imatrix: Mapping[str, np.ndarray] | None,
    cache: object | None = None,
    relative: bool = True,
    quantize_with_imatrix: bool = True,
) -> dict[tuple[str, str], float]:
    """``(gguf_name, fmt) -> sum_j w_j ||W[:, j] - Q(W)[:, j]||^2`` for every slot and legal format.

    ``w_j`` is the imatrix (mean squared activation of input column ``j``; all ones without one), so the
    sum is the expected squared output error per token. ``relative`` divides by ``sum_j w_j ||W[:, j]||^2``
    (unitless). Quantization uses the imatrix for formats that take one (unless ``quantize_with_imatrix`` is
    False: errors of imatrix-free quantization, still weighted by the imatrix), through ``cache`` (a
    :class:`ramp.evaluate.quantized.QuantCache`) when given, else RAMP's quantizers directly.
    """
    hf = {m.gguf_name: m.hf_name for m in lm.matrices()}  # type: ignore[attr-defined]
    out: dict[tuple[str, str], float] = {}
    for s in slots:
        if s.gguf_name not in hf:
            raise AllocationError(f"slot {s.gguf_name!r} is not a matrix of this model")
    bar = tqdm(total=sum(len(s.formats) for s in slots), desc="weighted error table", unit="pair", leave=False)
    with torch.no_grad(), bar:
        for s in slots:  # one matrix read at a time (from the files for a lazy model), all its formats
            w = lm.weight(hf[s.gguf_name])  # type: ignore[attr-defined]
            for fmt in s.formats:
                args = (imatrix, cache, relative, quantize_with_imatrix)
                out[(s.gguf_name, fmt)] = _weighted_error(w, s.gguf_name, fmt, *args)
                bar.update()
    return out


def _weighted_error(
    w: torch.Tensor,
    name: str,
    fmt: str,
    imatrix: Mapping[str, np.ndarray] | None,
    cache: object | None,
    relative: bool,
    quantize_with_imatrix: bool,
) -> float:
    """One entry of :func:`weighted_error_table` for the weight ``w`` of matrix ``name``."""
    im = None if imatrix is None else imatrix.get(name)
    if imatrix is not None and im is None:
        raise AllocationError(f"imatrix has no entry for {name}")
    qim = im if quantize_with_imatrix else None
    direct = cache is None
    q = dequantize_direct(w, name, fmt, qim) if direct else cache.dequantized(w, name, fmt, qim)  # type: ignore[attr-defined]
    col_w = torch.ones(w.shape[1]) if im is None else torch.from_numpy(np.asarray(im, dtype=np.float32))
    err = float(((w - q).double().pow(2).sum(0) * col_w.double()).sum())
    if relative:
        err /= max(float((w.double().pow(2).sum(0) * col_w.double()).sum()), 1e-30)
    return err


# ---------------------------------------------------------------------------------------------------------
# the action space every allocator shares: measured costs, Pareto-pruned per matrix
# ---------------------------------------------------------------------------------------------------------


def cost_frame(
    slots: Sequence[Slot], cost: CostTable, offered: Sequence[Slot], extra: Mapping[str, CostTable] | None = None
) -> pd.DataFrame:
    """One row per (matrix, legal format): ``file_bytes``, ``cost`` and ``offered`` (kept in the action space), and a
    column per table of ``extra`` (name -> table over the same pairs)."""
    kept = {(s.gguf_name, f) for s in offered for f in s.formats}
    extra = extra or {}
    rows = [
        {
            "gguf_name": s.gguf_name,
            "format": f,
            "file_bytes": s.file_bytes(f),
            "cost": float(cost[(s.gguf_name, f)]),
            "offered": (s.gguf_name, f) in kept,
            **{name: float(table[(s.gguf_name, f)]) for name, table in extra.items()},
        }
        for s in slots
        for f in s.formats
    ]
    return pd.DataFrame(rows)


def read_action_space(path: str | Path, slots: Sequence[Slot]) -> tuple[list[Slot], dict[tuple[str, str], float]]:
    """(``slots`` restricted to their offered formats, the cost table) from a :func:`cost_frame` Parquet file.

    ``slots`` are the model's (every legal format); a matrix the table lacks, or an offered format that is not
    legal for its matrix, is an :class:`AllocationError` naming it (a table from another model).
    """
    table = pd.read_parquet(path)
    cost = {(n, f): float(c) for n, f, c in zip(table["gguf_name"], table["format"], table["cost"], strict=True)}
    offered: dict[str, set[str]] = {}
    for n, f in zip(table["gguf_name"][table["offered"]], table["format"][table["offered"]], strict=True):
        offered.setdefault(n, set()).add(f)
    out = []
    for s in slots:
        if s.gguf_name not in offered:
            raise AllocationError(f"{path}: no offered format for matrix {s.gguf_name} (a table of another model?)")
        for f in offered[s.gguf_name]:
            s.check(f)
        out.append(replace(s, formats=tuple(f for f in s.formats if f in offered[s.gguf_name])))
    return out, cost
