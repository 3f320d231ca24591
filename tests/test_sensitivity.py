"""Sensitivity tables: running from a block on recorded FP inputs is the full forward, one-matrix KLDs equal a
full evaluation, the calibrated and gradient tables are priced as documented, and the knapsack stays in budget."""

import pytest
import torch

from ramp.allocation import matrix_bytes, min_matrix_bytes, slots_for
from ramp.evaluate.kld import fp_reference, kl_divergence
from ramp.evaluate.quantized import QuantCache
from ramp.knapsack import weighted_error_table
from ramp.models.tiny import tiny_gemma3, tiny_llama
from ramp.sensitivity import (
    BlockRunner,
    best_knapsack,
    calibrated_table,
    embedding_bytes,
    embedding_choice,
    embedding_params,
    gradient_table,
    legal_embedding_formats,
    measure_embedding,
    measure_kld,
    probe_formats,
)

FORMATS = ("Q2_K", "Q4_K", "Q8_0")


def _tokens(n=3, n_ctx=32):
    return torch.randint(0, 512, (n, n_ctx), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_running_from_a_block_is_the_full_forward(make):
    lm = make(seed=1)
    ref = fp_reference(lm, _tokens(), top_k=16, n_tail=8)
    runner = BlockRunner(lm, ref, batch_size=2)
    with torch.inference_mode():
        full = torch.log_softmax(lm.model(input_ids=ref.tokens[2:3]).logits[:, ref.first : -1].float(), dim=-1)
    for block in range(len(runner.layers)):
        got = runner.logprobs_from(block, 1)  # windows 2.. (batch 1 of size 2)
        torch.testing.assert_close(got, full, atol=2e-5, rtol=1e-5)
        assert runner.kld_from(block) == pytest.approx(0.0, abs=1e-5)
    # the layers are the model's own again
    assert not any(type(layer).__name__ == "_Pass" for layer in runner.layers)


def test_one_matrix_kld_equals_a_full_evaluation(tmp_path):
    lm = tiny_llama(seed=2, layers=3)
    ref = fp_reference(lm, _tokens(), top_k=16, n_tail=8)
    runner = BlockRunner(lm, ref)
    slots = slots_for(lm.matrices(), FORMATS)
    cache = QuantCache(tmp_path / "q")
    measured = measure_kld(lm, runner, slots, 1, cache, None, progress=False)
    assert set(measured) == {(s.gguf_name, "Q2_K") for s in slots}
    params = dict(lm.model.named_parameters())
    for s, m in zip(slots[::4], lm.matrices()[::4], strict=True):  # a few, in different blocks
        p = params[m.hf_name]
        fp = p.data
        p.data = cache.dequantized(fp, s.gguf_name, "Q2_K")
        try:
            full = kl_divergence(lm, ref).mean
        finally:
            p.data = fp
        assert measured[(s.gguf_name, "Q2_K")] == pytest.approx(full, rel=1e-4, abs=1e-7)
        assert full > 0
    # the model is FP again: its own KLD is 0
    assert kl_divergence(lm, ref).mean == pytest.approx(0.0, abs=1e-6)


def test_probe_formats_and_calibrated_prices():
    lm = tiny_llama(seed=3)
    slots = slots_for(lm.matrices(), FORMATS)
    s = slots[0]
    assert probe_formats(s, 1) == ("Q2_K",)
    assert probe_formats(s, 2) == ("Q2_K", "Q8_0")
    assert probe_formats(s, 9) == FORMATS
    with pytest.raises(ValueError, match="probes=0"):
        probe_formats(s, 0)
    proxy = {(x.gguf_name, f): {"Q2_K": 0.4, "Q4_K": 0.1, "Q8_0": 0.01}[f] for x in slots for f in x.formats}
    measured = {(x.gguf_name, "Q2_K"): 0.8 * (i + 1) for i, x in enumerate(slots)}
    table = calibrated_table(slots, proxy, measured)
    for i, x in enumerate(slots):  # the slot's measured KLD per unit of proxy, applied to its other formats
        assert table[(x.gguf_name, "Q2_K")] == measured[(x.gguf_name, "Q2_K")]
        assert table[(x.gguf_name, "Q4_K")] == pytest.approx(0.1 * 2.0 * (i + 1))
    measured[(s.gguf_name, "Q8_0")] = 0.01  # ratio 1 at 8.5 bpw, 2 at 2.625: Q4_K (4.5 bpw) in between
    two = calibrated_table(slots, proxy, measured)
    assert 0.1 * 1.0 < two[(s.gguf_name, "Q4_K")] < 0.1 * 2.0
    del measured[(s.gguf_name, "Q2_K")], measured[(s.gguf_name, "Q8_0")]
    with pytest.raises(Exception, match=s.gguf_name):
        calibrated_table(slots, proxy, measured)


def test_gradient_table_predicts_the_kld_change_and_leaves_the_model_fp(tmp_path):
    lm = tiny_llama(seed=4)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    ref = fp_reference(lm, _tokens(), top_k=16, n_tail=8)
    slots = slots_for(lm.matrices(), FORMATS)
    cache = QuantCache(tmp_path / "q")
    table = gradient_table(lm, ref, slots, cache, None, batch_size=2)
    assert all(table[(s.gguf_name, s.formats[0])] == 0.0 for s in slots)
    # raising precision is predicted to lower the KLD for most matrices (first order, so not for all)
    assert sum(table[(s.gguf_name, "Q8_0")] < 0 for s in slots) >= 0.75 * len(slots)
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in lm.model.parameters())
    assert kl_divergence(lm, ref).mean == pytest.approx(0.0, abs=1e-6)


