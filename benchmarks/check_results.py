"""Re-check published numbers: rebuild a sample of the quantized files that rows of ``results/*.json`` describe,
from their recipes, and re-measure them with ``llama-perplexity --kl-divergence``.

Usage: .venv/bin/python benchmarks/check_results.py [--files results/quality.json] [--sample 3] [--seed 0]

A row is rebuilt the way its ``rebuild`` field says: ``ramp-export`` quantizes the workspace's model to the
allocation of its recipe (``results/recipes/...``, ``--tensor-type-file`` form) with the pipeline's own quantize and
export functions; ``llama-quantize`` runs llama.cpp's tool on the original model's F32 export with the calibrate
stage's imatrix. The workspace is made from scratch by the pipeline (calibrate, fold) with the params overlay the
result file records, on the current ``params.yaml``. Each rebuilt file must have the row's bytes and sha256 (for
``llama-quantize`` files, which record the imatrix file's path, the recipe's tensor types instead of the sha256),
and llama.cpp's KLD and perplexity must equal the row's (to the digits llama-perplexity prints). Exit 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("check-results")
TOLERANCE = {"kld": 2e-6, "ppl": 2e-4}  # llama-perplexity prints KLD with 6 decimals, perplexity with 4


def entries(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The model entries of a result file with rebuildable rows: per model of ``models`` (``results/quality.json``)
    or ``targets`` (``results/transfer.json``) its settings, the file's ``chunks`` and its rows."""
    if not isinstance(doc.get("rows"), list) or "chunks" not in doc:
        return []  # not a file of rebuildable rows (e.g. results/folding.json's per-model summaries)
    out = []
    for key, row_key in (("models", "model"), ("targets", "target")):  # quality.json, transfer.json
        for name, spec in doc.get(key, {}).items():
            rows = [r for r in doc.get("rows", []) if r.get(row_key) == name]
            out.append({**spec, "model": name, "chunks": doc["chunks"], "rows": rows})
    return out


def sample_rows(rows: list[dict[str, Any]], n: int, rng: random.Random) -> list[dict[str, Any]]:
    """``n`` rebuildable rows, always one RAMP row first when there is one."""
    rebuildable = [r for r in rows if "rebuild" in r and "kld" in r]
    ramp = [r for r in rebuildable if r["method"].startswith("ramp")]  # ramp, ramp-own, ramp-zero-shot
    first = [rng.choice(ramp)] if ramp else []
    rest = [r for r in rebuildable if r not in first]
    return first + rng.sample(rest, max(0, min(n - len(first), len(rest))))


def rebuild(ws: Any, lm: Any, row: dict[str, Any], out: Path) -> Path:
    """The file ``row`` describes, made again in ``ws`` (``lm``: its folded model) the way ``row["rebuild"]`` says."""
    from ramp.allocation import read_tensor_type_recipe
    from ramp.llamacpp import llama_quantize
    from ramp.pipeline.measure import build_gguf, reference_gguf

    how = row["rebuild"]
    if how["kind"] == "llama-quantize":
        return llama_quantize(reference_gguf(ws), out, how["preset"], imatrix_path=ws.root / how["imatrix"])
    if how["kind"] != "ramp-export":
        raise ValueError(f"row {row['method']}: unknown rebuild kind {how['kind']!r}")
    alloc = read_tensor_type_recipe((REPO / row["recipe"]).read_text())
    built = build_gguf(ws, lm, alloc, out, how["provenance"], how["embedding_type"], how["norm_type"], how["imatrix"])
    return built.path


def check_entry(entry: dict[str, Any], n: int, rng: random.Random, work: Path) -> list[dict[str, Any]]:
    from benchmarks.quality import budget_overlay
    from ramp.allocation import read_tensor_type_recipe
    from ramp.llamacpp import cache_root, gguf_tensor_types
    from ramp.params import load_pipeline, merge
    from ramp.pipeline.measure import file_record, kld_base, llama_measure
    from ramp.pipeline.run import run_pipeline
    from ramp.pipeline.workspace import Workspace

    ws = Workspace(work / entry["model"], quant_cache=cache_root() / "quant")
    budget = next(iter(entry["budgets"].values()))
    params = load_pipeline(REPO / "params.yaml", merge(entry["overlay"], budget_overlay(budget)))
    run_pipeline(params, ws, ("calibrate", "fold"))
    base = kld_base(ws, entry["chunks"], entry["n_ctx"])
    lm = ws.folded_model()
    checks = []
    for row in sample_rows(entry["rows"], n, rng):
        path = rebuild(ws, lm, row, ws.root / "files" / f"{row['budget']}-{row['method']}.gguf")
        nbytes, sha = file_record(path)
        measured = llama_measure(path, base)
        diffs = {"kld": abs(measured["kld_mean"] - row["kld"]), "ppl": abs(measured["ppl"] - row["ppl"])}
        if row["rebuild"]["kind"] == "llama-quantize":
            # llama-quantize writes the imatrix file's path into the GGUF metadata, so the file's sha256 depends on
            # the workspace folder: compare the tensor types with the recipe instead (bytes, KLD and ppl as well)
            same_file = gguf_tensor_types(path) == read_tensor_type_recipe((REPO / row["recipe"]).read_text())
        else:
            same_file = sha == row["sha256"]
        ok = nbytes == row["bytes"] and same_file and all(d <= TOLERANCE[k] for k, d in diffs.items())
        checks.append(
            {
                "model": entry["model"],
                "budget": row["budget"],
                "method": row["method"],
                "ok": ok,
                "bytes": [row["bytes"], nbytes],
                "sha256_equal": sha == row["sha256"],
                "kld": [row["kld"], measured["kld_mean"]],
                "ppl": [row["ppl"], measured["ppl"]],
            }
        )
        log.info("%s %s %s: %s", entry["model"], row["budget"], row["method"], "ok" if ok else f"MISMATCH {checks[-1]}")
    return checks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", nargs="*", type=Path, default=None, help="result files (default: every results/*.json)")
    ap.add_argument("--sample", type=int, default=3, help="rows rebuilt per model entry")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=None, help="workspace root (default: a temporary folder)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)
    from ramp.offline import set_offline_env

    set_offline_env()
    rng = random.Random(args.seed)
    files = args.files or sorted((REPO / "results").glob("*.json"))
    checks = []
    with tempfile.TemporaryDirectory(prefix="ramp-check-") as tmp:
        work = args.work or Path(tmp)
        for f in files:
            for entry in entries(json.loads(f.read_text())):
                if any("rebuild" in r for r in entry["rows"]):
                    checks += check_entry(entry, args.sample, rng, work)
    for c in checks:
        print(json.dumps(c))
    bad = [c for c in checks if not c["ok"]]
    print(f"check-results: {len(checks) - len(bad)} of {len(checks)} rebuilt files match their rows")
    if not checks or bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
