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
