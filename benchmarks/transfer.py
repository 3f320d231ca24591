"""Zero-shot transfer (issue 17): a policy trained on other model families allocates a target it never saw, with no
evaluation on it, against the target's own trained policy and the zero-evaluation baselines, at equal file bytes.

Usage:
  .venv/bin/python benchmarks/transfer.py --target smollm2                       # merged into results/transfer.json
  .venv/bin/python benchmarks/transfer.py --target smollm2 --budgets Q3_K_M --seeds 0
  .venv/bin/python benchmarks/transfer.py --target smollm2 --pools "gemma3;gemma3,testbed"
  .venv/bin/python benchmarks/transfer.py --target smollm2 --pools "gemma3,testbed,testbed-deep,testbed-wide,testbed-s1"
  .venv/bin/python benchmarks/transfer.py --target smollm2 --seeds 1,2 --zero-shot-only    # own/baseline rows kept
  .venv/bin/python benchmarks/transfer.py --target smollm2 --seeds 0 --reuse-train --allocate '{"clip": 3.0}'
  .venv/bin/python benchmarks/transfer.py --target smollm2 --seeds 0 --ensemble 3 --zero-shot-only
  .venv/bin/python benchmarks/transfer.py --target smollm2 --seeds 0 --ensemble 3 --zero-shot-only --cost-gain role
  .venv/bin/python benchmarks/transfer.py ... --cost-gain role --reuse-train --allocate '{"walk": "prior"}'
  .venv/bin/python benchmarks/transfer.py --target smollm2 --seeds 0 --zero-shot-only --cost-gain role \
      --cost-basis fisher --allocate '{"walk": "prior", "embedding_type": "predicted"}'

Everything is the pipeline itself with params overlays (:mod:`benchmarks.quality`), in one workspace per target:

* ``ramp-own``: the committed params with ``train`` and ``allocate`` at the budget (the quality benchmark's RAMP);
  the same pass gives the zero-evaluation allocators of the evaluate stage (``greedy``, ``uniform-fill``: knapsacks
  on the imatrix-weighted proxy error) and, for reference, the measured ``sensitivity-knapsack``;
* ``llama.cpp-<preset>+imatrix``: ``llama-quantize`` files (zero evaluations);
* ``ramp-zero-shot``: ``train.sources`` = a pool of other families, ``train.include_target: false``, the
  ``--action-map`` (default residual: steps from each model's own uniform-fill; ``level`` for the earlier rows),
  trained at the target budget's bits per weight on each source; one row per pool and SAC seed
  (``train.sac.seed``; ``--ensemble N``: one policy averaging seeds seed .. seed + N - 1). Its train stage never
  evaluates the target (``target_evaluations`` = 0, checked). Its allocate stage walks the target with
  :data:`ZERO_SHOT_WALK` (``--allocate`` overrides; the row records the walk taken): a residual policy's prior
  alone, any other policy's actions shifted to fit (the walk of training let a Gemma-3 policy overspend on
  SmolLM2's early matrices and the wall then forced the last ones to Q2_K: KLD 4.1 x the own policy's).
  ``--cost-gain role``: the pool's per-role price of the proxy error (``train.cost_gain``) sets the residual prior
  and the proxy fill; ``--allocate '{"walk": "fit"}'`` on a residual policy adds its corrections to the prior.

``--zero-shot-only`` measures only the zero-shot rows (the own, baseline and llama.cpp rows already in ``--out`` are
what they are compared with); ``--reuse-train`` also keeps the workspace's trained pool policy (checked to be that
pool's, seed's and budget's) and reruns only allocate -> export, as ``dvc repro -s`` would. The zero-shot pass
leaves out the target's sensitivity stage where none of its stages reads it
(:func:`ramp.pipeline.project.skipped_stages`, as ``ramp quantize`` does).

Every file is scored by ``llama-perplexity --kl-divergence`` on ``--chunks`` held-out windows; zero-shot rows carry
paired bootstrap 95 % intervals of the per-chunk KLD difference (zero-shot minus the other) against ``ramp-own`` and
the best zero-evaluation baseline at no more bytes (llama.cpp files up to their imatrix metadata over, in their
favour, as in the quality benchmark).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository root is the import root
    sys.path.insert(0, str(REPO))

from benchmarks.quality import (  # noqa: E402
    MODELS,
    PRESET_SLACK,
    budget_overlay,
    budget_rows,
    llama_quantize_rows,
    merge_results,
    prepare,
    start,
)
from ramp.allocate import ZERO_SHOT_WALK  # noqa: E402
from ramp.params import SOURCE_SECTIONS, AllocateParams  # noqa: E402
from ramp.pipeline import STAGES  # noqa: E402
from ramp.pipeline.project import skipped_stages  # noqa: E402
from ramp.sac.config import ACTION_MAPS  # noqa: E402

log = logging.getLogger("bench-transfer")

# leave-one-family-out: the default pool of each target is every other real family
POOLS: dict[str, list[list[str]]] = {"smollm2": [["gemma3"]], "gemma3": [["smollm2"]]}
# testbeds of another depth, width or seed than the SPEC §8 one (``testbed``), as pool members: each is trained once
# (ramp.testbed, about 13 min for the 4-block one on 2 threads, longer for the deeper and wider) and cached; a
# member's source is its HF directory, prepared with the testbed's overlay (source_overlay)
TESTBEDS: dict[str, dict[str, int]] = {
    "testbed-deep": {"layers": 8},
    "testbed-wide": {"hidden": 512, "intermediate": 1536, "heads": 8, "kv_heads": 4},
    "testbed-s1": {"seed": 1},
}
# the own pass's rows carry llama-quantize's embedding type: allocate.embedding_type measured would evaluate the
# target (a forward per type), and with one embedding for all rows the comparison is between matrix allocations.
# Zero-shot rows may predict theirs (--allocate '{"embedding_type": "predicted"}': no evaluation either); they are
# then also paired with bench-quality's own and zero-evaluation rows of the measured type (compare)
FIXED_EMBEDDING = {"allocate": {"embedding_type": "auto"}}
ZERO_EVAL = ("greedy", "uniform-fill")  # the evaluate stage's allocators that measure nothing
KEEP_OWN = ("ramp", "sensitivity-knapsack", *ZERO_EVAL)
OWN_MEASURED = "bench-quality ramp (measured embedding)"  # the own path with the embedding type it measures
SAME_EMBEDDING = "bench-quality {} (same embedding)"  # a zero-evaluation knapsack given the zero-shot embedding
# the zero-shot pass's evaluate stage: RAMP's own row only (the baselines come from the own pass, same files)
LIGHT_EVALUATE = {"knapsack": [], "uniform": [], "presets": [], "evolution_evaluations": 0, "commonsense_n": 0}


# the zero-shot rows walk the target with ramp.allocate.ZERO_SHOT_WALK (a residual policy's prior, any other policy
# shifted to fit without the wall; the rest filled by the proxy error); the walk of training is AllocateParams'
# defaults, also what rows from before the settings were recorded used
TRAINING_WALK = {f.name: f.default for f in dataclasses.fields(AllocateParams) if f.name in ZERO_SHOT_WALK}
DOWNSTREAM = ("allocate", "quantize", "evaluate", "export")  # --reuse-train: the stages after train


def zero_shot_overlay(
    pool: list[str],
    bpw: float,
    seed: int,
    standardize: str = "model",
    allocate: dict[str, Any] | None = None,
    action_map: str = "level",
    ensemble: int = 1,
    cost_gain: str = "none",
    cost_basis: str = "proxy",
) -> dict[str, Any]:
    """The train stage on ``pool`` only, at ``bpw`` of each model's matrices, SAC seed offset ``seed`` (an
    ``ensemble`` of that many seeds from it), under ``action_map``, with ``train.cost_gain`` ``cost_gain`` on the
    fold stage's ``cost_basis`` table (``train.cost_basis``); the
    allocate stage's walk settings ``allocate`` (default :data:`ZERO_SHOT_WALK`)."""
    train = {
        "sources": [pool_source(m) for m in pool],
        "include_target": False,
        "rescore_top": 0,  # rescoring measures the target: a zero-shot pool never does
        "budget_bpw": bpw,
        "budget_file_bytes": None,
        "action_map": action_map,
        "ensemble": ensemble,
        "cost_gain": cost_gain,
        "cost_basis": cost_basis,
        "standardize": standardize,
        "sac": {"seed": seed},
    }
    overlays = {source: source_overlay(m) for m, source in zip(pool, train["sources"], strict=True)}
    if any(overlays.values()):
        train["source_overlays"] = {source: o for source, o in overlays.items() if o}
    return {"train": train, "allocate": dict(allocate or ZERO_SHOT_WALK), "evaluate": LIGHT_EVALUATE}