def test_best_knapsack_fits_the_budget_and_prefers_sensitive_matrices():
    lm = tiny_llama(seed=5)
    slots = slots_for(lm.matrices(), FORMATS)
    proxy = weighted_error_table(lm, slots, None)
    # one matrix made 1000x as sensitive as the proxy says: the knapsack gives it the most bits
    hot = slots[3].gguf_name
    cost = {k: v * (1000.0 if k[0] == hot else 1.0) for k, v in proxy.items()}
    budget = (min_matrix_bytes(slots) + matrix_bytes(slots, {s.gguf_name: "Q4_K" for s in slots})) // 2
    alloc = best_knapsack(slots, cost, budget)
    assert matrix_bytes(slots, alloc) <= budget
    assert alloc[hot] == "Q8_0"


def _model_tables(ratios: dict[str, list[float]], scale: float) -> tuple:
    """(costs, embedding) of a model whose measured KLD is ``scale * ratio * proxy`` per matrix, by role."""
    import pandas as pd

    rows, emb = [], []
    for role, rs in ratios.items():
        for i, r in enumerate(rs):
            name = f"blk.{i}.{role}.weight"
            emb.append({"gguf_name": name, "role": role})
            rows.append({"gguf_name": name, "format": "IQ4_NL", "proxy": 0.01 * (i + 1), "measured": None})
            rows[-1]["measured"] = scale * r * rows[-1]["proxy"]
            rows.append({"gguf_name": name, "format": "Q8_0", "proxy": 0.001, "measured": None})  # priced, unmeasured
    return pd.DataFrame(rows), pd.DataFrame(emb)


def test_role_gains_keep_each_models_role_ranking_not_its_scale():
    import math

    from ramp.sensitivity import gained_table, role_gains

    # model a: down costs 4x q per unit of proxy; model b the same ranking at a 100x larger scale, plus a gate role
    a = _model_tables({"q": [1.0, 1.0], "down": [4.0, 4.0]}, scale=0.01)
    b = _model_tables({"q": [1.0, 1.0], "down": [4.0, 4.0], "gate": [2.0, 2.0]}, scale=1.0)
    gains = role_gains([a, b])
    assert set(gains) == {"q", "down", "gate"}
    assert gains["down"] - gains["q"] == pytest.approx(math.log(4.0))  # the scales cancel
    assert gains["q"] == pytest.approx(-math.log(2.0)) and gains["gate"] == pytest.approx(0.0)  # gate: b's alone
    alone = role_gains([a])
    assert alone["down"] == pytest.approx(math.log(4.0) / 2) and alone["q"] == pytest.approx(-math.log(4.0) / 2)
    proxy = {("m1", "Q4_0"): 0.5, ("m2", "Q4_0"): 0.25}
    priced = gained_table(proxy, {"m1": "q", "m2": "down"}, alone)
    assert priced[("m2", "Q4_0")] / priced[("m1", "Q4_0")] == pytest.approx(0.5 * 4.0)
    with pytest.raises(ValueError, match="m1: role 'v' has no cost gain"):
        gained_table(proxy, {"m1": "v", "m2": "down"}, alone)
    costs, emb = a
    with pytest.raises(ValueError, match="model 0 of the pool has no measured sensitivity"):
        role_gains([(costs.assign(measured=None), emb)])
    with pytest.raises(ValueError, match="are measured but have no embedding row"):
        role_gains([(costs, emb.iloc[1:])])
    with pytest.raises(ValueError, match="model 1 of the pool: .*has no 'role' column"):
        role_gains([a, (costs, emb.drop(columns="role"))])


