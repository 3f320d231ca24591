"""Benchmark helpers that need no model: result-file entries for check-results, the quality table's pairing."""

import json
from pathlib import Path

import pytest

from benchmarks.check_results import entries, sample_rows
from benchmarks.quality import compare
from benchmarks.transfer import compare as compare_transfer

REPO = Path(__file__).resolve().parents[1]


def test_entries_split_rows_by_model_and_skip_other_result_files():
    doc = {
        "chunks": 40,
        "rows": [{"model": "a", "method": "ramp"}, {"model": "b", "method": "greedy"}, {"model": "a", "method": "x"}],
        "models": {"a": {"n_ctx": 512}, "b": {"n_ctx": 256}},
    }
    got = {e["model"]: e for e in entries(doc)}
    assert [r["method"] for r in got["a"]["rows"]] == ["ramp", "x"] and got["b"]["n_ctx"] == 256
    assert got["a"]["chunks"] == 40
    assert entries({"models": {"smollm2": {"kld": 0.1}}}) == []  # folding.json-like summaries: nothing to rebuild
    # every committed result file parses (check-results walks them all)
    for f in sorted((REPO / "results").glob("*.json")):
        entries(json.loads(f.read_text()))


def test_sample_rows_puts_a_ramp_row_first():
    import random

    rows = [{"method": m, "rebuild": {}, "kld": 0.1} for m in ("greedy", "ramp", "uniform-fill", "evolutionary")]
    picked = sample_rows(rows, 3, random.Random(0))
    assert picked[0]["method"] == "ramp" and len(picked) == 3


def test_compare_adds_paired_intervals_to_ramp_rows_only():
    def row(method, kld, nbytes=100):
        return {
            "budget": "b",
            "budget_bytes": 100,
            "method": method,
            "bytes": nbytes,
            "kld": kld,
            "kld_chunks": [kld * (1 + 0.1 * (i % 3)) for i in range(12)],
        }

    rows = [
        row("ramp", 0.05),
        row("sensitivity-knapsack", 0.06),
        row("greedy", 0.08),
        row("llama.cpp-Q3_K_M+imatrix", 0.09, 101),
        row("uniform-Q8_0", 0.001, 200),
    ]
    compare(rows)
    ramp = rows[0]
    assert ramp["best_baseline"] == "sensitivity-knapsack" and ramp["best_llama_cpp"] == "llama.cpp-Q3_K_M+imatrix"
    lo, hi = ramp["kld_diff_ci95_vs_best_baseline"]
    assert lo <= ramp["kld_diff_vs_best_baseline"] <= hi < 0
    assert ramp["kld_ratio_vs_best_llama_cpp"] == pytest.approx(0.05 / 0.09)
    assert all("kld_diff_vs_best_baseline" not in r for r in rows[1:])


def test_transfer_compare_pairs_zero_shot_with_own_policy_and_best_zero_evaluation_baseline():
    def row(method, kld, nbytes=100):
        chunks = [kld * (1 + 0.1 * (i % 3)) for i in range(12)]
        return {"budget": "b", "budget_bytes": 100, "method": method, "bytes": nbytes, "kld": kld, "kld_chunks": chunks}

    rows = [
        row("ramp-zero-shot", 0.06),
        row("ramp-own", 0.05),
        row("sensitivity-knapsack", 0.04),  # measured: not a zero-evaluation baseline
        row("greedy", 0.08),
        row("uniform-fill", 0.07, 101),  # over the budget: not compared
        row("llama.cpp-Q3_K_M+imatrix", 0.075, 612),  # imatrix metadata over: compared, in its favour
        row("llama.cpp-Q4_K_S+imatrix", 0.01, 5000),  # another size
    ]
    compare_transfer(rows)
    zs = rows[0]
    assert zs["vs_own"] == "ramp-own" and zs["kld_ratio_vs_own"] == pytest.approx(0.06 / 0.05)
    assert zs["vs_best_zero_eval"] == "llama.cpp-Q3_K_M+imatrix"
    lo, hi = zs["kld_diff_ci95_vs_best_zero_eval"]
    assert lo <= zs["kld_diff_vs_best_zero_eval"] <= hi < 0
    lo, hi = zs["kld_diff_ci95_vs_own"]
    assert 0 < lo <= hi
    assert all("vs_own" not in r for r in rows[1:])


