"""Baselines: uniform allocations, the greedy / Lagrangian knapsack against brute force, cost tables, and
llama.cpp's per-tensor preset rules (against the real llama-quantize in the slow test)."""

from __future__ import annotations

import itertools
import random
import time
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from ramp.allocation import AllocationError, Slot, matrix_bytes, min_matrix_bytes, slots_for
from ramp.formats import QUANT_CHOICES
from ramp.knapsack import (
    allocation_cost,
    greedy_knapsack,
    lagrangian_knapsack,
    weighted_error_table,
)
from ramp.models.arch import ARCHS
from ramp.models.loader import LoadedModel
from ramp.models.tiny import tiny_llama
from ramp.presets import LLAMA_PRESETS, llama_rules, uniform_baselines

M = namedtuple("M", "gguf_name block role shape")

SMOLLM2_PRESETS = ("Q2_K", "Q3_K_M", "Q4_0", "IQ4_NL", "Q4_K_S", "Q4_K_M")


def smollm2_like_slots(blocks: int = 2):
    """Slots with SmolLM2's shapes: only ffn_down (row length 1536) admits K-quants."""
    shapes = {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576), "gate": (1536, 576)}
    shapes |= {"up": (1536, 576), "down": (576, 1536)}
    names = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output", "gate": "ffn_gate", "up": "ffn_up"}
    names["down"] = "ffn_down"
    return slots_for([M(f"blk.{b}.{names[r]}.weight", b, r, shapes[r]) for b in range(blocks) for r in shapes])


def small_slots(n: int = 4, formats=("Q2_K", "Q3_K", "Q4_K", "Q6_K", "Q8_0")):
    shapes = [(256, 256), (512, 256), (256, 512), (128, 768), (384, 256)]
    return slots_for([M(f"blk.{i}.ffn_down.weight", i, "down", shapes[i % len(shapes)]) for i in range(n)], formats)


def random_costs(slots, rng: random.Random, convex: bool) -> dict:
    """Cost decreasing in bytes; ``convex``: decreasing slopes, so every format is on the lower hull."""
    cost = {}
    for s in slots:
        fmts = sorted(s.formats, key=s.file_bytes)
        if convex:
            slopes = sorted((rng.uniform(0.1, 10.0) for _ in fmts[1:]), reverse=True)
            c = rng.uniform(5e4, 1e5)
            cost[(s.gguf_name, fmts[0])] = c
            for prev, f, slope in zip(fmts, fmts[1:], slopes, strict=False):
                c -= slope * (s.file_bytes(f) - s.file_bytes(prev)) * 1e-3
                cost[(s.gguf_name, f)] = c
        else:
            vals = sorted((rng.uniform(0, 100) for _ in fmts), reverse=True)
            cost.update({(s.gguf_name, f): v for f, v in zip(fmts, vals, strict=True)})
    return cost


def brute_force(slots, cost, budget):
    best = None
    for combo in itertools.product(*(s.formats for s in slots)):
        alloc = {s.gguf_name: f for s, f in zip(slots, combo, strict=True)}
        if matrix_bytes(slots, alloc) <= budget:
            c = allocation_cost(slots, cost, alloc)
            best = c if best is None else min(best, c)
    return best


def lagrange_point(slots, cost, lam):
    return {
        s.gguf_name: min(s.formats, key=lambda f, s=s: cost[(s.gguf_name, f)] + lam * s.file_bytes(f)) for s in slots
    }


# ------------------------------------------------------------------------------------------------- uniform


def test_uniform_baselines_all_legal_on_tiny_model():
    slots = slots_for(tiny_llama().matrices())
    out = uniform_baselines(slots)
    assert sorted(out) == sorted(f"uniform-{f}" for f in QUANT_CHOICES)
    assert set(out["uniform-Q3_K"].values()) == {"Q3_K"}


def test_uniform_kquant_fallback_is_explicit_per_tensor():
    slots = smollm2_like_slots()
    out = uniform_baselines(slots, ["Q3_K", "Q4_K", "Q4_0", "Q6_K"])
    assert set(out) == {
        "uniform-Q3_K+Q4_0-fallback",
        "uniform-Q4_K+Q5_0-fallback",
        "uniform-Q4_0",
        "uniform-Q6_K+Q8_0-fallback",
    }
    q3 = out["uniform-Q3_K+Q4_0-fallback"]
    assert {n: f for n, f in q3.items() if "ffn_down" in n} == {
        "blk.0.ffn_down.weight": "Q3_K",
        "blk.1.ffn_down.weight": "Q3_K",
    }
    assert {f for n, f in q3.items() if "ffn_down" not in n} == {"Q4_0"}