def pool_source(member: str) -> str:
    """The ``train.sources`` entry of pool member ``member``: a model name, or a testbed variant's HF directory
    (trained here first when it is not cached yet)."""
    if member not in TESTBEDS:
        return member
    from ramp.testbed import TestbedConfig, testbed_model

    return str(testbed_model(TestbedConfig(**TESTBEDS[member])))


def source_overlay(model: str) -> dict[str, Any]:
    """``model``'s ``train.source_overlays`` entry: the sections of the quality benchmark's overlay for it that its
    preparation and reward read (the testbed calibrates on its trained context of 256 and has its own KLD scale);
    empty for the real models."""
    spec = MODELS.get("testbed" if model in TESTBEDS else model, {}).get("overlay", {})
    out = {k: v for k, v in spec.items() if k in SOURCE_SECTIONS}
    if "reward" in spec.get("train", {}):
        out["reward"] = spec["train"]["reward"]
    return out


def budget_bpw(ws: Any, params: Any) -> float:
    """The allocate stage's matrix budget under ``params`` (the own pass's) as bits per weight of the target's
    quantizable matrices, resolved as the allocate stage resolves it, once the stages up to fold have run (in a new
    workspace, ``--zero-shot-only``, they run here). Never read from the workspace's ``budget.json``: after a
    zero-shot pass that is the zero-shot pass's, of its budget and its embedding type."""
    from ramp.allocation import slots_for
    from ramp.pipeline.allocate import resolve_budget
    from ramp.pipeline.fold import action_space
    from ramp.pipeline.run import run_pipeline

    run_pipeline(params, ws, ("calibrate", "embed", "fold"))
    lm = ws.folded_model(lazy=True)
    slots, _ = action_space(ws, lm)
    matrix_bytes = resolve_budget(params.allocate, ws, lm, slots)[3].matrix_bytes
    weights = sum(s.params for s in slots_for(lm.matrices()))
    return round(8 * matrix_bytes / weights, 4)


