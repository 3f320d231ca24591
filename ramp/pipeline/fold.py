"""Stage fold: Scale Folding (SPEC §5) of the model, checked against the original logits, and the action space.

The model is read one tensor at a time and folded block by block (:func:`ramp.folding.fold_to_file`, one block's
fp32 weights in memory); the logit check runs both models block by block too.

Writes ``data/fold/``: ``model.json`` (which model later stages use), ``model.safetensors`` (the folded fp32
weights with their config; only when folding is enabled, else later stages read the calibrated model lazily),
``report.parquet``, ``imatrix.safetensors`` (the imatrix of the folded weights) and ``imatrix.dat`` (llama.cpp's
format), and
``action_space.parquet``: for every matrix and legal format of ``fold.formats`` its file bytes and measured cost
(imatrix-weighted relative error of the folded weights, :func:`ramp.knapsack.weighted_error_table`), and whether
it is offered to allocators (no other legal format costs no more bytes at a strictly lower error). Train,
allocate and evaluate all read this one action space.
"""

from __future__ import annotations

import logging
from typing import Any

from ramp.io import atomic_dir, sha256_file, write_json
from ramp.params import FoldParams
from ramp.pipeline.workspace import Timer, Workspace

log = logging.getLogger("ramp.pipeline.fold")
CHECK_WINDOWS = 2  # calibration windows on which folded and original logits are compared
ACTION_SPACE = "action_space.parquet"
FOLDED = "model.safetensors"  # written only when folding is enabled
MODEL_POINTER = "model.json"  # which model later stages use: {"folded", "source", "file", "sha256"}


def fold(params: FoldParams, ws: Workspace) -> dict[str, Any]:
    """Fold (or copy) the calibrate stage's model, measure its action space; returns the stage metrics."""
    import numpy as np
    import pandas as pd
    from safetensors.numpy import save_file
    from safetensors.torch import load_file

    from ramp.allocation import slots_for
    from ramp.calib import load_stats
    from ramp.fisher import FISHER_COLUMN
    from ramp.folding import fold_to_file, folded_imatrix, load_folded
    from ramp.imatrix import write_imatrix
    from ramp.knapsack import cost_frame, pareto_slots, weighted_error_table
    from ramp.models.loader import load_model

    ws.begin("fold")
    timer = Timer()
    stats = load_stats(ws.stage("calibrate") / "stats")
    imatrix = stats.imatrix()
    all_tokens = load_file(str(ws.stage("calibrate") / "tokens.safetensors"))["tokens"]
    # the model is read one tensor at a time (ramp.models.stream): folding runs block by block
    lm = load_model(ws.model_path(), with_tokenizer=False, lazy=True)
    with atomic_dir(ws.stage("fold")) as tmp:
        extra = {"alpha": params.alpha, "enabled": params.enabled}
        pointer: dict[str, Any] = {"folded": params.enabled, "source": ws.model_reference(), "file": None}
        if params.enabled:  # the folded weights go to model.safetensors, checked against the original logits
            result = fold_to_file(lm, stats, tmp / FOLDED, params.alpha, extra=extra, source=ws.model_reference())
            report = result.report
            imatrix = folded_imatrix(imatrix, result.scales)
            folded = load_folded(tmp / FOLDED, base=lm, lazy=True)
            diff = max_logit_diff(lm, folded, all_tokens[:CHECK_WINDOWS])
            log.info("fold (alpha=%.2f): max |logit diff| %.3g", params.alpha, diff)
            if diff > params.max_logit_diff:
                raise ValueError(
                    f"folded model changes logits by {diff:.3g} > max_logit_diff {params.max_logit_diff}: "
                    "folding is not exact"
                )
            pointer.update(file=FOLDED, sha256=sha256_file(tmp / FOLDED))
            lm = folded
        else:  # nothing is rewritten: later stages read the calibrate stage's model, one weight at a time
            report = pd.DataFrame({"gguf_name": [m.gguf_name for m in lm.matrices()]})
            diff = 0.0
            log.info("fold disabled: the model is used as calibrated (no copy written)")
        slots = slots_for(lm.matrices(), tuple(params.formats))
        cache = ws.quant_cache_store()
        cost = weighted_error_table(lm, slots, imatrix, cache)
        offered = pareto_slots(slots, cost)
        extra, fisher_seconds = {}, 0.0
        if params.fisher_windows:
            t_fisher = Timer()  # block by block on the lazy model: never loaded whole
            extra[FISHER_COLUMN] = fisher_costs_of(lm, slots, all_tokens[: params.fisher_windows], imatrix, cache)
            fisher_seconds = t_fisher.seconds
        write_json(tmp / MODEL_POINTER, pointer)
        report.to_parquet(tmp / "report.parquet", index=False)
        save_file(
            {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in imatrix.items()}, str(tmp / "imatrix.safetensors")
        )
        write_imatrix(tmp / "imatrix.dat", imatrix, n_chunks=int(all_tokens.shape[0]), dataset="calibrate")
        cost_frame(slots, cost, offered, extra).to_parquet(tmp / ACTION_SPACE, index=False)
    n_legal = sum(len(s.formats) for s in slots)
    n_offered = sum(len(s.formats) for s in offered)
    log.info("fold done in %.1f s: %d of %d (matrix, format) pairs offered", timer.seconds, n_offered, n_legal)
    cache.trim()
    log.info("%s", cache.usage_line())
    return ws.write_metrics(
        "fold",
        {
            "enabled": params.enabled,
            "alpha": params.alpha,
            "max_logit_diff": diff,
            "formats_legal": n_legal,
            "formats_offered": n_offered,
            "fisher_windows": params.fisher_windows,
            "fisher_seconds": fisher_seconds,
            "seconds": timer.seconds,
        },
    )