def test_uniform_without_fallback_raises():
    slots = slots_for([M("blk.0.attn_q.weight", 0, "q", (64, 48))], ("Q8_0", "F16"))
    with pytest.raises(AllocationError, match="Q8_0.*not legal"):
        uniform_baselines(slots, ["Q8_0"])


# ------------------------------------------------------------------------------------------------ knapsack


@pytest.mark.parametrize("seed", range(6))
def test_greedy_and_lagrangian_hit_the_optimum_at_lagrangian_budgets(seed):
    """With convex per-slot costs, each Lagrangian point is optimal for its own bytes; both solvers reach it."""
    rng = random.Random(seed)
    slots = small_slots(4)
    cost = random_costs(slots, rng, convex=True)
    for lam in (0.0, 1e-4, 1e-3, 3e-3, 1e-2, 1e9):
        point = lagrange_point(slots, cost, lam)
        budget = matrix_bytes(slots, point)
        opt = brute_force(slots, cost, budget)
        assert allocation_cost(slots, cost, point) == pytest.approx(opt)
        for solver in (greedy_knapsack, lagrangian_knapsack):
            alloc = solver(slots, cost, budget)
            assert matrix_bytes(slots, alloc) <= budget
            assert allocation_cost(slots, cost, alloc) == pytest.approx(opt), solver.__name__


@pytest.mark.parametrize("seed", range(8))
def test_knapsack_within_budget_and_near_optimal_on_random_tables(seed):
    rng = random.Random(100 + seed)
    slots = small_slots(4)
    cost = random_costs(slots, rng, convex=False)
    lo, hi = min_matrix_bytes(slots), sum(max(s.file_bytes(f) for f in s.formats) for s in slots)
    start_cost = allocation_cost(slots, cost, greedy_knapsack(slots, cost, lo))
    for budget in np.linspace(lo, hi, 7).astype(int):
        opt = brute_force(slots, cost, int(budget))
        for solver in (greedy_knapsack, lagrangian_knapsack):
            alloc = solver(slots, cost, int(budget))
            used = matrix_bytes(slots, alloc)
            c = allocation_cost(slots, cost, alloc)
            assert used <= budget
            assert opt - 1e-9 <= c <= start_cost + 1e-9
            # greedy is a heuristic: allow a gap, but it must close most of the way from start to optimum
            assert c - opt <= 0.5 * (start_cost - opt) + 1e-9, (solver.__name__, budget)


def test_knapsack_with_everything_affordable_picks_lowest_cost():
    rng = random.Random(7)
    slots = small_slots(5)
    cost = random_costs(slots, rng, convex=False)
    big = sum(max(s.file_bytes(f) for f in s.formats) for s in slots)
    best = {s.gguf_name: min(s.formats, key=lambda f, s=s: cost[(s.gguf_name, f)]) for s in slots}
    assert greedy_knapsack(slots, cost, big) == best


def test_knapsack_respects_start_and_errors():
    rng = random.Random(3)
    slots = small_slots(3)
    cost = random_costs(slots, rng, convex=True)
    floor = min_matrix_bytes(slots)
    with pytest.raises(AllocationError, match=rf"budget {floor - 1} bytes.*smallest legal allocation {floor} bytes"):
        greedy_knapsack(slots, cost, floor - 1)
    with pytest.raises(AllocationError, match=rf"budget {floor - 1} bytes"):
        lagrangian_knapsack(slots, cost, floor - 1)
    top = {s.gguf_name: "Q8_0" for s in slots}
    with pytest.raises(AllocationError, match="start allocation uses"):
        greedy_knapsack(slots, cost, floor, start=top)
    partial = {k: v for k, v in cost.items() if k[1] != "Q4_K"}
    with pytest.raises(AllocationError, match="no entry for.*Q4_K"):
        greedy_knapsack(slots, partial, floor * 2)
    # a start is kept where no upgrade fits
    start = {s.gguf_name: "Q3_K" for s in slots}
    assert greedy_knapsack(slots, cost, matrix_bytes(slots, start), start=start) == start


