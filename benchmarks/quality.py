"""RAMP against the strongest allocators and llama.cpp at equal file bytes (issue 16): the pipeline itself, run with
param overlays (one per model and budget) over ``params.yaml``, in a workspace of its own.

Usage:
  .venv/bin/python benchmarks/quality.py --model smollm2            # merged into results/quality.json
  .venv/bin/python benchmarks/quality.py --model smollm2 --budgets Q3_K_M --set train.sac.episodes=30
  .venv/bin/python benchmarks/quality.py --table                    # the README table of results/quality.json
  .venv/bin/python benchmarks/quality.py --model gemma3 --budgets Q4_0 --methods ramp --out results/side.json

For each budget the overlay sets ``train`` and ``allocate`` to that budget and :func:`ramp.pipeline.run.run_pipeline`
runs calibrate -> ... -> export (stages whose inputs did not change are reused). The rows are the evaluate stage's
own table (RAMP; the knapsacks on the sensitivity stage's measured-KLD and gradient tables and on the fold stage's
proxy error, all at RAMP's matrix budget; uniform types; llama.cpp presets as per-tensor types) plus llama.cpp's
real ``llama-quantize`` files (types and presets, with the calibrate stage's imatrix). Every row gets a GGUF file:
RAMP's is the export stage's, the others are built by the same quantize and export functions
(:func:`ramp.pipeline.measure.build_gguf`). Each file is scored by ``llama-perplexity --kl-divergence`` against the
F32 export of the original model on ``--chunks`` held-out windows; its row records bytes, sha256, a
``--tensor-type-file`` recipe under ``results/recipes/quality/`` and how to rebuild it (``make check-results``
does, and re-measures). RAMP rows carry paired bootstrap 95 % intervals of the per-chunk KLD difference (RAMP minus
the other) against the best llama.cpp file and the best other allocator at no more bytes. With ``--methods`` only
those rows are measured and replaced in ``--out``; the RAMP rows are compared with the rows already there (after a
train-only change, e.g. ``--methods ramp``, the baselines need not be re-measured).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script: the repository root is the import root
    sys.path.insert(0, str(REPO))

log = logging.getLogger("bench-quality")

# Budgets: llama.cpp's SmolLM2 file sizes (SPEC §10); for Gemma-3 the size of llama-quantize's own file of a preset
# (no imatrix), measured in the run; the testbed's in bits per weight of the matrices and at two such preset sizes.
# ``n_ctx``: llama-perplexity's window (the testbed has 256 positions). ``presets``: llama-quantize files (with
# imatrix) compared at each budget.
MODELS: dict[str, dict[str, Any]] = {
    "smollm2": {
        "overlay": {"model": {"source": "smollm2"}},
        "budgets": {
            "Q2_K": {"budget_file_bytes": 88202016},
            "Q4_0": {"budget_file_bytes": 91726912},
            "Q3_K_M": {"budget_file_bytes": 93510208},
        },
        "presets": ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "IQ4_NL"],
        "n_ctx": 512,
    },
    "gemma3": {
        "overlay": {"model": {"source": "gemma3"}},
        "budgets": {"Q4_0": {"preset_size": "Q4_0"}, "Q3_K_M": {"preset_size": "Q3_K_M"}},
        "presets": ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_0", "IQ4_NL"],
        "n_ctx": 512,
    },
    "testbed": {
        "overlay": {
            "model": {"source": "testbed"},
            "calibrate": {"n_ctx": 256},
            "evaluate": {"n_ctx": 256, "n_chunks": 16},
            "train": {"reward": {"reference": 3e-4}},
        },
        "budgets": {
            "3.0bpw": {"budget_bpw": 3.0},
            "3.5bpw": {"budget_bpw": 3.5},
            "Q3_K_S": {"preset_size": "Q3_K_S"},
            "Q3_K_M": {"preset_size": "Q3_K_M"},
        },
        "presets": ["Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_S"],
        "n_ctx": 256,
    },
}
# the allocators RAMP is compared with at equal bytes (the evaluate stage's method names)
ALLOCATORS = ("sensitivity-knapsack", "gradient-knapsack", "evolutionary", "greedy", "uniform-fill")


# llama-quantize's +imatrix files carry a few hundred bytes of imatrix metadata (Q2_K: 288 B, Q3_K_M: 512 B above
# the budget they are named after): presets up to this many bytes over a budget are compared, in their favour
PRESET_SLACK = 1024


def budget_overlay(budget: dict[str, Any]) -> dict[str, Any]:
    """``train`` and ``allocate`` both at ``budget`` (the policy is trained for the size it is used at); ``budget``
    is ``{"budget_file_bytes": n}`` or ``{"budget_bpw": x}``."""
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


def measured(path: Path, base: Path | None) -> dict[str, Any]:
    """llama.cpp's figures for ``path`` in the row schema (``kld``, ``ppl``, per-chunk KLD), or {} without a base."""
    from ramp.pipeline.measure import llama_measure

    if base is None:
        return {}
    m = llama_measure(path, base)
    return {
        "kld": m["kld_mean"],
        "kld_p99": m["kld_p99"],
        "ppl": m["ppl"],
        "same_top_p": m["same_top_p"],
        "kld_chunks": m["kld_chunks"],
    }


