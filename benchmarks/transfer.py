"""Zero-shot transfer: a SAC policy trained on the testbed (A) allocates SmolLM2 (B) at its Q3_K_M file size.

Usage (after benchmarks/sac.py --model smollm2 has saved the SmolLM2 policy at Q3_K_M):
  .venv/bin/python benchmarks/transfer.py --episodes 150 --out results/transfer.json

A is trained at the same matrix bits per weight as B's budget (the observation carries the budget only as a
remaining fraction, so the level must match), its reward the KLD on A's calibration slice. On B the policy reads
B's raw features standardised with A's statistics (the Standardizer stored in the policy) and is filled to B's
budget by fill_by_margin. Compared at equal bytes, all with B's held-out evaluator of benchmarks/sac.py: the
policy trained on B ("ramp", loaded from benchmarks/sac.py's policy folder), greedy knapsack, llama.cpp presets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from sac import Context, add_training_args, policy_folder, preset_rows, train_at  # noqa: E402

from ramp.allocate import allocate, load_policy, save_policy  # noqa: E402
from ramp.baselines import greedy_knapsack  # noqa: E402
from ramp.features import FEATURES  # noqa: E402
from ramp.io import atomic_write_text  # noqa: E402
from ramp.llamacpp import cache_root  # noqa: E402

log = logging.getLogger("bench-transfer")

B_BUDGET = "Q3_K_M"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("results/transfer.json"))
    ap.add_argument("--sac-json", type=Path, default=Path("results/sac.json"), help="where the own policy's run is")
    add_training_args(ap, episodes=150)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.perf_counter()

    b = Context("smollm2", 4, 512, 1024, 256, args.seed)
    budget = (b.work / "presets" / f"{b.src.stem}.{B_BUDGET}.gguf").stat().st_size
    mb = budget - b.ramp_overhead(budget)
    bpw = 8.0 * mb / b.matrix_params

    a = Context("testbed", 16, 256, 1024, 256, args.seed)
    a_mb = int(bpw * a.matrix_params / 8)
    res, train_s, config, _, _ = train_at(a, a_mb, args)
    folder = policy_folder(f"{bpw:.3f}bpw", args.action_map)
    policy_dir = save_policy(res.policy, cache_root() / "sac" / "testbed" / folder)

    rows = []
    zs = allocate(res.policy, b.env_slots, b.table, mb)  # policy.standardizer = A's statistics
    rows.append(
        b.matrix_row(
            "ramp-zero-shot",
            zs,
            budget,
            mb,
            trained_on="testbed",
            train_seconds=train_s,
            reward_evaluations=res.evaluations,
        )
    )
    own_dir = cache_root() / "sac" / "smollm2" / policy_folder(B_BUDGET, args.action_map)
    own = load_policy(own_dir, FEATURES)
    own_alloc = allocate(own, b.env_slots, b.table, mb)
    sac_json = args.sac_json
    own_train = {}
    if sac_json.exists():
        own_train = json.loads(sac_json.read_text()).get("training", {}).get(B_BUDGET, {})
    rows.append(
        b.matrix_row(
            "ramp",
            own_alloc,
            budget,
            mb,
            trained_on="smollm2",
            train_seconds=own_train.get("train_seconds"),
            reward_evaluations=own_train.get("reward_evaluations"),
        )
    )
    rows.append(b.matrix_row("greedy", greedy_knapsack(b.slots, b.cost, mb), budget, mb, trained_on=None))
    rows += [{**r, "trained_on": None} for r in preset_rows(b, B_BUDGET, budget)]
    for r in rows:
        r["budget"] = B_BUDGET
    best_llama = min((r for r in rows if r["method"].startswith("llama.cpp-")), key=lambda r: r["kld"])
    greedy_kld = rows[2]["kld"]
    doc = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "trained_on": "testbed (RAMP testbed Llama, 4 blocks, every format legal)",
        "rows": rows,
        "ratios": {
            r["method"]: {"kld_vs_greedy": r["kld"] / greedy_kld, "kld_vs_best_llama_cpp": r["kld"] / best_llama["kld"]}
            for r in rows
            if r["method"].startswith("ramp")
        },
        "best_llama_cpp": best_llama["method"],
        "training_a": {
            "matrix_budget_bytes": a_mb,
            "matrix_bpw": bpw,
            "train_seconds": train_s,
            "reward_evaluations": res.evaluations,
            "episodes": res.episodes,
            "best_seen_calib_kld": res.best_degradation,
            "policy_dir": str(policy_dir),
            "config": config.__dict__,
            "reward": a.calib_note,
        },
        "settings": {
            "heldout": b.heldout_note,
            "standardizer": "A's (testbed) statistics, stored in the policy",
            "fill": "fill_by_margin (no cost table)",
            "action_map": args.action_map,
            "note": "testbed and SmolLM2 are both Llama-architecture; gemma3 (another family) was not run here",
            "total_seconds": time.perf_counter() - t_start,
        },
        "command": " ".join(["python", *sys.argv]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    for r in rows:
        print(
            f"{r['method']:<28} {r['trained_on']!s:<8} {r['bytes']:>11} {r['bpw']:6.3f} {r['kld']:.5f} {r['ppl']:8.3f}"
        )
    print(json.dumps(doc["ratios"], indent=1))


if __name__ == "__main__":
    main()
