"""RAMP vs the knapsacks, uniform types and llama.cpp presets at equal file bytes: the pipeline itself, run with
param overlays (one per model and budget) over ``params.yaml``, in a workspace of its own.

Usage:
  .venv/bin/python benchmarks/sac.py --model smollm2 --out results/sac.json
  .venv/bin/python benchmarks/sac.py --model testbed --out results/sac.json   # merged under other_models
  .venv/bin/python benchmarks/sac.py --model smollm2 --set train.sac.episodes=30 --budgets Q3_K_M

For each budget the overlay sets ``train`` and ``allocate`` to that budget and :func:`ramp.pipeline.run.run_pipeline`
runs calibrate -> ... -> export (stages whose inputs did not change are reused). The rows are the evaluate stage's
own table (RAMP; the greedy and uniform-fill knapsacks on the fold stage's action space at RAMP's matrix budget;
uniform types; llama.cpp presets as per-tensor types) plus llama.cpp's real ``llama-quantize`` preset files (with
the calibrate stage's imatrix). Every row gets a GGUF file: RAMP's is the export stage's, the others are built by
the same quantize and export functions (:func:`ramp.pipeline.measure.build_gguf`). Each file is scored by
``llama-perplexity --kl-divergence`` against the F32 export of the original model (``--chunks`` held-out windows
of 512), and its row records bytes, sha256, a ``--tensor-type-file`` recipe under ``results/recipes/`` and how to
rebuild it (``make check-results`` does, and re-measures).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository root is the import root
    sys.path.insert(0, str(REPO))

log = logging.getLogger("bench-sac")

# llama.cpp's SmolLM2 file sizes (SPEC §10) are its budgets; the testbed's are bits per weight of the matrices
MODELS: dict[str, dict[str, Any]] = {
    "smollm2": {
        "overlay": {"model": {"source": "smollm2"}},
        "budgets": {
            "Q2_K": {"budget_file_bytes": 88202016},
            "Q4_0": {"budget_file_bytes": 91726912},
            "Q3_K_M": {"budget_file_bytes": 93510208},
        },
        "presets": ["Q2_K", "Q4_0", "IQ4_NL", "Q3_K_M"],
    },
    "testbed": {
        "overlay": {
            "model": {"source": "testbed"},
            "calibrate": {"n_ctx": 256},
            "evaluate": {"n_ctx": 256, "n_chunks": 16},
            "train": {"reward": {"reference": 3e-4}},
        },
        "budgets": {"3.0bpw": {"budget_bpw": 3.0}, "3.5bpw": {"budget_bpw": 3.5}, "4.0bpw": {"budget_bpw": 4.0}},
        "presets": ["Q2_K", "Q3_K_M", "Q4_K_S"],
    },
}


# llama-quantize's +imatrix files carry a few hundred bytes of imatrix metadata (Q2_K: 288 B, Q3_K_M: 512 B above
# the budget they are named after): presets up to this many bytes over a budget are compared, in their favour
PRESET_SLACK = 1024


def budget_overlay(budget: dict[str, Any]) -> dict[str, Any]:
    """``train`` and ``allocate`` both at ``budget`` (the policy is trained for the size it is used at)."""
    full = {"budget_file_bytes": None, "budget_bpw": None, **budget}
    return {"train": dict(full), "allocate": dict(full)}


def parse_set(items: list[str]) -> dict[str, Any]:
    """``section.key=value`` pairs (values parsed as YAML) as a nested overlay."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected section.key=value")
        node = out
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    return out


def write_recipe(path: Path, allocation: dict[str, str]) -> str:
    from ramp.allocation import tensor_type_recipe
    from ramp.io import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, tensor_type_recipe(allocation))
    return path.relative_to(REPO).as_posix() if path.is_relative_to(REPO) else str(path)


