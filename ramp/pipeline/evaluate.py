"""Stage evaluate: quality of the quantized model vs the FP model, and of baselines, on one held-out ruler.

Writes ``data/evaluate/results.parquet`` (one row per method: RAMP; the knapsacks ``greedy`` and
``uniform-fill`` on the fold stage's action space and cost table at RAMP's matrix budget; uniform formats;
llama.cpp presets as per-tensor types), ``data/evaluate/allocations.json`` (every row's allocation, so any row
can be rebuilt), plot data ``data/plots/pareto.csv`` / ``format_map.csv`` with their PNGs, and the metrics.

KLD is against the original (unfolded) FP model on held-out Wikipedia windows (SPEC §7, §10); the quantized
model is the folded model with the quantize stage's bytes dequantized and swapped in. Baseline rows count the
same non-matrix bytes as RAMP's file (embeddings in ``allocate.embedding_type``).
"""

from __future__ import annotations

import logging
from typing import Any

from ramp.io import atomic_dir, atomic_path, write_json
from ramp.params import EvaluateParams
from ramp.pipeline.workspace import Timer, Workspace, gguf_heads

log = logging.getLogger("ramp.pipeline.evaluate")


def dequantized_model(lm: Any, tensors: dict, types: dict) -> None:
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


def quantized_embedding(lm: Any, fmt: str, cache: Any) -> None:
    """Put the embedding tensors (``ramp.sensitivity.embedding_params``) of ``lm`` in ``fmt``, dequantized, as the
    export writes them (no imatrix), in place: the evaluation then scores what the files hold."""
    from ramp.sensitivity import embedding_params

    for name, p in embedding_params(lm).items():
        p.data = cache.dequantized(p.data, name, fmt)


def plot(results: Any, format_map: Any, plots: Any) -> None:
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
    with atomic_path(plots / "pareto.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    pivot = format_map.pivot(index="role", columns="block", values="bpw")
    fig, ax = plt.subplots(figsize=(max(4, 0.3 * pivot.shape[1] + 2), 3))
    im = ax.imshow(pivot.to_numpy(), aspect="auto", cmap="viridis")
    ax.set(yticks=range(len(pivot.index)), yticklabels=list(pivot.index), xlabel="block", title="bits per weight")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    with atomic_path(plots / "format_map.png") as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)


# evaluate.knapsack kinds -> method names in the results
KNAPSACK_METHODS = {
    "greedy": "greedy",
    "uniform": "uniform-fill",
    "sensitivity": "sensitivity-knapsack",
    "gradient": "gradient-knapsack",
    "fisher": "fisher-knapsack",
}


def baseline_allocations(
    params: EvaluateParams, ws: Workspace, lm: Any, slots: list, cost: dict, all_slots: list, budget: dict
) -> dict:
    """method -> allocation for every baseline ``params`` asks for (knapsacks at RAMP's matrix budget)."""
    from ramp.allocation import uniform
    from ramp.formats import get_format
    from ramp.pipeline.sensitivity import starts
    from ramp.presets import llama_rules, preset_allocation

    out: dict[str, dict] = {}
    for kind, alloc in starts(ws, slots, cost, int(budget["budget_matrix_bytes"]), params.knapsack).items():
        out[KNAPSACK_METHODS[kind]] = alloc
    for fmt in params.uniform:
        get_format(fmt)  # unknown name -> FormatError naming it
        if all(fmt in s.formats for s in all_slots):
            out[f"uniform-{fmt}"] = uniform(all_slots, fmt)
        else:
            log.info("uniform %s skipped: not legal for every matrix of this model", fmt)
    for preset in params.presets:
        types = llama_rules(lm, preset, has_imatrix=True)
        out[f"llama.cpp-{preset}"] = preset_allocation(all_slots, types)
    return out


def evolutionary(
    params: EvaluateParams, ws: Workspace, lm: Any, slots: list, start: dict, budget: int, cache: Any = None
) -> tuple:
    """(allocation, metrics) of the evolutionary search from ``start`` within ``budget`` matrix bytes, with KLD
    fitness on the first ``evolution_windows`` calibration windows (the reward's text, not the held-out one);
    ``cache``: the quantization cache to use (default: the workspace's)."""
    from safetensors.torch import load_file

    from ramp.evaluate.kld import fp_reference
    from ramp.evaluate.quantized import AllocationEvaluator
    from ramp.evolution import EvolutionConfig, evolve
    from ramp.pipeline.fold import folded_imatrix_of

    tokens = load_file(str(ws.stage("calibrate") / "tokens.safetensors"))["tokens"][: params.evolution_windows]
    ref = fp_reference(lm, tokens, top_k=params.top_k, batch_size=params.batch_size)
    cache = cache if cache is not None else ws.quant_cache_store()
    imatrix = folded_imatrix_of(ws)
    full = AllocationEvaluator(lm, ref, cache, imatrix, batch_size=params.batch_size)
    head = AllocationEvaluator(
        lm, ref.head(params.evolution_screen_windows), cache, imatrix, batch_size=params.batch_size
    )
    result = evolve(
        slots,
        start,
        budget,
        lambda a: full.evaluate(a).mean,
        lambda a: head.evaluate(a).mean,
        params.evolution_screen_windows / params.evolution_windows,
        EvolutionConfig(evaluations=params.evolution_evaluations),
    )
    return result.allocation, {
        "evaluations": result.evaluations,
        "generations": result.generations,
        "calibration_kld": result.fitness,
        "start_calibration_kld": result.history[0]["fitness"],
    }


