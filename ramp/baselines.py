"""Baselines every learned allocation must beat at equal bytes (SPEC §6): uniform formats, llama.cpp's presets
(the real ``llama-quantize`` and a Python reproduction of its per-tensor rules) and a greedy sensitivity
knapsack.

Costs for the knapsack are a table ``cost[(gguf_name, fmt)]`` = degradation when that one matrix is stored in
``fmt`` (lower is better): the imatrix-weighted relative squared weight error (:func:`weighted_error_table`,
cheap) or the measured KLD of a one-matrix change (:func:`kld_sensitivity_table`, one forward pass per entry).
All byte counts are file bytes of the quantizable matrices (:func:`ramp.allocation.matrix_bytes`, padded to
the GGUF alignment); a whole file is ``ramp.gguf_export.file_overhead(...)`` bytes more.
"""

from __future__ import annotations

import heapq
import logging
import subprocess
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ramp.allocation import Allocation, AllocationError, Slot, matrix_bytes, min_matrix_bytes, validate
from ramp.formats import QUANT_CHOICES, get_format
from ramp.io import atomic_path

log = logging.getLogger(__name__)

CostTable = Mapping[tuple[str, str], float]

# llama.cpp's fallback when a 256-block type does not fit the row length (tensor_type_fallback in
# src/llama-quant.cpp): the 32-block type it silently substitutes. RAMP records it explicitly instead.
KQUANT_FALLBACK: dict[str, str] = {
    "Q2_K": "Q4_0",
    "Q3_K": "Q4_0",
    "Q4_K": "Q5_0",
    "Q5_K": "Q5_1",
    "Q6_K": "Q8_0",
}


# ---------------------------------------------------------------------------------------------------------
# uniform allocations
# ---------------------------------------------------------------------------------------------------------


def uniform_baselines(slots: Sequence[Slot], formats: Iterable[str] = QUANT_CHOICES) -> dict[str, Allocation]:
    """method name -> allocation: each format everywhere it is legal.

    A format legal on every slot gives ``"uniform-<fmt>"``. A K-quant legal only on some slots gives
    ``"uniform-<fmt>+<fallback>-fallback"``: the K-quant where legal, llama.cpp's 32-block fallback type
    elsewhere, each tensor's type written out. Any other format that is not legal everywhere raises.
    """
    out: dict[str, Allocation] = {}
    for fmt in formats:
        fmt = get_format(fmt).name
        if all(fmt in s.formats for s in slots):
            out[f"uniform-{fmt}"] = {s.gguf_name: fmt for s in slots}
            continue
        fb = KQUANT_FALLBACK.get(fmt)
        if fb is None:
            bad = next(s for s in slots if fmt not in s.formats)
            raise AllocationError(
                f"{bad.gguf_name}: format {fmt} is not legal for shape {list(bad.shape)} and has no fallback "
                f"(fallbacks exist for {', '.join(KQUANT_FALLBACK)})"
            )
        alloc = {s.gguf_name: fmt if fmt in s.formats else fb for s in slots}
        validate(list(slots), alloc)
        out[f"uniform-{fmt}+{fb}-fallback"] = alloc
    return out


# ---------------------------------------------------------------------------------------------------------
# greedy knapsack
# ---------------------------------------------------------------------------------------------------------


def _slot_cost(cost: CostTable, s: Slot, fmt: str) -> float:
    try:
        return float(cost[(s.gguf_name, fmt)])
    except KeyError:
        raise AllocationError(f"cost table has no entry for ({s.gguf_name!r}, {fmt!r})") from None


