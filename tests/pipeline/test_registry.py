"""The MLflow policy registry with a real local store (sqlite + artifact folder in a temp project)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from filelock import FileLock
from mlflow import MlflowClient

from benchmarks.fuzz_registry import promotion_race, tiny_policy_dir
from flows import registry
from ramp.allocate import POLICY_JSON, POLICY_WEIGHTS, PolicyError, allocate, load_policy
from ramp.allocation import matrix_bytes, slots_for
from ramp.errors import RampError
from ramp.features import FEATURES
from ramp.models.tiny import tiny_llama

BUDGET = 123_456
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def project(tmp_path_factory, monkeypatch_module):
    root = tmp_path_factory.mktemp("mlproject")
    monkeypatch_module.delenv("MLFLOW_TRACKING_URI", raising=False)
    return root


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    return tiny_policy_dir(tmp_path_factory.mktemp("policy") / "policy")


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
    assert registry.promotion_lock_path(project) == project.resolve() / "mlflow.db.lock"


def test_gate_errors_are_project_errors_naming_what_is_missing(project, registered):
    with pytest.raises(registry.RegistryError, match="no kld_mean recorded at budget 999 B"):
        registry.promote_if_better(registered[2], "kld_mean", 0.01, 999, project=project)
    with pytest.raises(registry.GateError, match="not a finite number"):
        registry.promote_if_better(registered[2], "kld_mean", float("nan"), BUDGET, project=project)
    with pytest.raises(registry.RegistryError, match=r"models:/ramp-policy/999: no such registered version"):
        registry.promote_if_better("999", "kld_mean", 0.01, BUDGET, project=project)
    assert issubclass(registry.RegistryError, RampError) and issubclass(registry.GateError, ValueError)


def test_promotion_waits_for_the_lock_and_fails_in_one_line_when_it_stays_held(project, registered, monkeypatch):
    monkeypatch.setattr(registry, "LOCK_TIMEOUT_S", 0.3)
    before = champion(project)
    held = FileLock(registry.promotion_lock_path(project))  # another promotion in flight
    with held, pytest.raises(registry.RegistryError, match=r"mlflow\.db\.lock is still held after 0 s"):
        registry.promote_if_better(registered[2], "kld_mean", 0.001, BUDGET, project=project)
    assert champion(project) == before  # nothing was read, compared or set without the lock


def test_concurrent_promotions_never_leave_a_wrong_champion(tmp_path):
    # each trial: a fresh registry, two OS processes released by one barrier, promoting a better and a worse
    # policy against the same champion (the unlocked gate loses 9 of 12 such trials: benchmarks/fuzz_registry.py)
    assert promotion_race(3, str(tmp_path)) == {"trials": 3, "wrong_champion": 0, "errors": 0}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trial-000", "trial-001", "trial-002"]


def test_a_version_is_data_only_and_the_pulled_champion_allocates(project, registered, policy_dir):
    champ = champion(project)
    assert registry.pull_champion(project) == f"models:/{registry.MODEL_NAME}/{champ}"
    pulled = project / registry.CHAMPION_DIR
    assert (pulled / "version.txt").read_text() == f"models:/{registry.MODEL_NAME}/{champ}\n"
    assert sorted(p.name for p in (pulled / "policy").iterdir()) == sorted([POLICY_JSON, POLICY_WEIGHTS])
    for name in (POLICY_JSON, POLICY_WEIGHTS):
        assert (pulled / "policy" / name).read_bytes() == (policy_dir / name).read_bytes()
    # the artifact store holds the two policy files per version and nothing a loader could run
    stored = sorted(p.name for p in (project / "mlartifacts").rglob("*") if p.is_file())
    assert stored.count(POLICY_JSON) == 3 and stored.count(POLICY_WEIGHTS) == 3
    assert not [n for n in stored if n in ("MLmodel", "python_model.pkl") or n.endswith((".py", ".pkl"))]

    policy = load_policy(pulled / "policy", feature_names=FEATURES)
    mats = tiny_llama(seed=0, hidden=256, intermediate=512).matrices()
    rng = np.random.default_rng(0)
    table = pd.DataFrame(
        {"gguf_name": [m.gguf_name for m in mats], **{f: rng.normal(size=len(mats)) for f in FEATURES}}
    )
    slots = slots_for(mats)
    budget = int(4.5 * sum(s.params for s in slots) / 8)
    alloc = allocate(policy, slots, table, budget)
    assert set(alloc) == {m.gguf_name for m in mats}
    assert matrix_bytes(slots, alloc) <= budget


def test_each_project_keeps_its_own_store(project, registered, policy_dir, tmp_path):
    # MLflow's set_tracking_uri exports MLFLOW_TRACKING_URI; left set, the first project would capture this one
    before = champion(project)
    assert registry.register_policy(policy_dir, project=tmp_path) == "1"
    assert (tmp_path / "mlflow.db").is_file() and "MLFLOW_TRACKING_URI" not in os.environ
    assert champion(project) == before and champion(tmp_path) is None


def test_a_pooled_policy_is_tagged_with_the_models_it_was_trained_on(policy_dir, tmp_path):
    metrics = {"best_kld": 0.05, "trained_on": ["gemma3", "testbed"], "zero_shot": True, "cost_basis": "fisher"}
    version = registry.register_policy(policy_dir, metrics, project=tmp_path)
    registry.setup(tmp_path)
    tags = MlflowClient().get_model_version(registry.MODEL_NAME, version).tags
    assert tags["ramp.trained_on"] == "gemma3,testbed" and tags["ramp.zero_shot"] == "true"
    assert tags["ramp.cost_basis"] == "fisher"
    plain = registry.register_policy(policy_dir, {"best_kld": 0.05}, project=tmp_path)
    assert "ramp.trained_on" not in MlflowClient().get_model_version(registry.MODEL_NAME, plain).tags


def _register_raw(project: Path, files: dict[str, str]) -> str:
    """A version whose artifacts are ``files`` (relative path -> text), registered without register_policy."""
    registry.setup(project)
    client = MlflowClient()
    if not client.search_registered_models(f"name='{registry.MODEL_NAME}'"):
        client.create_registered_model(registry.MODEL_NAME)
    with mlflow.start_run() as run:
        for rel, text in files.items():
            mlflow.log_text(text, f"model/{rel}")
        source = mlflow.get_artifact_uri("model")
    return str(client.create_model_version(registry.MODEL_NAME, source, run_id=run.info.run_id).version)


def test_a_version_without_policy_files_fails_in_one_clear_line(tmp_path, monkeypatch):
    version = _register_raw(tmp_path, {"notes.txt": "not a policy"})
    with pytest.raises(PolicyError, match=rf"models:/ramp-policy/{version} holds no policy files: .*notes\.txt"):
        registry.download_policy(version, tmp_path / "out", project=tmp_path)
    assert not (tmp_path / "out").exists()

    registry.promote_if_better(version, "kld_mean", 0.1, BUDGET, project=tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = subprocess.run(
        [sys.executable, "-m", "flows.registry", "pull-champion"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert cli.returncode == 1 and cli.stdout == ""
    errors = [line for line in cli.stderr.splitlines() if line.startswith("flows.registry")]
    assert len(errors) == 1 and "Traceback" not in cli.stderr
    assert errors[0].startswith(f"flows.registry pull-champion: PolicyError: models:/ramp-policy/{version} holds no")
    assert not (tmp_path / registry.CHAMPION_DIR).exists()  # a failed pull leaves no half-written champion


def test_stored_code_is_never_run_and_a_tampered_policy_is_refused(tmp_path, policy_dir):
    # a version in the layout of the former pyfunc versions, with a loader that leaves a mark when imported
    marker = tmp_path / "code-ran"
    mlmodel = "flavors:\n  python_function:\n    loader_module: planted_loader\n    code: code\n"
    version = _register_raw(
        tmp_path,
        {
            "MLmodel": mlmodel,
            "code/planted_loader.py": f"open({str(marker)!r}, 'w').close()\n",
            f"artifacts/policy/{POLICY_JSON}": (policy_dir / POLICY_JSON).read_text(),
        },
    )
    # log_text cannot write the binary weights; copy them beside the stored policy.json
    stored_json = next((tmp_path / "mlartifacts").rglob(POLICY_JSON))
    stored_json.with_name(POLICY_WEIGHTS).write_bytes((policy_dir / POLICY_WEIGHTS).read_bytes())
    registry.promote_if_better(version, "kld_mean", 0.1, BUDGET, project=tmp_path)

    assert registry.pull_champion(tmp_path) == f"models:/ramp-policy/{version}"
    assert not marker.exists()
    assert (tmp_path / registry.CHAMPION_DIR / "policy" / POLICY_JSON).read_text() == stored_json.read_text()
    with pytest.raises(Exception):  # noqa: B017 - whatever pyfunc makes of it, it has imported the planted code
        mlflow.pyfunc.load_model(f"models:/ramp-policy/{version}")
    assert marker.exists()  # the planted loader is live: only pyfunc runs it, the pipeline's pull does not

    meta = json.loads(stored_json.read_text())
    stored_json.write_text(json.dumps({**meta, "obs_dim": meta["obs_dim"] + 1}))
    with pytest.raises(PolicyError, match=rf"models:/ramp-policy/{version}: .*policy\.json: obs_dim"):
        registry.pull_champion(tmp_path)
    # the earlier pull is still there, untouched
    assert json.loads((tmp_path / registry.CHAMPION_DIR / "policy" / POLICY_JSON).read_text()) == meta


def test_log_stage_run(project, tmp_path):
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
