"""Train (or reuse the cached) sub-4-bit testbed model and report its held-out perplexity.

Usage: .venv/bin/python benchmarks/train_testbed.py [--steps N] [--out results/testbed.json]

The model lands in ``~/.cache/ramp/testbed/<config hash>/`` (not in git); the JSON records the config, the
training log summary and the perplexity on the held-out Wikipedia documents (the trained context, BOS-led windows).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ramp.assets import asset_path
from ramp.data import wiki_split
from ramp.evaluate.perplexity import perplexity
from ramp.io import atomic_write_text
from ramp.models.loader import load_model
from ramp.testbed import TestbedConfig, testbed_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=TestbedConfig.steps)
    ap.add_argument("--chunks", type=int, default=20, help="held-out windows for perplexity")
    ap.add_argument("--n-ctx", type=int, default=TestbedConfig.n_ctx, help="window (the trained context by default)")
    ap.add_argument("--out", type=Path, default=Path("results/testbed.json"))
    args = ap.parse_args()
    cfg = TestbedConfig(steps=args.steps)
    path = testbed_model(cfg)
    torch.set_num_threads(2)
    lm = load_model(path)
    eval_text = wiki_split(asset_path("wiki"))[1]
    ids = torch.tensor(lm.tokenizer(eval_text, add_special_tokens=False).input_ids)
    bos = lm.tokenizer.bos_token_id
    ppl = perplexity(lm.model, ids, n_ctx=args.n_ctx, n_chunks=args.chunks, bos_id=bos)
    ppl_full = perplexity(lm.model, ids, n_ctx=args.n_ctx, n_chunks=args.chunks, bos_id=bos, full_window=True)
    train_log = json.loads((path / "train_log.json").read_text())
    train_log.pop("losses")
    result = {
        "model_dir": str(path),
        "params": sum(p.numel() for p in lm.model.parameters()),
        "train": train_log,
        "eval_tokens_available": int(ids.numel()),
        "heldout_ppl": ppl.as_dict(),
        "heldout_ppl_full_window": ppl_full.as_dict(),
        "command": " ".join(["python", *sys.argv]),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
