"""Prefect flows against a real ephemeral Prefect server, on the tiny pipeline copy; the retrain deployment's
cron schedule comes from params.yaml and one triggered run completes (registering and gating a policy)."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))

from flows import registry  # noqa: E402
from flows.retrain import retrain_params, set_offset  # noqa: E402
from tests.pipeline.harness import REPO, STAGES, dvc  # noqa: E402


def test_set_offset_keeps_the_file_and_changes_one_value(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((REPO / "params.yaml").read_text())
    before = p.read_text()
    assert set_offset(tmp_path, 40) == 0
    after = p.read_text()
    assert yaml.safe_load(after)["calibrate"]["offset_seqs"] == 40
    assert [a for a, b in zip(before.splitlines(), after.splitlines(), strict=True) if a != b] == [
        line for line in before.splitlines() if line.strip().startswith("offset_seqs:")
    ]
    assert retrain_params(REPO).cron == yaml.safe_load(before)["retrain"]["cron"]


@pytest.mark.slow
def test_pipeline_flow_and_served_retrain_deployment(tiny_pipeline: Path, monkeypatch):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.runner import Runner
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import ramp_pipeline
    from flows.serve import DEPLOYMENT, deployment

    root = tiny_pipeline
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(REPO)  # the runner's subprocess imports flows/ from here
    with prefect_test_harness(server_startup_timeout=120):
        # the DAG is up to date: every task runs `dvc repro -s`, nothing is recomputed
        summary = ramp_pipeline(project=str(root))
        assert summary["ran"] == []

        scheduled = deployment(root)  # built outside the event loop (to_deployment is sync-compatible)

        async def serve_once() -> tuple[object, object, list]:
            runner = Runner(name="test-runner")
            dep_id = await runner.add_deployment(scheduled)
            async with get_client() as client:
                dep = await client.read_deployment(dep_id)
                offset = yaml.safe_load((root / "params.yaml").read_text())["calibrate"]["offset_seqs"]
                run = await run_deployment(
                    f"retrain-policy/{DEPLOYMENT}", parameters={"offset_seqs": offset}, timeout=0, client=client
                )
                await runner.start(run_once=True)
                run = await client.read_flow_run(run.id)
                tasks = await client.read_task_runs()
            return dep, run, tasks

        dep, run, tasks = asyncio.run(serve_once())
    cron = yaml.safe_load((root / "params.yaml").read_text())["retrain"]["cron"]
    assert [s.schedule.cron for s in dep.schedules] == [cron]
    assert dep.parameters["project"] == str(root.resolve())
    assert run.state.is_completed(), run.state
    names = [t.name for t in tasks]
    assert set(STAGES) <= set(names)  # one Prefect task run per DVC stage (task_run_name = stage)
    assert "register-and-gate" in {n.rsplit("-", 1)[0] for n in names}
    # the triggered retrain registered a policy and, as the first one, made it champion with its KLD recorded
    champion = registry.champion_version(root)
    assert champion is not None
    from mlflow import MlflowClient

    budget = json.loads((root / "data/metrics/allocate.json").read_text())["budget_file_bytes"]
    kld = json.loads((root / "data/metrics/evaluate.json").read_text())["ramp_kld_mean"]
    tags = MlflowClient().get_model_version(registry.MODEL_NAME, champion).tags
    assert float(tags[f"eval.kld_mean.{budget}"]) == pytest.approx(kld)
    assert json.loads(dvc(root, "status", "--json").stdout) == {}
