"""Pipeline benchmark: a cold ``make demo`` on a fresh clone, a no-op second run, a budget change, screenshots.

Clones the repository's committed HEAD into a temp folder (no DVC cache, no data/, no MLflow or Prefect database),
points it at this checkout's virtualenv and offline assets (the network is not reachable; ``make env``/``make
assets`` are measured by their own targets), and times exactly what ``make demo`` runs: the Prefect flow
``ramp-pipeline`` (``python -m flows.pipeline --demo``: each DVC stage a task, every stage logged to MLflow, the
policy registered and gated). Then a second run (must recompute nothing), then a budget change in params.yaml
(allocate's budget only): the stages ``dvc status`` flags and the stages the flow reruns. Finally headless
Chromium screenshots the cold run's report, its MLflow champion and its Prefect flow run into ``docs/``
(``benchmarks/screenshots.py``: each page must show the run's numbers), and the plots are copied there too.

The cold demo's allocation is compared with the quality benchmark's RAMP row at the same budget (its recipe under
``results/recipes/quality/``, measured there by ``llama-perplexity --kl-divergence`` on 40 held-out chunks): the
committed params train and allocate at the file budget, so the demo exports what ``make bench-quality`` measures.
``--lock`` copies the cold run's ``dvc.lock`` (the committed params' hashes) to the given path.

    python benchmarks/pipeline.py --out results/pipeline.json --lock dvc.lock     (make bench-pipeline)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
Q4_0_BYTES = 91_726_912  # SPEC §10: llama.cpp's Q4_0 file of SmolLM2, the budget the change moves to


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-4000:]}")
    return seconds, out


def flow_ran(out: subprocess.CompletedProcess) -> list[str]:
    """The stages the flow ran, from its ``ramp-pipeline: ran [...]`` line."""
    m = re.search(r"ramp-pipeline: ran (\[[^\]]*\]|nothing)", out.stdout + out.stderr)
    if m is None:
        raise SystemExit(f"the flow printed no 'ramp-pipeline: ran' line:\n{(out.stdout + out.stderr)[-3000:]}")
    return [] if m.group(1) == "nothing" else re.findall(r"'(\w+)'", m.group(1))


def set_budget(params: Path, file_bytes: int) -> None:
    text = params.read_text()
    # the line inside the allocate section (train has its own budget_file_bytes: the policy's, left as it is)
    new, n = re.subn(r"(?m)^(allocate:\n(?:[ #].*\n)*?  budget_file_bytes:[ \t]*)\d+", rf"\g<1>{file_bytes}", text)
    if n != 1:
        raise SystemExit(f"{params}: expected one allocate.budget_file_bytes line, found {n}")
    params.write_text(new)


def quality_row(clone: Path) -> dict:
    """The demo's allocation against ``results/quality.json``'s SmolLM2 RAMP row at the demo's budget: the row's
    measured KLD and intervals, and whether the two allocations are the same tensor for tensor."""
    from ramp.allocation import allocation_hash, load_allocation, read_tensor_type_recipe

    demo = load_allocation(clone / "data" / "allocate" / "allocation.json")
    budget = json.loads((clone / "data" / "metrics" / "allocate.json").read_text())["budget_file_bytes"]
    quality = json.loads((REPO / "results" / "quality.json").read_text())
    rows = [r for r in quality["rows"] if r["model"] == "smollm2" and r["budget_bytes"] == budget]
    ramp = [r for r in rows if r["method"] == "ramp"]
    if not ramp:
        return {"budget_file_bytes": budget, "quality_row": None}
    row = ramp[0]
    measured = read_tensor_type_recipe((REPO / row["recipe"]).read_text())
    differ = sorted(k for k in set(demo) | set(measured) if demo.get(k) != measured.get(k))
    return {
        "budget_file_bytes": budget,
        "quality_row": {k: row[k] for k in ("method", "bytes", "kld", "recipe", "kld_diff_ci95_vs_best_llama_cpp")},
        "best_llama_cpp": row["best_llama_cpp"],  # chosen by the quality bench (its preset slack included)
        "ratio_vs_best_llama_cpp": round(row["kld_ratio_vs_best_llama_cpp"], 4),
        "demo_allocation_hash": allocation_hash(demo),
        "same_allocation": not differ,
        "tensors_differing": differ,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "pipeline.json")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    ap.add_argument("--lock", type=Path, default=None, help="copy the cold run's dvc.lock here (e.g. dvc.lock)")
    ap.add_argument(
        "--plots", type=Path, default=REPO / "docs", help="copy the cold demo's PNG plots here (the README shows them)"
    )
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ramp-bench-pipeline-"))
    clone = workdir / "ramp"
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAMP_ASSETS"] = str(REPO / "data" / "assets")
    env.pop("MLFLOW_TRACKING_URI", None)  # the clone's own mlflow.db, as make demo uses
    env.pop("PYTHONPATH", None)
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        (clone / "data").mkdir(exist_ok=True)  # data/metrics and data/plots are tracked (DVC metrics, cache: false)
        (clone / "data" / "assets").symlink_to(REPO / "data" / "assets")  # offline assets, not re-fetched
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        dvc, python = str(VENV_BIN / "dvc"), str(VENV_BIN / "python")
        env["PREFECT_HOME"] = str(clone / ".prefect")  # as the Makefile sets it
        demo = [python, "-m", "flows.pipeline", "--demo"]
        cold, out = run(demo, clone, env)
        print(out.stdout)
        cold_ran = flow_ran(out)
        sys.path.insert(0, str(REPO))
        from ramp.report import results_table

        table = results_table(clone)
        vs_quality = quality_row(clone)
        print(f"demo vs the quality benchmark's row: {vs_quality}")
        if args.lock is not None:
            shutil.copyfile(clone / "dvc.lock", args.lock)
            print(f"copied the cold run's dvc.lock -> {args.lock}")
        args.plots.mkdir(parents=True, exist_ok=True)
        for png in sorted((clone / "data" / "plots").glob("*.png")):  # the plots of the default params
            shutil.copyfile(png, args.plots / png.name)
            print(f"copied {png.name} -> {args.plots}")
        from benchmarks import screenshots

        shots = screenshots.take(clone, args.plots)
        noop, noop_out = run(demo, clone, env)
        _, status0 = run([dvc, "status", "--json"], clone, env)
        set_budget(clone / "params.yaml", Q4_0_BYTES)
        _, status = run([dvc, "status", "--json"], clone, env)
        changed, change_out = run(demo, clone, env)
        stage_seconds = {}
        for f in sorted((clone / "data" / "metrics").glob("*.json")):
            stage_seconds[f.stem] = json.loads(f.read_text()).get("seconds")
        result = {
            "fresh_clone_demo_seconds": round(cold, 1),
            "cold_demo_seconds": round(cold, 1),
            "cold_stages_ran": cold_ran,
            "mlflow_registered": shots["champion_version"] is not None,
            "champion_version": shots["champion_version"],
            "prefect_flow_run": shots["flow_run"],
            "report": "data/export/report.html",
            "screenshots": [str(Path(s["png"]).relative_to(REPO)) for s in shots["shots"]],
            "screenshot_checks": {Path(s["png"]).name: s["checked"] for s in shots["shots"]},
            "noop_demo_seconds": round(noop, 2),
            "noop_demo_ran": flow_ran(noop_out),
            "status_after_demo": json.loads(status0.stdout or "{}"),
            "budget_change_status": sorted(json.loads(status.stdout or "{}")),
            "budget_change_reran": flow_ran(change_out),
            "budget_change_seconds": round(changed, 1),
            "stage_seconds_last_run": stage_seconds,
            "results_table": table,
            "demo_vs_quality_benchmark": vs_quality,
            "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "notes": "fresh clone of HEAD with this checkout's .venv and offline assets (RAMP_ASSETS); cold = no "
            "DVC cache, no data/, no mlflow.db, no .prefect/; the demo is `python -m flows.pipeline --demo` as `make "
            "demo` runs it; budget change: allocate.budget_file_bytes -> 91,726,912 B (llama.cpp Q4_0 size)",
            "command": "python benchmarks/pipeline.py --out results/pipeline.json --lock dvc.lock (bench-pipeline)",
        }
    finally:
        if args.keep:
            print(f"clone kept at {clone}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    sys.path.insert(0, str(REPO))
    from ramp.io import atomic_write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "results_table"}, indent=2))


if __name__ == "__main__":
    main()