def _check_budget(slots: Sequence[Slot], budget_bytes: int) -> None:
    floor = min_matrix_bytes(list(slots))
    if budget_bytes < floor:
        raise AllocationError(
            f"budget {budget_bytes} bytes is below the smallest legal allocation {floor} bytes "
            f"({8.0 * budget_bytes / sum(s.params for s in slots):.3f} < "
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
    slots: Sequence[Slot], cost: CostTable, budget_bytes: int, start: Mapping[str, str] | None = None
) -> Allocation:
    """Spend ``budget_bytes`` of matrix file bytes greedily by cost reduction per extra byte.

    Starts from ``start`` (default: the cheapest legal format per slot), then repeatedly applies the upgrade
    (any slot to any legal format with more bytes and lower cost) with the largest ``(cost drop) / (extra
    bytes)`` that still fits, until none fits. A heap holds every candidate upgrade; entries of a slot that
    changed are dropped lazily, and an upgrade that does not fit now never will (the slack only shrinks).
    The result's :func:`ramp.allocation.matrix_bytes` is ``<= budget_bytes``.
    """
    slots = list(slots)
    _check_budget(slots, budget_bytes)
    alloc = dict(start) if start is not None else _cheapest(slots, cost)
    used = matrix_bytes(slots, alloc)
    if used > budget_bytes:
        raise AllocationError(f"start allocation uses {used} bytes, above the budget {budget_bytes} bytes")
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
        if ver != version[name] or used + extra > budget_bytes:
            continue
        alloc[name] = fmt
        used += extra
        version[name] += 1
        push(name)
    assert used == matrix_bytes(slots, alloc) <= budget_bytes
    return {s.gguf_name: alloc[s.gguf_name] for s in slots}


def knapsack_starts(
    slots: Sequence[Slot], cost: CostTable, budget_bytes: int, kinds: Sequence[str] = ("greedy", "uniform")
) -> dict[str, Allocation]:
    """Good allocations to start a search from (SAC's demonstrations), by kind, each within ``budget_bytes``:

    * ``greedy``: :func:`greedy_knapsack` from the cheapest formats;
    * ``uniform``: every slot at its highest format not above one common bpw level (the highest level that
      fits; slots with nothing that low take their cheapest), then the same greedy fill to the budget.
    """
    out = {}
    for kind in kinds:
        if kind == "greedy":
            out[kind] = greedy_knapsack(slots, cost, budget_bytes)
        elif kind == "uniform":
            _check_budget(slots, budget_bytes)
            for level in sorted({get_format(f).bpw for s in slots for f in s.formats}, reverse=True):
                start = {}
                for s in slots:
                    low = [f for f in s.formats if get_format(f).bpw <= level]
                    start[s.gguf_name] = low[-1] if low else s.formats[0]  # formats are ordered by bpw
                if matrix_bytes(slots, start) <= budget_bytes:
                    out[kind] = greedy_knapsack(slots, cost, budget_bytes, start=start)
                    break
        else:
            raise ValueError(f"unknown start {kind!r}; expected 'greedy' or 'uniform'")
    return out


def lagrangian_knapsack(slots: Sequence[Slot], cost: CostTable, budget_bytes: int, iterations: int = 60) -> Allocation:
    """Lagrangian relaxation then greedy fill: the best ``lambda`` whose per-slot ``argmin cost + lambda * bytes``
    fits the budget (bisection on ``lambda``), then :func:`greedy_knapsack` spends what is left."""
    slots = list(slots)
    _check_budget(slots, budget_bytes)
    table = {s.gguf_name: [(f, s.file_bytes(f), _slot_cost(cost, s, f)) for f in s.formats] for s in slots}

    def solve(lam: float) -> tuple[Allocation, int]:
        alloc, used = {}, 0
        for name, rows in table.items():
            f, b, _ = min(rows, key=lambda r: (r[2] + lam * r[1], r[1], r[0]))
            alloc[name] = f
            used += b
        return alloc, used

    lo, hi = 0.0, 1.0
    while solve(hi)[1] > budget_bytes and hi < 1e30:
        hi *= 4.0
    best, used = solve(hi)
    if used > budget_bytes:
        best = _cheapest(slots, cost)
    else:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            alloc, used = solve(mid)
            if used <= budget_bytes:
                hi, best = mid, alloc
            else:
                lo = mid
    return greedy_knapsack(slots, cost, budget_bytes, start=best)


def allocation_cost(slots: Sequence[Slot], cost: CostTable, allocation: Mapping[str, str]) -> float:
    """Sum of the table's costs over an allocation (the knapsack objective)."""
    return sum(_slot_cost(cost, s, allocation[s.gguf_name]) for s in slots)