def test_check_results_reads_transfer_targets():
    doc = {"chunks": 40, "rows": [{"target": "smollm2", "method": "ramp-zero-shot"}], "targets": {"smollm2": {}}}
    (entry,) = entries(doc)
    assert entry["model"] == "smollm2" and len(entry["rows"]) == 1


def test_transfer_compare_uses_earlier_rows_a_reuse_run_did_not_measure_again():
    def row(method, kld, **extra):
        chunks = [kld * (1 + 0.1 * (i % 3)) for i in range(12)]
        return {"budget": "b", "budget_bytes": 100, "method": method, "bytes": 100, "kld": kld, "kld_chunks": chunks}

    new = [row("ramp-zero-shot", 0.06)]
    compare_transfer(new, [row("ramp-own", 0.05), row("uniform-fill", 0.055)])
    assert new[0]["vs_own"] == "ramp-own" and new[0]["vs_best_zero_eval"] == "uniform-fill"
    assert new[0]["kld_ratio_vs_best_zero_eval"] == pytest.approx(0.06 / 0.055)


def test_transfer_compare_pairs_zero_shot_with_the_quality_benchmarks_own_row_at_its_budget(tmp_path):
    from benchmarks.transfer import OWN_MEASURED, SAME_EMBEDDING, quality_rows

    def row(method, kld, budget_bytes=100, **extra):
        chunks = [kld * (1 + 0.1 * (i % 3)) for i in range(12)]
        return {"budget": "b", "budget_bytes": budget_bytes, "method": method, "bytes": 100, "kld": kld,
                "kld_chunks": chunks, **extra}  # fmt: skip

    path = tmp_path / "quality.json"
    assert quality_rows(path, "smollm2") == []  # no quality results: nothing to pair with
    quality = [
        row("ramp", 0.04, model="smollm2"),
        row("ramp", 0.01, budget_bytes=99, model="smollm2"),  # another budget
        row("ramp", 0.001, model="gemma3"),
        row("uniform-fill", 0.03, model="smollm2"),
    ]
    path.write_text(json.dumps({"rows": quality}))
    own = quality_rows(path, "smollm2")
    assert [r["kld"] for r in own] == [0.04, 0.01, 0.03]
    new = [row("ramp-zero-shot", 0.05)]
    compare_transfer(new, [row("ramp-own", 0.06)], own)
    zs = new[0]
    assert zs["vs_own"] == "ramp-own" and zs["vs_own_measured"] == OWN_MEASURED
    assert zs["kld_ratio_vs_own_measured"] == pytest.approx(0.05 / 0.04)
    lo, hi = zs["kld_diff_ci95_vs_own_measured"]
    assert 0 < lo <= zs["kld_diff_vs_own_measured"] <= hi
    assert "vs_best_zero_eval" not in zs  # the quality rows are not this benchmark's zero-evaluation baselines
    assert "vs_same_embedding" not in zs  # the zero-shot row names no embedding type: nothing to match
    # a baseline file with the zero-shot row's embedding type: the matrix allocation compared alone
    q5 = {"rebuild": {"embedding_type": "Q5_1"}}
    quality = [row("uniform-fill", 0.045, model="smollm2", **q5), row("greedy", 0.047, model="smollm2", **q5),
               row("uniform-fill", 0.02, model="smollm2", rebuild={"embedding_type": "Q8_0"})]  # fmt: skip
    path.write_text(json.dumps({"rows": quality}))
    new = [row("ramp-zero-shot", 0.05, **q5)]
    compare_transfer(new, [], quality_rows(path, "smollm2"))
    assert new[0]["vs_same_embedding"] == SAME_EMBEDDING.format("uniform-fill")
    assert new[0]["kld_ratio_vs_same_embedding"] == pytest.approx(0.05 / 0.045)


def test_transfer_row_id_tells_allocate_settings_apart():
    from benchmarks.transfer import row_id
    from ramp.allocate import ZERO_SHOT_WALK

    base = {"target": "t", "budget": "b", "method": "ramp-zero-shot", "trained_on": ["g"], "seed": 0}
    old = dict(base)  # a row from before allocate settings were recorded: the training walk
    wall = {**base, "allocate": {"walk": "wall", "fill": "margin", "clip": None}}
    fit = {**base, "allocate": dict(ZERO_SHOT_WALK)}
    assert row_id(old) == row_id(wall) != row_id(fit)


