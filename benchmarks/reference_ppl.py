"""SmolLM2 reference check: RAMP's torch perplexity vs llama-perplexity on the identical held-out text.

Usage: .venv/bin/python benchmarks/reference_ppl.py [--out results/reference_ppl.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from ramp.assets import asset_path
from ramp.data import wiki_split
from ramp.evaluate.perplexity import perplexity
from ramp.io import atomic_write_text
from ramp.llamacpp import ensure_built, llama_perplexity
from ramp.models.loader import load_model

SPEC_REFERENCE = 15.40


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("results/reference_ppl.json"))
    ap.add_argument("--chunks", type=int, default=40)
    args = ap.parse_args()
    torch.set_num_threads(2)
    ensure_built()
    lm = load_model(asset_path("smollm2"))
    text = wiki_split(asset_path("wiki"))[1]
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False).input_ids)
    t0 = time.perf_counter()
    ours = perplexity(lm.model, ids, n_ctx=512, n_chunks=args.chunks).ppl
    t_ours = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        f = Path(d) / "eval.txt"
        f.write_text(text, encoding="utf-8")
        t0 = time.perf_counter()
        theirs = llama_perplexity(asset_path("smollm2"), f, chunks=args.chunks)
        t_theirs = time.perf_counter() - t0
    result = {
        "model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)",
        "n_ctx": 512,
        "chunks": args.chunks,
        "ppl_torch": ours,
        "ppl_llama_cpp": theirs,
        "ratio_torch_over_llama_cpp": ours / theirs,
        "spec_reference_ppl": SPEC_REFERENCE,
        "ratio_torch_over_spec": ours / SPEC_REFERENCE,
        "seconds_torch": t_ours,
        "seconds_llama_cpp": t_theirs,
        "command": " ".join(["python", *sys.argv]),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
