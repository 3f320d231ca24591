"""Does Scale Folding help? Weighted quantization error and end-to-end KLD, folded vs unfolded (SPEC §5).

For each migration strength alpha: fold SmolLM2 (fp32, exact), then quantize with a fixed allocation — every
matrix Q3_K where legal, else Q4_0 — using the (folded) imatrix, and measure KLD vs the FP model on held-out
wiki text. Also the mean imatrix-weighted relative error per format: Q2_K/Q3_K/Q4_K on the tensors where
K-quants are legal, Q4_0 on the others.

Caveat: SmolLM2's reference weights are the dequantized Q4_1 file, i.e. already on a 4-bit group-32 grid.
Folding moves them off that grid, which by itself can raise the error of 4-bit formats; the comparison is
still fair (both sides quantize the same fp32 function) but it is not what a continuous-weight model shows.

    python benchmarks/folding.py --out results/folding.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ramp.assets import asset_path, smollm2_gguf_path
from ramp.calib import calibrate, calibration_tokens
from ramp.data import wiki_split
from ramp.features import weighted_rel_error
from ramp.folding import fold_model, folded_imatrix
from ramp.formats import get_format
from ramp.io import atomic_write_text
from ramp.models.loader import load_model

ERR_FORMATS = ("Q2_K", "Q3_K", "Q4_K")


def main_allocation(lm) -> dict[str, str]:
    return {m.gguf_name: ("Q3_K" if get_format("Q3_K").is_legal(m.shape) else "Q4_0") for m in lm.matrices()}


def weighted_errors(lm, imatrix, allocation) -> dict[str, float]:
    params = dict(lm.model.named_parameters())
    out: dict[str, list[float]] = {f: [] for f in (*ERR_FORMATS, "Q4_0", "allocation")}
    for m in lm.matrices():
        w, im = params[m.hf_name], imatrix[m.gguf_name]
        k_legal = get_format("Q4_K").is_legal(m.shape)
        for f in ERR_FORMATS if k_legal else ("Q4_0",):
            out[f].append(weighted_rel_error(w, im, f))
        out["allocation"].append(out["Q3_K" if k_legal else "Q4_0"][-1])
    return {f: float(np.mean(v)) for f, v in out.items() if v}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/folding.json")
    ap.add_argument("--alphas", default="0.3,0.5,0.7")
    ap.add_argument("--calib-seqs", type=int, default=16)
    ap.add_argument("--eval-seqs", type=int, default=8)
    ap.add_argument("--n-ctx", type=int, default=512)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO)
    from ramp.evaluate.kld import fp_reference, kl_divergence
    from ramp.evaluate.quantized import QuantCache, swap_allocation

    t0 = time.time()
    lm = load_model(smollm2_gguf_path())
    calib_text, eval_text = wiki_split(asset_path("wiki"))
    n = args.n_ctx
    calib = calibration_tokens(lm, calib_text, args.calib_seqs * n, n)
    evals = calibration_tokens(lm, eval_text, args.eval_seqs * n, n)
    stats = calibrate(lm, calib, batch_size=2)
    imatrix = stats.imatrix()
    ref = fp_reference(lm, evals, batch_size=2)
    original = {k: v.clone() for k, v in lm.model.state_dict().items()}
    alloc = main_allocation(lm)

    with tempfile.TemporaryDirectory() as cache_dir:
        cache = QuantCache(cache_dir)

        def kld(im) -> dict:
            with swap_allocation(lm, alloc, cache, im):
                return kl_divergence(lm, ref, batch_size=2).as_dict()

        base_err = weighted_errors(lm, imatrix, alloc)
        base_kld = kld(imatrix)
        per_alpha = {}
        for a in [float(x) for x in args.alphas.split(",")]:
            lm.model.load_state_dict(original)
            res = fold_model(lm, stats, alpha=a, errors=False)
            f_im = folded_imatrix(imatrix, res.scales)
            err = weighted_errors(lm, f_im, alloc)
            k = kld(f_im)
            per_alpha[f"{a:g}"] = {
                "kld_folded": k["kld_mean"],
                "kld_unfolded": base_kld["kld_mean"],
                "weighted_err_folded": err["allocation"],
                "weighted_err_unfolded": base_err["allocation"],
                "kld_detail_folded": k,
                "weighted_err_per_format_folded": err,
                "scale_range": [float(res.report.s_min.min()), float(res.report.s_max.max())],
            }
            print(
                f"alpha {a}: KLD {k['kld_mean']:.4f} vs {base_kld['kld_mean']:.4f}; weighted err "
                f"{err['allocation']:.5f} vs {base_err['allocation']:.5f}",
                flush=True,
            )
    result = {
        "models": {
            "smollm2-135m": {
                "alpha": per_alpha,
                "kld_detail_unfolded": base_kld,
                "weighted_err_per_format_unfolded": base_err,
            }
        },
        "allocation": "uniform: Q3_K where the row length allows K-quants (ffn_down), else Q4_0; imatrix-weighted",
        "weighted_err": "mean over matrices of sum_j im_j sum_i (W-Q)^2 / sum_j im_j sum_i W^2; per format: "
        "Q2_K/Q3_K/Q4_K over K-legal matrices, Q4_0 over the others",
        "tokens": {"calibration": int(calib.numel()), "evaluation": int(evals.numel()), "n_ctx": n},
        "caveat": "SmolLM2's fp32 reference is the dequantized Q4_1 file (weights on a 4-bit group-32 grid); "
        "folding moves weights off that grid, so 4-bit results here understate what folding does on "
        "continuous weights.",
        "seconds": round(time.time() - t0, 1),
        "command": "python " + " ".join(sys.argv),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(json.dumps({a: {k: v for k, v in d.items() if not isinstance(v, dict)} for a, d in per_alpha.items()}))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
