"""Prefect flow ``ramp-pipeline``: the DVC DAG, one Prefect task per stage (``dvc repro -s <stage>``).

DVC keeps the caching: a task whose stage is up to date returns at once ("didn't change, skipping"). Tasks
wait on their DVC upstream stages (so the Prefect UI draws the DAG) and on the previous stage in DAG order
(DVC holds a repository lock, so stages run one at a time). Every stage that ran is logged to MLflow
(params section, metrics, small artifacts); when ``train`` ran, the new policy is registered as a version of
``ramp-policy`` and sent through the champion gate with the evaluate stage's held-out KLD at the budget.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task

from ramp.params import STAGE_SECTIONS, load_pipeline, section_data
from ramp.pipeline import STAGES
from ramp.pipeline.dag import upstream

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parent.parent
# Small files logged as MLflow artifacts per stage (big tensors stay in DVC's cache).
ARTIFACTS: dict[str, tuple[str, ...]] = {
    "calibrate": ("data/calibrate/model.json", "data/calibrate/stats.parquet"),
    "embed": ("data/embed/embedding.parquet",),
    "fold": ("data/fold/report.parquet",),
    "sensitivity": ("data/sensitivity/costs.parquet",),
    "train": ("data/train/policy", "data/plots/train_history.csv"),
    "allocate": ("data/allocate/allocation.json", "data/allocate/tensor_types.txt", "data/allocate/budget.json"),
    "quantize": ("data/quantize/types.json",),
    "evaluate": ("data/evaluate/results.parquet", "data/plots/pareto.png", "data/plots/format_map.png"),
    "export": ("data/export/report.html",),
}
PLOTS = ("data/plots/pareto.png", "data/plots/format_map.png")
GATE_METRIC = "kld_mean"


class StageFailed(RuntimeError):
    """``dvc repro`` of a stage failed (the message carries the tail of its output)."""


@dataclass(frozen=True)
class StageRun:
    stage: str
    ran: bool  # False: DVC found it up to date
    seconds: float


def _dvc() -> str:
    return str(Path(sys.executable).parent / "dvc")


def stage_env() -> dict[str, str]:
    """The environment for DVC: the venv's ``python`` first on PATH (dvc.yaml runs ``python -m stages.x``)."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def repro(project: Path, *args: str) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [_dvc(), "repro", *args], cwd=project, env=stage_env(), capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise StageFailed(f"dvc repro {' '.join(args)} failed ({out.returncode}):\n{(out.stdout + out.stderr)[-3000:]}")
    return out


def read_metrics(project: Path, stage: str) -> dict[str, Any]:
    path = project / "data" / "metrics" / f"{stage}.json"
    return json.loads(path.read_text()) if path.exists() else {}


def stage_params(project: Path, stage: str) -> dict[str, Any]:
    """The typed params sections ``stage`` reads (dvc.yaml ``params:``), as plain data for MLflow."""
    params = load_pipeline(project / "params.yaml")
    return {s: section_data(params, s) for s in STAGE_SECTIONS[stage]}


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, project: str, track: bool = True) -> StageRun:
    """``dvc repro -s <stage>``; log the stage to MLflow when it actually ran."""
    import time

    root = Path(project)
    t0 = time.perf_counter()
    out = repro(root, "-s", stage)
    ran = f"Running stage '{stage}'" in out.stdout
    result = StageRun(stage, ran, round(time.perf_counter() - t0, 3))
    log.info("stage %s %s in %.1f s", stage, "ran" if ran else "was up to date", result.seconds)
    if ran and track:
        from flows.registry import log_stage_run

        artifacts = [root / a for a in ARTIFACTS[stage] if (root / a).exists()]
        tags = {"ramp.report": "report.html"} if stage == "export" else None  # the page, among the run's artifacts
        log_stage_run(stage, stage_params(root, stage), read_metrics(root, stage), artifacts, project=root, tags=tags)
    return result