def test_zero_shot_overlay_sets_the_allocate_walk():
    from benchmarks.transfer import zero_shot_overlay
    from ramp.allocate import ZERO_SHOT_WALK

    overlay = zero_shot_overlay(["gemma3"], 4.6, 1)
    assert overlay["allocate"] == ZERO_SHOT_WALK and overlay["train"]["include_target"] is False
    assert zero_shot_overlay(["gemma3"], 4.6, 1, allocate={"walk": "wall"})["allocate"] == {"walk": "wall"}


def test_reuse_train_refuses_a_train_stage_of_another_pool_or_seed(tmp_path):
    from benchmarks.transfer import check_reused_train, zero_shot_overlay
    from ramp.params import load_pipeline, merge
    from ramp.pipeline.workspace import Workspace

    ws = Workspace(tmp_path)
    (ws.metrics).mkdir(parents=True)
    (ws.stage("train") / "policy").mkdir(parents=True)
    params = load_pipeline(REPO / "params.yaml", merge({}, zero_shot_overlay(["gemma3"], 4.6344, 1)))
    train = {"trained_on": ["gemma3"], "zero_shot": True, "budget_bpw": 4.6344, "sac": {"seed": params.seed + 1}}
    policy = {"standardizer": {"mode": "model"}, "env": {"action_map": "level"}}
    (ws.stage("train") / "policy" / "policy.json").write_text(json.dumps(policy))
    (ws.metrics / "train.json").write_text(json.dumps(train))
    check_reused_train(ws, params)  # this pool, seed, budget, action map: accepted
    residual = load_pipeline(REPO / "params.yaml", zero_shot_overlay(["gemma3"], 4.6344, 1, action_map="residual"))
    with pytest.raises(SystemExit, match=r"'action_map': \('level', 'residual'\)"):
        check_reused_train(ws, residual)
    three = load_pipeline(REPO / "params.yaml", zero_shot_overlay(["gemma3"], 4.6344, 1, ensemble=3))
    with pytest.raises(SystemExit, match=r"'ensemble': \(1, 3\)"):
        check_reused_train(ws, three)
    (ws.metrics / "train.json").write_text(json.dumps({**train, "sac": {"seed": params.seed}}))
    with pytest.raises(SystemExit, match=r"'seed': \(0, 1\)"):
        check_reused_train(ws, params)
    (ws.metrics / "train.json").write_text(json.dumps({**train, "trained_on": ["smollm2"]}))
    with pytest.raises(SystemExit, match="trained_on"):
        check_reused_train(ws, params)


def test_side_runs_write_recipes_beside_their_own_result_file():
    from benchmarks.quality import recipe_dir

    assert recipe_dir("quality", "smollm2") == REPO / "results" / "recipes" / "quality" / "smollm2"
    assert recipe_dir("quality", "smollm2", REPO / "results" / "quality.json") == recipe_dir("quality", "smollm2")
    assert recipe_dir("quality", "smollm2", Path("results/rescore.json")).parent.name == "rescore"
    elsewhere = recipe_dir("transfer", "gemma3", Path("/tmp/transfer.json")).parent.name
    assert elsewhere.startswith("transfer-") and elsewhere != "transfer"


def test_zero_shot_pools_prepare_the_testbed_on_its_own_context_and_reward_scale():
    from benchmarks.quality import MODELS
    from benchmarks.transfer import zero_shot_overlay
    from ramp.params import load_pipeline, source_pipeline

    mixed = load_pipeline(REPO / "params.yaml", zero_shot_overlay(["gemma3", "testbed"], 4.6344, 0))
    testbed = MODELS["testbed"]["overlay"]
    assert mixed.train.source_overlays == {
        "testbed": {"calibrate": testbed["calibrate"], "reward": testbed["train"]["reward"]}
    }
    prepared = source_pipeline(mixed, "testbed")
    assert prepared.model.source == "testbed" and prepared.calibrate.n_ctx == 256 != mixed.calibrate.n_ctx
    assert prepared.train.reward.reference == testbed["train"]["reward"]["reference"] != mixed.train.reward.reference
    assert source_pipeline(mixed, "gemma3").calibrate == mixed.calibrate  # a real model: the file's sections
    # a pool of real models only: no overlay key, so the train params of the rows already measured are unchanged
    assert "source_overlays" not in zero_shot_overlay(["gemma3"], 4.6344, 0)["train"]


