"""Stage sensitivity: what each matrix costs in calibration KLD in each offered format, measured and from one
gradient (:mod:`ramp.sensitivity`), for the knapsack baselines and SAC's demonstrations.

Reads ``data/fold/`` (folded model, imatrix, action space) and ``data/calibrate/tokens.safetensors``. Writes
``data/sensitivity/costs.parquet``: per matrix and offered format its file bytes, the fold stage's proxy error,
the measured KLD (probed formats only), the calibrated KLD table and the gradient table; and the stage metrics
(evaluations, seconds per evaluation).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ramp.io import atomic_dir
from ramp.params import SensitivityParams, as_dict
from ramp.pipeline.workspace import Timer, Workspace

log = logging.getLogger("ramp.pipeline.sensitivity")
COSTS = "costs.parquet"
# allocation starts by name: on the fold stage's proxy table (ramp.knapsack) or on this stage's tables
PROXY_STARTS = ("greedy", "uniform")
TABLE_STARTS = {"sensitivity": "kld", "gradient": "gradient"}
START_KINDS = (*PROXY_STARTS, *TABLE_STARTS)


def sensitivity(params: SensitivityParams, ws: Workspace) -> dict[str, Any]:
    """Measure the folded model's sensitivity tables; returns the stage metrics."""
    import math

    import pandas as pd
    from safetensors.torch import load_file

    from ramp.evaluate.kld import fp_reference
    from ramp.pipeline.fold import action_space, folded_imatrix_of
    from ramp.sensitivity import BlockRunner, calibrated_table, gradient_table, measure_kld

    ws.begin("sensitivity")
    timer = Timer()
    lm = ws.folded_model()
    slots, proxy = action_space(ws, lm)
    imatrix = folded_imatrix_of(ws)
    cache = ws.quant_cache_store()
    tokens = load_file(str(ws.stage("calibrate") / "tokens.safetensors"))["tokens"][: params.windows]
    ref = fp_reference(lm, tokens, top_k=params.top_k)
    runner = BlockRunner(lm, ref)
    t_measure = Timer()
    measured = measure_kld(lm, runner, slots, params.probes, cache, imatrix)
    measure_seconds = t_measure.seconds
    kld = calibrated_table(slots, proxy, measured)
    t_grad = Timer()
    grad = gradient_table(lm, ref, slots, cache, imatrix) if params.gradient else {}
    grad_seconds = t_grad.seconds if params.gradient else 0.0
    rows = [
        {
            "gguf_name": s.gguf_name,
            "format": f,
            "file_bytes": s.file_bytes(f),
            "proxy": float(proxy[(s.gguf_name, f)]),
            "measured": measured.get((s.gguf_name, f), math.nan),
            "kld": kld[(s.gguf_name, f)],
            "gradient": grad.get((s.gguf_name, f), math.nan),
        }
        for s in slots
        for f in s.formats
    ]
    with atomic_dir(ws.stage("sensitivity")) as tmp:
        pd.DataFrame(rows).to_parquet(tmp / COSTS, index=False)
    log.info(
        "sensitivity done in %.1f s: %d measurements (%.2f s each), gradient %.1f s",
        timer.seconds,
        len(measured),
        measure_seconds / max(1, len(measured)),
        grad_seconds,
    )
    cache.trim()
    log.info("%s", cache.usage_line())
    return ws.write_metrics(
        "sensitivity",
        {
            **as_dict(params),
            "scored_tokens": ref.n_tokens,
            "evaluations": len(measured),
            "seconds_per_evaluation": measure_seconds / max(1, len(measured)),
            "measure_seconds": measure_seconds,
            "gradient_seconds": grad_seconds,
            "seconds": timer.seconds,
        },
    )


def cost_tables(ws: Workspace) -> dict[str, dict[tuple[str, str], float]]:
    """This stage's tables by start name (``sensitivity``: calibrated KLD; ``gradient`` when it was computed)."""
    import pandas as pd

    frame = pd.read_parquet(ws.stage("sensitivity") / COSTS)
    out = {}
    for kind, column in TABLE_STARTS.items():
        if frame[column].notna().all():
            keys = zip(frame["gguf_name"], frame["format"], strict=True)
            out[kind] = {k: float(v) for k, v in zip(keys, frame[column], strict=True)}
    return out


def starts(
    ws: Workspace, slots: Sequence[Any], proxy: dict, budget_matrix_bytes: int, kinds: Sequence[str]
) -> dict[str, dict[str, str]]:
    """Allocations within ``budget_matrix_bytes`` by start kind (:data:`START_KINDS`): ``greedy`` / ``uniform`` on
    the proxy table (:func:`ramp.knapsack.knapsack_starts`), ``sensitivity`` / ``gradient`` the better knapsack on
    this stage's table (:func:`ramp.sensitivity.best_knapsack`). A table the stage did not compute is an error."""
    from ramp.knapsack import knapsack_starts
    from ramp.sensitivity import best_knapsack

    out = knapsack_starts(slots, proxy, budget_matrix_bytes, [k for k in kinds if k in PROXY_STARTS])
    wanted = [k for k in kinds if k in TABLE_STARTS]
    tables = cost_tables(ws) if wanted else {}
    for kind in wanted:
        if kind not in tables:
            raise ValueError(f"start {kind!r} needs the sensitivity stage's {kind} table (sensitivity.gradient: true)")
        out[kind] = best_knapsack(slots, tables[kind], budget_matrix_bytes)
    return {k: out[k] for k in kinds}