# ---------------------------------------------------------------------------------------------------------
# cost tables
# ---------------------------------------------------------------------------------------------------------


def _dequantize_direct(weight: torch.Tensor, name: str, fmt: str, imatrix: np.ndarray | None) -> torch.Tensor:
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
    params = dict(lm.model.named_parameters())  # type: ignore[attr-defined]
    hf = {m.gguf_name: m.hf_name for m in lm.matrices()}  # type: ignore[attr-defined]
    out: dict[tuple[str, str], float] = {}
    jobs = [(s, f) for s in slots for f in s.formats]
    with torch.no_grad():
        for s, fmt in tqdm(jobs, desc="weighted error table", unit="pair", leave=False):
            if s.gguf_name not in hf:
                raise AllocationError(f"slot {s.gguf_name!r} is not a matrix of this model")
            w = params[hf[s.gguf_name]].detach().to(torch.float32)
            im = None if imatrix is None else imatrix.get(s.gguf_name)
            if imatrix is not None and im is None:
                raise AllocationError(f"imatrix has no entry for {s.gguf_name}")
            qim = im if quantize_with_imatrix else None
            if cache is not None:
                q = cache.dequantized(w, s.gguf_name, fmt, qim)  # type: ignore[attr-defined]
            else:
                q = _dequantize_direct(w, s.gguf_name, fmt, qim)
            col_w = torch.ones(w.shape[1]) if im is None else torch.from_numpy(np.asarray(im, dtype=np.float32))
            err = float(((w - q).double().pow(2).sum(0) * col_w.double()).sum())
            if relative:
                err /= max(float((w.double().pow(2).sum(0) * col_w.double()).sum()), 1e-30)
            out[(s.gguf_name, fmt)] = err
    return out


def kld_sensitivity_table(
    evaluator: object,
    slots: Sequence[Slot],
    base: Mapping[str, str],
    formats: Iterable[str],
) -> dict[tuple[str, str], float]:
    """``(gguf_name, fmt) -> mean KLD`` of ``base`` with only that matrix changed to ``fmt`` (nats per token).

    One forward pass per entry (``evaluator`` is a :class:`ramp.evaluate.quantized.AllocationEvaluator`);
    formats illegal for a slot are skipped, and the base format's entry is the base KLD.
    """
    base = dict(base)
    validate(list(slots), base)
    base_kld = evaluator.evaluate(base).mean  # type: ignore[attr-defined]
    fmts = [get_format(f).name for f in formats]
    jobs = [(s, f) for s in slots for f in fmts if f in s.formats]
    out: dict[tuple[str, str], float] = {}
    for s, f in tqdm(jobs, desc="KLD sensitivity", unit="eval"):
        if f == base[s.gguf_name]:
            out[(s.gguf_name, f)] = base_kld
            continue
        trial = dict(base)
        trial[s.gguf_name] = f
        out[(s.gguf_name, f)] = evaluator.evaluate(trial).mean  # type: ignore[attr-defined]
    return out


# ---------------------------------------------------------------------------------------------------------
# llama.cpp presets: the real tool, and a reproduction of its per-tensor rules
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _RuleContext:
    i: int  # index of this tensor among its kind (= block index for a dense model)
    n: int  # number of such tensors (attn_v) or blocks (ffn_*)
    gqa: int  # n_head / n_head_kv
    imatrix: bool


def _more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


Rule = Callable[[_RuleContext], str | None]  # None: keep the preset's default type