def evaluate(params: EvaluateParams, ws: Workspace) -> dict[str, Any]:
    """Score RAMP's quantized model and the baselines on held-out windows; returns the stage metrics."""
    import pandas as pd
    from safetensors.numpy import load_file

    from ramp.allocation import allocation_hash, bits_per_weight, load_allocation, matrix_bytes, slots_for
    from ramp.assets import asset_path
    from ramp.data import wiki_split
    from ramp.evaluate.kld import fp_reference, kl_divergence, windows_for
    from ramp.evaluate.quantized import AllocationEvaluator
    from ramp.formats import get_format
    from ramp.models.loader import load_model
    from ramp.pipeline.fold import action_space, folded_imatrix_of

    ws.begin("evaluate")
    timer = Timer()
    fp = load_model(ws.model_path())
    text = wiki_split(asset_path("wiki"))[1]
    ids = fp.tokenizer(text, add_special_tokens=False).input_ids
    windows = windows_for(fp, ids, params.n_ctx, params.n_chunks)
    ref = fp_reference(fp, windows, top_k=params.top_k, batch_size=params.batch_size)
    budget = ws.read_json("allocate/budget.json")
    overhead = int(budget["overhead_bytes"])
    allocation = load_allocation(ws.stage("allocate") / "allocation.json")

    lm = ws.folded_model(with_tokenizer=True)
    all_slots = slots_for(lm.matrices())
    slots, cost = action_space(ws, lm)
    cache = ws.quant_cache_store()
    quantized_embedding(lm, budget["embedding_type"], cache)  # every row: the files' embedding, as exported
    evaluator = AllocationEvaluator(lm, ref, cache, folded_imatrix_of(ws), batch_size=params.batch_size)

    def row(method: str, kind: str, alloc: dict, kld: Any) -> dict:
        return {
            "method": method,
            "kind": kind,
            "file_bytes": overhead + matrix_bytes(all_slots, alloc),
            "bpw": bits_per_weight(all_slots, alloc),
            "allocation_hash": allocation_hash(alloc),
            **kld.as_dict(),
        }

    baselines = baseline_allocations(params, ws, lm, slots, cost, all_slots, budget)
    evolution = None
    if params.evolution_evaluations > 0:
        first = next((baselines[m] for m in KNAPSACK_METHODS.values() if m in baselines), None)
        if first is None:
            raise ValueError("evaluate.evolution_evaluations > 0 needs a knapsack start (evaluate.knapsack)")
        start = baselines.get("sensitivity-knapsack", first)
        baselines["evolutionary"], evolution = evolutionary(
            params, ws, lm, slots, start, int(budget["budget_matrix_bytes"]), cache
        )
    rows = [row(name, "baseline", alloc, evaluator.evaluate(alloc)) for name, alloc in baselines.items()]

    tensors = load_file(str(ws.stage("quantize") / "tensors.safetensors"))
    types = ws.read_json("quantize/types.json")
    if types != allocation:
        raise ValueError("data/quantize/types.json does not match data/allocate/allocation.json: rerun quantize")
    dequantized_model(lm, tensors, types)
    rows.insert(0, row("ramp", "ramp", allocation, kl_divergence(lm, ref, batch_size=params.batch_size)))
    metrics: dict[str, Any] = {f"ramp_{k}": v for k, v in rows[0].items() if k not in ("method", "kind")}
    if evolution is not None:
        metrics["evolution"] = evolution
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
            for s in all_slots
        ]
    )
    with atomic_dir(ws.stage("evaluate")) as tmp:
        results.to_parquet(tmp / "results.parquet", index=False)
        write_json(tmp / "allocations.json", {"ramp": allocation, **baselines})
    ws.plots.mkdir(parents=True, exist_ok=True)
    with atomic_path(ws.plots / "pareto.csv") as tmp:
        results.to_csv(tmp, index=False)
    with atomic_path(ws.plots / "format_map.csv") as tmp:
        format_map.to_csv(tmp, index=False)
    plot(results, format_map, ws.plots)
    metrics["seconds"] = timer.seconds
    log.info("evaluate done in %.1f s:\n%s", timer.seconds, results.to_string(index=False))
    cache.trim()
    log.info("%s", cache.usage_line())
    return ws.write_metrics("evaluate", metrics)
