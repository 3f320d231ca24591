"""Stage evaluate: quality of the quantized model vs the FP model, and of baselines at the same size.

Reads params ``evaluate``. Reads ``data/calibrate/`` (original model), ``data/fold/`` (folded model, imatrix),
``data/allocate/`` and ``data/quantize/``. Writes ``data/evaluate/results.parquet`` (one row per method:
RAMP, greedy knapsack at RAMP's bytes, uniform formats), plot data ``data/plots/pareto.csv`` and
``data/plots/format_map.csv`` with their PNGs, and ``data/metrics/evaluate.json`` (KLD, ppl, bytes, bpw).

KLD is against the original (unfolded) FP model on held-out Wikipedia windows (SPEC §7, §10); the quantized
model is the folded model with the quantize stage's bytes dequantized and swapped in.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

from ramp.io import atomic_path
from stages._common import (
    DATA,
    PLOTS,
    Timer,
    atomic_dir,
    gguf_heads,
    load_folded_model,
    load_params,
    model_path,
    setup_logging,
    write_metrics,
)

log = logging.getLogger("stages.evaluate")
OUT = DATA / "evaluate"
QUANT_CACHE = "cache/quantized"  # content-addressed dequantized weights (git-ignored, shared across runs)


@dataclass(frozen=True)
class EvaluateParams:
    """Held-out windows (``n_chunks`` x ``n_ctx`` tokens), the FP reference's ``top_k``, baselines compared at
    RAMP's size (``greedy``; every format of ``uniform`` that is legal for all matrices), commonsense subsets
    (``commonsense_n`` questions per task, 0 = skip)."""

    n_ctx: int
    n_chunks: int
    top_k: int
    batch_size: int
    greedy: bool
    uniform: list[str]
    commonsense_tasks: list[str]
    commonsense_n: int


def dequantized_model(lm, tensors: dict, types: dict) -> None:
    """Swap the quantize stage's bytes, dequantized, into ``lm`` (in place)."""
    import torch

    from ramp.formats import get_format
    from ramp.models.arch import unpermute_from_gguf

    params = dict(lm.model.named_parameters())
    with torch.no_grad():
        for m in lm.matrices():
            fmt = get_format(types[m.gguf_name])
            w = fmt.dequantize(tensors[m.gguf_name], m.shape).to(torch.float32)
            heads = gguf_heads(lm, m.role)
            params[m.hf_name].data = w if heads is None else unpermute_from_gguf(w, heads).contiguous()


