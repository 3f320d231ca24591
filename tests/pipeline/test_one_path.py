"""One path: a benchmark row, the ``ramp`` CLI and ``dvc repro`` run the same stage functions, so the same params
give the same allocation, the same KLD and the same file bytes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from ramp.params import load_pipeline
from ramp.pipeline.workspace import Workspace
from tests.pipeline.harness import TINY, tiny_params

pytestmark = pytest.mark.slow  # reuses the DVC run of the tiny pipeline (test_dag)

REPO = Path(__file__).resolve().parents[2]


def test_benchmark_row_equals_the_pipelines_own_metrics(tiny_pipeline: Path, tmp_path: Path):
    from benchmarks.quality import budget_rows

    params = load_pipeline(REPO / "params.yaml", TINY)  # the same overlay dvc repro ran with (harness.TINY)
    ws = Workspace(tmp_path / "ws", quant_cache=tmp_path / "quant")
    rows = budget_rows(params, ws, "tiny", tmp_path / "recipes", tmp_path / "files")
    ramp = next(r for r in rows if r["method"] == "ramp")
    evaluate = json.loads((tiny_pipeline / "data/metrics/evaluate.json").read_text())
    export = json.loads((tiny_pipeline / "data/metrics/export.json").read_text())
    assert ramp["allocation_hash"] == evaluate["ramp_allocation_hash"] == export["allocation_hash"]
    assert ramp["kld_torch"] == evaluate["ramp_kld_mean"]
    assert ramp["sha256"] == export["sha256"] and ramp["bytes"] == export["file_bytes"]
    # baseline rows are the evaluate stage's own, and their files are rebuilt from their recipes byte for byte
    methods = {r["method"] for r in rows}
    assert {"greedy", "uniform-fill", "uniform-Q4_0", "llama.cpp-Q3_K_M"} <= methods
    for r in rows:
        if r["method"] != "ramp":
            assert r["kld_torch"] == evaluate[f"{r['method']}_kld_mean"], r["method"]
    from ramp.allocation import allocation_hash, read_tensor_type_recipe
    from ramp.pipeline.measure import build_gguf

    greedy = next(r for r in rows if r["method"] == "greedy")
    recipe = Path(greedy["recipe"])
    alloc = read_tensor_type_recipe((recipe if recipe.is_absolute() else REPO / recipe).read_text())
    assert allocation_hash(alloc) == greedy["allocation_hash"]
    rb = greedy["rebuild"]
    # allocate.embedding_type measured: the type the allocate stage chose, for every file of the run
    chosen = json.loads((tiny_pipeline / "data/allocate/budget.json").read_text())["embedding_type"]
    assert rb["embedding_type"] == chosen
    rebuilt = build_gguf(
        ws, ws.folded_model(), alloc, tmp_path / "again.gguf", rb["provenance"], rb["embedding_type"], rb["norm_type"]
    )
    assert rebuilt.sha256 == greedy["sha256"]


def test_cli_train_and_allocate_are_the_pipeline_stages(tiny_pipeline: Path, tmp_path: Path):
    from ramp.cli import app

    params_file = tmp_path / "params.yaml"
    params_file.write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    ws = tmp_path / "ws"
    policy = tmp_path / "policy"
    common = ["--params", str(params_file), "--workspace", str(ws)]
    res = CliRunner().invoke(app, ["train", "tiny", "--out", str(policy), *common])
    assert res.exit_code == 0, res.output
    alloc_file = tmp_path / "alloc.json"
    res = CliRunner().invoke(
        app, ["allocate", "tiny", "--policy", str(policy), "--out", str(alloc_file), "--bpw", "4.5", *common]
    )
    assert res.exit_code == 0, res.output
    # the same params (allocate.budget_bpw 4.5) through dvc repro gave the same allocation
    assert json.loads(alloc_file.read_text()) == json.loads(
        (tiny_pipeline / "data/allocate/allocation.json").read_text()
    )
    res = CliRunner().invoke(
        app, ["allocate", "tiny", "--policy", str(policy), "--out", str(alloc_file), "--file-bytes", "1000", *common]
    )
    assert res.exit_code != 0 and "below the smallest legal allocation" in res.output
