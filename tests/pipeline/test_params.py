"""params.yaml sections load into frozen dataclasses; typos, missing keys and wrong types are clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from ramp.params import (
    SECTIONS,
    AllocateParams,
    FoldParams,
    ParamsError,
    QuantizeParams,
    TrainParams,
    load_params,
    load_pipeline,
    load_value,
)

REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, data: dict) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def repo_params() -> dict:
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("section", sorted(SECTIONS))
def test_repo_params_load_frozen(section):
    params = load_params(section, SECTIONS[section], REPO / "params.yaml")
    assert dataclasses.is_dataclass(params)
    fields = [f.name for f in dataclasses.fields(params)]
    if fields:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(params, fields[0], None)
    assert load_value("seed", int, REPO / "params.yaml") == 0


def test_typo_names_key_and_section(tmp_path):
    data = repo_params()
    data["allocate"]["budget_bytes"] = data["allocate"].pop("budget_file_bytes")
    with pytest.raises(ParamsError, match=r"unknown key 'budget_bytes'.*section 'allocate'"):
        load_params("allocate", AllocateParams, write(tmp_path, data))


def test_typo_in_nested_library_config(tmp_path):
    data = repo_params()
    data["train"]["sac"]["episode"] = 3
    with pytest.raises(ParamsError, match=r"train\.sac: unknown key 'episode'"):
        load_params("train", TrainParams, write(tmp_path, data))


def test_unknown_demonstration_is_named(tmp_path):
    data = repo_params()
    data["train"]["demos"] = ["greedy", "random"]
    with pytest.raises(ParamsError, match=r"train\.demos has \['random'\]"):
        load_params("train", TrainParams, write(tmp_path, data))


def test_unknown_action_map_is_named(tmp_path):
    data = repo_params()
    data["train"]["action_map"] = "bits"
    with pytest.raises(ParamsError, match=r"train\.action_map is 'bits'"):
        load_params("train", TrainParams, write(tmp_path, data))


def test_missing_key(tmp_path):
    data = repo_params()
    del data["fold"]["alpha"]
    with pytest.raises(ParamsError, match=r"missing key 'alpha'.*section 'fold'"):
        load_params("fold", FoldParams, write(tmp_path, data))


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("fold", "alpha", "half", r"fold\.alpha: expected a number, got 'half'"),
        ("calibrate", "n_tokens", 2.5, r"calibrate\.n_tokens: expected an integer"),
        ("quantize", "imatrix", 1, r"quantize\.imatrix: expected bool"),
        ("allocate", "policy", "best", r"allocate\.policy: 'best' is not one of 'file', 'champion'"),
        ("evaluate", "uniform", "Q4_0", r"evaluate\.uniform: expected a list"),
    ],
)
def test_wrong_type(tmp_path, section, key, value, message):
    data = repo_params()
    data[section][key] = value
    with pytest.raises(ParamsError, match=message):
        load_params(section, SECTIONS[section], write(tmp_path, data))


def test_invalid_value_is_params_error(tmp_path):
    data = repo_params()
    data["allocate"]["budget_bpw"] = 3.5  # both budgets set
    with pytest.raises(
        ParamsError, match=r"allocate: set exactly one of budget_file_bytes \(93510208\) and budget_bpw"
    ):
        load_params("allocate", AllocateParams, write(tmp_path, data))
    data = repo_params()
    data["train"]["budget_bpw"] = 100.0  # bits per weight above F32's
    with pytest.raises(ParamsError, match=r"train: budget_bpw=100.0 must be in \(0, 32.0\]"):
        load_params("train", TrainParams, write(tmp_path, data))
    data = repo_params()
    data["fold"]["formats"] = ["Q4_0", "Q9_9"]
    with pytest.raises(ParamsError, match="unknown format 'Q9_9'"):
        load_params("fold", FoldParams, write(tmp_path, data))
    data = repo_params()
    data["fold"]["alpha"] = 1.5
    with pytest.raises(ParamsError, match=r"alpha=1.5 must be in \[0, 1\]"):
        load_params("fold", FoldParams, write(tmp_path, data))


def test_missing_section(tmp_path):
    data = repo_params()
    del data["quantize"]
    with pytest.raises(ParamsError, match="no section 'quantize'"):
        load_params("quantize", QuantizeParams, write(tmp_path, data))


def test_int_accepted_for_float(tmp_path):
    data = repo_params()
    data["fold"]["alpha"] = 1
    assert load_params("fold", FoldParams, write(tmp_path, data)).alpha == 1.0


def test_pipeline_overlay_changes_only_what_it_names(tmp_path):
    base = load_pipeline(REPO / "params.yaml")
    over = load_pipeline(
        REPO / "params.yaml", {"allocate": {"budget_file_bytes": 88202016}, "train": {"sac": {"episodes": 7}}}
    )
    assert over.allocate.budget_file_bytes == 88202016 != base.allocate.budget_file_bytes
    assert over.train.sac.episodes == 7 and over.train.sac.hidden == base.train.sac.hidden
    assert over.fold == base.fold and over.evaluate == base.evaluate
    with pytest.raises(ParamsError, match=r"unknown key 'budget'.*section 'allocate'"):
        load_pipeline(REPO / "params.yaml", {"allocate": {"budget": 1}})