def test_log_prices_keep_the_positive_measured_pairs_and_role_map_names_a_missing_column():
    import math

    from ramp.sensitivity import log_prices, role_map

    costs, emb = _model_tables({"q": [1.0, 3.0]}, scale=0.5)
    costs.loc[0, "measured"] = 0.0  # a measured pair with no KLD change has no log price
    m = log_prices(costs)
    assert list(m["gguf_name"]) == ["blk.1.q.weight"] and list(m["format"]) == ["IQ4_NL"]
    assert m["log_price"].iloc[0] == pytest.approx(math.log(1.5))
    assert role_map(emb) == {"blk.0.q.weight": "q", "blk.1.q.weight": "q"}
    with pytest.raises(ValueError, match="has no 'role' column"):
        role_map(emb.drop(columns="role"))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_embedding_kld_is_a_full_evaluation_with_only_the_embedding_quantized(make, tmp_path):
    lm = make(seed=6)
    ref = fp_reference(lm, _tokens(), top_k=16, n_tail=8)
    cache = QuantCache(tmp_path / "q")
    params = embedding_params(lm)
    tied = bool(getattr(lm.config, "tie_word_embeddings", False))
    assert set(params) == ({"token_embd.weight"} if tied else {"token_embd.weight", "output.weight"})
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    got = measure_embedding(lm, ref, ["Q8_0", "Q4_0", "Q2_K"], cache)
    assert list(got) == ["Q8_0", "Q4_0", "Q2_K"]
    assert 0 <= got["Q8_0"] < got["Q4_0"] < got["Q2_K"]
    # by hand: swap the same dequantized tensors in, one full evaluation
    hf = {name: _hf_name(lm, p) for name, p in params.items()}
    for name, p in params.items():
        p.data = cache.dequantized(before[hf[name]], name, "Q4_0")
    try:
        assert kl_divergence(lm, ref).mean == pytest.approx(got["Q4_0"], rel=1e-5)
    finally:
        for name, p in params.items():
            p.data = before[hf[name]]
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # FP again
    assert embedding_bytes(lm, "Q8_0") == sum(p.numel() for p in params.values()) // 32 * 34


def _hf_name(lm, param):
    return next(k for k, v in lm.model.named_parameters(remove_duplicate=False) if v is param)


def test_legal_embedding_formats_keep_the_order_and_drop_what_the_rows_do_not_divide():
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from ramp.models.arch import ARCHS
    from ramp.models.loader import LoadedModel

    # rows of 288 = 9 blocks of 32, not a multiple of 256 (as SmolLM2's 576): no K-quant
    cfg = LlamaConfig(
        hidden_size=288, intermediate_size=256, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, tie_word_embeddings=True,
    )  # fmt: skip
    lm = LoadedModel(LlamaForCausalLM(cfg), None, ARCHS["llama"], source=Path("<hidden 288>"))
    assert legal_embedding_formats(lm, ["Q6_K", "Q8_0", "Q4_K", "Q5_0"]) == ("Q8_0", "Q5_0")
    assert legal_embedding_formats(tiny_llama(seed=7), ["Q6_K", "Q8_0"]) == ("Q6_K", "Q8_0")


def test_embedding_choice_trades_embedding_error_for_matrix_bytes():
    from ramp.budget import Budget, BudgetError

    lm = tiny_llama(seed=8)
    slots = slots_for(lm.matrices(), FORMATS)
    cost = weighted_error_table(lm, slots, None)
    big, small = 10_000_000, 10_000_000 - matrix_bytes(slots, {s.gguf_name: "Q8_0" for s in slots}) // 2
    overheads = {"Q8_0": big, "Q4_0": small}
    floor = min_matrix_bytes(slots)
    budget = Budget(file_bytes=big + floor + 1000)  # with Q8_0 the matrices get their cheapest formats
    low_all = sum(cost[(s.gguf_name, s.formats[0])] for s in slots)
    # a cheap embedding that costs little buys every matrix more bits: chosen
    best, pred = embedding_choice(slots, cost, {"Q8_0": 0.0, "Q4_0": 1e-9}, overheads, budget)
    assert best == "Q4_0" and pred["Q8_0"] == pytest.approx(low_all) and pred["Q4_0"] < pred["Q8_0"]
    # the same bytes, but the small embedding costs more than the matrices gain: the large one
    best, pred = embedding_choice(slots, cost, {"Q8_0": 0.0, "Q4_0": 10 * low_all}, overheads, budget)
    assert best == "Q8_0"
    # a tie goes to the larger type; a bpw budget gives the matrices the same bytes: the lowest embedding KLD
    assert embedding_choice(slots, cost, {"Q8_0": 0.0, "Q4_0": 0.0}, {"Q8_0": 5, "Q4_0": 5}, budget)[0] == "Q8_0"
    bpw = Budget(bpw=4.5)
    assert embedding_choice(slots, cost, {"Q8_0": 0.01, "Q4_0": 0.02}, overheads, bpw)[0] == "Q8_0"
    # a type that leaves the matrices less than their floor is not offered; none feasible: the largest's error
    tight = Budget(file_bytes=small + floor)
    best, pred = embedding_choice(slots, cost, {"Q8_0": 0.0, "Q4_0": 0.5}, overheads, tight)
    assert best == "Q4_0" and set(pred) == {"Q4_0"}
    with pytest.raises(BudgetError, match="budget_file_bytes|leaves"):
        embedding_choice(slots, cost, {"Q8_0": 0.0}, overheads, Budget(file_bytes=big))


