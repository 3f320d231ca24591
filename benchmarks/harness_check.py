"""Commonsense scoring on SmolLM2 by our evaluator and by lm-evaluation-harness itself, on the same documents.

Both score the seeded subset that ``evaluate_commonsense`` draws (``--n`` documents per task, seed 0); the
harness uses its own packaged task definitions, reading the offline datasets. Writes per task: both sets of
metrics, the largest per-request log-likelihood gap, and whether choice counts and every document's acc agree.

Usage: .venv/bin/python benchmarks/harness_check.py [--n 200] [--out results/harness_check.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from ramp.assets import asset_path
from ramp.evaluate.commonsense import CHANCE, TASKS, load_task, subset_indices
from ramp.evaluate.harness import compare_with_harness
from ramp.io import atomic_write_text
from ramp.models.loader import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=200, help="documents per task")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/harness_check.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tasks = args.tasks.split(",")
    lm = load_model(asset_path("smollm2"))
    indices = {t: subset_indices(len(load_task(t)), args.n, seed=0) for t in tasks}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        rows = compare_with_harness(lm, tasks, indices, Path(d))
    for task, r in rows.items():
        r["chance"] = CHANCE[task]
        print(
            f"{task:14s} n={r['n']} harness {r['harness']}  ours acc {r['ours']['acc']:.3f} "
            f"acc_norm {r['ours']['acc_norm']:.3f}  max |dll| {r['max_abs_ll_diff']:.2e}  "
            f"per-doc acc agree {r['per_doc_acc_agree']}"
        )
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "harness": "lm_eval 0.4.13 (HFLM on the same torch model and tokenizer)",
        "seed": 0,
        "seconds_total": round(time.perf_counter() - t0, 1),
        "tasks": rows,
        "command": "python benchmarks/harness_check.py " + shlex.join(sys.argv[1:]),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