def test_testbed_variants_are_other_testbeds_prepared_like_the_testbed():
    from benchmarks.transfer import TESTBEDS, pool_source, source_overlay
    from ramp.testbed import TestbedConfig, testbed_dir

    dirs = {testbed_dir(TestbedConfig())} | {testbed_dir(TestbedConfig(**v)) for v in TESTBEDS.values()}
    assert len(dirs) == len(TESTBEDS) + 1  # each variant is a model of its own (its own cache folder)
    assert all(source_overlay(v) == source_overlay("testbed") != {} for v in TESTBEDS)
    assert pool_source("gemma3") == "gemma3" and pool_source("testbed") == "testbed"


def test_a_run_of_some_methods_replaces_only_them_and_is_compared_with_the_rows_kept(tmp_path):
    from benchmarks.quality import compare_measured, merge_results, row_key

    def row(method, kld, budget="b"):
        chunks = [kld * (1 + 0.1 * (i % 3)) for i in range(12)]
        return {"model": "m", "budget": budget, "budget_bytes": 100, "method": method, "bytes": 100, "kld": kld,
                "kld_chunks": chunks}  # fmt: skip

    out = tmp_path / "quality.json"
    first = [row("ramp", 0.07), row("sensitivity-knapsack", 0.06), row("llama.cpp-Q3_K_M+imatrix", 0.09)]
    first.append(row("ramp", 0.2, budget="c"))
    other = [{**row("sensitivity-knapsack", 0.01), "model": "n"}]  # another model's row at a same-named budget
    merge_results(out, 12, ("models", "model"), "n", other, {"budgets": {"b": {}}, "stages": {}}, "cmd")
    entry = {"budgets": {"b": {}, "c": {}}, "stages": {}}
    merge_results(out, 12, ("models", "model"), "m", first, dict(entry), "cmd")
    again = [row("ramp", 0.05)]
    compare_measured(again, out)
    assert again[0]["best_baseline"] == "sensitivity-knapsack" and again[0]["kld_diff_vs_best_baseline"] < 0
    assert again[0]["best_llama_cpp"] == "llama.cpp-Q3_K_M+imatrix"
    merge_results(out, 12, ("models", "model"), "m", again, {"budgets": {"b": {}}, "stages": {}}, "cmd", row_key)
    rows = {row_key(r): r["kld"] for r in json.loads(out.read_text())["rows"]}
    assert rows == {("m", "b", "ramp"): 0.05, ("m", "b", "sensitivity-knapsack"): 0.06,
                    ("m", "b", "llama.cpp-Q3_K_M+imatrix"): 0.09, ("m", "c", "ramp"): 0.2,
                    ("n", "b", "sensitivity-knapsack"): 0.01}  # fmt: skip
    alone = [row("ramp", 0.05)]
    compare_measured(alone, None)  # a full run compares its own rows only
    assert "best_baseline" not in alone[0]


def test_every_benchmark_overlay_is_valid_params():
    """The benchmarks' overlays laid over the committed params.yaml load: a params change that breaks one (a
    budget given twice, more windows than the calibration has) fails here, not hours into a benchmark."""
    from benchmarks import quality, scale
    from ramp.params import load_pipeline, merge

    scale_policy = load_pipeline(REPO / "params.yaml", scale.POLICY_OVERLAY)
    assert scale_policy.train.budget_bpw == 5.0 and scale_policy.train.budget_file_bytes is None
    assert load_pipeline(REPO / "params.yaml", scale.OVERLAY).allocate.budget_bpw == 5.0
    for name, spec in quality.MODELS.items():
        for label, budget in spec["budgets"].items():
            if "preset_size" in budget:  # measured in the run: any size stands in
                budget = {"budget_file_bytes": 10**9}
            p = load_pipeline(REPO / "params.yaml", merge(spec["overlay"], quality.budget_overlay(budget)))
            assert p.model.source == name and p.train.budget_file_bytes == p.allocate.budget_file_bytes, label


def test_pipeline_bench_moves_the_allocate_budget_and_leaves_the_policy_budget(tmp_path):
    from benchmarks.pipeline import Q4_0_BYTES, set_budget
    from ramp.params import load_pipeline

    params = tmp_path / "params.yaml"
    params.write_text((REPO / "params.yaml").read_text())
    before = load_pipeline(params)
    set_budget(params, Q4_0_BYTES)
    after = load_pipeline(params)
    assert after.allocate.budget_file_bytes == Q4_0_BYTES != before.allocate.budget_file_bytes
    assert after.train == before.train