def row_id(r: dict[str, Any]) -> tuple:
    """What a row measured: a later run replaces the rows it measured again and keeps the others."""
    walk = tuple((r.get("allocate") or TRAINING_WALK).items())
    key = (r["target"], r["budget"], r["method"], tuple(r["trained_on"]), r["seed"], r.get("standardize"), walk)
    basis = r.get("cost_basis", "proxy")
    return key + (r.get("action_map", "level"), r.get("ensemble", 1), r.get("cost_gain", "none"), basis)


def compare(
    rows: list[dict[str, Any]], measured: list[dict[str, Any]] = (), quality: list[dict[str, Any]] = ()
) -> None:
    """Zero-shot rows: ratios and paired bootstrap intervals against ramp-own and the best zero-evaluation row, of
    ``rows`` and the earlier ``measured`` rows of the same target (a run that did not measure them again), and
    against ``quality``'s rows at the same budget (:func:`quality_rows`): its RAMP row (``own_measured``: the
    product's own path, whose embedding type the sensitivity stage measures) and its best zero-evaluation knapsack
    whose file carries the zero-shot row's embedding type (``same_embedding``: what the matrices' allocation alone is
    worth, the embedding handed to the baseline)."""
    from ramp.stats import paired_bootstrap

    for r in rows:
        if r["method"] != "ramp-zero-shot":
            continue
        here = [x for x in [*rows, *measured] if x["budget"] == r["budget"] and x is not r]
        same_budget = [x for x in quality if x["budget_bytes"] == r["budget_bytes"]]
        own_measured = [{**x, "method": OWN_MEASURED} for x in same_budget if x["method"] == "ramp"]
        emb = (r.get("rebuild") or {}).get("embedding_type")
        same_embedding = [  # the matrix allocation alone: a baseline handed the embedding type the zero-shot row chose
            {**x, "method": SAME_EMBEDDING.format(x["method"])}
            for x in same_budget
            if x["method"] in ZERO_EVAL and emb is not None and (x.get("rebuild") or {}).get("embedding_type") == emb
        ]
        zero = [
            x
            for x in here
            if (x["method"] in ZERO_EVAL and x["bytes"] <= r["budget_bytes"])
            or (x["method"].startswith("llama.cpp-") and x["bytes"] <= r["budget_bytes"] + PRESET_SLACK)
        ]
        own = [x for x in here if x["method"] == "ramp-own"]
        pools = {"own": own, "best_zero_eval": zero, "own_measured": own_measured, "same_embedding": same_embedding}
        for key, pool in pools.items():
            if not pool:
                continue
            best = min(pool, key=lambda x: x["kld"])
            mean, lo, hi = paired_bootstrap(r["kld_chunks"], best["kld_chunks"])
            r[f"vs_{key}"] = best["method"]
            r[f"kld_ratio_vs_{key}"] = r["kld"] / best["kld"]
            r[f"kld_diff_ci95_vs_{key}"] = [lo, hi]
            r[f"kld_diff_vs_{key}"] = mean


