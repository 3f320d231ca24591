"""params.yaml sections load into frozen dataclasses; typos, missing keys, wrong types and values out of range are
one clear error naming the file, the key path and the value."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import yaml

from ramp.params import (
    SECTIONS,
    STAGE_SECTIONS,
    AllocateParams,
    CacheParams,
    EvaluateParams,
    FoldParams,
    ParamsError,
    QuantizeParams,
    TinyModelParams,
    TrainParams,
    load_cache_params,
    load_params,
    load_pipeline,
    load_value,
    merge,
)

REPO = Path(__file__).resolve().parents[2]
BPW_ONLY = {"budget_file_bytes": None}  # params.yaml's train budget is in file bytes: a bpw budget replaces it


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
    with pytest.raises(ParamsError, match=r"train\.demos = \['greedy', 'random'\]: \['random'\] unknown"):
        load_params("train", TrainParams, write(tmp_path, data))


def test_unknown_action_map_is_named(tmp_path):
    data = repo_params()
    data["train"]["action_map"] = "bits"
    with pytest.raises(
        ParamsError, match=r"train\.action_map = 'bits': expected one of \['index', 'level', 'residual'\]"
    ):
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
    data["train"]["budget_file_bytes"] = None
    data["train"]["budget_bpw"] = 100.0  # bits per weight above F32's
    with pytest.raises(ParamsError, match=r"train: budget_bpw=100.0 must be in \(0, 32.0\]"):
        load_params("train", TrainParams, write(tmp_path, data))
    data = repo_params()
    data["fold"]["formats"] = ["Q4_0", "Q9_9"]
    with pytest.raises(ParamsError, match="unknown format 'Q9_9'"):
        load_params("fold", FoldParams, write(tmp_path, data))
    data = repo_params()
    data["fold"]["alpha"] = 1.5
    with pytest.raises(ParamsError, match=r"fold\.alpha = 1\.5: must be in \[0\.0, 1\.0\]"):
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


# (overlay on the repository's params.yaml, the message after "<file>: ")
INVALID = [
    ({"evaluate": {"n_chunks": 0}}, "evaluate.n_chunks = 0: must be >= 1"),
    ({"model": {"tiny": {"heads": 0}}}, "model.tiny.heads = 0: must be in [1, 128]"),
    ({"model": {"tiny": {"heads": 3}}}, "model.tiny.heads = 3: must divide hidden=256 into an even head size"),
    ({"model": {"tiny": {"hidden": 8192, "layers": 64}}}, "model.tiny.hidden = 8192: the tiny model would have"),
    ({"model": {"source": ""}}, "model.source = '': expected one of smollm2, gemma3, testbed, tiny or a model path"),
    ({"calibrate": {"n_tokens": 1024.0}}, "calibrate.n_tokens: expected an integer, got 1024.0"),
    ({"calibrate": {"n_ctx": True}}, "calibrate.n_ctx: expected an integer, got True"),
    ({"calibrate": {"batch_size": 0}}, "calibrate.batch_size = 0: must be >= 1"),
    ({"allocate": {"budget_file_bytes": 1e30}}, "allocate.budget_file_bytes: expected an integer, got 1e+30"),
    ({"allocate": {"budget_file_bytes": 2**63}}, f"allocate.budget_file_bytes = {2**63}: does not fit in a 64-bit"),
    ({"allocate": {"norm_type": "Q4_0"}}, "allocate.norm_type = 'Q4_0': unknown format 'Q4_0'; expected GGUF types"),
    ({"train": {**BPW_ONLY, "budget_bpw": 100}}, "train: budget_bpw=100.0 must be in (0, 32.0] bits per weight"),
    (
        {"train": {**BPW_ONLY, "budget_bpw": 9.0}},
        "train.budget_bpw = 9.0: above 8.5 bits per weight, the largest format",
    ),
    ({"fold": {"alpha": float("nan")}}, "fold.alpha = nan: expected a finite number"),
    ({"evaluate": {"evolution_evaluations": float("inf")}}, "evaluate.evolution_evaluations = inf: expected a finite"),
    ({"evaluate": {"commonsense_tasks": ["mmlu"]}}, "evaluate.commonsense_tasks = ['mmlu']: ['mmlu'] unknown"),
    ({"export": {"llama_chunks": 0}}, "export.llama_chunks = 0: must be >= 1"),
    ({"seed": -1}, "seed = -1: must be >= 0"),
    ({"cache": {"disk_bytes": -1}}, "cache.disk_bytes = -1: must be >= 0"),
    ({"cache": {"memory_bytes": 1.5}}, "cache.memory_bytes: expected an integer, got 1.5"),
    ({"cache": {"disk_size": 1}}, "cache: unknown key 'disk_size' in params.yaml section 'cache'"),
]


@pytest.mark.parametrize(("overlay", "message"), INVALID, ids=[m.split(" ")[0].rstrip(":") for _, m in INVALID])
def test_invalid_value_names_file_key_path_and_value(overlay, message):
    path = REPO / "params.yaml"
    with pytest.raises(ParamsError) as e:
        load_pipeline(path, overlay)
    assert str(e.value).startswith(f"{path}: {message}")


def test_every_fuzzed_overlay_is_one_params_error():
    from benchmarks.fuzz_cli import PARAMS_OVERLAYS

    path = REPO / "params.yaml"
    for name, overlay in PARAMS_OVERLAYS:
        with pytest.raises(ParamsError) as e:
            load_pipeline(path, overlay)
        assert str(e.value).startswith(f"{path}: ") and "\n" not in str(e.value), name


def test_limits_themselves_are_accepted():
    params = load_pipeline(
        REPO / "params.yaml",
        {
            "train": {**BPW_ONLY, "budget_bpw": 8.5},
            "evaluate": {"n_ctx": 8, "n_chunks": 1},
            "allocate": {"norm_type": "F16"},
        },
    )
    assert params.train.budget_bpw == 8.5 and params.evaluate.n_chunks == 1 and params.allocate.norm_type == "F16"
    big = load_pipeline(REPO / "params.yaml", {"allocate": {"budget_file_bytes": 2**63 - 1}, "seed": 2**63 - 1})
    assert big.allocate.budget_file_bytes == 2**63 - 1 and big.seed == 2**63 - 1


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("seed: [0\nmodel: {", "not valid YAML at line 2, column 6"),
        (b"\xff\xfe\x00", "not UTF-8 text (invalid start byte at byte 0)"),
        ("- 1\n", "expected a mapping of sections at the top level, got list"),
    ],
)
def test_unreadable_params_file_names_it(tmp_path, text, message):
    p = tmp_path / "params.yaml"
    p.write_bytes(text) if isinstance(text, bytes) else p.write_text(text)
    with pytest.raises(ParamsError, match=re.escape(f"{p}: {message}")):
        load_pipeline(p)
    with pytest.raises(ParamsError, match=re.escape(f"{tmp_path}: is a directory")):
        load_pipeline(tmp_path)


def test_bounds_hold_for_dataclasses_built_in_code():
    with pytest.raises(ValueError, match=r"^n_chunks = 0: must be >= 1$"):
        EvaluateParams(n_ctx=512, n_chunks=0, top_k=64, batch_size=4, uniform=[], commonsense_tasks=[], commonsense_n=0)
    with pytest.raises(ValueError, match=r"^kv_heads = 3: must divide heads=4$"):
        TinyModelParams(kv_heads=3)
    assert TinyModelParams(heads=8, kv_heads=4).heads == 8


def test_cache_section_is_optional_and_defaults_match_the_cache():
    from ramp.evaluate.quantized import DEFAULT_DISK_BYTES, DEFAULT_MEMORY_BYTES

    assert CacheParams() == CacheParams(disk_bytes=DEFAULT_DISK_BYTES, memory_bytes=DEFAULT_MEMORY_BYTES)
    assert CacheParams().disk_bytes == 4 * 2**30 and CacheParams().memory_bytes == 2**30
    assert load_cache_params(REPO / "params.yaml") == load_pipeline(REPO / "params.yaml").cache


def test_params_without_cache_section_load_with_its_defaults(tmp_path):
    data = repo_params()
    del data["cache"]
    path = write(tmp_path, data)
    assert load_pipeline(path).cache == CacheParams() == load_cache_params(path)
    data["cache"] = {"disk_bytes": 0}
    path = write(tmp_path, data)
    assert load_cache_params(path) == CacheParams(disk_bytes=0) == load_pipeline(path).cache


def test_bad_cache_value_names_the_key(tmp_path):
    data = repo_params()
    data["cache"]["disk_bytes"] = -1
    path = write(tmp_path, data)
    with pytest.raises(ParamsError, match=re.escape(f"{path}: cache.disk_bytes = -1: must be >= 0")):
        load_cache_params(path)
    with pytest.raises(ValueError, match=r"^memory_bytes = -2: must be >= 0$"):
        CacheParams(memory_bytes=-2)


def test_cache_size_is_no_stage_params():
    """The cache's bounds change no output: no stage lists the section, and no stage's params stamp moves."""
    from ramp.pipeline.run import _stamp

    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert all("cache" not in sections for sections in STAGE_SECTIONS.values())
    assert all("cache" not in spec.get("params", []) for spec in stages.values())
    base = load_pipeline(REPO / "params.yaml")
    other = load_pipeline(REPO / "params.yaml", {"cache": {"disk_bytes": 0, "memory_bytes": 12345}})
    assert other.cache != base.cache
    for stage in STAGE_SECTIONS:
        assert _stamp(stage, other, [], "code", "") == _stamp(stage, base, [], "code", ""), stage
    moved = load_pipeline(REPO / "params.yaml", {"evaluate": {"n_chunks": 3}})  # the check can see a change
    assert _stamp("evaluate", moved, [], "code", "") != _stamp("evaluate", base, [], "code", "")


def test_workspace_carries_the_cache_bounds(tmp_path, monkeypatch):
    from ramp.pipeline.workspace import Workspace
    from stages._common import workspace_from_params

    store = Workspace(tmp_path, cache_disk_bytes=0, cache_memory_bytes=123).quant_cache_store()
    assert (store.root, store.disk_bytes, store.memory_bytes) == (tmp_path / "cache" / "quantized", 0, 123)
    default = Workspace(tmp_path, quant_cache=tmp_path / "q").quant_cache_store()
    assert (default.root, default.disk_bytes, default.memory_bytes) == (tmp_path / "q", 4 << 30, 1 << 30)
    data = repo_params()
    data["cache"] = {"disk_bytes": 5 << 20, "memory_bytes": 0}
    ws = workspace_from_params(write(tmp_path, data))
    assert (ws.root, ws.cache_disk_bytes, ws.cache_memory_bytes) == (Path("."), 5 << 20, 0)
    absent = workspace_from_params(tmp_path / "none.yaml")
    assert (absent.cache_disk_bytes, absent.cache_memory_bytes) == (4 << 30, 1 << 30)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("walk", "greedy", "allocate.walk: 'greedy' is not one of 'wall', 'fit'"),
        ("fill", "knapsack", "allocate.fill: 'knapsack' is not one of 'margin', 'proxy'"),
        ("clip", 0, "allocate.clip = 0.0: must be a positive number of standard deviations"),
        ("clip", -1.5, "allocate.clip = -1.5: must be a positive number of standard deviations"),
    ],
)
def test_bad_allocate_walk_settings_name_the_key(tmp_path, key, value, match):
    data = repo_params()
    data["allocate"][key] = value
    with pytest.raises(ParamsError, match=re.escape(match)):
        load_pipeline(write(tmp_path, data))


def test_clip_with_the_prior_walk_is_refused(tmp_path):
    data = repo_params()
    data["allocate"].update(walk="prior", clip=3.0)
    with pytest.raises(ParamsError, match=re.escape("allocate.clip = 3.0: bounds the policy's features")):
        load_pipeline(write(tmp_path, data))


def test_allocate_walk_settings_load():
    params = load_pipeline(REPO / "params.yaml")
    assert (params.allocate.walk, params.allocate.fill, params.allocate.clip) == ("wall", "margin", None)


def test_train_reads_one_key_of_allocate_the_embedding_type_that_prices_its_budget():
    from ramp.params import section_data
    from ramp.pipeline.run import _stamp
    from ramp.report import pipeline_sections

    base = load_pipeline(REPO / "params.yaml")
    q8 = load_pipeline(REPO / "params.yaml", {"allocate": {"embedding_type": "Q8_0"}})
    walk = load_pipeline(
        REPO / "params.yaml", {"allocate": {"walk": "fit" if base.allocate.walk != "fit" else "prior"}}
    )
    assert (
        section_data(base, "allocate.embedding_type") == base.allocate.embedding_type == "measured"
        and section_data(q8, "allocate.embedding_type") == "Q8_0"
    )
    assert section_data(base, "seed") == base.seed
    assert section_data(base, "train")["rescore_top"] == base.train.rescore_top
    assert _stamp("train", q8, [], "code", "") != _stamp("train", base, [], "code", "")
    assert _stamp("train", walk, [], "code", "") == _stamp("train", base, [], "code", "")  # the rest of allocate: no
    assert "allocate.embedding_type" not in pipeline_sections(base)  # the report prints the whole section once
    assert pipeline_sections(q8)["allocate"]["embedding_type"] == "Q8_0"


def test_more_reward_and_rescore_windows_than_the_calibration_has_is_an_error():
    small = {"calibrate": {"n_tokens": 1024, "n_ctx": 128}}  # 8 windows
    with pytest.raises(ParamsError, match=r"train.reward_windows 2 \+ rescore_windows 8 = 10 windows: the calibr"):
        load_pipeline(REPO / "params.yaml", small)
    fits = load_pipeline(REPO / "params.yaml", merge(small, {"train": {"rescore_windows": 6}}))
    assert fits.train.reward_windows + fits.train.rescore_windows == 8
    no_rescore = load_pipeline(REPO / "params.yaml", merge(small, {"train": {"rescore_top": 0}}))
    assert no_rescore.train.rescore_top == 0
    with pytest.raises(ParamsError, match=r"train.reward_windows 9 = 9 windows: the calibration has 8 \(calibrate"):
        load_pipeline(REPO / "params.yaml", merge(small, {"train": {"rescore_top": 0, "reward_windows": 9}}))


@pytest.mark.parametrize("kind", ["measured", "predicted"])
def test_measured_embedding_type_needs_measured_embedding_formats(kind):
    none = {"sensitivity": {"embedding_formats": []}, "allocate": {"embedding_type": kind}}
    with pytest.raises(ParamsError, match=rf"embedding_type '{kind}' .* sensitivity.embedding_formats, but .* empty"):
        load_pipeline(REPO / "params.yaml", none)
    ok = load_pipeline(REPO / "params.yaml", merge(none, {"sensitivity": {"embedding_formats": ["Q8_0", "Q5_0"]}}))
    assert ok.sensitivity.embedding_formats == ("Q8_0", "Q5_0")
    with pytest.raises(ParamsError, match=r"embedding_formats.*unknown format 'Q9_9'"):
        load_pipeline(REPO / "params.yaml", {"sensitivity": {"embedding_formats": ["Q8_0", "Q9_9"]}})
    with pytest.raises(ParamsError, match=r"embedding_type.*unknown format 'measure'"):
        load_pipeline(REPO / "params.yaml", {"allocate": {"embedding_type": "measure"}})


def test_what_reads_the_fisher_table_needs_fold_fisher_windows():
    off = {"fold": {"fisher_windows": 0}, "evaluate": {"knapsack": ["greedy"]}}
    assert load_pipeline(REPO / "params.yaml", off).fold.fisher_windows == 0  # nothing reads it: fine
    for overlay, user in (
        ({"train": {"cost_basis": "fisher"}}, "train.cost_basis"),
        ({"train": {"demos": ["greedy", "fisher"]}}, "train.demos"),
        ({"evaluate": {"knapsack": ["fisher"]}}, "evaluate.knapsack"),
    ):
        with pytest.raises(ParamsError, match=rf"{re.escape(user)} reads the fold stage's Fisher table, but fold\."):
            load_pipeline(REPO / "params.yaml", merge(off, overlay))
    with pytest.raises(ParamsError, match=r"fold\.fisher_windows 41: the calibration has 40 windows"):
        load_pipeline(REPO / "params.yaml", {"fold": {"fisher_windows": 41}})
    with pytest.raises(ParamsError, match=r"train\.cost_basis = 'gradient': expected one of \['proxy', 'fisher'\]"):
        load_pipeline(REPO / "params.yaml", {"train": {"cost_basis": "gradient"}})
