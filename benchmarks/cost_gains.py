"""Does measured sensitivity transfer between model families? (issue 17) The proxy priced by another family's
per-role gains (``train.cost_gain: role``), scored on the target's own measured table, with no llama.cpp run.

Usage:
  .venv/bin/python benchmarks/cost_gains.py                       # the transfer workspace of SmolLM2 and its sources
  .venv/bin/python benchmarks/cost_gains.py --workspace DIR --out results/cost_gains.json
  .venv/bin/python benchmarks/cost_gains.py --pools "gemma3;gemma3,testbed;gemma3,testbed,testbed-s1"
  .venv/bin/python benchmarks/cost_gains.py --embedding --target-workspace ~/.cache/ramp/bench/quality/smollm2
  .venv/bin/python benchmarks/cost_gains.py --fisher --workspace ~/.cache/ramp/bench/quality/smollm2 \
      --source gemma3=~/.cache/ramp/bench/quality/gemma3 --out results/cost_gains_fisher.json

It reads the prepared models of a transfer benchmark workspace (the target in ``DIR``, each source in
``DIR/cache/sources/<name>``; each needs its sensitivity table ``data/sensitivity/costs.parquet``). For every ordered
pair (the model the gains are learned on -> the model they price), it reports:

* how well each predictor ranks the target's measured log price of a unit of proxy error (``log(measured / proxy)``
  per measured (matrix, format), Spearman): the role gains of :func:`ramp.sensitivity.role_gains`, and for contrast a
  ridge regression (lambda 1) of the same quantity on the 11 standardised features, and on roles plus features;
* at budgets spread from the target's cheapest to its dearest allocation (fractions of that byte range), and at the
  ``--budgets`` given in matrix bytes, the additive measured cost (the sum of the matrices' KLDs on the target's table,
  a first-order estimate that ranks llama.cpp's KLDs of results/transfer.json the same way) of the uniform-fill
  allocation (:func:`ramp.knapsack.knapsack_starts`, what the residual map's prior is) on the proxy, on the proxy
  priced by each predictor, and of the target's own measured knapsack; ``gap_closed`` = (uniform-fill - priced) /
  (uniform-fill - own).

``--pools`` (bench-transfer's pool syntax: ``;`` between pools, ``,`` between members, testbed variants by name)
prices the target instead with the gains learned on each pool at once (:func:`ramp.sensitivity.role_gains` of all
its members, what ``train.cost_gain: role`` does), at the same budgets: how the zero-shot prior depends on the number
of source models, over the whole byte range where bench-transfer measures one budget with llama.cpp.

``--fisher`` scores the fold stage's Fisher table (:mod:`ramp.fisher`, no evaluation) the same way: its rank
correlation with the measured KLD, and the additive measured cost of its uniform-fill and knapsack, as it is and
priced by the source's role gains learned on the Fisher basis (``train.cost_basis: fisher``), against the zero-shot
prior on the proxy. ``--source NAME=DIR`` adds a prepared workspace (e.g. bench-quality's) as a model to learn from.

``--embedding`` compares the embedding type each model would get chosen by its own measurements, predicted from
another model's gains (``allocate.embedding_type: predicted``) and by the proxy at unit gains
(:func:`embedding_choices`).

Seconds: ~20 on SmolLM2 + Gemma-3 (the knapsacks); ``--embedding`` ~4 min (quantizing the embeddings).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository root is the import root
    sys.path.insert(0, str(REPO))

FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.45, 0.6, 0.8)
# SmolLM2's matrix bytes at llama.cpp's Q2_K / Q4_0 / Q3_K_M file sizes (the file budgets less the fixed tensors)
SMOLLM2_BUDGETS = {"Q2_K": 56194528, "Q4_0": 59719424, "Q3_K_M": 61502720}
# --embedding: the whole-file budgets of bench-transfer (llama.cpp's files of each real model)
FILE_BUDGETS = {
    "smollm2": {"Q2_K": 88202016, "Q4_0": 91726912, "Q3_K_M": 93510208},
    "gemma3": {"Q4_0": 241408960, "Q3_K_M": 241961920},
}


def model_tables(ws):
    import pandas as pd

    costs = ws.stage("sensitivity") / "costs.parquet"
    if not costs.exists():
        raise SystemExit(f"{ws.root}: no sensitivity table ({costs}); prepare the model with the transfer benchmark")
    return pd.read_parquet(costs), pd.read_parquet(ws.stage("embed") / "embedding.parquet")


def log_prices(costs, embedding):
    """Measured (matrix, format) pairs with their log price of a unit of proxy error, joined to the embedding."""
    from ramp.sensitivity import log_prices as priced_pairs

    return priced_pairs(costs).merge(embedding, on="gguf_name")


def ridge_gains(src, dst, with_roles: bool) -> dict[str, float]:
    """Per matrix of embedding ``dst``, the log price predicted by a ridge fit on ``src``'s (:func:`log_prices`)
    features, each model's standardised by its own statistics."""
    import numpy as np

    from ramp.features import FEATURES
    from ramp.models.arch import ROLES

    def design(j):
        x = j[list(FEATURES)].to_numpy(float)
        x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1.0)
        onehot = np.stack([(j["role"] == r).to_numpy(float) for r in ROLES], 1)
        return np.c_[onehot, x] if with_roles else np.c_[np.ones(len(j)), x]

    a = design(src)
    beta = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ src["log_price"].to_numpy())
    return dict(zip(dst["gguf_name"], design(dst) @ beta, strict=True))