def test_knapsack_scales_to_a_real_model_size():
    """210 SmolLM2-shaped slots x all legal formats: exact bytes, deterministic, and it spends the budget."""
    slots = smollm2_like_slots(30)
    rng = random.Random(0)
    cost = random_costs(slots, rng, convex=False)
    budget = int(0.5 * (min_matrix_bytes(slots) + sum(s.file_bytes("Q8_0") for s in slots)))
    t0 = time.perf_counter()
    a = greedy_knapsack(slots, cost, budget)
    elapsed = time.perf_counter() - t0
    assert a == greedy_knapsack(slots, cost, budget)
    used = matrix_bytes(slots, a)
    assert used <= budget
    # no single remaining upgrade fits the leftover bytes with a gain: greedy stopped for lack of room
    slack = budget - used
    for s in slots:
        cur = a[s.gguf_name]
        for f in s.formats:
            extra = s.file_bytes(f) - s.file_bytes(cur)
            if 0 < extra <= slack:
                assert cost[(s.gguf_name, f)] >= cost[(s.gguf_name, cur)]
    print(f"greedy on {len(slots)} slots: {elapsed * 1e3:.1f} ms")


# --------------------------------------------------------------------------------------------- cost tables


def test_weighted_error_table_orders_formats_and_matches_cache(tmp_path):
    lm = tiny_llama(seed=1, layers=1)
    slots = slots_for(lm.matrices(), ("Q2_K", "Q4_0", "Q4_K", "Q8_0", "F16"))
    rng = np.random.default_rng(0)
    imatrix = {s.gguf_name: rng.uniform(0.1, 2.0, s.shape[1]).astype(np.float32) for s in slots}
    table = weighted_error_table(lm, slots, imatrix)
    assert set(table) == {(s.gguf_name, f) for s in slots for f in s.formats}
    for s in slots:
        e = {f: table[(s.gguf_name, f)] for f in s.formats}
        assert e["Q2_K"] > e["Q4_K"] > e["Q8_0"] > e["F16"] >= 0.0
        assert e["Q2_K"] < 1.0  # relative error of a 2.6-bit format on Gaussian weights is well below 1
    plain = weighted_error_table(lm, slots, None)
    assert plain != table
    from ramp.evaluate.quantized import QuantCache

    cached = weighted_error_table(lm, slots, imatrix, QuantCache(tmp_path / "qc"))
    assert cached == pytest.approx(table, rel=1e-9)
    with pytest.raises(AllocationError, match="imatrix has no entry"):
        weighted_error_table(lm, slots, {})


# ---------------------------------------------------------------------------------------------- llama rules


def _llama(hidden: int, intermediate: int, layers: int, heads: int, kv: int, tied: bool = True) -> LoadedModel:
    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        head_dim=hidden // heads,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return LoadedModel(AutoModelForCausalLM.from_config(cfg), None, ARCHS["llama"], Path("<rules test>"))


def test_llama_rules_q4_k_m_more_bits_layers():
    lm = _llama(256, 512, 8, 4, 2, tied=False)
    types = llama_rules(lm, "Q4_K_M")
    more = {0, 3, 6, 7}  # i < n/8, i >= 7n/8, (i - n/8) % 3 == 2 for n = 8
    for i in range(8):
        want = "Q6_K" if i in more else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == want
        assert types[f"blk.{i}.ffn_down.weight"] == want
        assert types[f"blk.{i}.attn_q.weight"] == "Q4_K"
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_K"


def test_llama_rules_shape_fallback_and_tied_embedding():
    lm = _llama(320, 512, 2, 5, 1)  # row length 320: K-quants illegal except on ffn_down (512)
    q2 = llama_rules(lm, "Q2_K")
    assert q2["blk.0.attn_q.weight"] == "Q4_0"  # Q2_K -> Q4_0 fallback
    assert q2["blk.0.attn_v.weight"] == "Q5_0"  # gqa 5 >= 4 picks Q4_K, whose fallback is Q5_0
    assert q2["blk.0.ffn_down.weight"] == "Q3_K"  # row length 512: K-quant kept
    q4km = llama_rules(lm, "Q4_K_M")
    assert q4km["blk.0.attn_q.weight"] == "Q5_0"
    assert q4km["blk.0.ffn_down.weight"] == "Q4_K"  # n = 2: only block 1 (>= 7n/8) gets more bits
    assert q4km["blk.1.ffn_down.weight"] == "Q6_K"
    assert q4km["token_embd.weight"] == "Q8_0"  # tied: output rule (320 % 256) -> Q8_0
    assert llama_rules(lm, "Q4_0", has_imatrix=True)["blk.0.ffn_down.weight"] == "Q4_0"  # n/8 = 0 layers
    with pytest.raises(ValueError, match="unknown llama.cpp preset 'Q9_K'"):
        llama_rules(lm, "Q9_K")


