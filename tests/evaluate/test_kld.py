"""KL divergence vs the FP model: the compact top-k + tail-sample reference against exact full-vocabulary KL."""

import copy

import numpy as np
import pytest
import torch

from ramp.allocation import slots_for, uniform
from ramp.evaluate.kld import (
    FPReference,
    exact_kl_divergence,
    fp_reference,
    kl_divergence,
    windows_for,
)
from ramp.evaluate.perplexity import EvaluationError, perplexity
from ramp.evaluate.quantized import QuantCache, swap_allocation
from ramp.models.tiny import tiny_llama


def peaked_tiny(seed: int = 0):
    """A tiny Llama whose next-token distributions are peaked like a real LM's (~13 % mass outside the top 32)."""
    lm = tiny_llama(seed=seed)
    with torch.no_grad():
        lm.model.model.norm.weight.mul_(2.5)
    return lm


def windows(n_seq: int = 4, n_ctx: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 512, (n_seq, n_ctx), generator=torch.Generator().manual_seed(seed))


def test_fp_reference_shapes_ppl_and_self_kld():
    lm = peaked_tiny()
    toks = windows()
    ref = fp_reference(lm, toks, top_k=16, n_tail=8, batch_size=3)
    assert ref.first == 32 and ref.n_tokens == 4 * 31
    assert ref.topk_logp.shape == (4, 31, 16) and ref.tail_idx.shape == (4, 31, 8)
    # the top-k are sorted, and top-k mass + rest mass = 1
    assert torch.all(ref.topk_logp[..., :-1] >= ref.topk_logp[..., 1:])
    total = ref.topk_logp.exp().sum(-1) + ref.rest.exp()
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    # tail draws never hit the top k
    assert not (ref.tail_idx.unsqueeze(-1) == ref.topk_idx.unsqueeze(-2)).any()
    # FP perplexity equals llama.cpp-style perplexity on the same windows
    ppl = perplexity(lm.model, toks.reshape(-1), n_ctx=64).ppl
    assert ref.ppl == pytest.approx(ppl, rel=1e-4)
    same = kl_divergence(lm, ref)
    assert abs(same.mean) < 1e-5 and same.top1 == 1.0 and same.ppl == pytest.approx(same.ppl_fp, rel=1e-5)


@pytest.mark.parametrize("fmt", ["Q2_K", "Q4_0", "Q8_0"])
def test_estimate_matches_exact_full_vocab_kl(fmt, tmp_path):
    lm = peaked_tiny()
    toks = windows(8)
    ref = fp_reference(lm, toks, top_k=32, n_tail=64, batch_size=8)
    assert 0.05 < float(ref.rest.exp().mean()) < 0.3  # a tail that matters, as on SmolLM2
    with swap_allocation(lm, uniform(slots_for(lm.matrices()), fmt), QuantCache(tmp_path)):
        res = kl_divergence(lm, ref)
        quant = copy.deepcopy(lm.model)
    exact = exact_kl_divergence(lm, quant, toks)
    assert res.mean == pytest.approx(exact.mean(), rel=0.05), (res.mean, exact.mean())  # sampling noise, 248 tokens
    assert res.median == pytest.approx(np.median(exact), rel=0.15)  # per-token values carry the sampling noise
    # merging the tail into one bucket is a lower bound, and a loose one
    assert res.bucket_mean <= exact.mean() + 1e-6
    assert res.bucket_mean < 0.95 * exact.mean()
    assert 0 < res.top1 < 1 and res.n_tokens == 8 * 31


def test_save_load_roundtrip_and_errors(tmp_path):
    lm = tiny_llama(seed=1)
    ref = fp_reference(lm, windows(2), top_k=8, n_tail=4)
    path = ref.save(tmp_path / "ref.safetensors")
    back = FPReference.load(path)
    assert back.first == ref.first
    for name in ("tokens", "topk_logp", "topk_idx", "rest", "tail_idx", "tail_logp", "target"):
        assert torch.equal(getattr(back, name), getattr(ref, name)), name
    assert kl_divergence(lm, back).mean == kl_divergence(lm, ref).mean
    # deterministic under a seed
    again = fp_reference(lm, windows(2), top_k=8, n_tail=4)
    assert torch.equal(again.tail_idx, ref.tail_idx)
    with pytest.raises(EvaluationError, match="no such FP reference"):
        FPReference.load(tmp_path / "missing.safetensors")
    with pytest.raises(EvaluationError, match="token windows"):
        fp_reference(lm, torch.arange(64))
    with pytest.raises(EvaluationError, match="top_k=512"):
        fp_reference(lm, windows(1), top_k=512)
    small = tiny_llama(seed=0, vocab=256)
    with pytest.raises(EvaluationError, match="vocabulary has 256"):
        kl_divergence(small, ref)


def test_windows_for_uses_bos_only_when_the_model_adds_one():
    lm = tiny_llama(seed=0)
    w = windows_for(lm, torch.arange(130), n_ctx=64)
    assert w.shape == (2, 64) and w[1, 0] == 64  # tokenizer None: no BOS substitution


def test_reference_head_is_the_reference_of_the_first_windows():
    from ramp.models.tiny import tiny_llama

    lm = tiny_llama(seed=6)
    toks = torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(1))
    ref = fp_reference(lm, toks, top_k=8, n_tail=4, batch_size=1)
    head = ref.head(2)
    assert head.tokens.shape[0] == 2 and head.first == ref.first
    assert torch.equal(head.topk_logp, ref.topk_logp[:2]) and torch.equal(head.tail_idx, ref.tail_idx[:2])
    with pytest.raises(EvaluationError, match="n_seq=4"):
        ref.head(4)