@task(name="register-and-gate")
def register_and_gate(project: str) -> dict[str, Any]:
    """Register ``data/train/policy`` and promote it if its held-out KLD beats the champion's at this budget."""
    from flows.registry import promote_if_better, register_policy

    root = Path(project)
    evaluate = read_metrics(root, "evaluate")
    budget = read_metrics(root, "allocate")["budget_file_bytes"]
    version = register_policy(root / "data" / "train" / "policy", read_metrics(root, "train"), project=root)
    promotion = promote_if_better(version, GATE_METRIC, evaluate[f"ramp_{GATE_METRIC}"], budget, project=root)
    return {"version": version, "promoted": promotion.promoted, "reason": promotion.reason}


@task(name="pull-champion")
def pull_champion_task(project: str) -> str:
    """Copy the registry's champion into ``policies/champion/`` for ``allocate.policy: champion``."""
    from flows.registry import pull_champion

    return pull_champion(project)


@flow(name="ramp-pipeline", log_prints=True)
def ramp_pipeline(project: str = str(PROJECT), track: bool = True, stages: list[str] | None = None) -> dict[str, Any]:
    """Run the DVC DAG stage by stage; returns which stages ran and, if a policy was trained, the gate's verdict."""
    wanted = list(stages or STAGES)
    unknown = [s for s in wanted if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    graph = upstream(Path(project) / "dvc.yaml")
    policy = load_pipeline(Path(project) / "params.yaml").allocate.policy
    futures: dict[str, Any] = {}
    previous = None
    for stage in STAGES:
        if stage not in wanted:
            continue
        if stage == "allocate" and policy == "champion":
            previous = pull_champion_task.submit(project, wait_for=[previous] if previous is not None else [])
        wait = [futures[u] for u in graph[stage] if u in futures] + ([previous] if previous is not None else [])
        futures[stage] = run_stage.submit(stage, project, track, wait_for=wait)
        previous = futures[stage]
    runs = {s: f.result() for s, f in futures.items()}
    summary: dict[str, Any] = {"ran": [s for s, r in runs.items() if r.ran]}
    if track and runs.get("train") and runs["train"].ran and "evaluate" in runs and policy == "file":
        summary["registry"] = register_and_gate(project)
    print(f"ramp-pipeline: ran {summary['ran'] or 'nothing (all stages up to date)'}")
    return summary


def demo_summary(project: str | Path, summary: dict[str, Any]) -> str:
    """What ``make demo`` prints after the flow: the results table (RAMP, the allocators, the llama.cpp presets at
    their sizes), where the plots, the GGUF and the report are, the registry's verdict and how to open the UIs."""
    from flows.registry import champion_version
    from ramp.report import results_table

    root = Path(project)
    export = read_metrics(root, "export")
    lines = [results_table(root), ""]
    lines.append(f"GGUF:    {root / 'data/export/model.gguf'} ({export.get('file_bytes', 0):,d} B)")
    lines.append(f"report:  {root / 'data/export/report.html'}")
    lines.append("plots:   " + "  ".join(str(root / p) for p in PLOTS))
    reg = summary.get("registry")
    if reg:
        verdict = "promoted to champion" if reg["promoted"] else f"not promoted ({reg['reason']})"
        lines.append(f"policy:  models:/ramp-policy/{reg['version']} registered, {verdict}")
    champion = champion_version(root)
    lines.append(f"champion: models:/ramp-policy/{champion}" if champion else "champion: none registered yet")
    lines.append("MLflow UI:  make mlflow-ui   (http://127.0.0.1:5000: experiment ramp, model ramp-policy)")
    lines.append("Prefect UI: make prefect-ui  (http://127.0.0.1:4200: flow ramp-pipeline)")
    return "\n".join(lines)


if __name__ == "__main__":
    if sys.argv[1:] == ["--table"]:
        from ramp.report import results_table

        print(results_table(PROJECT))
    elif sys.argv[1:] in ([], ["--demo"]):
        state = ramp_pipeline(return_state=True)
        result = state.result()  # a failed stage raises here, with the tail of its DVC output
        print(demo_summary(PROJECT, result))
        print(f"Prefect flow run {state.state_details.flow_run_id}: {state.name}")
    else:
        print("usage: python -m flows.pipeline [--demo | --table]", file=sys.stderr)
        sys.exit(2)