def test_auto_embedding_type_is_llama_quantizes_output_type_and_the_export_writes_it():
    from ramp.gguf_export import file_overhead, plan_tensors
    from ramp.params import ParamsError, pipeline_from_dict, read_params
    from ramp.pipeline.allocate import embedding_type
    from ramp.presets import auto_embedding_type

    assert [auto_embedding_type(c) for c in (256, 576, 640, 4096)] == ["Q6_K", "Q8_0", "Q8_0", "Q6_K"]
    for hidden in (256, 320):  # a K-quant preset's tied embedding: Q6_K, or its Q8_0 fallback
        lm = _llama(hidden, 512, 2, 4, 2)
        assert embedding_type(lm, "auto") == auto_embedding_type(hidden)
        for preset in ("Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M"):
            assert llama_rules(lm, preset)["token_embd.weight"] == auto_embedding_type(hidden)
        alloc = {s.gguf_name: "Q8_0" for s in lm.matrices()}
        types = {p.name: p.type_name for p in plan_tensors(lm, alloc, "auto")}
        assert types["token_embd.weight"] == auto_embedding_type(hidden)
        assert file_overhead(lm, "auto") == file_overhead(lm, auto_embedding_type(hidden))
    assert file_overhead(_llama(256, 512, 2, 4, 2), "auto") < file_overhead(_llama(256, 512, 2, 4, 2), "Q8_0")
    data = read_params(Path(__file__).resolve().parents[1] / "params.yaml")
    assert data["allocate"]["embedding_type"] == "measured"  # auto is the choice llama-quantize would make
    data["allocate"]["embedding_type"] = "Q6"
    with pytest.raises(ParamsError, match="embedding_type.*'Q6'"):
        pipeline_from_dict(data)


@pytest.mark.slow
def test_llama_rules_match_real_llama_quantize_on_smollm2(llama_cpp_bin, tmp_path):
    from ramp.assets import asset_path, smollm2_gguf_path
    from ramp.data import wiki_split
    from ramp.llamacpp import gguf_tensor_types, llama_imatrix, llama_presets
    from ramp.models.loader import load_model

    src = smollm2_gguf_path()
    lm = load_model(src, with_tokenizer=False)
    text = tmp_path / "calib.txt"
    text.write_text(wiki_split(asset_path("wiki"))[0][:200_000], encoding="utf-8")
    imatrix = llama_imatrix(src, text, tmp_path / "imatrix.gguf", chunks=1)  # types do not depend on its values
    for im in (None, imatrix):
        made = llama_presets(src, tmp_path / "presets", SMOLLM2_PRESETS, imatrix_path=im)
        for preset, path in made.items():
            real = gguf_tensor_types(path)
            ours = llama_rules(lm, preset, has_imatrix=im is not None)
            quantizable = {k: v for k, v in real.items() if not k.endswith("norm.weight")}
            assert ours == quantizable, (preset, im, {k: (v, real.get(k)) for k, v in ours.items() if real.get(k) != v})
    assert set(LLAMA_PRESETS) >= set(SMOLLM2_PRESETS)


def test_preset_tools_reject_bad_input(tmp_path):
    from ramp.llamacpp import llama_quantize
    from ramp.presets import preset_allocation

    with pytest.raises(ValueError, match="unknown llama.cpp preset 'Q7_K'"):
        llama_quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q7_K")
    with pytest.raises(FileNotFoundError, match="in.gguf: no such GGUF file"):
        llama_quantize(tmp_path / "in.gguf", tmp_path / "out.gguf", "Q4_K_M")
    assert not (tmp_path / "out.gguf").exists()
    slots = smollm2_like_slots(1)
    types = {s.gguf_name: "Q4_0" for s in slots}
    assert preset_allocation(slots, types) == types
    with pytest.raises(AllocationError, match="lack 1 matrices"):
        preset_allocation(slots, {k: v for k, v in types.items() if "attn_q" not in k})
    with pytest.raises(AllocationError, match="Q4_K.*not legal"):
        preset_allocation(slots, {**types, "blk.0.attn_q.weight": "Q4_K"})


