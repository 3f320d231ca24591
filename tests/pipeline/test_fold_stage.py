"""The fold stage with folding enabled (issue 18): the model is folded block by block from a lazy load into
``data/fold/model.safetensors``, the same weights as folding the whole model, checked against the original logits
by block-by-block forward passes; a check that fails leaves no output."""

from __future__ import annotations

import json

import pytest
import torch

from ramp.calib import load_stats
from ramp.folding import fold_model
from ramp.models.loader import load_model
from ramp.params import load_pipeline, merge
from ramp.pipeline.run import run_pipeline
from ramp.pipeline.workspace import Workspace
from tests.pipeline.harness import REPO, TINY

FOLD_ON = merge(TINY, {"fold": {"enabled": True, "alpha": 0.5}})


def test_enabled_fold_streams_the_whole_model_fold(tmp_path):
    params = load_pipeline(REPO / "params.yaml", FOLD_ON)
    ws = Workspace(tmp_path / "ws", quant_cache=tmp_path / "quant")
    run_pipeline(params, ws, ("calibrate", "fold"))
    pointer = json.loads((ws.stage("fold") / "model.json").read_text())
    assert pointer["folded"] is True and pointer["file"] == "model.safetensors" and len(pointer["sha256"]) == 64
    metrics = json.loads((ws.root / "data" / "metrics" / "fold.json").read_text())
    assert 0.0 < metrics["max_logit_diff"] <= params.fold.max_logit_diff and metrics["enabled"] is True
    # the streamed file holds what folding the whole model in memory gives, bit for bit
    whole = load_model(ws.model_path(), with_tokenizer=False)
    fold_model(whole, load_stats(ws.stage("calibrate") / "stats"), alpha=0.5, errors=False)
    folded = ws.folded_model()
    want, got = whole.model.state_dict(), folded.model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    lazy = ws.folded_model(lazy=True)
    assert lazy.store is not None and all(p.is_meta for p in lazy.model.parameters())


def test_a_failed_logit_check_leaves_no_fold_output(tmp_path):
    params = load_pipeline(REPO / "params.yaml", merge(FOLD_ON, {"fold": {"max_logit_diff": 1e-30}}))
    ws = Workspace(tmp_path / "ws", quant_cache=tmp_path / "quant")
    run_pipeline(params, ws, ("calibrate",))
    with pytest.raises(ValueError, match=r"folded model changes logits by .* > max_logit_diff 1e-30"):
        run_pipeline(params, ws, ("fold",))
    assert not ws.stage("fold").exists() and not list(ws.stage("fold").parent.glob(".fold.*"))


def test_the_fold_stage_prices_every_legal_pair_by_the_fisher_table_when_asked(tmp_path):
    import pandas as pd

    from ramp.fisher import FISHER_COLUMN
    from ramp.pipeline.fold import ACTION_SPACE, fisher_costs

    params = load_pipeline(REPO / "params.yaml", merge(TINY, {"fold": {"fisher_windows": 3}}))
    ws = Workspace(tmp_path / "ws", quant_cache=tmp_path / "quant")
    run_pipeline(params, ws, ("calibrate", "fold"))
    table = pd.read_parquet(ws.stage("fold") / ACTION_SPACE)
    assert (table[FISHER_COLUMN] > 0).all()
    # per matrix, a format of more error costs more: the Fisher table ranks like the proxy within a matrix
    for _, rows in table.groupby("gguf_name"):
        assert rows["cost"].rank().tolist() == rows[FISHER_COLUMN].rank().tolist()
    costs = fisher_costs(ws)
    assert len(costs) == len(table) and costs[(table.gguf_name[0], table.format[0])] == table[FISHER_COLUMN][0]
    assert ws.read_json("metrics/fold.json")["fisher_windows"] == 3
    off = load_pipeline(
        REPO / "params.yaml", merge(TINY, {"fold": {"fisher_windows": 0}, "evaluate": {"knapsack": ["greedy"]}})
    )
    run_pipeline(off, ws, ("fold",))
    assert FISHER_COLUMN not in pd.read_parquet(ws.stage("fold") / ACTION_SPACE).columns
    with pytest.raises(ValueError, match="has no 'fisher' column: run the fold stage with fold.fisher_windows > 0"):
        fisher_costs(ws)
