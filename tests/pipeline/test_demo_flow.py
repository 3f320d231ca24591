"""``make demo`` is the Prefect flow ``ramp-pipeline`` on the DVC pipeline: on a cold tiny copy it leaves a
Completed flow run, one MLflow run per stage (the export run holding the HTML report), a registered ``ramp-policy``
version with the ``champion`` alias, and prints the results table with the llama.cpp rows, the GGUF, the report and
the UIs to open; a second run recomputes nothing and registers nothing."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile

import pytest

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))

from tests.pipeline.harness import STAGES, dvc, make_pipeline_copy  # noqa: E402


@pytest.mark.slow
def test_demo_flow_tracks_registers_and_completes(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    from flows import registry
    from flows.pipeline import demo_summary, ramp_pipeline

    root = make_pipeline_copy(tmp_path / "repo")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the project's own mlflow.db, as make demo uses
    monkeypatch.setenv("RAMP_ASSETS", str(root / "data" / "assets"))
    with prefect_test_harness(server_startup_timeout=120):
        state = ramp_pipeline(project=str(root), return_state=True)
        summary = state.result()

        async def read_run():  # what the Prefect UI shows for this run
            async with get_client() as client:
                return await client.read_flow_run(state.state_details.flow_run_id)

        run = asyncio.run(read_run())
        assert run.state.is_completed() and run.state.name == "Completed"
        assert summary["ran"] == list(STAGES)
        assert summary["registry"]["promoted"] is True
        # the second run: DVC finds every stage up to date, nothing is logged or registered
        again = ramp_pipeline(project=str(root))
        assert again["ran"] == [] and "registry" not in again

    registry.setup(root)
    client = MlflowClient()
    experiment = client.get_experiment_by_name(registry.EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    stage_runs = sorted(r.data.tags["ramp.stage"] for r in runs if "ramp.stage" in r.data.tags)
    assert stage_runs == sorted(STAGES)  # one run per stage that ran, once
    export_run = next(r for r in runs if r.data.tags.get("ramp.stage") == "export")
    assert [a.path for a in client.list_artifacts(export_run.info.run_id)] == ["report.html"]
    assert export_run.data.tags["ramp.report"] == "report.html"
    evaluate_run = next(r for r in runs if r.data.tags.get("ramp.stage") == "evaluate")
    kld = json.loads((root / "data/metrics/evaluate.json").read_text())["ramp_kld_mean"]
    assert evaluate_run.data.metrics["ramp_kld_mean"] == pytest.approx(kld)
    champion = client.get_model_version_by_alias(registry.MODEL_NAME, "champion")
    assert str(champion.version) == summary["registry"]["version"] == "1"

    text = demo_summary(root, summary)
    assert "llama.cpp-Q3_K_M" in text and "ramp " in text  # the preset beside RAMP in the results table
    assert str(root / "data/export/model.gguf") in text and str(root / "data/export/report.html") in text
    assert "promoted to champion" in text and "models:/ramp-policy/1" in text
    assert "make mlflow-ui" in text and "make prefect-ui" in text
    assert json.loads(dvc(root, "status", "--json").stdout) == {}