def test_role_gains_price_the_embedding_against_the_same_models_matrices():
    import math

    from ramp.sensitivity import EMBEDDING_ROLE, predicted_embedding_kld, role_gains

    # a's matrices: mean log price log(0.01) + (log 1 + log 4) / 2 (q at 1x its scale, down at 4x); its embedding
    # costs 50x its scale per unit of proxy error at both measured formats (Q8_0: no KLD, no log price)
    a = _model_tables({"q": [1.0, 1.0], "down": [4.0, 4.0]}, scale=0.01)
    b = _model_tables({"q": [1.0, 1.0], "down": [4.0, 4.0]}, scale=1.0)
    mean_a = math.log(0.01) + math.log(4.0) / 2
    emb_a = ({"Q8_0": 0.0, "Q5_0": 0.01 * 50 * 0.002, "Q4_0": 0.01 * 50 * 0.008}, {"Q5_0": 0.002, "Q4_0": 0.008})
    gains = role_gains([a, b], [emb_a, None])  # b measured no embedding: the gain is a's alone
    assert gains[EMBEDDING_ROLE] == pytest.approx(math.log(0.01 * 50) - mean_a)
    assert {k: v for k, v in gains.items() if k != EMBEDDING_ROLE} == pytest.approx(role_gains([a, b]))
    # b's embedding at 200x its scale: the pool averages the two models' gains (their scales cancel)
    emb_b = ({"Q5_0": 200 * 0.003}, {"Q5_0": 0.003, "Q4_0": 0.01})
    both = role_gains([a, b], [emb_a, emb_b])
    mean_b = math.log(4.0) / 2
    want = ((math.log(0.5) - mean_a) + (math.log(200) - mean_b)) / 2
    assert both[EMBEDDING_ROLE] == pytest.approx(want)
    # the embedding priced in the units of the gained matrices: proxy * exp(gain)
    assert predicted_embedding_kld({"Q5_0": 0.002, "Q8_0": 0.0}, both) == pytest.approx(
        {"Q5_0": 0.002 * math.exp(want), "Q8_0": 0.0}
    )
    with pytest.raises(ValueError, match=r"an 'embedding' cost gain, and the policy has \['down', 'q'\]"):
        predicted_embedding_kld({"Q5_0": 0.002}, role_gains([a, b]))
    with pytest.raises(ValueError, match="policy has none"):
        predicted_embedding_kld({"Q5_0": 0.002}, None)
    with pytest.raises(ValueError, match="1 embedding tables for 2 models"):
        role_gains([a, b], [emb_a])
    with pytest.raises(ValueError, match="model 1 of the pool: no embedding format with a positive KLD"):
        role_gains([a, b], [emb_a, ({"Q8_0": 0.0}, {"Q8_0": 0.0})])


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_embedding_proxy_is_the_relative_error_of_the_embedding_as_exported(make):
    from ramp.formats import get_format
    from ramp.sensitivity import embedding_proxy

    lm = make(seed=6)
    params = embedding_params(lm)
    before = {k: p.detach().clone() for k, p in params.items()}
    got = embedding_proxy(lm, ["Q8_0", "Q5_0", "Q4_0"])
    assert 0 < got["Q8_0"] < got["Q5_0"] < got["Q4_0"] < 0.1
    # by hand over every embedding tensor (token_embd; output too where untied), no imatrix
    err = total = 0.0
    for name, w in before.items():
        f = get_format("Q5_0")
        q = f.dequantize(f.quantize(w.float(), None, name=name), tuple(w.shape))
        err += float((w.float() - q).double().pow(2).sum())
        total += float(w.double().pow(2).sum())
    assert got["Q5_0"] == pytest.approx(err / total, rel=1e-9)
    assert all(torch.equal(before[k], p) for k, p in embedding_params(lm).items())  # nothing written back
    with pytest.raises(ValueError, match=r"embedding formats \['Q9_K'\]|unknown format 'Q9_K'"):
        embedding_proxy(lm, ["Q8_0", "Q9_K"])
