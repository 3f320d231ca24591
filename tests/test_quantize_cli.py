"""``ramp quantize MODEL --size|--bpw -o OUT``: the whole pipeline as a DVC project in a workspace of its own.

Checked: sizes parse in the units users write; bad arguments fail in one line before any work, leaving nothing;
on the tiny model the command writes a GGUF within budget that reads back, and its report; a rerun recomputes
nothing (DVC says every stage is up to date) and writes the same bytes; ``--policy champion`` uses the registry's
champion with no ``train`` stage, and without a champion fails in one line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ramp.cli import INT64_MAX, parse_size
from ramp.errors import RampError
from tests.test_cli_errors import fails_in_one_line

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("93510208", 93_510_208),
        ("3.6GB", 3_600_000_000),
        ("3.6gb", 3_600_000_000),
        ("850 MB", 850_000_000),
        ("3.35GiB", int(3.35 * 1024**3)),
        ("512KiB", 512 * 1024),
        (".5G", 500_000_000),
        ("1.5B", 1),  # whole bytes, rounded down: a budget is never exceeded
    ],
)
def test_sizes_parse_in_the_units_users_write(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "3.6XB", "-1GB", "1e9", "3,6GB", "0", "0.4", "1e30", "9" * 30])
def test_a_bad_size_is_one_error_naming_it(text):
    with pytest.raises(RampError, match="--size") as e:
        parse_size(text)
    assert repr(text) in str(e.value)
    assert str(INT64_MAX) in str(e.value) or "expected a size" in str(e.value) or "at least 1" in str(e.value)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ([], "give one budget"),
        (["--size", "1MB", "--bpw", "4.5"], "give one budget"),
        (["--size", "lots"], "--size 'lots'"),
        (["--bpw", "0"], "--bpw 0.0"),
        (["--bpw", "4.5", "--policy", "best"], "--policy 'best'"),
        (["--bpw", "4.5", "--imatrix", "missing.dat"], "--imatrix missing.dat: no such file"),
    ],
)
def test_bad_arguments_fail_in_one_line_before_any_work(tmp_path, monkeypatch, extra, expected):
    monkeypatch.chdir(tmp_path)
    line = fails_in_one_line(["quantize", "tiny", "-o", "out.gguf", "--workspace", "ws", *extra], tmp_path)
    assert expected in line, line
    assert not (tmp_path / "ws").exists()


def test_output_must_be_a_gguf_and_model_must_exist(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "expected a .gguf" in fails_in_one_line(["quantize", "tiny", "-o", "out.bin", "--bpw", "4"], tmp_path)
    line = fails_in_one_line(["quantize", "nope/model", "-o", "o.gguf", "--bpw", "4"], tmp_path)
    assert "MODEL nope/model: no such model file or directory" in line


# ------------------------------------------------------------------------------ the real pipeline, tiny model


@pytest.fixture(scope="module")
def tiny_params(tmp_path_factory) -> Path:
    from tests.pipeline.harness import tiny_params as tiny

    path = tmp_path_factory.mktemp("quantize") / "tiny-params.yaml"
    path.write_text(yaml.safe_dump(tiny(), sort_keys=False))
    return path


def quantize(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(Path(sys.executable).parent / "ramp"), *args], capture_output=True, text=True, env=env, check=False
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_params) -> tuple[Path, Path, list[str], subprocess.CompletedProcess]:
    """``ramp quantize tiny --size 900KB`` with a policy trained on the model: (workspace, OUT, argv, result)."""
    root = tmp_path_factory.mktemp("trained")
    ws, out = root / "ws", root / "tiny-q.gguf"
    args = ["quantize", "tiny", "--size", "900KB", "-o", str(out), "--params", str(tiny_params), "--workspace", str(ws)]
    return ws, out, args, quantize(*args)


@pytest.mark.slow
def test_quantize_tiny_model_writes_gguf_within_budget_report_and_reruns_cached(trained):
    from ramp.gguf_check import validate_gguf

    ws, out, args, first = trained
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    size = out.stat().st_size
    assert size <= 900_000
    layout = validate_gguf(out)
    assert {t.name for t in layout.tensors} >= {"blk.0.attn_q.weight", "blk.1.ffn_down.weight", "token_embd.weight"}
    report = out.with_suffix(".html")
    assert report.read_text().lstrip().lower().startswith("<!doctype html")
    metrics = json.loads((ws / "data" / "metrics" / "export.json").read_text())
    assert metrics["file_bytes"] == size and metrics["budget_file_bytes"] == 900_000
    assert f"{size:,d} B of a 900,000 B budget" in first.stdout
    assert "llama.cpp-Q3_K_M" in first.stdout  # the results table, presets included
    # the workspace is a DVC project: dvc.yaml with the repository's code as absolute deps, the overlay in params
    dvc_yaml = yaml.safe_load((ws / "dvc.yaml").read_text())
    assert list(dvc_yaml["stages"]) == ["calibrate", "embed", "fold", "sensitivity", "train", "allocate", "quantize",
                                        "evaluate", "export"]  # fmt: skip
    assert str(REPO / "ramp" / "pipeline" / "calibrate.py") in dvc_yaml["stages"]["calibrate"]["deps"]
    params = yaml.safe_load((ws / "params.yaml").read_text())
    assert params["allocate"]["budget_file_bytes"] == 900_000 and params["allocate"]["budget_bpw"] is None
    before = out.read_bytes()
    again = quantize(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Running stage" not in again.stdout + again.stderr
    assert out.read_bytes() == before
    status = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), "status"], cwd=ws, capture_output=True, text=True, check=True
    )
    assert "up to date" in status.stdout


@pytest.mark.slow
def test_quantize_with_the_champion_policy_skips_train(tmp_path, tiny_params, trained, monkeypatch):
    from flows.registry import promote_if_better, register_policy

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    ws, out = tmp_path / "ws", tmp_path / "zero-shot.gguf"
    args = ["quantize", "tiny", "--bpw", "4.0", "-o", str(out), "--params", str(tiny_params), "--workspace", str(ws)]
    none = quantize(*args, "--policy", "champion")
    assert none.returncode == 1
    assert none.stderr.strip().splitlines()[-1].startswith("error: --policy champion: ")
    assert "no such registered policy" in none.stderr and not out.exists()
    # a champion: the policy the pipeline trained at another budget, registered and promoted
    assert trained[3].returncode == 0
    version = register_policy(trained[0] / "data" / "train" / "policy", project=tmp_path)
    assert promote_if_better(version, "kld_mean", 0.01, 1, project=tmp_path).promoted
    used = quantize(*args, "--policy", "champion")
    assert used.returncode == 0, used.stdout[-3000:] + used.stderr[-3000:]
    assert f"models:/ramp-policy/{version}" in used.stdout
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    assert "train" not in stages and "policies/champion" in stages["allocate"]["deps"]
    assert not (ws / "data" / "train").exists()
    budget = json.loads((ws / "data" / "allocate" / "budget.json").read_text())
    assert budget["policy_version"] == f"models:/ramp-policy/{version}"
    from ramp.allocate import ZERO_SHOT_WALK  # a policy from elsewhere walks as zero-shot policies do

    assert {k: budget["params"][k] for k in ZERO_SHOT_WALK} == ZERO_SHOT_WALK
    assert budget["walk"] == "fit"  # auto, for the pipeline's index-map policy
    assert out.exists() and out.with_suffix(".html").exists()
    # the large-model path: zero-shot and no torch evaluation (stale results of the run above are not reported)
    assert (ws / "data" / "evaluate").exists()
    fast = quantize(*args, "--policy", "champion", "--no-evaluate")
    assert fast.returncode == 0, fast.stdout[-3000:] + fast.stderr[-3000:]
    stages = yaml.safe_load((ws / "dvc.yaml").read_text())["stages"]
    assert list(stages) == ["calibrate", "embed", "fold", "allocate", "quantize", "export"]
    assert not any("data/evaluate" in d or "data/sensitivity" in d for d in stages["export"]["deps"])
    assert not (ws / "data" / "evaluate").exists() and not (ws / "data" / "sensitivity").exists()
    assert "no results: data/evaluate/results.parquet missing" in fast.stdout
    assert "not evaluated" in fast.stdout and "not evaluated" in out.with_suffix(".html").read_text()
    assert "Running stage 'export'" in fast.stdout + fast.stderr  # its deps changed
    assert "Running stage 'calibrate'" not in fast.stdout + fast.stderr  # the rest is cached
    # a champion that learned an embedding cost gain (a pool with train.cost_gain role) also picks the embedding's
    # type with no evaluation on the model, under a file budget: allocate.embedding_type predicted
    import dataclasses

    from ramp.allocate import load_policy, save_policy

    plain = load_policy(trained[0] / "data" / "train" / "policy")
    roles = ("q", "k", "v", "o", "gate", "up", "down")
    gained = dataclasses.replace(plain, cost_gains={**dict.fromkeys(roles, 0.0), "embedding": 4.5})
    version = register_policy(save_policy(gained, tmp_path / "gained"), project=tmp_path)
    assert promote_if_better(version, "kld_mean", 0.001, 1, project=tmp_path).promoted
    sized = [a if a != "4.0" else "900KB" for a in args]
    sized[sized.index("--bpw")] = "--size"
    predicted = quantize(*sized, "--policy", "champion", "--no-evaluate")
    assert predicted.returncode == 0, predicted.stdout[-3000:] + predicted.stderr[-3000:]
    assert "embedding type: predicted from the champion's learned embedding cost gain" in predicted.stdout
    assert yaml.safe_load((ws / "params.yaml").read_text())["allocate"]["embedding_type"] == "predicted"
    budget = json.loads((ws / "data" / "allocate" / "budget.json").read_text())
    assert budget["policy_version"] == f"models:/ramp-policy/{version}"
    assert budget["embedding_type"] in budget["embedding_predicted_kld"] and len(budget["embedding_predicted_kld"]) > 1
    assert out.stat().st_size <= 900_000
