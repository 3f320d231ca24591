"""Stage train: SAC learns per-matrix formats on the folded model, rewarded by KLD on calibration windows.

Reads ``data/embed/embedding.parquet``, ``data/fold/`` (folded model, imatrix, action space) and
``data/calibrate/tokens.safetensors``. Writes ``data/train/`` (``policy/``: the actor and its feature statistics
as safetensors + JSON; ``best_allocation.json``; ``demos.json``: the measured demonstrations; ``checkpoint/``),
the learning curve ``data/plots/train_history.csv`` and the stage metrics.

Demonstrations (``train.demos``, :func:`ramp.pipeline.sensitivity.starts`): the greedy knapsack on the fold stage's
cost table, the uniform-level start filled the same way, and the knapsacks on the sensitivity stage's measured and
gradient tables are measured first, the best cloned by the actor (``sac.bc_steps``, ``sac.bc_weight``) and all
explored around; ``[]`` trains from scratch.

The training budget is the policy's own and independent of ``allocate``'s, so changing the deployment budget
never retrains (SPEC §2: a budget change reruns only allocate -> export).
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from ramp.io import atomic_dir, atomic_path, write_json
from ramp.params import TrainParams, as_dict
from ramp.pipeline.workspace import Timer, Workspace

log = logging.getLogger("ramp.pipeline.train")


def train(params: TrainParams, seed: int, ws: Workspace) -> dict[str, Any]:
    """Train the policy on the workspace's folded model; returns the stage metrics."""
    import pandas as pd
    import torch
    from safetensors.torch import load_file

    from ramp.allocate import save_policy
    from ramp.allocation import save_allocation
    from ramp.budget import Budget
    from ramp.evaluate.kld import fp_reference
    from ramp.evaluate.quantized import AllocationEvaluator
    from ramp.features import FEATURES, Standardizer
    from ramp.pipeline.allocate import overhead_bytes
    from ramp.pipeline.fold import action_space, folded_imatrix_of
    from ramp.pipeline.sensitivity import starts
    from ramp.sac.env import AllocationEnv, EnvConfig
    from ramp.sac.train import train_policy

    ws.begin("train")
    timer = Timer()
    torch.manual_seed(seed)
    sac = dataclasses.replace(params.sac, seed=seed)
    lm = ws.folded_model()
    slots, cost = action_space(ws, lm)
    budget = Budget(file_bytes=params.budget_file_bytes, bpw=params.budget_bpw, where="train").resolve(
        slots, overhead_bytes(lm)
    )
    table = pd.read_parquet(ws.stage("embed") / "embedding.parquet").set_index("gguf_name")
    table = table.loc[[s.gguf_name for s in slots]].reset_index()
    standardizer = Standardizer().fit(table)
    tokens = load_file(str(ws.stage("calibrate") / "tokens.safetensors"))["tokens"][: params.reward_windows]
    ref = fp_reference(lm, tokens, top_k=params.top_k)
    cache = ws.quant_cache_store()
    evaluator = AllocationEvaluator(lm, ref, cache, folded_imatrix_of(ws))
    demos = starts(ws, slots, cost, budget.matrix_bytes, params.demos) if params.demos else {}
    env = AllocationEnv(
        slots,
        standardizer.transform(table),
        budget.matrix_bytes,
        quality_fn=lambda alloc: evaluator.evaluate(alloc).mean,
        reward=params.reward,
        config=EnvConfig(action_map=params.action_map),
        feature_names=FEATURES,
    )
    with atomic_dir(ws.stage("train")) as tmp:
        result = train_policy(
            env,
            sac,
            checkpoint_dir=tmp / "checkpoint",
            standardizer=standardizer.to_dict(),
            demonstrations=list(demos.values()),
        )
        save_policy(result.policy, tmp / "policy")
        if result.best_allocation is not None:
            save_allocation(tmp / "best_allocation.json", slots, result.best_allocation)
        write_json(tmp / "demos.json", demos)
    history = pd.DataFrame(result.log)
    ws.plots.mkdir(parents=True, exist_ok=True)
    with atomic_path(ws.plots / "train_history.csv") as tmp_csv:
        history.to_csv(tmp_csv, index=False)
    log.info("train done in %.1f s: %d episodes, best KLD %s", timer.seconds, result.episodes, result.best_degradation)
    cache.trim()
    log.info("%s", cache.usage_line())
    return ws.write_metrics(
        "train",
        {
            "episodes": result.episodes,
            "evaluations": result.evaluations,
            "budget_file_bytes": budget.file_bytes,
            "budget_matrix_bytes": budget.matrix_bytes,
            "best_kld": result.best_degradation,
            "best_matrix_bytes": result.best_bytes,
            "policy_matches_best": result.policy_matches_best,
            "final_reward": float(history["reward"].iloc[-1]) if len(history) else None,
            "sac": as_dict(sac),
            "seconds": timer.seconds,
        },
    )
