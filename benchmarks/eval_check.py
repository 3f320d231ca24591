"""Evaluation check on SmolLM2: our torch metrics against llama.cpp's own tools, plus evaluator timings.

(a) perplexity of the FP model in torch vs ``llama-perplexity`` on an F32 GGUF written by export_gguf
    (same held-out text, n_ctx 512);
(b) KLD of a uniform Q4_0 allocation through AllocationEvaluator vs ``llama-perplexity --kl-divergence``
    against the F32 GGUF's logits (Q4_0 GGUF with F32 embeddings, as the torch swap leaves them);
(c) timings: filling the quantization cache for all 210 matrices, one warm evaluate() at 4x512 and 8x256;
(d) FP commonsense accuracy on seeded subsets next to the published SmolLM2-135M numbers.

Usage: .venv/bin/python benchmarks/eval_check.py [--chunks 10] [--commonsense 100] [--out results/eval_check.json]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ramp.allocation import slots_for, uniform
from ramp.assets import asset_path
from ramp.data import wiki_split
from ramp.evaluate.commonsense import TASKS, evaluate_commonsense
from ramp.evaluate.kld import fp_reference, windows_for
from ramp.evaluate.perplexity import perplexity
from ramp.evaluate.quantized import AllocationEvaluator, QuantCache
from ramp.gguf_export import export_gguf
from ramp.io import atomic_write_text
from ramp.llamacpp import ensure_built, tool
from ramp.models.loader import load_model

# SmolLM2-135M model card (base model, lighteval zero-shot); our asset is the Instruct model.
PUBLISHED_BASE = {"hellaswag": 42.1, "piqa": 68.4, "winogrande": 51.3, "arc_avg": 43.9}


def run_llama(args: list[str], pattern: str, attempts: int = 3) -> tuple[float, str]:
    """Run llama-perplexity and parse ``pattern`` (it sometimes exits 0 without its summary: retry)."""
    out = ""
    for _ in range(attempts):
        p = subprocess.run([str(tool("llama-perplexity")), *args], capture_output=True, text=True)
        out = p.stdout + p.stderr
        m = re.search(pattern, out)
        if m:
            return float(m.group(1)), out
    raise RuntimeError(f"llama-perplexity: no match for {pattern!r} after {attempts} attempts:\n{out[-2000:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--chunks", type=int, default=10)
    ap.add_argument("--commonsense", type=int, default=100, help="documents per task (0 skips)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("results/eval_check.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ensure_built()
    result: dict = {"model": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to fp32)", "n_ctx": 512}
    result["chunks"] = args.chunks
    lm = load_model(asset_path("smollm2"))
    slots = slots_for(lm.matrices())
    text = wiki_split(asset_path("wiki"))[1]
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False).input_ids)
    windows = windows_for(lm, ids, 512, args.chunks)
    with tempfile.TemporaryDirectory(dir="/tmp") as d:
        d = Path(d)
        text_file = d / "eval.txt"
        text_file.write_text(text, encoding="utf-8")
        common = ["-f", str(text_file), "-c", "512", "--chunks", str(args.chunks), "-t", str(args.threads)]

        # (a) perplexity
        t0 = time.perf_counter()
        ppl_torch = perplexity(lm.model, ids, n_ctx=512, n_chunks=args.chunks).ppl
        t_torch = time.perf_counter() - t0
        f32 = export_gguf(lm, d / "f32.gguf", default_type="F32", embedding_type="F32")
        base = d / "f32.kld"
        t0 = time.perf_counter()
        ppl_llama, _ = run_llama(
            ["-m", str(f32), *common, "--kl-divergence-base", str(base)], r"Final estimate: PPL = ([0-9.]+)"
        )
        t_llama = time.perf_counter() - t0
        result["perplexity"] = {
            "torch": ppl_torch,
            "llama_cpp_f32_gguf": ppl_llama,
            "ratio": ppl_torch / ppl_llama,
            "within_1pct": abs(ppl_torch / ppl_llama - 1) < 0.01,
            "seconds_torch": t_torch,
            "seconds_llama_cpp": t_llama,
        }
        print(json.dumps(result["perplexity"], indent=1), flush=True)

        # (b) KLD of uniform Q4_0 and (c) timings
        cache_dir = d / "qcache"
        cache = QuantCache(cache_dir, memory_bytes=2 << 30)
        t0 = time.perf_counter()
        ref = fp_reference(lm, windows)
        t_ref = time.perf_counter() - t0
        ev = AllocationEvaluator(lm, ref, cache)
        timings = {"fp_reference_seconds": t_ref, "fp_reference_mbytes": ref.nbytes / 1e6}
        for fmt in ("Q4_0", "Q8_0"):
            t0 = time.perf_counter()
            cache.warm(lm, [fmt], digests=ev.digests)
            timings[f"fill_cache_{fmt}_210_matrices_seconds"] = time.perf_counter() - t0
        q4 = uniform(slots, "Q4_0")
        t0 = time.perf_counter()
        ours = ev.evaluate(q4)
        timings[f"evaluate_{args.chunks}x512_warm_seconds"] = time.perf_counter() - t0
        q4_path = export_gguf(lm, d / "q4_0.gguf", allocation=q4, default_type="F32", embedding_type="F32")
        t0 = time.perf_counter()
        kld_llama, out = run_llama(
            ["-m", str(q4_path), *common, "--kl-divergence-base", str(base), "--kl-divergence"],
            r"Mean\s+KLD:\s+([0-9.]+)",
        )
        t_kld = time.perf_counter() - t0
        top1 = re.search(r"Same top p:\s+([0-9.]+)", out)
        p99 = re.search(r"99\.0%\s+KLD:\s+([0-9.]+)", out)
        med = re.search(r"Median\s+KLD:\s+([0-9.]+)", out)
        result["kld_uniform_q4_0"] = {
            "ours": ours.as_dict(),
            "llama_cpp": {
                "kld_mean": kld_llama,
                "kld_median": float(med.group(1)) if med else None,
                "kld_p99": float(p99.group(1)) if p99 else None,
                "top1_pct": float(top1.group(1)) if top1 else None,
                "seconds": t_kld,
            },
            "ratio_mean": ours.mean / kld_llama,
            "within_10pct": abs(ours.mean / kld_llama - 1) < 0.10,
        }
        print(json.dumps(result["kld_uniform_q4_0"], indent=1), flush=True)

        # warm evaluate() of a new allocation at the SAC-sized inputs
        q8 = uniform(slots, "Q8_0")
        mixed = {s.gguf_name: ("Q8_0" if s.block % 2 else "Q4_0") for s in slots}
        for n_seq, n_ctx in ((4, 512), (8, 256)):
            small = windows_for(lm, ids, n_ctx, n_seq)
            ev_small = AllocationEvaluator(lm, fp_reference(lm, small), cache)
            ev_small.evaluate(q8)  # first call also hashes nothing new: the cache is warm
            t0 = time.perf_counter()
            r = ev_small.evaluate(mixed)
            timings[f"evaluate_{n_seq}x{n_ctx}_warm_seconds"] = time.perf_counter() - t0
            timings[f"evaluate_{n_seq}x{n_ctx}_kld_mixed"] = r.mean
        result["timings"] = timings
        result["threads"] = args.threads
        print(json.dumps(timings, indent=1), flush=True)

    # (d) commonsense
    if args.commonsense:
        t0 = time.perf_counter()
        cs = evaluate_commonsense(lm, TASKS, n_per_task=args.commonsense, seed=0)
        arc_avg = 100 * (cs["arc_easy"]["acc_norm"] + cs["arc_challenge"]["acc_norm"]) / 2
        result["commonsense_fp"] = {
            "n_per_task": args.commonsense,
            "seed": 0,
            "results": cs,
            "arc_avg_acc_norm_pct": arc_avg,
            "published_smollm2_135m_base": PUBLISHED_BASE,
            "seconds": time.perf_counter() - t0,
        }
        print(json.dumps(result["commonsense_fp"], indent=1), flush=True)

    result["command"] = " ".join(["python", *sys.argv])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
