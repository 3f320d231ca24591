"""Pipeline benchmark: a cold ``dvc repro`` of the demo on a fresh clone, a no-op second repro, a budget change.

Clones the repository's committed HEAD into a temp folder (no DVC cache, no data/), points it at this
checkout's virtualenv and offline assets (the network is not reachable; ``make env``/``make assets`` are
measured by their own targets), and times exactly what ``make demo`` runs: ``dvc repro`` + the results
table. Then a second ``dvc repro`` (must be a no-op), then a budget change in params.yaml (allocate's
budget only): the stages ``dvc status`` flags and the stages ``dvc repro`` reruns. The cold run's plots
(``data/plots/*.png``) are copied to ``docs/``, where the README shows them.

    python benchmarks/pipeline.py --out results/pipeline.json     (make bench-pipeline)
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


def ran(out: subprocess.CompletedProcess) -> list[str]:
    return re.findall(r"Running stage '(\w+)'", out.stdout)


def set_budget(params: Path, file_bytes: int) -> None:
    text = params.read_text()
    new, n = re.subn(r"(?m)^(  budget_file_bytes:[ \t]*)\d+", rf"\g<1>{file_bytes}", text)
    if n != 1:
        raise SystemExit(f"{params}: expected one allocate.budget_file_bytes line, found {n}")
    params.write_text(new)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "pipeline.json")
    ap.add_argument("--keep", action="store_true", help="keep the clone (its path is printed)")
    ap.add_argument(
        "--plots", type=Path, default=REPO / "docs", help="copy the cold demo's PNG plots here (the README shows them)"
    )
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="ramp-bench-pipeline-"))
    clone = workdir / "ramp"
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["RAMP_ASSETS"] = str(REPO / "data" / "assets")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{clone / 'mlflow.db'}"
    env.pop("PYTHONPATH", None)
    try:
        subprocess.run(["git", "clone", "--quiet", str(REPO), str(clone)], check=True)
        (clone / "data").mkdir()
        (clone / "data" / "assets").symlink_to(REPO / "data" / "assets")  # offline assets, not re-fetched
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
        dvc = str(VENV_BIN / "dvc")
        cold, out = run([dvc, "repro"], clone, env)
        table_s, table = run([str(VENV_BIN / "python"), "-m", "flows.pipeline", "--table"], clone, env)
        print(table.stdout)
        args.plots.mkdir(parents=True, exist_ok=True)
        for png in sorted((clone / "data" / "plots").glob("*.png")):  # the plots of the default params
            shutil.copyfile(png, args.plots / png.name)
            print(f"copied {png.name} -> {args.plots}")
        noop, noop_out = run([dvc, "repro"], clone, env)
        _, status0 = run([dvc, "status", "--json"], clone, env)
        set_budget(clone / "params.yaml", Q4_0_BYTES)
        _, status = run([dvc, "status", "--json"], clone, env)
        changed, change_out = run([dvc, "repro"], clone, env)
        stage_seconds = {}
        for f in sorted((clone / "data" / "metrics").glob("*.json")):
            stage_seconds[f.stem] = json.loads(f.read_text()).get("seconds")
        result = {
            "cold_demo_seconds": round(cold + table_s, 1),
            "cold_repro_seconds": round(cold, 1),
            "cold_stages_ran": ran(out),
            "noop_repro_seconds": round(noop, 2),
            "noop_repro_ran": ran(noop_out),
            "status_after_repro": json.loads(status0.stdout or "{}"),
            "budget_change_status": sorted(json.loads(status.stdout or "{}")),
            "budget_change_reran": ran(change_out),
            "budget_change_seconds": round(changed, 1),
            "stage_seconds_last_run": stage_seconds,
            "results_table": table.stdout,
            "commit": commit,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
            "notes": "fresh clone of HEAD with this checkout's .venv and offline assets (RAMP_ASSETS); cold = no "
            "DVC cache and no data/; budget change: allocate.budget_file_bytes -> 91,726,912 B (llama.cpp Q4_0 size)",
            "command": "python benchmarks/pipeline.py --out results/pipeline.json  (make bench-pipeline)",
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
