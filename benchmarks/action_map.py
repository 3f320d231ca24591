"""Action map ablation for zero-shot transfer: "index" (a fraction of each matrix's format list) vs "level" (a bpw
level, the same on any model), testbed policy -> SmolLM2 at the Q3_K_M size, over several seeds.

Runs benchmarks/transfer.py once per (map, seed) and collects the zero-shot, own-policy and greedy KLDs. The own
SmolLM2 policy of each map must exist (benchmarks/sac.py --budgets Q3_K_M [--action-map level], whose JSON is
given by --sac-json-index / --sac-json-level).

Usage: .venv/bin/python benchmarks/action_map.py --seeds 0,1,2 --out results/action_map.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from ramp.io import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--episodes", type=int, default=300)
    ap.add_argument("--sac-json-index", type=Path, default=Path("results/sac.json"))
    ap.add_argument("--sac-json-level", type=Path, default=Path("results/sac_level.json"))
    ap.add_argument("--out", type=Path, default=Path("results/action_map.json"))
    args = ap.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    here = Path(__file__).resolve().parent
    runs: dict[str, list[dict]] = {"index": [], "level": []}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        for action_map, sac_json in (("index", args.sac_json_index), ("level", args.sac_json_level)):
            for seed in seeds:
                out = Path(d) / f"{action_map}-{seed}.json"
                cmd = [sys.executable, str(here / "transfer.py"), "--episodes", str(args.episodes), "--self-imitation"]
                cmd += ["--seed", str(seed), "--action-map", action_map, "--sac-json", str(sac_json), "--out", str(out)]
                print(f"== {action_map} seed {seed}: {shlex.join(cmd[1:])}", flush=True)
                subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
                doc = json.loads(out.read_text())
                kld = {r["method"]: r["kld"] for r in doc["rows"]}
                zs = next(r for r in doc["rows"] if r["method"] == "ramp-zero-shot")
                runs[action_map].append(
                    {
                        "seed": seed,
                        "zero_shot_kld": kld["ramp-zero-shot"],
                        "own_policy_kld": kld["ramp"],
                        "greedy_kld": kld["greedy"],
                        "zero_shot_formats": zs["formats"],
                        "testbed_best_seen_calib_kld": doc["training_a"]["best_seen_calib_kld"],
                    }
                )
                print(f"   zero-shot KLD {kld['ramp-zero-shot']:.4f}  formats {zs['formats']}", flush=True)
    summary = {
        m: {
            "zero_shot_kld_mean": statistics.mean(r["zero_shot_kld"] for r in rs),
            "zero_shot_kld_min": min(r["zero_shot_kld"] for r in rs),
            "zero_shot_kld_max": max(r["zero_shot_kld"] for r in rs),
            "zero_shot_vs_greedy_mean": statistics.mean(r["zero_shot_kld"] / r["greedy_kld"] for r in rs),
        }
        for m, rs in runs.items()
    }
    means = {m: summary[m]["zero_shot_kld_mean"] for m in runs}
    summary["level_over_index_mean_kld"] = means["level"] / means["index"]
    doc = {
        "what": "zero-shot transfer testbed -> SmolLM2 at the Q3_K_M size, held-out KLD, per action map and seed",
        "summary": summary,
        "runs": runs,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": "python benchmarks/action_map.py " + shlex.join(sys.argv[1:]),
    }
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