def budgets_of(slots, name: str) -> dict[str, int]:
    """The budgets a target is priced at: fractions of its byte range, and SmolLM2's llama.cpp sizes."""
    lo = sum(s.file_bytes(s.formats[0]) for s in slots)
    hi = sum(s.file_bytes(s.formats[-1]) for s in slots)
    budgets = {f"{f:.2f} of the range": int(lo + f * (hi - lo)) for f in FRACTIONS}
    return budgets | (SMOLLM2_BUDGETS if name == "smollm2" else {})


def measured_costs(costs) -> dict[tuple[str, str], float]:
    """(matrix, format) -> measured KLD of a sensitivity table."""
    return {(n, f): float(k) for n, f, k in zip(costs["gguf_name"], costs["format"], costs["kld"], strict=True)}


def priced_rows(slots, proxy, measured, budgets: dict[str, int], priced: dict) -> list[dict]:
    """Per budget, the additive measured cost of the uniform-fill on the proxy, on each ``priced`` table, and of the
    target's own measured knapsack, with each priced table's ``gap_closed``; printed as they come."""
    from ramp.knapsack import allocation_cost, knapsack_starts
    from ramp.sensitivity import best_knapsack

    rows = []
    for label, b in budgets.items():
        uniform = allocation_cost(slots, measured, knapsack_starts(slots, proxy, b, ["uniform"])["uniform"])
        own = allocation_cost(slots, measured, best_knapsack(slots, measured, b))
        row = {"budget": label, "matrix_bytes": b, "uniform_fill": uniform, "own_measured_knapsack": own}
        for k, table in priced.items():
            cost = allocation_cost(slots, measured, knapsack_starts(slots, table, b, ["uniform"])["uniform"])
            row[k] = {"cost": cost, "gap_closed": (uniform - cost) / (uniform - own) if uniform > own else None}
        rows.append(row)
        parts = ", ".join(f"{k} {row[k]['cost']:.5f}" for k in priced)
        print(f"  {label:>17}: uniform-fill {uniform:.5f} | {parts} | own {own:.5f}")
    return rows


def gaps_closed(rows: list[dict], name: str) -> list[float]:
    """``name``'s ``gap_closed`` over the budgets where the own knapsack is below the uniform-fill."""
    return [r[name]["gap_closed"] for r in rows if r[name]["gap_closed"] is not None]


def write_out(args, out: dict) -> None:
    if args.out:
        from ramp.io import atomic_write_text

        out["command"] = " ".join(["python", "benchmarks/cost_gains.py", *sys.argv[1:]])
        atomic_write_text(args.out, json.dumps(out, indent=1) + "\n")
        print(f"wrote {args.out}")


