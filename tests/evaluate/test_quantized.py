"""Allocation evaluation by weight swapping: the quantization cache, the swap, and the memoised evaluator."""

import json

import numpy as np
import pytest
import torch

from ramp.allocation import AllocationError, slots_for, uniform
from ramp.evaluate.kld import fp_reference, kl_divergence
from ramp.evaluate.perplexity import EvaluationError
from ramp.evaluate.quantized import AllocationEvaluator, QuantCache, swap_allocation
from ramp.formats import get_format
from ramp.models.tiny import tiny_llama


def fp_state(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_fp_intact(lm, state) -> None:
    now = lm.model.state_dict()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def test_cache_returns_ggml_dequantized_bytes_and_persists(tmp_path):
    w = 0.05 * torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    im = np.linspace(0.1, 2.0, 512, dtype=np.float32)
    cache = QuantCache(tmp_path, memory_bytes=1 << 20)
    fmt = get_format("Q4_K")
    want = fmt.dequantize(fmt.quantize(w, im, "x"), (256, 512))
    got = cache.dequantized(w, "x", "Q4_K", im)
    assert torch.equal(got, want) and cache.stats["quantized"] == 1
    assert cache.dequantized(w, "x", "Q4_K", im) is got and cache.stats["memory_hits"] == 1
    # the imatrix is part of the key for formats that use it ...
    plain = cache.dequantized(w, "x", "Q4_K", None)
    assert not torch.equal(plain, got) and cache.stats["quantized"] == 2
    # ... and not for those that ignore it
    q8a = cache.dequantized(w, "x", "Q8_0", im)
    q8b = cache.dequantized(w, "x", "Q8_0", None)
    assert q8a is q8b and cache.stats["quantized"] == 3
    # F16 is a rounding to half precision, F32 the weight itself
    assert torch.equal(cache.dequantized(w, "x", "F16"), w.half().float())
    assert torch.equal(cache.dequantized(w, "x", "F32"), w)
    # a fresh cache on the same folder reads the disk entry instead of quantizing
    again = QuantCache(tmp_path)
    assert torch.equal(again.dequantized(w, "x", "Q4_K", im), want)
    assert again.stats == {"memory_hits": 0, "disk_hits": 1, "quantized": 0, "quantize_seconds": 0.0}
    # the LRU stays under its byte bound
    assert cache._lru_bytes <= 1 << 20


def test_corrupt_cache_entry_is_an_error(tmp_path):
    w = torch.randn(4, 256)
    cache = QuantCache(tmp_path, memory_bytes=0)
    cache.dequantized(w, "x", "Q4_0")
    (path,) = list(tmp_path.rglob("*.safetensors"))
    path.write_bytes(b"garbage")
    with pytest.raises(EvaluationError, match="unreadable quantization cache entry"):
        cache.dequantized(w, "x", "Q4_0")


def test_swap_puts_dequantized_weights_in_and_restores_fp(tmp_path):
    lm = tiny_llama(seed=0)
    state = fp_state(lm)
    slots = slots_for(lm.matrices())
    alloc = {s.gguf_name: ("Q2_K" if s.block == 0 else "Q8_0") for s in slots}
    cache = QuantCache(tmp_path)
    params = dict(lm.model.named_parameters())
    m0 = lm.matrices()[0]
    with swap_allocation(lm, alloc, cache) as swapped:
        assert swapped is lm
        fmt = get_format("Q2_K")
        want = fmt.dequantize(fmt.quantize(state[m0.hf_name], None), m0.shape)
        assert torch.equal(params[m0.hf_name], want)
        assert not torch.equal(params[m0.hf_name], state[m0.hf_name])
    assert_fp_intact(lm, state)
    with pytest.raises(RuntimeError, match="boom"), swap_allocation(lm, alloc, cache):
        raise RuntimeError("boom")
    assert_fp_intact(lm, state)


def test_swap_rejects_bad_allocations_without_touching_weights(tmp_path):
    lm = tiny_llama(seed=0)
    state = fp_state(lm)
    alloc = uniform(slots_for(lm.matrices()), "Q4_0")
    cache = QuantCache(tmp_path)
    with (
        pytest.raises(AllocationError, match="blk.99.ffn_up.weight"),
        swap_allocation(lm, {**alloc, "blk.99.ffn_up.weight": "Q4_0"}, cache),
    ):
        pass
    with (
        pytest.raises(AllocationError, match="'BF16' is not legal"),
        swap_allocation(lm, {**alloc, "blk.0.attn_q.weight": "BF16"}, cache),
    ):
        pass
    missing = dict(alloc)
    missing.pop("blk.1.ffn_down.weight")
    with pytest.raises(AllocationError, match="without a format"), swap_allocation(lm, missing, cache):
        pass
    assert_fp_intact(lm, state)


def test_evaluator_memoises_orders_formats_and_keeps_fp(tmp_path):
    lm = tiny_llama(seed=0)
    state = fp_state(lm)
    toks = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = fp_reference(lm, toks, top_k=32, n_tail=16)
    slots = slots_for(lm.matrices())
    memo = tmp_path / "memo.json"
    ev = AllocationEvaluator(lm, ref, QuantCache(tmp_path / "q"), memo_path=memo)
    res = {f: ev.evaluate(uniform(slots, f)) for f in ("Q2_K", "Q4_0", "Q8_0", "F16")}
    assert res["Q2_K"].mean > res["Q4_0"].mean > res["Q8_0"].mean > res["F16"].mean
    assert abs(res["F16"].mean) < 1e-4  # unbiased tail estimate: ~0, either sign, for a near-lossless format
    assert_fp_intact(lm, state)
    # FP ppl through the evaluator's reference equals a direct run on the intact model
    assert kl_divergence(lm, ref).mean < 1e-6
    again = ev.evaluate(uniform(slots, "Q4_0"))
    assert again is res["Q4_0"] and ev.stats["memo_hits"] == 1 and ev.stats["evaluations"] == 4
    assert [r.mean for r in ev.evaluate_many([uniform(slots, "Q2_K"), uniform(slots, "F16")])] == [
        res["Q2_K"].mean,
        res["F16"].mean,
    ]
    # the memo file serves a new evaluator without any forward pass
    assert len(json.loads(memo.read_text())["results"]) == 4
    ev2 = AllocationEvaluator(lm, ref, QuantCache(tmp_path / "q"), memo_path=memo)
    assert ev2.evaluate(uniform(slots, "Q4_0")).mean == res["Q4_0"].mean and ev2.stats["evaluations"] == 0
    # ... but not one built on another imatrix
    im = {m.gguf_name: np.ones(m.shape[1], dtype=np.float32) for m in lm.matrices()}
    with pytest.raises(EvaluationError, match="another model/reference/imatrix"):
        AllocationEvaluator(lm, ref, QuantCache(tmp_path / "q"), imatrix=im, memo_path=memo)
    # changing the FP weights under an evaluator is caught, not silently scored
    with torch.no_grad():
        dict(lm.model.named_parameters())[lm.matrices()[3].hf_name].mul_(1.01)
    with pytest.raises(EvaluationError, match="FP weights changed"):
        ev.evaluate(uniform(slots, "Q5_0"))