def plot(results, format_map) -> None:
    """size-vs-KLD Pareto (RAMP vs baselines) and the per-matrix format map, as PNG (matplotlib, offline)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, g in results.groupby("kind"):
        ax.scatter(g["file_bytes"] / 1e6, g["kld_mean"], label=method, marker="*" if method == "ramp" else "o")
    for _, r in results.iterrows():
        ax.annotate(r["method"], (r["file_bytes"] / 1e6, r["kld_mean"]), fontsize=7)
    ax.set(xlabel="file size (MB)", ylabel="mean KLD vs FP (nats/token)", yscale="log", title="size vs KLD")
    ax.legend()
    fig.tight_layout()
    with atomic_path(PLOTS / "pareto.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    pivot = format_map.pivot(index="role", columns="block", values="bpw")
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * pivot.shape[1] + 2), 3))
    im = ax.imshow(pivot.to_numpy(), aspect="auto", cmap="viridis")
    ax.set(yticks=range(len(pivot.index)), yticklabels=list(pivot.index), xlabel="block", title="bits per weight")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(PLOTS / "format_map.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


def main() -> None:
    setup_logging()
    timer = Timer()
    params = load_params("evaluate", EvaluateParams)

    import pandas as pd
    from safetensors.numpy import load_file

    from ramp.allocation import bits_per_weight, load_allocation, matrix_bytes, slots_for, uniform
    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.evaluate.kld import fp_reference, kl_divergence, windows_for
    from ramp.evaluate.quantized import AllocationEvaluator, QuantCache
    from ramp.formats import get_format
    from ramp.models.loader import load_model

    fp = load_model(model_path())
    text = wiki_split(asset_path("wiki"))[1]
    ids = fp.tokenizer(text, add_special_tokens=False).input_ids
    windows = windows_for(fp, ids, params.n_ctx, params.n_chunks)
    ref = fp_reference(fp, windows, top_k=params.top_k, batch_size=params.batch_size)
    budget = json.loads((DATA / "allocate" / "budget.json").read_text())
    overhead = int(budget["overhead_bytes"])
    allocation = load_allocation(DATA / "allocate" / "allocation.json")

    lm = load_folded_model(with_tokenizer=True)
    slots = slots_for(lm.matrices())
    imatrix = load_file(str(DATA / "fold" / "imatrix.safetensors"))
    evaluator = AllocationEvaluator(lm, ref, QuantCache(QUANT_CACHE), imatrix, batch_size=params.batch_size)
    rows = []

    def row(method: str, kind: str, alloc: dict, kld) -> dict:
        return {
            "method": method,
            "kind": kind,
            "file_bytes": overhead + matrix_bytes(slots, alloc),
            "bpw": bits_per_weight(slots, alloc),
            **kld.as_dict(),
        }

    baselines: dict[str, dict] = {}
    if params.greedy:
        from ramp.baselines import greedy_knapsack, weighted_error_table

        cost = weighted_error_table(lm, slots, imatrix, evaluator.cache)
        baselines["greedy"] = greedy_knapsack(slots, cost, int(budget["matrix_budget_bytes"]))
    for fmt in params.uniform:
        get_format(fmt)  # unknown name -> FormatError naming it
        if all(fmt in s.formats for s in slots):
            baselines[f"uniform-{fmt}"] = uniform(slots, fmt)
        else:
            log.info("uniform %s skipped: not legal for every matrix of this model", fmt)
    for name, alloc in baselines.items():
        rows.append(row(name, "baseline", alloc, evaluator.evaluate(alloc)))

    tensors = load_file(str(DATA / "quantize" / "tensors.safetensors"))
    types = json.loads((DATA / "quantize" / "types.json").read_text())
    if types != allocation:
        raise ValueError("data/quantize/types.json does not match data/allocate/allocation.json: rerun quantize")
    dequantized_model(lm, tensors, types)
    kld = kl_divergence(lm, ref, batch_size=params.batch_size)
    rows.insert(0, row("ramp", "ramp", allocation, kld))
    metrics = {f"ramp_{k}": v for k, v in rows[0].items() if k not in ("method", "kind")}
    if params.commonsense_n > 0:
        from ramp.evaluate.commonsense import evaluate_commonsense, retained
        from ramp.evaluate.perplexity import EvaluationError

        q = evaluate_commonsense(lm, params.commonsense_tasks, params.commonsense_n, seed=0)
        base = evaluate_commonsense(fp, params.commonsense_tasks, params.commonsense_n, seed=0)
        metrics["commonsense"] = {"ramp": q, "fp": base}
        try:
            metrics["commonsense"]["retained"] = retained(q, base)
        except EvaluationError as e:  # e.g. FP accuracy 0 on a tiny random model: no retention to express
            log.warning("commonsense retention not computed: %s", e)
            metrics["commonsense"]["retained_error"] = str(e)
    results = pd.DataFrame(rows)
    for r in rows[1:]:
        metrics[f"{r['method']}_kld_mean"] = r["kld_mean"]
        metrics[f"{r['method']}_file_bytes"] = r["file_bytes"]
    same_size = [r for r in rows[1:] if r["file_bytes"] <= rows[0]["file_bytes"]]
    if same_size:
        best = min(same_size, key=lambda r: r["kld_mean"])
        metrics["best_baseline_at_size"] = best["method"]
        metrics["kld_ratio_vs_best_baseline"] = rows[0]["kld_mean"] / max(best["kld_mean"], 1e-12)
    format_map = pd.DataFrame(
        [
            {
                "gguf_name": s.gguf_name,
                "block": s.block,
                "role": s.role,
                "format": allocation[s.gguf_name],
                "bpw": get_format(allocation[s.gguf_name]).bpw,
            }
            for s in slots
        ]
    )
    with atomic_dir(OUT) as tmp:
        results.to_parquet(tmp / "results.parquet", index=False)
    PLOTS.mkdir(parents=True, exist_ok=True)
    with atomic_path(PLOTS / "pareto.csv") as tmp:
        results.to_csv(tmp, index=False)
    with atomic_path(PLOTS / "format_map.csv") as tmp:
        format_map.to_csv(tmp, index=False)
    plot(results, format_map)
    metrics["seconds"] = timer.seconds
    write_metrics("evaluate", metrics)
    log.info("evaluate done in %.1f s:\n%s", timer.seconds, results.to_string(index=False))


if __name__ == "__main__":
    main()