def quality_rows(path: Path, target: str) -> list[dict[str, Any]]:
    """``path``'s (``results/quality.json``) RAMP and zero-evaluation knapsack rows of ``target``: the committed
    params' own path at each budget, on the same held-out chunks, with ``allocate.embedding_type: measured`` (this
    benchmark's own pass keeps llama-quantize's embedding type for every row), and the greedy and uniform-fill
    files that carry that measured embedding; none when the file is absent."""
    if not path.exists():
        return []
    rows = json.loads(path.read_text())["rows"]
    return [r for r in rows if r["model"] == target and r["method"] in ("ramp", *ZERO_EVAL)]


def check_reused_train(ws: Any, params: Any) -> None:
    """``--reuse-train``: the workspace's train stage must be ``params``' pool's (``train.sources``), with this SAC
    seed and standardisation, at this budget, and zero-shot; anything else is an error naming what differs."""
    from ramp.pipeline.train import run_config

    train = ws.read_json("metrics/train.json")
    want = {
        "trained_on": list(params.train.sources),
        "zero_shot": True,
        "budget_bpw": params.train.budget_bpw,
        "seed": run_config(params.train, params.seed).seed,
        "standardize": params.train.standardize,
        "action_map": params.train.action_map,
        "ensemble": params.train.ensemble,
        "cost_gain": params.train.cost_gain,
        "cost_basis": params.train.cost_basis,
    }
    policy = ws.read_json("train/policy/policy.json")
    got = {
        "trained_on": train.get("trained_on"),
        "zero_shot": train.get("zero_shot"),
        "budget_bpw": train.get("budget_bpw"),
        "seed": train.get("sac", {}).get("seed"),
        "standardize": (policy.get("standardizer") or {}).get("mode", "model"),
        "action_map": policy.get("env", {}).get("action_map", "index"),
        "ensemble": len(train.get("ensemble_seeds", [None])),
        "cost_gain": "none" if policy.get("cost_gains") is None else "role",
        "cost_basis": policy.get("cost_basis", "proxy"),
    }
    differ = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    if differ:
        raise SystemExit(f"--reuse-train: {ws.root}'s train stage differs (found, wanted): {differ}")


