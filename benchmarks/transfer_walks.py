"""Why a zero-shot policy's allocation is what it is (issue 17): the walks of ``ramp.allocate`` on a transfer
benchmark workspace, priced on the target's measured sensitivity table, with no llama.cpp run.

Usage:
  .venv/bin/python benchmarks/transfer_walks.py                   # ~/.cache/ramp/bench/transfer/smollm2
  .venv/bin/python benchmarks/transfer_walks.py --workspace DIR --out results/transfer_walks.json

It reads the workspace's trained policy (``data/train/policy``: whatever pool and seed ran last there), the target's
embedding, action space, allocate budget and sensitivity table (``data/sensitivity/costs.parquet``: per matrix and
format, the calibration KLD with only that matrix quantized), and prints:

* the walk of training: the bytes the policy asks for without the wall (as a fraction of the budget) and how many
  matrices the wall clamps;
* the ``fit`` shift, and the standardised features of the target beyond the range of the pool's (each source's
  prepared embedding in ``cache/sources/<name>``);
* for every walk (``wall`` / ``fit``) x ``clip`` (none / 3) x fill (``margin`` / ``proxy``), the ``prior`` walk of a
  residual policy, and for the uniform-fill and sensitivity knapsacks: the allocation's additive cost on the
  measured table (the sum of its matrices' KLDs, a first-order estimate: it ranks the llama.cpp KLDs of
  results/transfer.json the same way);
* the matrices the zero-shot allocation (:data:`ramp.allocate.ZERO_SHOT_WALK`) and the measured knapsack move away
  from the uniform-fill, with each move's measured KLD and byte change: what a policy would have to learn;
* for an ensemble (``train.ensemble``), each member seed's zero-shot walk priced alone.

The policy's walks use the proxy as the allocate stage does: priced by its cost gains when it has them
(``train.cost_gain: role``); the ``uniform-fill (proxy)`` row is the plain proxy's.

Seconds on SmolLM2 (210 matrices): the walks take ~0.5 s each.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository root is the import root
    sys.path.insert(0, str(REPO))


def measured_table(ws) -> dict[tuple[str, str], float]:
    import pandas as pd

    costs = pd.read_parquet(ws.stage("sensitivity") / "costs.parquet")
    return {(n, f): float(k) for n, f, k in zip(costs["gguf_name"], costs["format"], costs["kld"], strict=True)}


def features_of(ws, slots):
    import pandas as pd

    table = pd.read_parquet(ws.stage("embed") / "embedding.parquet").set_index("gguf_name")
    return table.loc[[s.gguf_name for s in slots]].reset_index()


def moves(slots, measured, base, alloc) -> list[dict]:
    """The matrices ``alloc`` gives another format than ``base``, with the measured KLD and byte change of each,
    largest KLD change first (additive: they sum to the two allocations' cost difference)."""
    out = []
    for s in slots:
        a, b = base[s.gguf_name], alloc[s.gguf_name]
        if a != b:
            change = measured[(s.gguf_name, b)] - measured[(s.gguf_name, a)]
            out.append(
                {
                    "matrix": s.gguf_name,
                    "from": a,
                    "to": b,
                    "kld_change": change,
                    "bytes_change": s.file_bytes(b) - s.file_bytes(a),
                }
            )
    return sorted(out, key=lambda m: -abs(m["kld_change"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path.home() / ".cache/ramp/bench/transfer/smollm2")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    args = ap.parse_args()

    import numpy as np

    from ramp.allocate import (
        ZERO_SHOT_WALK,
        allocate,
        fit_shift,
        load_policy,
        policy_costs,
        policy_env_config,
        policy_observations,
        policy_walk,
        residual_prior,
    )
    from ramp.allocation import matrix_bytes
    from ramp.io import atomic_write_text
    from ramp.knapsack import allocation_cost, knapsack_starts
    from ramp.pipeline.fold import action_space
    from ramp.pipeline.train import source_slug
    from ramp.pipeline.workspace import Workspace
    from ramp.sensitivity import best_knapsack

    ws = Workspace(args.workspace)
    train = ws.read_json("metrics/train.json")
    policy = load_policy(ws.stage("train") / "policy")
    slots, raw_proxy = action_space(ws, ws.folded_model(lazy=True))
    budget = int(ws.read_json("allocate/budget.json")["budget_matrix_bytes"])
    table = features_of(ws, slots)
    proxy = policy_costs(policy, slots, table, raw_proxy)  # as the allocate stage: priced by the policy's cost gains
    measured = measured_table(ws)
    x = policy_observations(policy, slots, table)

    prior = residual_prior(slots, proxy, budget) if policy_env_config(policy).action_map == "residual" else None
    free, _ = policy_walk(policy, slots, x, budget, wall=False, prior=prior)
    walled, _ = policy_walk(policy, slots, x, budget, prior=prior)
    clamped = sum(free[s.gguf_name] != walled[s.gguf_name] for s in slots)
    out = {
        "workspace": str(ws.root),
        "trained_on": train.get("trained_on"),
        "sac_seed": train.get("sac", {}).get("seed"),
        "budget_matrix_bytes": budget,
        "training_walk_spend": matrix_bytes(slots, free) / budget,
        "training_walk_clamped": int(clamped),
        "fit_shift": fit_shift(policy, slots, x, budget, prior=prior),
        "fit_shift_clip3": fit_shift(policy, slots, np.clip(x, -3, 3), budget, prior=prior),
    }
    names = list(policy.feature_names)
    pool_max = np.full(len(names), -np.inf)
    pool_min = np.full(len(names), np.inf)
    for source in train.get("trained_on") or []:
        sws = Workspace(ws.root / "cache" / "sources" / source_slug(source))
        if not sws.stage("embed").exists():
            continue
        s_slots, _ = action_space(sws, sws.folded_model(lazy=True))
        sx = policy_observations(policy, s_slots, features_of(sws, s_slots))
        pool_max, pool_min = np.maximum(pool_max, sx.max(0)), np.minimum(pool_min, sx.min(0))
    out["features_beyond_pool"] = {
        n: {"target": [float(x[:, j].min()), float(x[:, j].max())], "pool": [float(pool_min[j]), float(pool_max[j])]}
        for j, n in enumerate(names)
        if np.isfinite(pool_max[j]) and (x[:, j].max() > pool_max[j] + 1e-6 or x[:, j].min() < pool_min[j] - 1e-6)
    }
    costs = {}
    for walk, clip, fill in itertools.product(("wall", "fit"), (None, 3.0), ("margin", "proxy")):
        alloc = allocate(
            policy,
            slots,
            table,
            budget,
            fill_cost=proxy if fill == "proxy" else None,
            walk=walk,
            clip=clip,
            prior_cost=proxy,
        )
        costs[f"{walk} walk, {fill} fill, clip {clip}"] = allocation_cost(slots, measured, alloc)
    if prior is not None:  # the residual prior alone (allocate.walk: prior)
        alloc = allocate(policy, slots, table, budget, fill_cost=proxy, walk="prior", prior_cost=proxy)
        costs["prior walk (the policy's corrections left out)"] = allocation_cost(slots, measured, alloc)
    fill = knapsack_starts(slots, raw_proxy, budget, ("uniform",))["uniform"]
    oracle = best_knapsack(slots, measured, budget)
    costs["uniform-fill (proxy)"] = allocation_cost(slots, measured, fill)
    costs["sensitivity-knapsack (measured)"] = allocation_cost(slots, measured, oracle)
    zs = ZERO_SHOT_WALK
    fill_cost = proxy if zs["fill"] == "proxy" else None
    members = sorted((ws.stage("train") / "members").glob("*/")) if (ws.stage("train") / "members").is_dir() else []
    for folder in members:  # an ensemble's seeds, each walked alone as the zero-shot walk does
        alone = allocate(load_policy(folder), slots, table, budget, fill_cost, zs["walk"], zs["clip"], prior_cost=proxy)
        costs[f"ensemble member {folder.name}, zero-shot walk"] = allocation_cost(slots, measured, alone)
    out["additive_measured_kld"] = costs
    zero_shot = allocate(policy, slots, table, budget, fill_cost, zs["walk"], zs["clip"], prior_cost=proxy)
    out["moves_from_uniform_fill"] = {
        "zero-shot walk": moves(slots, measured, fill, zero_shot),
        "sensitivity-knapsack (measured)": moves(slots, measured, fill, oracle),
    }

    print(f"policy trained on {out['trained_on']} (SAC seed {out['sac_seed']}), target {ws.root}")
    print(
        f"walk of training: asks for {out['training_walk_spend']:.1%} of the budget without the wall; the wall "
        f"clamps {clamped} of {len(slots)} matrices"
    )
    print(f"fit shift: {out['fit_shift']:+.3f} (with clip 3: {out['fit_shift_clip3']:+.3f})")
    for n, v in out["features_beyond_pool"].items():
        (tlo, thi), (plo, phi) = v["target"], v["pool"]
        print(f"  {n:<18} target [{tlo:+.2f}, {thi:+.2f}]  pool [{plo:+.2f}, {phi:+.2f}]")
    for k, v in costs.items():
        print(f"  {k:<40} additive measured KLD {v:.4f}")
    for k, v in out["moves_from_uniform_fill"].items():
        print(f"{k}: {len(v)} matrices moved from uniform-fill, the largest by measured KLD change:")
        for m in v[:6]:
            print(
                f"  {m['matrix']:<28} {m['from']:>6} -> {m['to']:<6} {m['kld_change']:+.5f}  {m['bytes_change']:+,d} B"
            )
    if args.out is not None:
        atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