# preset -> (default type, role -> rule) for a dense Llama-family model (no experts, not Falcon, not 70B);
# role names are ramp.models.arch.ROLES. Derived from llama_tensor_get_type_impl in src/llama-quant.cpp.
LLAMA_PRESETS: dict[str, tuple[str, dict[str, Rule]]] = {
    "Q2_K": (
        "Q2_K",
        {
            "v": lambda c: "Q4_K" if c.gqa >= 4 else "Q3_K",
            "down": lambda c: "Q3_K",
            "o": lambda c: "Q3_K",
        },
    ),
    "Q3_K_S": ("Q3_K", {}),
    "Q3_K_M": (
        "Q3_K",
        {
            "v": lambda c: "Q5_K" if c.i < 2 else "Q4_K",
            "down": lambda c: "Q5_K" if c.i < c.n // 16 else "Q4_K",
            "o": lambda c: "Q4_K",
        },
    ),
    "Q3_K_L": ("Q3_K", {"v": lambda c: "Q5_K", "down": lambda c: "Q5_K", "o": lambda c: "Q5_K"}),
    "Q4_0": ("Q4_0", {"down": lambda c: "Q4_1" if c.imatrix and c.i < c.n // 8 else None}),
    "Q4_1": ("Q4_1", {}),
    "Q5_0": ("Q5_0", {"down": lambda c: "Q5_1" if c.imatrix and c.i < c.n // 8 else None}),
    "Q5_1": ("Q5_1", {}),
    "IQ4_NL": (
        "IQ4_NL",
        {
            "v": lambda c: "Q5_K" if c.gqa >= 4 else None,
            "down": lambda c: "Q5_K" if c.i < c.n // 8 and not c.imatrix else None,
        },
    ),
    "Q4_K_S": (
        "Q4_K",
        {
            "v": lambda c: "Q5_K" if c.i < 4 else None,
            "down": lambda c: "Q5_K" if c.i < c.n // 8 else None,
        },
    ),
    "Q4_K_M": (
        "Q4_K",
        {
            "v": lambda c: "Q6_K" if _more_bits(c.i, c.n) else None,
            "down": lambda c: "Q6_K" if _more_bits(c.i, c.n) else None,
        },
    ),
    "Q5_K_S": ("Q5_K", {}),
    "Q5_K_M": (
        "Q5_K",
        {
            "v": lambda c: "Q6_K" if _more_bits(c.i, c.n) else None,
            "down": lambda c: "Q6_K" if _more_bits(c.i, c.n) else None,
        },
    ),
    "Q6_K": ("Q6_K", {}),
    "Q8_0": ("Q8_0", {}),
}


def _fallback(fmt: str, cols: int) -> str:
    """llama.cpp's shape fallback: a type whose block does not divide the row length is replaced."""
    if cols % get_format(fmt).block_size == 0:
        return fmt
    fb = KQUANT_FALLBACK.get(fmt, fmt)
    return fb if cols % get_format(fb).block_size == 0 else "F16"


def _output_type(default: str, cols: int) -> str:
    """Type of ``output.weight`` (or of a tied ``token_embd.weight``) before the shape fallback."""
    if cols % get_format(default).block_size:
        return "Q8_0"
    return default if default == "Q8_0" else "Q6_K"


def llama_rules(lm: object, ftype: str, has_imatrix: bool = False) -> dict[str, str]:
    """GGUF tensor name -> type that ``llama-quantize <ftype>`` picks for ``lm`` (a dense Llama-family model).

    Covers every quantizable matrix plus ``token_embd.weight`` and ``output.weight`` (when untied), after the
    shape fallback for row lengths that do not divide into 256 (SmolLM2: only ``ffn_down`` keeps K-quants).
    ``has_imatrix`` matters for Q4_0/Q5_0 and IQ4_NL (their ``ffn_down`` rule depends on it).
    """
    if ftype not in LLAMA_PRESETS:
        raise ValueError(f"unknown llama.cpp preset {ftype!r}; expected one of {', '.join(LLAMA_PRESETS)}")
    default, rules = LLAMA_PRESETS[ftype]
    cfg = lm.config  # type: ignore[attr-defined]
    n_layer = int(cfg.num_hidden_layers)
    gqa = int(cfg.num_attention_heads) // int(cfg.num_key_value_heads)
    out: dict[str, str] = {}
    # llama-quantize visits tensors sorted by block, so each kind's counter equals the block index here
    for m in lm.matrices():  # type: ignore[attr-defined]
        rule = rules.get(m.role)
        chosen = rule(_RuleContext(m.block, n_layer, gqa, has_imatrix)) if rule else None
        out[m.gguf_name] = _fallback(chosen or default, m.shape[1])
    hidden = int(cfg.hidden_size)
    if bool(getattr(cfg, "tie_word_embeddings", False)):
        out["token_embd.weight"] = _fallback(_output_type(default, hidden), hidden)
    else:
        out["token_embd.weight"] = _fallback(default, hidden)
        out["output.weight"] = _fallback(_output_type(default, hidden), hidden)
    return out


def llama_quantize(
    src_gguf: str | Path,
    out_gguf: str | Path,
    preset: str,
    imatrix_path: str | Path | None = None,
    extra_args: Sequence[str] = (),
    threads: int = 2,
) -> Path:
    """Run the real ``llama-quantize`` (``--allow-requantize``: the SmolLM2 source is Q4_1); atomic output."""
    from ramp.llamacpp import tool

    if preset not in LLAMA_PRESETS:
        raise ValueError(f"unknown llama.cpp preset {preset!r}; expected one of {', '.join(LLAMA_PRESETS)}")
    src, out = Path(src_gguf), Path(out_gguf)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such GGUF file")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        cmd = [str(tool("llama-quantize")), "--allow-requantize"]
        if imatrix_path is not None:
            cmd += ["--imatrix", str(imatrix_path)]
        cmd += [*extra_args, str(src), str(tmp), preset, str(threads)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not Path(tmp).exists():
            raise RuntimeError(f"llama-quantize {preset} failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return out


def llama_imatrix(
    model_gguf: str | Path,
    text_file: str | Path,
    out_path: str | Path,
    chunks: int = 40,
    n_ctx: int = 512,
    threads: int = 2,
) -> Path:
    """Run the real ``llama-imatrix`` over ``chunks`` windows of ``n_ctx`` tokens of ``text_file`` (GGUF output)."""
    from ramp.llamacpp import tool

    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(out) as tmp:
        cmd = [
            str(tool("llama-imatrix")),
            *("-m", str(model_gguf), "-f", str(text_file), "-o", str(tmp)),
            *("--chunks", str(chunks), "-c", str(n_ctx), "-t", str(threads), "--no-ppl"),
        ]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0 or not Path(tmp).exists():
            raise RuntimeError(f"llama-imatrix failed (exit {res.returncode}):\n{res.stderr[-3000:]}")
    return out


def gguf_tensor_types(path: str | Path) -> dict[str, str]:
    """GGUF tensor name -> type name, read back with gguf-py."""
    from ramp.models.loader import read_gguf

    return {t.name: t.tensor_type.name for t in read_gguf(Path(path)).tensors}


def gguf_tensor_bytes(path: str | Path) -> dict[str, int]:
    """GGUF tensor name -> bytes of its data (unpadded)."""
    from ramp.models.loader import read_gguf

    return {t.name: int(t.n_bytes) for t in read_gguf(Path(path)).tensors}


def preset_allocation(slots: Sequence[Slot], types: Mapping[str, str]) -> Allocation:
    """The matrices' part of a preset's per-tensor types, as an allocation (validated: every type must be legal)."""
    missing = [s.gguf_name for s in slots if s.gguf_name not in types]
    if missing:
        raise AllocationError(f"preset types lack {len(missing)} matrices, e.g. {missing[:3]}")
    alloc = {s.gguf_name: types[s.gguf_name] for s in slots}
    validate(list(slots), alloc)
    return alloc


def llama_presets(
    src_gguf: str | Path,
    out_dir: str | Path,
    presets: Iterable[str] = ("Q2_K", "Q3_K_M", "Q4_0", "IQ4_NL", "Q4_K_S", "Q4_K_M"),
    imatrix_path: str | Path | None = None,
    threads: int = 2,
) -> dict[str, Path]:
    """preset -> GGUF made by ``llama-quantize`` from ``src_gguf`` into ``out_dir`` (reused when present).

    File names carry ``-imatrix`` when an imatrix is used; delete ``out_dir`` to rebuild.
    """
    out_dir = Path(out_dir)
    stem = Path(src_gguf).stem
    tag = "-imatrix" if imatrix_path is not None else ""
    made = {}
    for p in tqdm(list(presets), desc="llama-quantize", unit="preset", leave=False):
        out = out_dir / f"{stem}.{p}{tag}.gguf"
        if not out.exists():
            llama_quantize(src_gguf, out, p, imatrix_path, threads=threads)
        made[p] = out
    return made
