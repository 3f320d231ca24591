"""Which stages a workspace project leaves out: the sensitivity stage goes only where no stage left reads it."""

from __future__ import annotations

from pathlib import Path

import pytest

from ramp.params import load_pipeline
from ramp.pipeline.project import project_dvc_yaml, sensitivity_readers, skipped_stages

REPO = Path(__file__).resolve().parents[2]
ZERO_SHOT = {  # a pool of other models at a bpw, allocate at the file size, the light evaluate of bench-transfer
    "train": {
        "sources": ["gemma3"],
        "include_target": False,
        "rescore_top": 0,
        "budget_bpw": 3.9,
        "budget_file_bytes": None,
    },
    "allocate": {"budget_file_bytes": 93_510_208, "budget_bpw": None, "embedding_type": "auto"},
    "evaluate": {"knapsack": [], "evolution_evaluations": 0},
}


def params(overlay: dict):
    return load_pipeline(REPO / "params.yaml", overlay)


def test_the_committed_pipeline_reads_its_sensitivity_tables_in_three_stages():
    p = params({})
    assert sensitivity_readers(p) == ["train", "allocate", "evaluate"]
    assert skipped_stages(p, False, False) == set()
    assert sensitivity_readers(p, skip_train=True, skip_evaluate=True) == ["allocate"]  # the measured embedding
    assert skipped_stages(p, True, True) == {"train", "evaluate"}


def test_a_zero_shot_pass_leaves_the_target_sensitivity_stage_out():
    p = params(ZERO_SHOT)
    assert sensitivity_readers(p) == []
    assert skipped_stages(p, False, False) == {"sensitivity"}
    stages = project_dvc_yaml(p)["stages"]
    assert "sensitivity" not in stages and "train" in stages
    assert not any("data/sensitivity" in str(d) for spec in stages.values() for d in spec["deps"])


@pytest.mark.parametrize(
    ("change", "reader"),
    [
        ({"allocate": {"embedding_type": "measured"}}, "allocate"),  # the embedding measured, at a file size
        ({"evaluate": {"knapsack": ["greedy", "gradient"]}}, "evaluate"),  # a knapsack on a measured table
        ({"train": {"include_target": True}}, "train"),  # the target among the training models: its demos
    ],
)
def test_each_reader_keeps_the_sensitivity_stage(change, reader):
    overlay = {k: {**ZERO_SHOT[k], **change.get(k, {})} for k in ZERO_SHOT}
    p = params(overlay)
    assert sensitivity_readers(p) == [reader]
    assert "sensitivity" not in skipped_stages(p, False, False)


def test_a_measured_embedding_under_a_bpw_budget_reads_nothing():
    overlay = {**ZERO_SHOT, "allocate": {"budget_file_bytes": None, "budget_bpw": 3.5, "embedding_type": "measured"}}
    assert sensitivity_readers(params(overlay)) == []


def test_with_neither_train_nor_evaluate_only_a_measured_embedding_at_a_file_size_keeps_it():
    auto = params({"allocate": {"embedding_type": "auto"}})
    assert skipped_stages(auto, True, True) == {"train", "evaluate", "sensitivity"}
    assert skipped_stages(auto, True, False) == {"train"}  # the committed evaluate's measured knapsacks read it