def run_target(name: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    from ramp.params import load_pipeline, merge

    t0 = time.perf_counter()
    spec, overlay, ws, recipes, budgets, base = prepare(name, args, "transfer")
    overlay = merge(FIXED_EMBEDDING, overlay)  # --set may still say otherwise
    files = ws.root / "files"
    pools = [p.split(",") for p in args.pools.split(";")] if args.pools else POOLS[name]
    seeds = [int(s) for s in args.seeds.split(",")]
    rows: list[dict[str, Any]] = []
    stages: dict[str, Any] = {}
    walk = {**ZERO_SHOT_WALK, **json.loads(args.allocate)} if args.allocate else dict(ZERO_SHOT_WALK)
    for label, budget in budgets.items():
        own = load_pipeline(REPO / "params.yaml", merge(overlay, budget_overlay(budget)))
        if args.zero_shot_only:  # the own pass is not run again: its budget resolved on the target as before
            stages[label] = {"budget_bpw": budget_bpw(ws, own)}
        else:
            for r in budget_rows(own, ws, label, recipes, files, base, methods=KEEP_OWN):
                if r["method"] in KEEP_OWN:
                    method = "ramp-own" if r["method"] == "ramp" else r["method"]
                    rows.append(
                        {**r, "method": method, "trained_on": [name] if method == "ramp-own" else [], "seed": 0}
                    )
            stages[label] = {"budget_bpw": budget_bpw(ws, own), "own_train": ws.read_json("metrics/train.json")}
        bpw = stages[label]["budget_bpw"]
        for pool, seed, standardize in itertools.product(pools, seeds, args.standardize.split(",")):
            zs = zero_shot_overlay(
                pool, bpw, seed, standardize, walk, args.action_map, args.ensemble, args.cost_gain, args.cost_basis
            )
            params = load_pipeline(REPO / "params.yaml", merge(merge(overlay, budget_overlay(budget)), zs))
            variant = "" if walk == TRAINING_WALK else "-" + "-".join(str(v) for v in walk.values())
            variant += "" if args.action_map == "level" else f"-{args.action_map}"
            variant += "" if args.ensemble == 1 else f"-e{args.ensemble}"
            variant += "" if args.cost_gain == "none" else f"-gain-{args.cost_gain}"
            variant += "" if args.cost_basis == "proxy" else f"-{args.cost_basis}"
            stem = f"{label}-zero-shot-{'+'.join(pool)}-s{seed}-{standardize}{variant}"
            if args.reuse_train:
                check_reused_train(ws, params)
            # the product's stage selection: the target's sensitivity stage only where a stage here reads it
            left_out = skipped_stages(params, skip_train=False, skip_evaluate=False)
            to_run = [s for s in (DOWNSTREAM if args.reuse_train else STAGES) if s not in left_out]
            got = budget_rows(params, ws, stem, recipes, files, base, methods=("ramp",), stages=to_run)
            train = ws.read_json("metrics/train.json")
            if train["target_evaluations"] != 0 or train["trained_on"] != list(params.train.sources):
                raise RuntimeError(f"zero-shot run evaluated the target or trained on {train['trained_on']}")
            for r in got:
                rows.append(
                    {
                        **r,
                        "budget": label,
                        "method": "ramp-zero-shot",
                        "trained_on": pool,
                        "seed": seed,
                        "standardize": standardize,
                        "allocate": {**walk, "walk": ws.read_json("metrics/allocate.json")["walk"]},  # auto resolved
                        "action_map": args.action_map,
                        "ensemble": args.ensemble,
                        "cost_gain": args.cost_gain,
                        "cost_gains": train.get("cost_gains"),
                        "cost_basis": args.cost_basis,
                        "train_reused": bool(args.reuse_train),
                        "evaluations": 0,
                        "source_evaluations": train["evaluations"],
                    }
                )
            stages[label][stem] = train
    sizes_by_label = {label: b["budget_file_bytes"] for label, b in budgets.items() if "budget_file_bytes" in b}
    sizes_by_label.update({r["budget"]: r["budget_bytes"] for r in rows})
    presets = [] if args.zero_shot_only else spec["presets"]  # zero-shot only: the earlier llama.cpp rows stand
    for r in llama_quantize_rows(ws, presets, sizes_by_label, recipes, files, base):
        if r["budget"] is not None:
            rows.append({**r, "trained_on": [], "seed": 0})
    for r in rows:
        r["target"] = name
    earlier = json.loads(args.out.read_text())["rows"] if args.out.exists() else []
    new = {row_id(r) for r in rows}
    quality = quality_rows(args.out.parent / "quality.json", name)
    compare(rows, [r for r in earlier if r["target"] == name and row_id(r) not in new], quality)
    entry = {
        "overlay": overlay,
        "budgets": budgets,
        "n_ctx": spec["n_ctx"],
        "pools": pools,
        "seeds": seeds,
        "stages": stages,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(["python", "benchmarks/transfer.py", *sys.argv[1:]]),
    }
    return rows, entry


def recompare(out: Path, target: str) -> None:
    """``--recompare``: every zero-shot row of ``target`` in ``out`` paired again with the rows beside it and the
    quality benchmark's (:func:`compare`), written back in place (atomically); no measurement runs."""
    from ramp.io import atomic_write_text

    doc = json.loads(out.read_text())
    rows = [r for r in doc["rows"] if r["target"] == target]
    compare(rows, [], quality_rows(out.parent / "quality.json", target))
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")


def markdown_table(doc: dict[str, Any], target: str) -> str:
    """The README table of ``target``: every row by KLD; zero-shot rows with their walk and their ratio to (and
    paired 95 % interval of the per-chunk KLD difference with) the own policy and the best zero-evaluation row."""
    lines = [
        "| budget | method | trained on | seed | file bytes | KLD (llama.cpp) | zero-shot / own, diff 95 % CI "
        "| zero-shot / best zero-eval, diff 95 % CI | zero-shot / own with measured embedding, diff 95 % CI "
        "| zero-shot / zero-eval with its embedding, diff 95 % CI |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for r in doc["rows"] if r["target"] == target]
    for label in doc["targets"][target]["budgets"]:
        for r in sorted((r for r in rows if r["budget"] == label), key=lambda r: r["kld"]):
            method, vs = r["method"], ["", "", "", ""]
            if method == "ramp-zero-shot":
                walk = r.get("allocate") or TRAINING_WALK
                amap = r.get("action_map", "level")
                method += f" ({amap} map, {walk['walk']} walk, {walk['fill']} fill, clip {walk['clip']})"
                if r.get("ensemble", 1) > 1:
                    method += f", ensemble of seeds {r['seed']}-{r['seed'] + r['ensemble'] - 1}"
                if r.get("cost_gain", "none") != "none":
                    method += f", {r['cost_gain']} cost gains"
                if r.get("cost_basis", "proxy") != "proxy":
                    method += f" on the {r['cost_basis']} table"
                if walk.get("embedding_type"):
                    method += f", embedding {walk['embedding_type']} ({r['rebuild']['embedding_type']})"
                for i, key in enumerate(("own", "best_zero_eval", "own_measured", "same_embedding")):
                    if f"kld_ratio_vs_{key}" in r:
                        lo, hi = r[f"kld_diff_ci95_vs_{key}"]
                        vs[i] = f"{r[f'kld_ratio_vs_{key}']:.2f} x, [{lo:+.4f}, {hi:+.4f}] ({r[f'vs_{key}']})"
            cells = [
                f"{label} ({r['budget_bytes']:,d} B)",
                method,
                ", ".join(r["trained_on"]) or "-",
                str(r["seed"]),
                f"{r['bytes']:,d}",
                f"{r['kld']:.4f}",
                *vs,
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", default="smollm2", choices=sorted(POOLS))
    ap.add_argument("--table", action="store_true", help="print the README table of --out's --target and exit")
    ap.add_argument(
        "--recompare",
        action="store_true",
        help="recompute --out's --target zero-shot comparisons from its rows and quality.json beside it, and exit",
    )
    ap.add_argument("--out", type=Path, default=REPO / "results" / "transfer.json")
    ap.add_argument("--budgets", default=None, help="comma-separated budget labels (default: all of the target's)")
    ap.add_argument("--pools", default=None, help="source pools: models joined by ',', pools by ';'")
    ap.add_argument("--seeds", default="0,1,2", help="SAC seeds of the zero-shot runs (train.sac.seed)")
    ap.add_argument("--standardize", default="model", help="train.standardize of the zero-shot runs: model,pooled")
    ap.add_argument(
        "--allocate",
        default=None,
        help='the zero-shot allocate settings over the default, as JSON, e.g. \'{"walk": "wall", "clip": null}\'',
    )
    ap.add_argument(
        "--reuse-train",
        action="store_true",
        help="zero-shot rows from the workspace's trained pool policy (allocate -> export only, as dvc repro -s); "
        "implies --zero-shot-only",
    )
    ap.add_argument(
        "--zero-shot-only",
        action="store_true",
        help="measure only the zero-shot rows; they are compared with the own and baseline rows already in --out",
    )
    ap.add_argument(
        "--action-map",
        default="residual",
        choices=[m for m in ACTION_MAPS if m != "index"],
        help="train.action_map of the zero-shot runs (residual: steps from each model's uniform-fill)",
    )
    ap.add_argument(
        "--ensemble", type=int, default=1, help="train.ensemble of the zero-shot runs: seeds averaged per policy"
    )
    ap.add_argument(
        "--cost-gain",
        default="none",
        choices=["none", "role"],
        help="train.cost_gain of the zero-shot runs (role: the proxy priced per layer type, learned from the pool)",
    )
    ap.add_argument(
        "--cost-basis",
        default="proxy",
        choices=["proxy", "fisher"],
        help="train.cost_basis of the zero-shot runs (fisher: the fold stage's Fisher table, in KLD, ramp.fisher)",
    )
    ap.add_argument("--chunks", type=int, default=40, help="held-out windows for llama-perplexity's KLD")
    ap.add_argument("--set", action="append", default=[], help="extra overlay, section.key=value (repeatable)")
    ap.add_argument("--workspace", type=Path, default=None, help="default: ~/.cache/ramp/bench/transfer/<target>")
    args = ap.parse_args()
    args.zero_shot_only = args.zero_shot_only or args.reuse_train
    if args.table:
        print(markdown_table(json.loads(args.out.read_text()), args.target))
        return
    if args.recompare:
        recompare(args.out, args.target)
        return
    start()
    rows, entry = run_target(args.target, args)
    if args.zero_shot_only and args.out.exists():  # keep what the earlier full runs recorded of each budget
        old = json.loads(args.out.read_text()).get("targets", {}).get(args.target, {})
        for label, st in old.get("stages", {}).items():
            entry["stages"][label] = {**st, **entry["stages"].get(label, {})}
        entry["commands"] = [*old.get("commands", [old["command"]] if "command" in old else []), entry["command"]]
    merge_results(
        args.out, args.chunks, ("targets", "target"), args.target, rows, entry, "make bench-transfer", same=row_id
    )
    for r in rows:
        print(f"{r['budget']:<8} {r['method']:<30} {'+'.join(r['trained_on']):<16} {r['bytes']:>11} {r['kld']:.5f}")


if __name__ == "__main__":
    main()