def test_pareto_slots_drop_formats_beaten_at_equal_or_fewer_bytes():
    from ramp.knapsack import pareto_slots

    s = Slot("blk.0.ffn_down.weight", 0, "ffn_down", (256, 512), ("Q2_K", "Q3_K", "Q4_0", "IQ4_NL", "Q5_0", "Q8_0"))
    cost = {
        (s.gguf_name, "Q2_K"): 9.0,
        (s.gguf_name, "Q3_K"): 5.0,
        (s.gguf_name, "Q4_0"): 3.0,  # same bytes as IQ4_NL, worse: dropped
        (s.gguf_name, "IQ4_NL"): 2.0,
        (s.gguf_name, "Q5_0"): 2.5,  # more bytes than IQ4_NL and worse: dropped
        (s.gguf_name, "Q8_0"): 0.1,
    }
    (pruned,) = pareto_slots([s], cost)
    assert pruned.formats == ("Q2_K", "Q3_K", "IQ4_NL", "Q8_0")
    assert (pruned.gguf_name, pruned.shape) == (s.gguf_name, s.shape)
    # the greedy knapsack never wanted the dropped formats, at any budget
    for fmt in pruned.formats:
        budget = s.file_bytes(fmt)
        assert greedy_knapsack([pruned], cost, budget) == greedy_knapsack([s], cost, budget)
    with pytest.raises(AllocationError, match="no entry"):
        pareto_slots([s], {k: v for k, v in cost.items() if k[1] != "Q8_0"})


def test_knapsack_starts_greedy_and_uniform_level():
    from ramp.knapsack import knapsack_starts

    fmts = ("Q2_K", "Q3_K", "Q4_0", "Q5_0", "Q8_0")
    a = Slot("blk.0.attn_q.weight", 0, "attn_q", (256, 256), fmts)
    b = Slot("blk.0.ffn_up.weight", 0, "ffn_up", (256, 256), fmts)
    bits = {"Q2_K": 2.625, "Q3_K": 3.4375, "Q4_0": 4.5, "Q5_0": 5.5, "Q8_0": 8.5}
    # a is 1000x as sensitive as b: the greedy knapsack starves b to feed a
    cost = {(s.gguf_name, f): w * 2.0 ** -bits[f] for s, w in ((a, 1000.0), (b, 1.0)) for f in fmts}
    budget = a.file_bytes("Q4_0") + b.file_bytes("Q4_0")
    starts = knapsack_starts([a, b], cost, budget)
    assert starts["greedy"] == greedy_knapsack([a, b], cost, budget)
    assert bits[starts["greedy"][b.gguf_name]] < 4.5 < bits[starts["greedy"][a.gguf_name]]
    assert starts["uniform"] == {a.gguf_name: "Q4_0", b.gguf_name: "Q4_0"}
    for alloc in starts.values():
        assert matrix_bytes([a, b], alloc) <= budget
    assert list(knapsack_starts([a, b], cost, budget, ["uniform"])) == ["uniform"]
    with pytest.raises(ValueError, match="unknown start 'random'"):
        knapsack_starts([a, b], cost, budget, ["random"])
    with pytest.raises(AllocationError, match="below the smallest legal allocation"):
        knapsack_starts([a, b], cost, 10, ["uniform"])


def test_one_resolver_gives_every_user_of_an_embedding_type_the_same_gguf_type():
    from ramp.gguf_export import plan_tensors
    from ramp.presets import embedding_type_name, resolve_embedding_type

    assert embedding_type_name("auto") == "auto" and embedding_type_name("q8_0") == "Q8_0"
    assert [resolve_embedding_type("auto", c) for c in (256, 576)] == ["Q6_K", "Q8_0"]
    assert resolve_embedding_type("q4_k", 576) == "Q4_K"  # a named type is kept (legality is the plan's to check)
    with pytest.raises(ValueError, match="'Q6'"):
        resolve_embedding_type("Q6", 256)
    lm = _llama(256, 512, 2, 4, 2)
    alloc = {s.gguf_name: "Q8_0" for s in lm.matrices()}
    with pytest.raises(ValueError, match="'Q6'"):  # the export's plan refuses it the same way
        plan_tensors(lm, alloc, "Q6")
    assert {p.name: p.type_name for p in plan_tensors(lm, alloc, "q6_k")}["token_embd.weight"] == "Q6_K"
