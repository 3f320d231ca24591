"""RAMP (SAC) vs greedy knapsack, uniform formats and llama.cpp presets at equal bytes, one held-out evaluator.

Usage (SmolLM2 first, then the testbed rows are merged into the same file under ``other_models``):
  .venv/bin/python benchmarks/sac.py --model smollm2 --episodes 48 --out results/sac.json
  .venv/bin/python benchmarks/sac.py --model testbed --episodes 150 --out results/sac.json

For each budget a policy is trained from scratch (SACConfig defaults except episodes / warm-up), its reward the
KLD vs the FP model on a short *calibration* slice (``--calib-tokens``); every row is then scored by the same
held-out evaluator (``--kld-windows`` windows of ``--n-ctx`` tokens of the held-out wiki split, top-64 FP
reference, as benchmarks/baselines.py), with the same llama-imatrix for every quantizer that takes one.

Budgets are file sizes. RAMP's matrix budget is the file budget minus ``file_overhead(lm, "Q8_0", provenance)``
with the ``ramp.*`` provenance keys of the longest method name (header bytes only grow with string length), so
an exported RAMP file is never above the budget. Greedy gets the same matrix budget (equal bytes). RAMP and
greedy choose from GREEDY_CHOICES of benchmarks/baselines.py (no Q4_1/Q5_1: SmolLM2's weights lie on a Q4_1
grid, SPEC §8). llama.cpp presets are their per-tensor types (``llama_rules``, checked against llama-quantize in
results/baselines.json) evaluated as allocations; their bytes are the real llama-quantize file sizes.

The agent's action axis is GREEDY_CHOICES pruned per matrix by ``pareto_slots`` (formats beaten at equal
bytes on the cost table dropped; ``--no-prune`` keeps them). Training starts from demonstrations
(``--demos``, :func:`ramp.baselines.knapsack_starts`): they are measured, the best one is cloned
(``--bc-steps``, kept near by ``--bc-weight``) and the warm-up explores around them.

Rows: "ramp" = the policy's deterministic walk + fill_by_margin (no cost table); "ramp-best-seen" = the best
allocation met during training (by calibration KLD, demonstrations included); "greedy" = greedy knapsack on the
imatrix-weighted error; "uniform-fill" = the uniform-level demonstration (every matrix at one bpw level, filled
greedily), a strong non-RL baseline.
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

from baselines import GREEDY_CHOICES, _setup  # noqa: E402

from ramp.allocate import allocate, save_policy  # noqa: E402
from ramp.allocation import bits_per_weight, matrix_bytes, save_allocation, slots_for  # noqa: E402
from ramp.assets import asset_path  # noqa: E402
from ramp.baselines import (  # noqa: E402
    allocation_cost,
    greedy_knapsack,
    knapsack_starts,
    llama_rules,
    pareto_slots,
    preset_allocation,
    uniform_baselines,
    weighted_error_table,
)
from ramp.calib import calibrate, calibration_tokens  # noqa: E402
from ramp.data import wiki_split  # noqa: E402
from ramp.evaluate.kld import fp_reference  # noqa: E402
from ramp.evaluate.perplexity import make_windows  # noqa: E402
from ramp.evaluate.quantized import AllocationEvaluator, QuantCache  # noqa: E402
from ramp.features import FEATURES, Standardizer, layer_embedding  # noqa: E402
from ramp.gguf_export import Provenance, file_overhead  # noqa: E402
from ramp.imatrix import read_imatrix  # noqa: E402
from ramp.io import atomic_write_text  # noqa: E402
from ramp.llamacpp import cache_root  # noqa: E402
from ramp.sac import AllocationEnv, RewardConfig, SACConfig, train_policy  # noqa: E402
from ramp.sac.env import ACTION_MAPS, EnvConfig  # noqa: E402

log = logging.getLogger("bench-sac")

# llama.cpp presets whose SmolLM2 file sizes are the budgets (issue 7); the testbed uses bits per weight
SMOLLM2_BUDGETS = ("Q2_K", "Q4_0", "Q3_K_M")
TESTBED_BPW = (3.0, 3.5, 4.0)
PRESETS = ("Q2_K", "Q3_K_M", "Q4_0", "IQ4_NL", "Q4_K_S", "Q4_K_M")
UNIFORM = ("Q2_K", "Q3_K", "Q4_0", "IQ4_NL", "Q4_K", "Q5_0")
# reward unit (RewardConfig.reference, KLD nats/token): about a 4-bit KLD of the model on the calibration slice
REWARD_REFERENCE = {"smollm2": 0.05, "testbed": 3e-4}
# llama-quantize's imatrix metadata keys put "+imatrix" files a few hundred bytes above the plain preset
PRESET_SLACK = 1024
LONGEST_METHOD = "ramp-zero-shot-from-testbed"  # longest ramp.method string written by these benchmarks
POLICY_VERSION = "sac-" + "x" * 40


class Context:
    """Everything the rows of one model share: model, slots, features, imatrix, evaluators, cost table."""

    def __init__(
        self, model: str, kld_windows: int, n_ctx: int, calib_tokens: int, calib_ctx: int, seed: int, prune: bool = True
    ):
        t0 = time.perf_counter()
        self.model = model
        self.work = cache_root() / "baselines" / model
        self.work.mkdir(parents=True, exist_ok=True)
        lm, src, bos, eval_text, im_path, im_note = _setup(model, self.work, 10)
        self.lm, self.src, self.im_note = lm, Path(src), im_note
        self.imatrix = read_imatrix(im_path)
        self.all_slots = slots_for(lm.matrices())
        self.slots = slots_for(lm.matrices(), GREEDY_CHOICES)
        self.n_params = sum(p.numel() for p in lm.model.parameters())
        self.matrix_params = sum(s.shape[0] * s.shape[1] for s in self.slots)
        cache = QuantCache(cache_root() / "quant_cache")

        # held-out evaluator: the one ruler for every row
        ids = torch.tensor(lm.tokenizer(eval_text, add_special_tokens=False).input_ids)
        ref = fp_reference(lm, make_windows(ids, n_ctx, kld_windows, bos), top_k=64)
        memo_dir = cache_root() / "sac" / model
        memo_dir.mkdir(parents=True, exist_ok=True)
        memo = f"heldout-{kld_windows}x{n_ctx}"
        self.heldout = {
            False: AllocationEvaluator(lm, ref, cache, None, memo_path=memo_dir / f"{memo}.json"),
            True: AllocationEvaluator(lm, ref, cache, self.imatrix, memo_path=memo_dir / f"{memo}-imatrix.json"),
        }
        self.heldout_note = f"{kld_windows} held-out wiki windows of {n_ctx} tokens ({ref.n_tokens} scored), top-64"
        self.fp_ppl = ref.ppl

        # reward: KLD on a short calibration slice (document-disjoint from the held-out windows)
        calib_text = wiki_split(asset_path("wiki"))[0]
        toks = calibration_tokens(lm, calib_text, calib_tokens, calib_ctx)
        self.calib = AllocationEvaluator(lm, fp_reference(lm, toks, seed=seed), cache, self.imatrix)
        self.calib_note = f"{toks.shape[0]} calibration windows of {calib_ctx} tokens ({toks.numel()} tokens)"
        stats = calibrate(lm, toks)
        self.table = layer_embedding(lm, stats, self.imatrix)
        self.standardizer = Standardizer().fit(self.table)
        self.cost = weighted_error_table(lm, self.slots, self.imatrix, cache)
        # the agent's action axis: formats beaten at equal bytes by another (on the cost table) are dropped
        self.env_slots = pareto_slots(self.slots, self.cost) if prune else self.slots
        self.setup_seconds = time.perf_counter() - t0

    def features(self, standardizer: Standardizer | None = None):
        """Standardised features in slot order (with ``standardizer``, e.g. another model's, or this model's)."""
        st = standardizer or self.standardizer
        return st.transform(self.table.set_index("gguf_name").loc[[s.gguf_name for s in self.env_slots]].reset_index())

    def ramp_overhead(self, budget: int) -> int:
        """Non-matrix bytes of a RAMP export with provenance keys (upper bound over the method names used)."""
        prov = Provenance(policy_version=POLICY_VERSION, budget_bytes=budget, method=LONGEST_METHOD)
        return file_overhead(self.lm, "Q8_0", provenance=prov)

    def row(self, method: str, alloc: dict, use_im: bool, budget: int, file_bytes: int, **extra) -> dict:
        t0 = time.perf_counter()
        res = self.heldout[use_im].evaluate(alloc)
        row = {
            "method": method,
            "imatrix": use_im,
            "budget_bytes": budget,
            "bytes": int(file_bytes),
            "within_budget": int(file_bytes) <= budget,
            "bpw": bits_per_weight(self.all_slots, alloc),
            "file_bpw": 8.0 * file_bytes / self.n_params,
            "ppl": res.ppl,
            "kld": res.mean,
            "kld_p99": res.p99,
            "top1": res.top1,
            "formats": {f: sum(1 for v in alloc.values() if v == f) for f in sorted(set(alloc.values()))},
            **extra,
        }
        log.info(
            "%-34s %11d B  bpw %.3f  KLD %.5f  ppl %.3f  (%.0fs)",
            method,
            file_bytes,
            row["bpw"],
            res.mean,
            res.ppl,
            time.perf_counter() - t0,
        )
        return row

    def matrix_row(self, method: str, alloc: dict, budget: int, budget_mb: int, **extra) -> dict:
        """:meth:`row` of an allocation of ``self.slots`` (imatrix-quantized, RAMP's file overhead for ``budget``
        and ``budget_mb`` matrix bytes), with its cost-table value."""
        file_bytes = budget - budget_mb + matrix_bytes(self.slots, alloc)
        return self.row(
            method, alloc, True, budget, file_bytes, table_cost=allocation_cost(self.slots, self.cost, alloc), **extra
        )


def budgets_for(ctx: Context) -> dict[str, int]:
    """label -> file budget in bytes."""
    if ctx.model == "smollm2":
        return {p: (ctx.work / "presets" / f"{ctx.src.stem}.{p}.gguf").stat().st_size for p in SMOLLM2_BUDGETS}
    base = ctx.ramp_overhead(0)
    return {f"{b:.1f}bpw": base + int(b * ctx.matrix_params / 8) for b in TESTBED_BPW}


def add_training_args(ap: argparse.ArgumentParser, episodes: int) -> None:
    """The SAC training options shared by benchmarks/sac.py and benchmarks/transfer.py."""
    ap.add_argument("--episodes", type=int, default=episodes)
    ap.add_argument("--random-episodes", type=int, default=12)
    ap.add_argument("--warmup-spread", type=float, default=0.12, help="std of warm-up actions around their centre")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--demos", default="greedy,uniform", help="demonstrations (greedy, uniform; '' = none)")
    ap.add_argument("--bc-steps", type=int, default=500, help="behaviour-cloning steps on the best demonstration")
    ap.add_argument("--bc-weight", type=float, default=1.0, help="cloning loss weight during SAC (TD3+BC)")
    ap.add_argument("--self-imitation", action="store_true", help="clone the best episode so far, not the demo")
    ap.add_argument("--action-map", default="index", choices=ACTION_MAPS, help="how an action picks a format")


def policy_folder(label: str, action_map: str) -> str:
    """Folder name of a benchmark policy (the index map keeps the historical name)."""
    return f"policy-{label}" + ("" if action_map == "index" else f"-{action_map}")


def train_at(ctx: Context, budget_mb: int, args: argparse.Namespace):
    """Train a policy at ``budget_mb`` matrix bytes; returns (TrainResult, seconds, config, budget level,
    demonstrations by kind)."""
    env = AllocationEnv(
        ctx.env_slots,
        ctx.features(),
        budget_mb,
        lambda a: ctx.calib.evaluate(a).mean,
        reward=RewardConfig(reference=REWARD_REFERENCE[ctx.model]),
        config=EnvConfig(action_map=args.action_map),
        feature_names=FEATURES,
    )
    config = SACConfig(
        seed=args.seed,
        episodes=args.episodes,
        random_episodes=args.random_episodes,
        warmup_spread=args.warmup_spread,
        bc_steps=args.bc_steps,
        bc_weight=args.bc_weight,
        self_imitation=args.self_imitation,
    )
    t0 = time.perf_counter()
    demos = [d for d in args.demos.split(",") if d]
    starts = knapsack_starts(ctx.env_slots, ctx.cost, budget_mb, demos)
    res = train_policy(env, config, standardizer=ctx.standardizer.to_dict(), demonstrations=list(starts.values()))
    return res, time.perf_counter() - t0, config, env.budget_level(), starts


def preset_rows(ctx: Context, label: str, budget: int) -> list[dict]:
    """llama.cpp presets with and without imatrix: the one named by the budget, and any other whose file fits
    (up to PRESET_SLACK bytes over: IQ4_NL's file is 224-288 bytes above Q4_0's)."""
    rows = []
    for p in PRESETS:
        for use_im in (False, True):
            path = ctx.work / "presets" / f"{ctx.src.stem}.{p}{'-imatrix' if use_im else ''}.gguf"
            size = path.stat().st_size if path.exists() else None
            alloc = preset_allocation(ctx.all_slots, llama_rules(ctx.lm, p, has_imatrix=use_im))
            if size is None:
                size = file_overhead(ctx.lm, "Q8_0") + matrix_bytes(ctx.all_slots, alloc)
            # the same-name preset always; others if they fit up to PRESET_SLACK (flagged by within_budget)
            if p != label and size > budget + PRESET_SLACK:
                continue
            rows.append(ctx.row(f"llama.cpp-{p}{'+imatrix' if use_im else ''}", alloc, use_im, budget, size))
    return rows


def ratios(rows: list[dict]) -> dict:
    """KLD ratios of the ramp rows vs the best llama.cpp entry at this budget, vs greedy and vs uniform-fill."""
    llama = [r for r in rows if r["method"].startswith("llama.cpp-")]
    best = min(llama, key=lambda r: r["kld"]) if llama else None
    greedy = next((r for r in rows if r["method"] == "greedy"), None)
    flat = next((r for r in rows if r["method"] == "uniform-fill"), None)
    out = {"best_llama_cpp": best["method"] if best else None, "best_llama_cpp_kld": best["kld"] if best else None}
    for r in rows:
        if r["method"].startswith("ramp"):
            out[r["method"]] = {
                "kld_vs_best_llama_cpp": r["kld"] / best["kld"] if best else None,
                "kld_vs_greedy": r["kld"] / greedy["kld"] if greedy else None,
                "kld_vs_uniform_fill": r["kld"] / flat["kld"] if flat else None,
            }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=("smollm2", "testbed"))
    ap.add_argument("--out", type=Path, default=Path("results/sac.json"))
    add_training_args(ap, episodes=48)
    ap.add_argument("--budgets", default=None, help="comma-separated budget labels (default: all)")
    ap.add_argument("--kld-windows", type=int, default=4)
    ap.add_argument("--n-ctx", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=1024)
    ap.add_argument("--calib-ctx", type=int, default=256)
    ap.add_argument("--no-prune", action="store_true", help="keep formats dominated at equal bytes")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # file_overhead writes a header per call
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    t_start = time.perf_counter()

    ctx = Context(
        args.model, args.kld_windows, args.n_ctx, args.calib_tokens, args.calib_ctx, args.seed, not args.no_prune
    )
    log.info("setup %.0fs", ctx.setup_seconds)
    budgets = budgets_for(ctx)
    if args.budgets:
        budgets = {k: budgets[k] for k in args.budgets.split(",")}
    rows, training, ratio = [], {}, {}
    for label, budget in budgets.items():
        mb = budget - ctx.ramp_overhead(budget)
        res, train_s, config, level, starts = train_at(ctx, mb, args)
        policy_dir = save_policy(res.policy, cache_root() / "sac" / args.model / policy_folder(label, args.action_map))
        save_allocation(policy_dir / "best_seen.json", ctx.env_slots, res.best_allocation)
        ramp_alloc = allocate(res.policy, ctx.env_slots, ctx.table, mb)
        common = {"train_seconds": train_s, "reward_evaluations": res.evaluations, "episodes": res.episodes}
        # the uniform-level start filled greedily (one of the demonstrations): a strong non-RL baseline
        flat = starts.get("uniform") or knapsack_starts(ctx.env_slots, ctx.cost, mb, ["uniform"])["uniform"]
        budget_rows = [
            ctx.matrix_row("ramp", ramp_alloc, budget, mb, **common),
            ctx.matrix_row("ramp-best-seen", res.best_allocation, budget, mb, calib_kld=res.best_degradation, **common),
            ctx.matrix_row("greedy", greedy_knapsack(ctx.slots, ctx.cost, mb), budget, mb),
            ctx.matrix_row("uniform-fill", flat, budget, mb),
        ]
        for use_im in (False, True):
            for name, alloc in uniform_baselines(ctx.all_slots, UNIFORM).items():
                size = file_overhead(ctx.lm, "Q8_0") + matrix_bytes(ctx.all_slots, alloc)
                if size <= budget:
                    budget_rows.append(ctx.row(name + ("+imatrix" if use_im else ""), alloc, use_im, budget, size))
        budget_rows += preset_rows(ctx, label, budget)
        for r in budget_rows:
            r["budget"] = label
        rows += budget_rows
        ratio[label] = ratios(budget_rows)
        training[label] = {
            "budget_bytes": budget,
            "matrix_budget_bytes": mb,
            "train_seconds": train_s,
            "reward_evaluations": res.evaluations,
            "episodes": res.episodes,
            "warmup_budget_level": level,
            "policy_dir": str(policy_dir),
            "best_seen_episode": min(
                (r for r in res.log if r["degradation"] is not None), key=lambda r: r["degradation"]
            )["episode"],
            "config": config.__dict__,
            "log": [
                {k: r[k] for k in ("episode", "reward", "degradation", "bpw", "clamped", "entropy", "alpha")}
                for r in res.log
            ],
        }
        log.info("%s: %s", label, json.dumps(ratio[label]))

    entry = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)"
        if args.model == "smollm2"
        else "RAMP testbed Llama (4 blocks, every format legal)",
        "fp": {"ppl": ctx.fp_ppl},
        "rows": rows,
        "train_seconds": sum(t["train_seconds"] for t in training.values()),
        "reward_evaluations": sum(t["reward_evaluations"] for t in training.values()),
        "ratios": ratio,
        "training": training,
        "settings": {
            "heldout": ctx.heldout_note,
            "reward": f"RewardConfig(reference={REWARD_REFERENCE[args.model]}) KLD on {ctx.calib_note}",
            "imatrix": ctx.im_note,
            "choices": list(GREEDY_CHOICES),
            "greedy_cost": "imatrix-weighted relative squared weight error (ramp.baselines.weighted_error_table)",
            "fill": "ramp: ramp.allocate.fill_by_margin (no cost table)",
            "action_map": args.action_map,
            "threads": torch.get_num_threads(),
            "setup_seconds": ctx.setup_seconds,
            "total_seconds": time.perf_counter() - t_start,
        },
        "command": " ".join(["python", *sys.argv]),
    }
    out = args.out
    doc = json.loads(out.read_text()) if out.exists() else {}
    if args.model == "smollm2":
        doc = {**entry, "other_models": doc.get("other_models", {})}
    else:
        doc.setdefault("other_models", {})[args.model] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")
    for r in rows:
        print(f"{r['budget']:<8} {r['method']:<36} {r['bytes']:>11} {r['bpw']:6.3f} {r['kld']:.5f} {r['ppl']:8.3f}")
    print(json.dumps(ratio, indent=1))


if __name__ == "__main__":
    main()