def budget_rows(
    params: Any,
    ws: Any,
    label: str,
    recipes: Path,
    files: Path,
    base: Path | None = None,
    methods: Collection[str] | None = None,
    stages: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Run the pipeline for ``params`` in ``ws`` and turn its evaluate table into rows with files and recipes;
    ``base``: a :func:`ramp.pipeline.measure.kld_base` file to score every file with llama.cpp (None: skip);
    ``methods``: only these rows (None: all); ``stages``: only these stages, on the others' outputs already in
    ``ws`` (as ``dvc repro -s``; None: every stage, each rerun when its inputs changed)."""
    import pandas as pd

    from ramp.allocation import allocation_hash
    from ramp.pipeline.measure import build_gguf
    from ramp.pipeline.run import STAGES, run_pipeline

    if stages is None:
        metrics = run_pipeline(params, ws)
    else:
        ran = run_pipeline(params, ws, [s for s in STAGES if s in stages])
        metrics = {n: ws.read_json(f"metrics/{n}.json") for n in STAGES if (ws.metrics / f"{n}.json").exists()} | ran
    results = pd.read_parquet(ws.stage("evaluate") / "results.parquet")
    allocations = ws.read_json("evaluate/allocations.json")
    budget = ws.read_json("allocate/budget.json")
    export = metrics["export"]
    sens_evals = int(metrics["sensitivity"]["evaluations"]) if "sensitivity" in metrics else 0  # a stage left out
    evaluations = {
        "ramp": int(metrics["train"]["evaluations"]) + sens_evals,  # its demonstrations include the measured table
        "sensitivity-knapsack": sens_evals,
    }
    if "evolution" in metrics["evaluate"]:  # it starts from the sensitivity knapsack
        evaluations["evolutionary"] = round(metrics["evaluate"]["evolution"]["evaluations"]) + sens_evals
    lm = ws.folded_model()  # every baseline file is built from it
    rows = []
    for r in results.to_dict("records"):
        if r["file_bytes"] > int(budget["budget_file_bytes"]):
            continue  # not at this size (e.g. uniform Q8_0): no comparison at equal bytes
        if methods is not None and r["method"] not in methods:
            continue
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
            "budget_bytes": int(budget["budget_file_bytes"]),
            "method": method,
            "bytes": int(nbytes),
            "within_budget": int(nbytes) <= int(budget["budget_file_bytes"]),
            "evaluations": evaluations.get(method, 0),
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
            **measured(path, base),
        }
        rows.append(row)
        log.info("%-8s %-26s %11d B  KLD torch %.5f  llama %s", label, method, nbytes, r["kld_mean"], row.get("kld"))
    return rows


def llama_quantize_rows(
    ws: Any, presets: list[str], budgets: dict[str, int], recipes: Path, files: Path, base: Path
) -> list[dict[str, Any]]:
    """llama.cpp's real ``llama-quantize`` files, as its users run it: the original model's F32 GGUF and the
    calibrate stage's imatrix (llama.cpp's format); ``budgets``: label -> budget bytes. A file is a row of every
    budget it fits up to PRESET_SLACK bytes (its imatrix metadata), in its favour."""
    from ramp.allocation import allocation_hash, slots_for
    from ramp.llamacpp import gguf_tensor_types, llama_quantize
    from ramp.pipeline.measure import file_record, reference_gguf

    slots = slots_for(ws.folded_model().matrices())
    rows = []
    for preset in presets:
        path = files / f"llama-quantize-{preset}+imatrix.gguf"
        llama_quantize(reference_gguf(ws), path, preset, imatrix_path=ws.stage("calibrate") / "imatrix.dat")
        types = gguf_tensor_types(path)
        nbytes, sha = file_record(path)
        common = {
            "method": f"llama.cpp-{preset}+imatrix",
            "bytes": nbytes,
            "evaluations": 0,
            "sha256": sha,
            "recipe": write_recipe(recipes / f"llama-quantize-{preset}.txt", types),
            "allocation_hash": allocation_hash({s.gguf_name: types[s.gguf_name] for s in slots}),
            "rebuild": {"kind": "llama-quantize", "preset": preset, "imatrix": "data/calibrate/imatrix.dat"},
            **measured(path, base),
        }
        fits = [(label, b) for label, b in budgets.items() if nbytes <= b + PRESET_SLACK]
        for label, b in fits or [(None, None)]:
            rows.append({"budget": label, "budget_bytes": b, "within_budget": b is not None and nbytes <= b, **common})
        log.info("%-26s %11d B  llama KLD %.5f  (budgets %s)", common["method"], nbytes, common["kld"], fits)
    return rows


def preset_sizes(ws: Any, presets: list[str], files: Path) -> dict[str, int]:
    """File bytes of llama-quantize's own files of ``presets`` (no imatrix) from the model's F32 GGUF."""
    from ramp.llamacpp import llama_quantize
    from ramp.pipeline.measure import file_record, reference_gguf

    out = {}
    for preset in presets:
        path = llama_quantize(reference_gguf(ws), files / f"size-{preset}.gguf", preset)
        out[preset] = file_record(path)[0]
        path.unlink()
    return out


def compare(rows: list[dict[str, Any]]) -> None:
    """Add to every RAMP row the paired bootstrap interval of its per-chunk KLD minus that of the best llama.cpp
    file and of the best other allocator at its budget (in place)."""
    from ramp.stats import paired_bootstrap

    for r in rows:
        if r["method"] != "ramp" or "kld_chunks" not in r:
            continue
        here = [x for x in rows if x["budget"] == r["budget"] and "kld_chunks" in x]
        llama = [x for x in here if x["method"].startswith("llama.cpp-")]
        allocators = [x for x in here if x["method"] in ALLOCATORS and x["bytes"] <= r["budget_bytes"]]
        for key, pool in (("best_llama_cpp", llama), ("best_baseline", allocators)):
            if not pool:
                continue
            best = min(pool, key=lambda x: x["kld"])
            mean, lo, hi = paired_bootstrap(r["kld_chunks"], best["kld_chunks"])
            r[f"{key}"] = best["method"]
            r[f"kld_ratio_vs_{key}"] = r["kld"] / best["kld"]
            r[f"kld_diff_vs_{key}"] = mean
            r[f"kld_diff_ci95_vs_{key}"] = [lo, hi]


def markdown_table(doc: dict[str, Any], model: str) -> str:
    """The README table of one model: per budget every row by llama.cpp KLD, RAMP's ratios and intervals."""
    lines = [
        "| budget | method | file bytes | KLD (llama.cpp) | ppl | KLD evals | RAMP − this, 95 % CI |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = [r for r in doc["rows"] if r["model"] == model and r["budget"] is not None and "kld" in r]
    d = 5 if rows and max(r["kld"] for r in rows) < 0.05 else 4  # the testbed's KLDs are two orders smaller
    for label in doc["models"][model]["budgets"]:
        here = sorted((r for r in rows if r["budget"] == label), key=lambda r: r["kld"])
        ramp = next((r for r in here if r["method"] == "ramp"), None)
        for r in here:
            ci = ""
            if ramp is not None and r is not ramp:
                from ramp.stats import paired_bootstrap

                mean, lo, hi = paired_bootstrap(ramp["kld_chunks"], r["kld_chunks"])
                ci = f"{mean:+.{d}f} [{lo:+.{d}f}, {hi:+.{d}f}]"
            cells = [f"{label} ({r['budget_bytes']:,d} B)", r["method"], f"{r['bytes']:,d}", f"{r['kld']:.{d}f}"]
            lines.append("| " + " | ".join([*cells, f"{r['ppl']:.3f}", str(r["evaluations"]), ci]) + " |")
    return "\n".join(lines)


def recipe_dir(bench: str, name: str, out: Path | None = None) -> Path:
    """``results/recipes/<bench>/<name>`` for the benchmark's own result file (``results/<bench>.json``, or no
    ``out``); ``results/recipes/<out's stem>/<name>`` for any other (plus a hash of its path when the stem is
    ``bench``'s), so a side run never overwrites the recipes that the published rows point to."""
    import hashlib

    folder = bench
    if out is not None and out.resolve() != (REPO / "results" / f"{bench}.json").resolve():
        folder = (
            out.stem if out.stem != bench else f"{bench}-{hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:8]}"
        )
    return REPO / "results" / "recipes" / folder / name


def prepare(name: str, args: argparse.Namespace, bench: str) -> tuple[dict, dict, Any, Path, dict, Path]:
    """What every budget of model ``name`` shares: (spec, overlay, workspace ``~/.cache/ramp/bench/<bench>/<name>``
    or ``--workspace``, recipe folder, budgets by label in file bytes or bpw, llama-perplexity's KLD base file);
    calibrates the model first (the KLD base and llama-quantize's preset sizes need its F32 export)."""
    from ramp.llamacpp import cache_root
    from ramp.params import load_pipeline, merge
    from ramp.pipeline.measure import kld_base
    from ramp.pipeline.run import run_pipeline
    from ramp.pipeline.workspace import Workspace

    spec = MODELS[name]
    overlay = merge(spec["overlay"], parse_set(args.set))
    ws = Workspace(args.workspace or cache_root() / "bench" / bench / name, quant_cache=cache_root() / "quant")
    recipes = recipe_dir(bench, name, args.out)
    labels = args.budgets.split(",") if args.budgets else list(spec["budgets"])
    unknown = [x for x in labels if x not in spec["budgets"]]
    if unknown:
        raise SystemExit(f"--budgets {unknown}: {name} has budgets {list(spec['budgets'])}")
    first = load_pipeline(REPO / "params.yaml", merge(overlay, budget_overlay({"budget_bpw": 4.0})))
    run_pipeline(first, ws, ("calibrate",))
    base = kld_base(ws, args.chunks, spec["n_ctx"])
    presets = [b["preset_size"] for b in spec["budgets"].values() if "preset_size" in b]
    sizes = preset_sizes(ws, presets, ws.root / "files")
    budgets = {
        label: {"budget_file_bytes": sizes[b["preset_size"]]} if "preset_size" in b else b
        for label, b in spec["budgets"].items()
        if label in labels
    }
    return spec, overlay, ws, recipes, budgets, base


def start() -> None:
    """A benchmark process: INFO logs, offline, torch on at most 2 threads."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)

    import torch

    from ramp.offline import set_offline_env

    set_offline_env()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def row_key(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    """What a row replaces in a result file: its model, budget and method."""
    return row.get("model"), row["budget"], row["method"]


def compare_measured(rows: list[dict[str, Any]], out: Path | None) -> None:
    """:func:`compare` the new ``rows``; with ``out`` (a run of some methods only) also against the rows ``out``
    already holds at other (model, budget, method) keys, which the run leaves in place."""
    new, models = {row_key(r) for r in rows}, {r["model"] for r in rows}
    old = json.loads(out.read_text())["rows"] if out is not None and out.exists() else []
    compare(rows + [r for r in old if r["model"] in models and row_key(r) not in new])


def merge_results(
    out: Path,
    chunks: int,
    group: tuple[str, str],
    name: str,
    rows: list[dict],
    entry: dict,
    command: str,
    same: Callable[[dict], Any] | None = None,
) -> None:
    """Merge one model's ``rows`` and ``entry`` into the JSON at ``out``, its ``doc[group[0]][name]`` entry updated;
    ``group`` = (entry key, row key), e.g. ("models", "model"). Replaced: every old row of its budgets, or, with
    ``same``, only old rows whose ``same(row)`` equals a new row's (a run that measured part of a table)."""
    from ramp.io import atomic_write_text

    key, model_field = group
    doc = json.loads(out.read_text()) if out.exists() else {"chunks": chunks, "rows": [], key: {}}
    if doc["chunks"] != chunks:
        raise SystemExit(f"{out} holds {doc['chunks']}-chunk rows; this run measured {chunks}")
    labels = set(entry["budgets"])
    if same is None:
        doc["rows"] = [r for r in doc["rows"] if r[model_field] != name or (r["budget"] not in labels and r["budget"])]
    else:
        new = {same(r) for r in rows}
        doc["rows"] = [r for r in doc["rows"] if r[model_field] != name or same(r) not in new]
    doc["rows"] += rows
    old = doc[key].get(name, {})
    entry["budgets"] = {**old.get("budgets", {}), **entry["budgets"]}
    entry["stages"] = {**old.get("stages", {}), **entry["stages"]}
    doc[key][name] = entry
    doc["command"] = command
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(doc, indent=1) + "\n")


