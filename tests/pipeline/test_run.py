"""run_pipeline: the stage functions outside DVC recompute only what changed (params, upstream stamps, code deps)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from ramp.params import load_pipeline, merge
from ramp.pipeline import STAGES
from ramp.pipeline.run import code_digest, run_pipeline
from ramp.pipeline.workspace import Workspace
from tests.pipeline.harness import TINY

pytestmark = pytest.mark.slow  # the tiny pipeline in-process, twice and a half: about a minute

REPO = Path(__file__).resolve().parents[2]


def ran(caplog) -> list[str]:
    return [r.getMessage().split()[2] for r in caplog.records if r.getMessage().startswith("running stage")]


def test_reruns_exactly_the_stages_whose_inputs_changed(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="ramp.pipeline.run")
    ws = Workspace(tmp_path / "ws", quant_cache=tmp_path / "quant")
    params = load_pipeline(REPO / "params.yaml", TINY)
    first = run_pipeline(params, ws)
    assert ran(caplog) == list(STAGES)
    caplog.clear()
    assert run_pipeline(params, ws) == first and ran(caplog) == []
    caplog.clear()
    cheaper = load_pipeline(REPO / "params.yaml", merge(TINY, {"allocate": {"budget_bpw": 4.0}}))
    again = run_pipeline(cheaper, ws)
    assert ran(caplog) == ["allocate", "quantize", "evaluate", "export"]  # train keeps its own budget
    assert again["allocate"]["bpw"] <= 4.0 < first["allocate"]["bpw"]
    # at the train budget allocate exports the allocation the policy was distilled onto; at another, its walk
    assert first["allocate"]["source"] == "train-best" and again["allocate"]["source"] == "policy-walk"
    caplog.clear()
    run_pipeline(cheaper, ws, stages=("fold",))
    assert ran(caplog) == []
    (ws.data / ".stamps" / "embed.json").write_text(json.dumps({"stamp": "stale"}))
    run_pipeline(cheaper, ws, stages=("embed", "train"))
    assert ran(caplog) == ["embed"]  # a stale stamp reruns its stage; train's inputs (params, stamps) are unchanged


def test_code_digest_follows_the_stage_deps_of_dvc_yaml(tmp_path, monkeypatch):
    import shutil

    import ramp.pipeline.stamps as stamps

    for folder in ("ramp", "stages"):
        shutil.copytree(REPO / folder, tmp_path / folder, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(stamps, "REPO", tmp_path)
    before = {s: code_digest(s) for s in ("calibrate", "evaluate", "export")}
    with open(tmp_path / "ramp" / "pipeline" / "evaluate.py", "a") as f:
        f.write("# changed\n")
    after = {s: code_digest(s) for s in before}
    assert after["evaluate"] != before["evaluate"]  # evaluate runs that file
    assert after["calibrate"] == before["calibrate"] and after["export"] == before["export"]  # they do not


def test_measured_embedding_type_is_the_lowest_prediction_and_the_files_type(tmp_path):
    """allocate.embedding_type measured: the sensitivity stage measures the legal embedding formats, train and
    allocate resolve the same type for the same file budget, and the export writes that type within budget."""
    import gguf

    from ramp.allocation import slots_for
    from ramp.pipeline.allocate import overhead_bytes

    ws = Workspace(tmp_path / "ws", quant_cache=tmp_path / "quant")
    formats = ["Q8_0", "Q6_K", "Q4_0", "Q2_K"]
    prep = load_pipeline(REPO / "params.yaml", merge(TINY, {"sensitivity": {"embedding_formats": formats}}))
    metrics = run_pipeline(prep, ws, stages=("calibrate", "embed", "fold", "sensitivity"))
    assert metrics["sensitivity"]["embedding_evaluations"] == len(formats)  # all legal for rows of 256
    lm = ws.folded_model(lazy=True)
    n = sum(s.params for s in slots_for(lm.matrices()))
    file_bytes = overhead_bytes(lm, "Q8_0") + int(4.0 * n / 8)
    budget = {"budget_file_bytes": file_bytes, "budget_bpw": None}
    overlay = {
        "sensitivity": {"embedding_formats": formats},
        "train": budget,
        "allocate": {**budget, "embedding_type": "measured"},
    }
    params = load_pipeline(REPO / "params.yaml", merge(TINY, overlay))
    out = run_pipeline(params, ws)
    chosen = ws.read_json("allocate/budget.json")
    predicted = chosen["embedding_predicted_kld"]
    assert set(predicted) <= set(formats) and len(predicted) >= 2
    assert chosen["embedding_type"] == min(predicted, key=predicted.get)
    assert chosen["overhead_bytes"] == overhead_bytes(lm, chosen["embedding_type"])
    assert out["train"]["budget_matrix_bytes"] == chosen["budget_matrix_bytes"]  # the same type for the same budget
    from ramp.pipeline.allocate import resolve_budget
    from ramp.pipeline.fold import action_space

    # what a caller (the transfer benchmark's zero-shot pass) resolves without running allocate
    slots = action_space(ws, lm)[0]
    emb, overhead, _, resolved = resolve_budget(params.allocate, ws, lm, slots)
    assert (emb, overhead, resolved.matrix_bytes) == (
        chosen["embedding_type"],
        chosen["overhead_bytes"],
        chosen["budget_matrix_bytes"],
    )
    from benchmarks.transfer import budget_bpw

    weights = sum(s.params for s in slots)
    from_stage = budget_bpw(ws, params)  # resolved as above
    assert from_stage == round(8 * chosen["budget_matrix_bytes"] / weights, 4)
    # not read from budget.json: after a zero-shot pass (another budget, another embedding) that file is its own
    stage_budget = ws.data / "allocate" / "budget.json"
    kept = stage_budget.read_text()
    try:
        stage_budget.write_text(json.dumps({**chosen, "budget_matrix_bytes": chosen["budget_matrix_bytes"] // 2}))
        assert budget_bpw(ws, params) == from_stage
        stage_budget.unlink()
        assert budget_bpw(ws, params) == from_stage
    finally:
        stage_budget.write_text(kept)
    # a bpw budget prices the matrices only: measured is auto there (Q8_0, the lowest KLD, would grow the file)
    from ramp.budget import Budget
    from ramp.pipeline.allocate import resolve_embedding

    bpw = Budget(file_bytes=None, bpw=4.0, where="allocate")
    assert resolve_embedding(ws, lm, slots, "measured", bpw) == (*resolve_embedding(ws, lm, slots, "auto", bpw)[:2], {})
    from ramp.allocation import load_allocation

    assert chosen["source"] == "train-best"
    best = load_allocation(ws.stage("train") / "best_allocation.json")
    assert load_allocation(ws.stage("allocate") / "allocation.json") == best
    reader = gguf.GGUFReader(ws.stage("export") / "model.gguf")
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["token_embd.weight"] == chosen["embedding_type"]
    assert out["export"]["file_bytes"] <= file_bytes
