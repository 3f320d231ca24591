"""SAC training cost on SmolLM2 at the Q3_K_M file size: seconds, reward evaluations, best KLD seen.

Reward = KLD vs FP on a short calibration slice (``--calib-chunks`` windows of ``--n-ctx`` tokens from the
calibration split), through ramp.evaluate.quantized.AllocationEvaluator; features from ramp.features on the
same slice. Writes results/sac_train.json (the lead's results/sac.json compares methods at equal bytes).

    .venv/bin/python benchmarks/sac.py --episodes 40 --out results/sac_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from ramp.allocate import allocate
from ramp.allocation import bits_per_weight, matrix_bytes, slots_for, uniform
from ramp.assets import asset_path
from ramp.calib import calibrate, calibration_tokens
from ramp.data import wiki_split
from ramp.evaluate.kld import fp_reference
from ramp.evaluate.quantized import AllocationEvaluator, QuantCache
from ramp.features import FEATURES, Standardizer, layer_embedding
from ramp.gguf_export import file_overhead
from ramp.io import atomic_write_text
from ramp.llamacpp import cache_root
from ramp.models.loader import load_model
from ramp.sac import AllocationEnv, SACConfig, train_policy

Q3_K_M_BYTES = 93_510_208  # SPEC §10: llama.cpp's Q3_K_M file of SmolLM2-135M


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--episodes", type=int, default=SACConfig().episodes)
    ap.add_argument("--calib-chunks", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("results/sac_train.json"))
    args = ap.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    t0 = time.perf_counter()
    lm = load_model(asset_path("smollm2"))
    slots = slots_for(lm.matrices())
    budget = Q3_K_M_BYTES - file_overhead(lm, "Q8_0")
    calib_text = wiki_split(asset_path("wiki"))[0]
    tokens = calibration_tokens(lm, calib_text, args.calib_chunks * args.n_ctx, args.n_ctx)
    stats = calibrate(lm, tokens)
    table = layer_embedding(lm, stats)
    std = Standardizer().fit(table)
    x = std.transform(table.set_index("gguf_name").loc[[s.gguf_name for s in slots]].reset_index())
    ref = fp_reference(lm, tokens, seed=args.seed)
    evaluator = AllocationEvaluator(lm, ref, QuantCache(cache_root() / "quant"), stats.imatrix())
    setup_s = time.perf_counter() - t0

    env = AllocationEnv(slots, x, budget, lambda a: evaluator.evaluate(a).mean, feature_names=FEATURES)
    config = SACConfig(seed=args.seed, episodes=args.episodes)
    t1 = time.perf_counter()
    res = train_policy(env, config, standardizer=std.to_dict())
    train_s = time.perf_counter() - t1

    policy_alloc = allocate(res.policy, slots, table, budget)
    policy_kld = evaluator.evaluate(policy_alloc).mean
    q4_0 = uniform(slots, "Q4_0")
    result = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "model": str(lm.source),
        "budget_bytes": budget,
        "file_budget_bytes": Q3_K_M_BYTES,
        "calib_tokens": int(tokens.numel()),
        "episodes": res.episodes,
        "n_slots": len(slots),
        "reward_evaluations": res.evaluations,
        "setup_seconds": setup_s,
        "train_seconds": train_s,
        "seconds_per_episode": train_s / max(1, res.episodes),
        "best_seen": {"kld": res.best_degradation, "bytes": res.best_bytes},
        "policy": {
            "kld": policy_kld,
            "bytes": matrix_bytes(slots, policy_alloc),
            "bpw": bits_per_weight(slots, policy_alloc),
        },
        "uniform_Q4_0_calib_kld": evaluator.evaluate(q4_0).mean if matrix_bytes(slots, q4_0) <= budget else None,
        "log": res.log,
        "config": config.__dict__,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "log"}, indent=1))


if __name__ == "__main__":
    main()
