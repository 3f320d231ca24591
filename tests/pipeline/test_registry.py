"""The MLflow policy registry with a real local store (sqlite + artifact folder in a temp project)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from flows import registry
from ramp.allocate import save_policy
from ramp.allocation import matrix_bytes, slots_for
from ramp.features import FEATURES
from ramp.models.tiny import tiny_llama
from ramp.sac.agent import Actor, Policy, SACConfig
from ramp.sac.env import BUDGET_STATE

BUDGET = 123_456


@pytest.fixture(scope="module")
def project(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("mlproject")
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    torch.manual_seed(0)
    sac = SACConfig(hidden=8)
    actor = Actor(len(FEATURES) + len(BUDGET_STATE), sac.hidden, sac.log_std_min, sac.log_std_max)
    return save_policy(Policy(actor, tuple(FEATURES), sac, {}, None), tmp_path_factory.mktemp("policy") / "policy")


@pytest.fixture(scope="module")
def registered(project, policy_dir):
    """Three versions of ramp-policy registered in order."""
    return [registry.register_policy(policy_dir, {"kld": 0.1}, project=project) for _ in range(3)]


def champion(project) -> str:
    return registry.champion_version(project)


def test_first_version_becomes_champion_then_better_wins_worse_is_rejected(project, registered):
    v1, v2, v3 = registered
    assert champion(project) is None
    first = registry.promote_if_better(v1, "kld_mean", 0.050, BUDGET, project=project)
    assert first.promoted and champion(project) == v1

    better = registry.promote_if_better(v2, "kld_mean", 0.040, BUDGET, project=project)
    assert better.promoted and better.champion_version == v1 and better.champion_value == pytest.approx(0.05)
    assert champion(project) == v2

    worse = registry.promote_if_better(v3, "kld_mean", 0.045, BUDGET, project=project)
    assert not worse.promoted and champion(project) == v2
    tags = MlflowClient().get_model_version(registry.MODEL_NAME, v3).tags
    assert "0.045" in tags["rejected"] and "0.04" in tags["rejected"] and f"v{v2}" in tags["rejected"]
    assert float(tags["rejected.value"]) == pytest.approx(0.045)
    assert float(tags["rejected.champion_value"]) == pytest.approx(0.040)
    assert "rejected" not in MlflowClient().get_model_version(registry.MODEL_NAME, v2).tags


def test_gate_needs_the_champions_number_at_the_same_budget(project, registered):
    with pytest.raises(LookupError, match="no kld_mean recorded at budget 999 B"):
        registry.promote_if_better(registered[2], "kld_mean", 0.01, 999, project=project)
    with pytest.raises(ValueError, match="not a finite number"):
        registry.promote_if_better(registered[2], "kld_mean", float("nan"), BUDGET, project=project)


def test_pyfunc_maps_embedding_and_budget_to_allocation(project, registered):
    import mlflow

    registry.setup(project)
    model = mlflow.pyfunc.load_model(f"models:/{registry.MODEL_NAME}@{registry.CHAMPION}")
    lm = tiny_llama(seed=0, hidden=256, intermediate=512)
    mats = lm.matrices()
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {
            "gguf_name": [m.gguf_name for m in mats],
            "block": [m.block for m in mats],
            "role": [m.role for m in mats],
            "rows": [m.shape[0] for m in mats],
            "cols": [m.shape[1] for m in mats],
            **{f: rng.normal(size=len(mats)).astype(np.float32) for f in FEATURES},
        }
    )
    slots = slots_for(mats)
    budget = int(4.5 * sum(s.params for s in slots) / 8)
    out = model.predict(table, params={"matrix_bytes": budget})
    alloc = dict(zip(out["gguf_name"], out["format"], strict=True))
    assert list(out["gguf_name"]) == [m.gguf_name for m in mats]
    assert matrix_bytes(slots, alloc) <= budget
    with pytest.raises(Exception, match="matrix_bytes"):
        model.predict(table)


def test_log_stage_run(project, tmp_path):
    import mlflow

    art = tmp_path / "allocation.json"
    art.write_text("{}")
    run_id = registry.log_stage_run(
        "allocate",
        {"budget_bytes": 10, "uniform": ["Q4_0"]},
        {"bpw": 4.5, "formats": {"Q4_0": 3}, "name": "x"},
        [art],
        project=project,
    )
    run = mlflow.get_run(run_id)
    assert run.data.params["budget_bytes"] == "10" and run.data.metrics["formats.Q4_0"] == 3.0
    assert run.data.tags["ramp.stage"] == "allocate"
    assert [a.path for a in MlflowClient().list_artifacts(run_id)] == ["allocation.json"]
    assert (project / "mlartifacts").is_dir()