def run_model(name: str, args: argparse.Namespace) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Every budget of model ``name``: (rows, the model's settings and stage metrics)."""
    from ramp.params import load_pipeline, merge

    t0 = time.perf_counter()
    spec, overlay, ws, recipes, budgets, base = prepare(name, args, "quality")
    files = ws.root / "files"
    methods = args.methods.split(",") if args.methods else None
    rows, stages = [], {}
    for label, budget in budgets.items():
        params = load_pipeline(REPO / "params.yaml", merge(overlay, budget_overlay(budget)))
        rows += budget_rows(params, ws, label, recipes, files, base, methods=methods)
        stages[label] = {
            s: json.loads((ws.metrics / f"{s}.json").read_text()) for s in ("sensitivity", "train", "allocate")
        }
        stages[label]["evolution"] = json.loads((ws.metrics / "evaluate.json").read_text()).get("evolution")
    sizes_by_label = {r["budget"]: r["budget_bytes"] for r in rows}
    presets = [p for p in spec["presets"] if methods is None or f"llama.cpp-{p}+imatrix" in methods]
    rows += llama_quantize_rows(ws, presets, sizes_by_label, recipes, files, base)
    for r in rows:
        r["model"] = name
    compare_measured(rows, args.out if methods is not None else None)
    entry = {
        "overlay": overlay,
        "budgets": budgets,
        "n_ctx": spec["n_ctx"],
        "stages": stages,
        "seconds": round(time.perf_counter() - t0, 1),
        "command": " ".join(["python", "benchmarks/quality.py", *sys.argv[1:]]),
    }
    return rows, entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--table", action="store_true", help="print the README table of --out's --model and exit")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "quality.json")
    ap.add_argument("--budgets", default=None, help="comma-separated budget labels (default: all)")
    ap.add_argument("--methods", default=None, help="comma-separated rows to measure, e.g. ramp (default: all)")
    ap.add_argument("--chunks", type=int, default=40, help="held-out windows for llama-perplexity's KLD")
    ap.add_argument("--set", action="append", default=[], help="extra overlay, section.key=value (repeatable)")
    ap.add_argument("--workspace", type=Path, default=None, help="default: ~/.cache/ramp/bench/quality/<model>")
    args = ap.parse_args()
    if args.table:
        print(markdown_table(json.loads(args.out.read_text()), args.model))
        return
    start()
    rows, entry = run_model(args.model, args)
    same = row_key if args.methods else None  # --methods: only those rows are replaced
    merge_results(args.out, args.chunks, ("models", "model"), args.model, rows, entry, "make bench-quality", same)
    for r in rows:
        print(f"{r['budget'] or '-':<8} {r['method']:<34} {r['bytes']:>11} {r.get('kld', float('nan')):.5f}")


if __name__ == "__main__":
    main()