def embedding_choices(workspaces, tables) -> dict:
    """``--embedding``: each model's own embedding gain (:func:`ramp.sensitivity.role_gains`), and per ordered pair
    (gains learned on one model -> the other, a real model with bench-transfer's file budgets) the embedding type
    chosen at each budget three ways: by the priced model's own measurements (``measured``: its measured knapsack),
    by the source's gains with no evaluation (``predicted``: the role-gained uniform-fill, the zero-shot prior), and
    by the plain proxy at unit gains (``unit gains``: the uniform-fill, a zero-evaluation baseline choosing its own
    type); each with its additive measured KLD on the priced model (the embedding's measured KLD plus the matrices'
    on its measured table)."""
    from ramp.budget import Budget
    from ramp.knapsack import allocation_cost, knapsack_starts
    from ramp.pipeline.allocate import overhead_bytes
    from ramp.pipeline.fold import action_space
    from ramp.pipeline.sensitivity import embedding_prices
    from ramp.sensitivity import (
        EMBEDDING_ROLE,
        best_knapsack,
        embedding_choice,
        gained_table,
        predicted_embedding_kld,
        role_gains,
        role_map,
    )

    emb = {n: embedding_prices(w) for n, w in workspaces.items()}
    unmeasured = [n for n, e in emb.items() if e is None]
    if unmeasured:
        raise SystemExit(f"--embedding: {unmeasured} measured no embedding (sensitivity.embedding_formats)")
    out = {"embedding_gain": {n: role_gains([tables[n]], [emb[n]])[EMBEDDING_ROLE] for n in workspaces}, "pairs": []}
    print("embedding gain per model:", {n: round(g, 3) for n, g in out["embedding_gain"].items()})
    for src, dst in [(a, b) for a in workspaces for b in workspaces if a != b and b in FILE_BUDGETS]:
        ws = workspaces[dst]
        lm = ws.folded_model(lazy=True)
        slots, proxy = action_space(ws, lm)
        costs, table = tables[dst]
        on_dst = measured_costs(costs)
        kld, eproxy = emb[dst]
        gains = role_gains([tables[src]], [emb[src]])
        ways = {
            "measured": (kld, on_dst),
            "predicted": (predicted_embedding_kld(eproxy, gains), gained_table(proxy, role_map(table), gains)),
            "unit gains": (eproxy, proxy),
        }
        overheads = {f: overhead_bytes(lm, f) for f in kld}
        pair = {"learned_on": src, "priced": dst, "embedding_gain": gains[EMBEDDING_ROLE], "budgets": []}
        for label, file_bytes in FILE_BUDGETS[dst].items():
            budget = Budget(file_bytes=file_bytes, where=f"{dst} {label}")
            row: dict = {"budget": label, "file_bytes": file_bytes}
            for way, (ek, t) in ways.items():
                fmt = embedding_choice(slots, t, ek, overheads, budget)[0]
                left = budget.resolve(slots, overheads[fmt]).matrix_bytes
                fill = knapsack_starts(slots, t, left, ["uniform"])["uniform"] if way != "measured" else None
                alloc = best_knapsack(slots, t, left) if fill is None else fill
                row[way] = {"type": fmt, "additive_measured_kld": kld[fmt] + allocation_cost(slots, on_dst, alloc)}
            pair["budgets"].append(row)
            parts = ", ".join(f"{w} {row[w]['type']} {row[w]['additive_measured_kld']:.4f}" for w in ways)
            print(f"{src} -> {dst} {label}: {parts}")
        out["pairs"].append(pair)
    return out


def pool_curve(args, ws, tables) -> dict:
    """``--pools``: per pool, the role gains learned on all its members and the additive measured cost of the
    uniform-fill on the proxy they price, against the proxy's and the target's own measured knapsack."""
    import numpy as np

    from benchmarks.transfer import pool_source
    from ramp.pipeline.fold import action_space
    from ramp.pipeline.train import source_slug
    from ramp.sensitivity import gained_table, role_gains

    pools = [p.split(",") for p in args.pools.split(";")]
    by_member = {m: source_slug(pool_source(m)) for pool in pools for m in pool}
    missing = sorted(m for m, slug in by_member.items() if slug not in tables)
    if missing:
        raise SystemExit(f"--pools: {missing} not prepared under {args.workspace / 'cache' / 'sources'}")
    slots, proxy = action_space(ws, ws.folded_model(lazy=True))
    costs, emb = tables[args.target_name]
    roles = dict(zip(emb["gguf_name"], emb["role"], strict=True))
    gains = {"+".join(p): role_gains([tables[by_member[m]] for m in p]) for p in pools}
    priced = {n: gained_table(proxy, roles, g) for n, g in gains.items()}
    rows = priced_rows(slots, proxy, measured_costs(costs), budgets_of(slots, args.target_name), priced)
    summary = {n: float(np.mean(gaps_closed(rows, n))) for n in gains}
    print("mean gap closed: " + ", ".join(f"{n} {v:.3f}" for n, v in summary.items()))
    return {
        "workspace": str(args.workspace),
        "target": args.target_name,
        "pools": {n: {"members": n.split("+"), "gains": g, "gap_closed_mean": summary[n]} for n, g in gains.items()},
        "budgets": rows,
    }