def budget_rows(
    params: Any,
    ws: Any,
    label: str,
    recipes: Path,
    files: Path,
    base: Path | None = None,
) -> list[dict[str, Any]]:
    """Run the pipeline for ``params`` in ``ws`` and turn its evaluate table into rows with files and recipes;
    ``base``: a :func:`ramp.pipeline.measure.kld_base` file to score every file with llama.cpp (None: skip)."""
    import pandas as pd

    from ramp.allocation import allocation_hash
    from ramp.pipeline.measure import build_gguf, llama_measure
    from ramp.pipeline.run import run_pipeline

    metrics = run_pipeline(params, ws)
    results = pd.read_parquet(ws.stage("evaluate") / "results.parquet")
    allocations = ws.read_json("evaluate/allocations.json")
    budget = ws.read_json("allocate/budget.json")
    export = metrics["export"]
    lm = ws.folded_model()  # every baseline file is built from it
    rows = []
    for r in results.to_dict("records"):
        if r["file_bytes"] > int(budget["budget_file_bytes"]):
            continue  # not at this size (e.g. uniform Q8_0): no comparison at equal bytes
        method, alloc = r["method"], allocations[r["method"]]
        stem = f"{label}-{method}"
        if method == "ramp":
            path = ws.stage("export") / "model.gguf"
            provenance = {
                "policy_version": budget["policy_version"],
                "budget_file_bytes": budget["budget_file_bytes"],
                "method": "ramp",
            }
            nbytes, sha = export["file_bytes"], export["sha256"]
            if export["allocation_hash"] != r["allocation_hash"]:
                raise RuntimeError(f"export and evaluate disagree on RAMP's allocation in {ws.root}")
        else:
            provenance = {"policy_version": "", "budget_file_bytes": 0, "method": method}
            built = build_gguf(
                ws,
                lm,
                alloc,
                files / f"{stem}.gguf",
                provenance,
                budget["embedding_type"],
                budget["norm_type"],
                params.quantize.imatrix,
            )
            path, nbytes, sha = built.path, built.bytes, built.sha256
        row = {
            "budget": label,
            "budget_file_bytes": int(budget["budget_file_bytes"]),
            "method": method,
            "bytes": int(nbytes),
            "within_budget": int(nbytes) <= int(budget["budget_file_bytes"]),
            "sha256": sha,
            "recipe": write_recipe(recipes / f"{stem}.txt", alloc),
            "allocation_hash": allocation_hash(alloc),
            "bpw": r["bpw"],
            "kld_torch": r["kld_mean"],
            "ppl_torch": r["ppl"],
            "rebuild": {
                "kind": "ramp-export",
                "provenance": provenance,
                "embedding_type": budget["embedding_type"],
                "norm_type": budget["norm_type"],
                "imatrix": params.quantize.imatrix,
            },
        }
        if base is not None:
            row.update(llama_measure(path, base))
        rows.append(row)
        log.info(
            "%-8s %-26s %11d B  KLD torch %.5f  llama %s", label, method, nbytes, r["kld_mean"], row.get("kld_mean")
        )
    return rows


def llama_quantize_rows(
    ws: Any, presets: list[str], budgets: dict[str, int], recipes: Path, files: Path, base: Path
) -> list[dict[str, Any]]:
    """llama.cpp's real ``llama-quantize`` preset files, as its users run it: the original model's F32 GGUF and the
    calibrate stage's imatrix (llama.cpp's format); ``budgets``: preset name -> the budget it stands for, if any."""
    from ramp.allocation import allocation_hash, slots_for
    from ramp.llamacpp import gguf_tensor_types, llama_quantize
    from ramp.pipeline.measure import file_record, llama_measure, reference_gguf

    slots = slots_for(ws.folded_model().matrices())
    rows = []
    for preset in presets:
        path = files / f"llama-quantize-{preset}+imatrix.gguf"
        llama_quantize(reference_gguf(ws), path, preset, imatrix_path=ws.stage("calibrate") / "imatrix.dat")
        types = gguf_tensor_types(path)
        nbytes, sha = file_record(path)
        row = {
            "budget": preset if preset in budgets else None,
            "budget_file_bytes": budgets.get(preset),
            "method": f"llama.cpp-{preset}+imatrix",
            "bytes": nbytes,
            "sha256": sha,
            "recipe": write_recipe(recipes / f"llama-quantize-{preset}.txt", types),
            "allocation_hash": allocation_hash({s.gguf_name: types[s.gguf_name] for s in slots}),
            "rebuild": {"kind": "llama-quantize", "preset": preset, "imatrix": "data/calibrate/imatrix.dat"},
            **llama_measure(path, base),
        }
        rows.append(row)
        log.info("%-26s %11d B  llama KLD %.5f", row["method"], nbytes, row["kld_mean"])
    return rows


