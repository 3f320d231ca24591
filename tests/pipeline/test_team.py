"""A team shares one DVC cache and one MLflow registry (issue 19): another clone gets the stage outputs with
``dvc pull`` from a DVC remote (a local folder here), and two projects on different "machines" register, promote and
pull policies through one ``mlflow server`` (sqlite backend, artifacts served by the server), as ``make serve`` runs it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from pathlib import Path

import pytest

from benchmarks.screenshots import free_port, server
from tests.pipeline.harness import dvc, make_pipeline_copy


@pytest.mark.slow
def test_dvc_remote_lets_another_clone_pull_every_output(tiny_pipeline: Path, tmp_path):
    remote = tmp_path / "remote"
    dvc(tiny_pipeline, "remote", "add", "--local", "-d", "team", str(remote))
    try:
        dvc(tiny_pipeline, "push")
        # a clone: what git carries (the code, params, dvc.lock and the small `cache: false` metrics and plots,
        # which DVC leaves to git), none of the cached stage outputs
        other = make_pipeline_copy(tmp_path / "other")
        shutil.copyfile(tiny_pipeline / "dvc.lock", other / "dvc.lock")
        for folder in ("metrics", "plots"):
            shutil.copytree(tiny_pipeline / "data" / folder, other / "data" / folder)
        assert not (other / "data" / "export").exists()
        dvc(other, "remote", "add", "--local", "-d", "team", str(remote))
        dvc(other, "pull")
    finally:
        dvc(tiny_pipeline, "remote", "remove", "--local", "team")
    for rel in ("data/export/model.gguf", "data/allocate/allocation.json", "data/train/policy/policy.safetensors"):
        assert (other / rel).read_bytes() == (tiny_pipeline / rel).read_bytes(), rel
    status = dvc(other, "status", "--json").stdout.strip()
    assert status == "{}", status  # nothing to recompute: the outputs are the team's


@contextlib.contextmanager
def mlflow_server(root: Path):
    """``mlflow server`` as ``make serve`` starts it (sqlite backend, served artifacts) on a free port; its URL."""
    port = free_port()
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
        "--artifacts-destination", str(root / "server-artifacts"), "--serve-artifacts",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    with server(cmd, f"{url}/health", {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}, root / "server.log"):
        yield url


@pytest.mark.slow
def test_one_mlflow_server_is_the_registry_of_two_machines(tiny_pipeline: Path, tmp_path, monkeypatch):
    from flows import registry

    (tmp_path / "srv").mkdir()
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    alice.mkdir()
    bob.mkdir()
    policy = tiny_pipeline / "data" / "train" / "policy"
    with mlflow_server(tmp_path / "srv") as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        version = registry.register_policy(policy, {"best_kld": 0.02}, project=alice)
        assert registry.promote_if_better(version, "kld_mean", 0.02, 1_000_000, project=alice).promoted
        assert registry.pull_champion(bob) == f"models:/{registry.MODEL_NAME}/{version}"  # another machine
        worse = registry.register_policy(policy, project=bob)
        assert not registry.promote_if_better(worse, "kld_mean", 0.03, 1_000_000, project=bob).promoted
        assert registry.champion_version(alice) == version
    for name in ("policy.json", "policy.safetensors"):
        assert (bob / "policies" / "champion" / "policy" / name).read_bytes() == (policy / name).read_bytes()
    # the artifacts live with the server, not in either project's folder
    assert any((tmp_path / "srv" / "server-artifacts").rglob("policy.safetensors"))
    assert not (alice / "mlartifacts").exists() and not (bob / "mlartifacts").exists()
