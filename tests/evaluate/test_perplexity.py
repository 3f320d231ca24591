"""llama.cpp-compatible perplexity: windowing rules, and agreement with llama-perplexity on SmolLM2."""

import pytest
import torch

from ramp.assets import asset_path
from ramp.data import wiki_split
from ramp.evaluate.perplexity import EvaluationError, make_windows, perplexity
from ramp.llamacpp import llama_perplexity
from ramp.models.loader import load_model
from ramp.models.tiny import tiny_llama

SPEC_LLAMA_CPP_PPL = 15.40  # SPEC §10 / issue 3: llama-perplexity, held-out split, n_ctx 512, 40 chunks


def test_windows_replace_first_token_with_bos():
    w = make_windows(torch.arange(10), n_ctx=4, n_chunks=None, bos_id=99)
    assert w.tolist() == [[99, 1, 2, 3], [99, 5, 6, 7]]
    with pytest.raises(EvaluationError, match="3 chunks of 4 tokens requested but the text has only 2"):
        make_windows(torch.arange(10), 4, 3, None)


def test_half_window_scoring_counts():
    lm = tiny_llama(seed=0)
    ids = torch.randint(0, 512, (3 * 64,), generator=torch.Generator().manual_seed(0))
    half = perplexity(lm.model, ids, n_ctx=64)
    full = perplexity(lm.model, ids, n_ctx=64, full_window=True)
    assert half.tokens_scored == 3 * 31 and full.tokens_scored == 3 * 63
    # llama.cpp's rule by hand: per window, the logits at positions 32..62 predict tokens 33..63
    with torch.no_grad():
        logits = lm.model(input_ids=ids.view(3, 64)).logits.float()
    targets = ids.view(3, 64)
    nll = torch.nn.functional.cross_entropy(logits[:, 32:63].reshape(-1, logits.shape[-1]), targets[:, 33:].reshape(-1))
    assert half.ppl == pytest.approx(float(torch.exp(nll)), rel=1e-4)
    nll_full = torch.nn.functional.cross_entropy(
        logits[:, :63].reshape(-1, logits.shape[-1]), targets[:, 1:].reshape(-1)
    )
    assert full.ppl == pytest.approx(float(torch.exp(nll_full)), rel=1e-4)


@pytest.mark.slow
def test_smollm2_perplexity_matches_llama_cpp(llama_cpp_bin, tmp_path):
    torch.set_num_threads(2)
    lm = load_model(asset_path("smollm2"))
    eval_text = wiki_split(asset_path("wiki"))[1]
    ids = torch.tensor(lm.tokenizer(eval_text, add_special_tokens=False).input_ids)
    ours = perplexity(lm.model, ids, n_ctx=512, n_chunks=40).ppl
    assert abs(ours / SPEC_LLAMA_CPP_PPL - 1) < 0.02, ours
    text_file = tmp_path / "eval.txt"
    text_file.write_text(eval_text, encoding="utf-8")
    theirs = llama_perplexity(asset_path("smollm2"), text_file)
    assert abs(ours / theirs - 1) < 0.01, (ours, theirs)