def markdown_table(entry: dict[str, Any]) -> str:
    """The README table of one model entry: per budget, llama.cpp's KLD of every file at or below the budget, and
    the best llama-quantize preset file up to PRESET_SLACK bytes above it."""
    lines = [
        "| budget | method | file bytes | KLD (llama.cpp) | ppl (llama.cpp) | KLD / best llama.cpp preset |",
        "|---|---|---|---|---|---|",
    ]
    for label in entry["budgets"]:
        size = next(r["budget_file_bytes"] for r in entry["rows"] if r["budget"] == label)
        here = [r for r in entry["rows"] if r["budget"] == label and not r["method"].endswith("+imatrix")]
        presets = [
            r
            for r in entry["rows"]
            if r["method"].startswith("llama.cpp-")
            and "kld_mean" in r
            and r["method"].endswith("+imatrix")
            and r["bytes"] <= size + PRESET_SLACK
        ]
        best = min(presets, key=lambda r: r["kld_mean"]) if presets else None
        for r in sorted(here + ([best] if best else []), key=lambda r: r["kld_mean"]):
            ratio = f"{r['kld_mean'] / best['kld_mean']:.2f}" if best else "—"
            cells = [f"{label} ({size:,d} B)", r["method"], f"{r['bytes']:,d}", f"{r['kld_mean']:.4f}"]
            lines.append("| " + " | ".join([*cells, f"{r['ppl']:.3f}", ratio]) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--table", action="store_true", help="print the README table of --out's --model entry and exit")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "sac.json")
    ap.add_argument("--budgets", default=None, help="comma-separated budget labels (default: all)")
    ap.add_argument("--chunks", type=int, default=40, help="held-out windows of 512 for llama-perplexity's KLD")
    ap.add_argument("--set", action="append", default=[], help="extra overlay, section.key=value (repeatable)")
    ap.add_argument("--workspace", type=Path, default=None, help="default: ~/.cache/ramp/bench/sac/<model>")
    args = ap.parse_args()
    if args.table:
        doc = json.loads(args.out.read_text())
        print(markdown_table(doc if args.model == "smollm2" else doc["other_models"][args.model]))
        return
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)

    import torch

    from ramp.io import atomic_write_text
    from ramp.llamacpp import cache_root
    from ramp.offline import set_offline_env
    from ramp.params import load_pipeline, merge
    from ramp.pipeline.measure import kld_base
    from ramp.pipeline.workspace import Workspace

    set_offline_env()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    spec = MODELS[args.model]
    overlay = merge(spec["overlay"], parse_set(args.set))
    ws = Workspace(args.workspace or cache_root() / "bench" / "sac" / args.model, quant_cache=cache_root() / "quant")
    recipes = REPO / "results" / "recipes" / "sac" / args.model
    files = ws.root / "files"
    labels = args.budgets.split(",") if args.budgets else list(spec["budgets"])
    t0 = time.perf_counter()
    rows, stages = [], {}
    base = None
    for label in labels:
        params = load_pipeline(REPO / "params.yaml", merge(overlay, budget_overlay(spec["budgets"][label])))
        if base is None:
            from ramp.pipeline.run import run_pipeline

            run_pipeline(params, ws, ("calibrate",))
            base = kld_base(ws, args.chunks, 512)
        rows += budget_rows(params, ws, label, recipes, files, base)
        stages[label] = {s: json.loads((ws.metrics / f"{s}.json").read_text()) for s in ("train", "allocate")}
    sizes = {r["budget"]: r["budget_file_bytes"] for r in rows}
    rows += llama_quantize_rows(ws, spec["presets"], sizes, recipes, files, base)
    entry = {
        "model": args.model,
        "overlay": overlay,
        "budgets": {label: spec["budgets"][label] for label in labels},
        "chunks": args.chunks,
        "n_ctx": 512,
        "rows": rows,
        "training": stages,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(["python", "benchmarks/sac.py", *sys.argv[1:]]),
    }
    doc = json.loads(args.out.read_text()) if args.out.exists() else {}
    if args.model == "smollm2":
        doc = {**entry, "other_models": doc.get("other_models", {})}
    else:
        doc.setdefault("other_models", {})[args.model] = entry
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    for r in rows:
        print(f"{r['budget'] or '-':<8} {r['method']:<34} {r['bytes']:>11} {r.get('kld_mean', float('nan')):.5f}")


if __name__ == "__main__":
    main()