def max_logit_diff(a: Any, b: Any, tokens: Any) -> float:
    """max |logits(a) - logits(b)| over ``tokens[n_seq, n_ctx]``; lazy models run block by block
    (:func:`ramp.models.stream.block_forward`), the same bits as their whole forward pass."""
    import torch

    from ramp.models.stream import block_forward, output_head

    def logits(lm: Any) -> list[torch.Tensor]:
        hidden = block_forward(lm.model, lm.store, tokens, batch_size=int(tokens.shape[0]), desc="fold check")
        with torch.inference_mode(), output_head(lm.model, lm.store) as head:
            return [head(h) for h in hidden]

    return max(float((x - y).abs().max()) for x, y in zip(logits(a), logits(b), strict=True))


def action_space(ws: Workspace, lm: Any) -> tuple[list, dict]:
    """(offered slots, cost table) of the fold stage for ``lm`` (the folded model)."""
    from ramp.allocation import slots_for
    from ramp.knapsack import read_action_space

    return read_action_space(ws.stage("fold") / ACTION_SPACE, slots_for(lm.matrices()))


def fisher_costs_of(lm: Any, slots: list, tokens: Any, imatrix: dict, cache: Any) -> dict:
    """The Fisher table (:func:`ramp.fisher.fisher_table`) of ``lm`` (lazy or whole; a forward and a backward pass
    per window of ``tokens``, block by block) for every legal format of ``slots``."""
    from ramp.fisher import fisher_table, output_fisher

    log.info("Fisher table: output gradients on %d calibration windows", int(tokens.shape[0]))
    return fisher_table(lm, slots, output_fisher(lm, tokens), imatrix, cache)


def fisher_costs(ws: Workspace) -> dict[tuple[str, str], float]:
    """``(gguf_name, fmt) -> KLD`` estimate of the fold stage's Fisher table (every legal format); an error naming
    the param when the stage computed none."""
    import pandas as pd

    from ramp.fisher import FISHER_COLUMN

    table = pd.read_parquet(ws.stage("fold") / ACTION_SPACE)
    if FISHER_COLUMN not in table.columns:
        raise ValueError(
            f"{ws.stage('fold') / ACTION_SPACE} has no {FISHER_COLUMN!r} column: run the fold stage with "
            "fold.fisher_windows > 0"
        )
    keys = zip(table["gguf_name"], table["format"], strict=True)
    return {k: float(v) for k, v in zip(keys, table[FISHER_COLUMN], strict=True)}


def folded_imatrix_of(ws: Workspace) -> dict:
    """The folded model's imatrix (tensor name -> float32[cols]) written by this stage."""
    from safetensors.numpy import load_file

    return load_file(str(ws.stage("fold") / "imatrix.safetensors"))
