"""Stage train: SAC learns per-matrix formats on the folded model, rewarded by KLD on calibration windows.

Reads params ``train`` and ``seed``. Reads ``data/embed/embedding.parquet``, ``data/fold/`` (folded model,
imatrix) and ``data/calibrate/tokens.safetensors``. Writes ``data/train/`` (``policy/``: the actor and its
feature statistics as safetensors + JSON; ``best_allocation.json``; ``checkpoint/``), the learning curve
``data/plots/train_history.csv`` and ``data/metrics/train.json``.

Demonstrations (``train.demos``): the greedy knapsack on the imatrix-weighted error table and the uniform-level
start filled the same way (:func:`ramp.baselines.knapsack_starts`) are measured first, cloned by the actor
(``sac.bc_steps``, ``sac.bc_weight``) and explored around; ``[]`` trains from scratch.

The training budget (``train.budget_bpw``) is the policy's own and independent of ``allocate``'s budget, so
changing the deployment budget never retrains (SPEC §2: a budget change reruns only allocate -> export).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ramp.sac.agent import SACConfig
from ramp.sac.env import ACTION_MAPS
from ramp.sac.reward import RewardConfig
from stages._common import (
    DATA,
    PLOTS,
    Timer,
    as_dict,
    atomic_dir,
    load_folded_model,
    load_params,
    load_value,
    setup_logging,
    write_json,
    write_metrics,
)

log = logging.getLogger("stages.train")
OUT = DATA / "train"
QUANT_CACHE = "cache/quantized"


@dataclass(frozen=True)
class TrainParams:
    """``budget_bpw``: training budget in bits per weight of the quantizable matrices; ``reward_windows``
    calibration windows scored for the reward (a short slice, SPEC §6); ``top_k`` of the FP reference."""

    budget_bpw: float
    reward_windows: int
    top_k: int
    demos: tuple[str, ...] = ("greedy", "uniform")
    action_map: str = "index"  # how an action picks a format: index | level (ramp.sac.env)
    sac: SACConfig = field(default_factory=SACConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)

    def __post_init__(self) -> None:
        if self.budget_bpw <= 0 or self.reward_windows < 1:
            raise ValueError(f"budget_bpw={self.budget_bpw} and reward_windows={self.reward_windows} must be > 0")
        bad = [d for d in self.demos if d not in ("greedy", "uniform")]
        if bad:
            raise ValueError(f"train.demos has {bad}; expected a list of 'greedy' and/or 'uniform'")
        if self.action_map not in ACTION_MAPS:
            raise ValueError(f"train.action_map is {self.action_map!r}; expected one of {list(ACTION_MAPS)}")


def main() -> None:
    setup_logging()
    timer = Timer()
    params = load_params("train", TrainParams)
    seed = load_value("seed", int)

    import dataclasses

    import pandas as pd
    import torch
    from safetensors.numpy import load_file as load_np
    from safetensors.torch import load_file

    from ramp.allocate import save_policy
    from ramp.allocation import slots_for
    from ramp.baselines import knapsack_starts, weighted_error_table
    from ramp.evaluate.kld import fp_reference
    from ramp.evaluate.quantized import AllocationEvaluator, QuantCache
    from ramp.features import FEATURES, Standardizer
    from ramp.sac.env import AllocationEnv, EnvConfig
    from ramp.sac.train import train_policy

    torch.manual_seed(seed)
    sac = dataclasses.replace(params.sac, seed=seed)
    lm = load_folded_model()
    slots = slots_for(lm.matrices())
    table = pd.read_parquet(DATA / "embed" / "embedding.parquet").set_index("gguf_name")
    table = table.loc[[s.gguf_name for s in slots]].reset_index()
    standardizer = Standardizer().fit(table)
    features = standardizer.transform(table)
    tokens = load_file(str(DATA / "calibrate" / "tokens.safetensors"))["tokens"][: params.reward_windows]
    ref = fp_reference(lm, tokens, top_k=params.top_k)
    imatrix = load_np(str(DATA / "fold" / "imatrix.safetensors"))
    cache = QuantCache(QUANT_CACHE)
    evaluator = AllocationEvaluator(lm, ref, cache, imatrix)
    budget = int(params.budget_bpw * sum(s.params for s in slots) / 8)
    demos = {}
    if params.demos:
        log.info("demonstrations %s from the imatrix-weighted error table", list(params.demos))
        cost = weighted_error_table(lm, slots, imatrix, cache)
        demos = knapsack_starts(slots, cost, budget, params.demos)
    env = AllocationEnv(
        slots,
        features,
        budget,
        quality_fn=lambda alloc: evaluator.evaluate(alloc).mean,
        reward=params.reward,
        config=EnvConfig(action_map=params.action_map),
        feature_names=FEATURES,
    )
    with atomic_dir(OUT) as tmp:
        result = train_policy(
            env,
            sac,
            checkpoint_dir=tmp / "checkpoint",
            standardizer=standardizer.to_dict(),
            demonstrations=list(demos.values()),
        )
        save_policy(result.policy, tmp / "policy")
        write_json(tmp / "best_allocation.json", result.best_allocation or {})
    history = pd.DataFrame(result.log)
    PLOTS.mkdir(parents=True, exist_ok=True)
    from ramp.io import atomic_path

    with atomic_path(PLOTS / "train_history.csv") as tmp_csv:
        history.to_csv(tmp_csv, index=False)
    write_metrics(
        "train",
        {
            "episodes": result.episodes,
            "evaluations": result.evaluations,
            "budget_bpw": params.budget_bpw,
            "matrix_budget_bytes": budget,
            "best_kld": result.best_degradation,
            "best_bytes": result.best_bytes,
            "final_reward": float(history["reward"].iloc[-1]) if len(history) else None,
            "sac": as_dict(sac),
            "seconds": timer.seconds,
        },
    )
    log.info(
        "train done in %.1f s: %d episodes, best KLD %s -> %s",
        timer.seconds,
        result.episodes,
        result.best_degradation,
        OUT,
    )


if __name__ == "__main__":
    main()