def fisher_pairs(workspaces, tables) -> dict:
    """``--fisher``: per ordered pair (the model the gains are learned on -> the model priced), how well the fold
    stage's Fisher table (:mod:`ramp.fisher`, no evaluation) ranks the target's measured KLD against the proxy, and
    at each budget the additive measured cost of allocations on the target with no evaluation on it: the uniform-fill
    on the proxy priced by the source's role gains (the zero-shot prior of ``train.cost_basis: proxy``), the
    uniform-fill and the better knapsack on the Fisher table as it is and priced by the source's role gains learned on
    the Fisher basis (``train.cost_basis: fisher``); and the target's own measured knapsack."""
    import numpy as np

    from ramp.knapsack import allocation_cost, knapsack_starts
    from ramp.pipeline.fold import action_space, fisher_costs
    from ramp.pipeline.train import basis_costs
    from ramp.sensitivity import best_knapsack, gained_table, log_prices, role_gains

    def spearman(costs, column: str) -> float:
        m = log_prices(costs)
        return float(m["measured"].rank().corr(m[column].rank()))

    fisher_tables = {n: (basis_costs(c, workspaces[n], "fisher"), e) for n, (c, e) in tables.items()}
    out = {"pairs": []}
    for src, dst in [(a, b) for a in workspaces for b in workspaces if a != b]:
        ws = workspaces[dst]
        slots, proxy = action_space(ws, ws.folded_model(lazy=True))
        offered = {(s.gguf_name, f) for s in slots for f in s.formats}
        fisher = {k: v for k, v in fisher_costs(ws).items() if k in offered}
        costs, emb = tables[dst]
        roles = dict(zip(emb["gguf_name"], emb["role"], strict=True))
        proxy_gains, fisher_gains = role_gains([tables[src]]), role_gains([fisher_tables[src]])
        priced = {
            "proxy, role gains": gained_table(proxy, roles, proxy_gains),
            "fisher": fisher,
            "fisher, role gains": gained_table(fisher, roles, fisher_gains),
        }
        measured = measured_costs(costs)
        lp = log_prices(fisher_tables[dst][0])
        pair = {
            "learned_on": src,
            "priced": dst,
            "gains": {"proxy": proxy_gains, "fisher": fisher_gains},
            "spearman_measured": {
                "proxy": spearman(costs, "proxy"),
                "fisher": spearman(fisher_tables[dst][0], "proxy"),
            },
            "fisher_log_price": {"mean": float(lp["log_price"].mean()), "std": float(lp["log_price"].std())},
            "proxy_log_price_std": float(log_prices(costs)["log_price"].std()),
            "budgets": [],
        }
        print(f"\n{src} -> {dst}: spearman with the measured KLD {pair['spearman_measured']}")
        print(f"  log(measured / fisher) {pair['fisher_log_price']}, proxy's std {pair['proxy_log_price_std']:.3f}")
        for label, b in budgets_of(slots, dst).items():
            row = {"budget": label, "matrix_bytes": b}
            for k, table in priced.items():
                fill = knapsack_starts(slots, table, b, ["uniform"])["uniform"]
                row[f"{k}: uniform-fill"] = allocation_cost(slots, measured, fill)
                if k != "proxy, role gains":
                    row[f"{k}: knapsack"] = allocation_cost(slots, measured, best_knapsack(slots, table, b))
            row["own measured knapsack"] = allocation_cost(slots, measured, best_knapsack(slots, measured, b))
            pair["budgets"].append(row)
            print(
                f"  {label:>17}: "
                + ", ".join(f"{k} {v:.5f}" for k, v in row.items() if k not in ("budget", "matrix_bytes"))
            )
        keys = [k for k in pair["budgets"][0] if k not in ("budget", "matrix_bytes")]
        own = np.array([r["own measured knapsack"] for r in pair["budgets"]])
        pair["mean_ratio_to_own"] = {k: float(np.mean([r[k] for r in pair["budgets"]] / own)) for k in keys}
        print(
            "  mean ratio to the own measured knapsack: "
            + ", ".join(f"{k} {v:.3f}" for k, v in pair["mean_ratio_to_own"].items())
        )
        out["pairs"].append(pair)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workspace", type=Path, default=Path.home() / ".cache/ramp/bench/transfer/smollm2")
    ap.add_argument("--target-name", default="smollm2", help="the workspace's own model's name")
    ap.add_argument("--out", type=Path, default=None, help="also write the numbers as JSON")
    ap.add_argument("--pools", default=None, help='pools of source models, e.g. "gemma3;gemma3,testbed"')
    ap.add_argument(
        "--embedding", action="store_true", help="the embedding type chosen measured, predicted and at unit gains"
    )
    ap.add_argument("--fisher", action="store_true", help="the fold stage's Fisher table against the proxy")
    ap.add_argument(
        "--source",
        action="append",
        default=[],
        metavar="NAME=DIR",
        help="a prepared model's workspace to learn from (repeatable), beside those under DIR/cache/sources",
    )
    ap.add_argument(
        "--target-workspace",
        type=Path,
        default=None,
        help="the target's measured table from this workspace instead (a zero-shot-only transfer workspace has "
        "none: e.g. ~/.cache/ramp/bench/quality/smollm2)",
    )
    args = ap.parse_args()

    import numpy as np
    import pandas as pd
    from tqdm import tqdm

    from ramp.pipeline.fold import action_space
    from ramp.pipeline.workspace import Workspace
    from ramp.sensitivity import gained_table, role_gains

    workspaces = {args.target_name: Workspace(args.target_workspace or args.workspace)}
    sources = args.workspace / "cache" / "sources"
    for d in sorted(sources.iterdir()) if sources.exists() else []:
        workspaces[d.name] = Workspace(d)
    for item in args.source:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--source {item!r}: expected NAME=DIR")
        workspaces[name] = Workspace(Path(path).expanduser())
    if len(workspaces) < 2:
        raise SystemExit(f"{args.workspace}: no prepared source model under {sources}")
    tables = {n: model_tables(w) for n, w in workspaces.items()}
    if args.pools:
        write_out(args, pool_curve(args, workspaces[args.target_name], tables))
        return
    if args.embedding:
        write_out(args, embedding_choices(workspaces, tables))
        return
    if args.fisher:
        write_out(args, {"workspace": str(args.workspace), **fisher_pairs(workspaces, tables)})
        return
    out = {"workspace": str(args.workspace), "pairs": []}
    for src, dst in tqdm([(a, b) for a in workspaces for b in workspaces if a != b], desc="pairs", unit="pair"):
        ws = workspaces[dst]
        slots, proxy = action_space(ws, ws.folded_model(lazy=True))
        costs, emb = tables[dst]
        roles = dict(zip(emb["gguf_name"], emb["role"], strict=True))
        s_j, d_j = log_prices(*tables[src]), log_prices(costs, emb)
        gains = role_gains([tables[src]])
        per_matrix = {
            "role gains": {n: gains[roles[n]] for n in roles},
            "ridge on features": ridge_gains(s_j, emb, False),
            "ridge on roles + features": ridge_gains(s_j, emb, True),
        }
        # a per-matrix gain is a role of its own: the matrix's name
        priced = {k: gained_table(proxy, {n: n for n in g}, g) for k, g in per_matrix.items()}
        measured_rank = d_j["log_price"].reset_index(drop=True).rank()
        pair = {
            "learned_on": src,
            "priced": dst,
            "gains": gains,
            "spearman": {
                k: float(pd.Series([g[n] for n in d_j["gguf_name"]]).rank().corr(measured_rank))
                for k, g in per_matrix.items()
            },
            "budgets": [],
        }
        print(f"\n{src} -> {dst}: gains", {k: round(v, 2) for k, v in gains.items()})
        print("  spearman " + ", ".join(f"{k} {v:.2f}" for k, v in pair["spearman"].items()))
        pair["budgets"] = priced_rows(slots, proxy, measured_costs(costs), budgets_of(slots, dst), priced)
        closed = gaps_closed(pair["budgets"], "role gains")
        pair["role_gains_gap_closed_mean"] = float(np.mean(closed))
        pair["role_gains_better_or_equal"] = f"{sum(c >= 0 for c in closed)} of {len(closed)}"
        out["pairs"].append(pair)
    write_out(args, out)


if __name__ == "__main__":
    main()
