"""The Fisher table (ramp.fisher): what one matrix's quantization costs in KLD, from output gradients and the imatrix
with no quantized evaluation. It must land near the measured one-matrix KLD (in its units, no per-model gain), rank
formats like their errors, be the same for the same seed and leave the model as it was."""

import numpy as np
import pytest
import torch

from ramp.allocation import slots_for
from ramp.calib import calibrate
from ramp.evaluate.kld import fp_reference, kl_divergence
from ramp.evaluate.quantized import QuantCache
from ramp.fisher import fisher_table, output_fisher
from ramp.models.tiny import tiny_gemma3, tiny_llama
from ramp.sensitivity import BlockRunner, measure_kld

FORMATS = ("Q2_K", "Q4_K", "Q8_0")


def _tokens(n=6, n_ctx=64, seed=0):
    return torch.randint(0, 512, (n, n_ctx), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_output_fisher_is_seeded_and_leaves_the_model_as_it_was(make):
    lm = make(seed=3)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    flags = [p.requires_grad for p in lm.model.parameters()]
    tokens = _tokens(3)
    a, b = output_fisher(lm, tokens, seed=0), output_fisher(lm, tokens, seed=0)
    other = output_fisher(lm, tokens, seed=1)
    shapes = {m.gguf_name: m.shape[0] for m in lm.matrices()}
    assert set(a) == set(shapes) and all(a[n].shape == (rows,) for n, rows in shapes.items())
    assert all(np.array_equal(a[n], b[n]) for n in a)  # same seed, same draws: the same bytes
    assert any(not np.array_equal(a[n], other[n]) for n in a)  # the draws matter
    assert all(np.isfinite(v).all() and (v >= 0).all() and v.sum() > 0 for v in a.values())
    after = lm.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert [p.requires_grad for p in lm.model.parameters()] == flags
    assert all(p.grad is None for p in lm.model.parameters())


def _whole_model_moments(lm, tokens, seed=0):
    """The same moments by one backward pass through the whole model per window (what the streamed version must
    equal): hooks on every matrix's output gradient."""
    model, gen = lm.model, torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    sums = {}

    def hook(name):
        def on_output(_m, _a, out):
            out.register_hook(lambda g: sums.__setitem__(name, sums.get(name, 0) + g.double().pow(2).sum((0, 1))))

        return on_output

    handles = [
        modules[m.hf_name.removesuffix(".weight")].register_forward_hook(hook(m.gguf_name)) for m in lm.matrices()
    ]
    n_ctx = tokens.shape[1]
    keep = torch.arange(n_ctx // 2, n_ctx - 1)
    try:
        for w in range(tokens.shape[0]):
            x = model.get_input_embeddings()(tokens[w : w + 1]).detach().requires_grad_(True)
            logits = model(inputs_embeds=x, use_cache=False, logits_to_keep=keep).logits.float()
            logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
            logp.gather(-1, torch.multinomial(logp.detach().exp(), 1, generator=gen)).sum().backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
    return {k: (v / (tokens.shape[0] * len(keep))).numpy() for k, v in sums.items()}


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_block_by_block_moments_are_the_whole_backward_pass_and_need_no_loaded_model(make, tmp_path):
    from ramp.models.loader import load_model

    make(seed=4).model.save_pretrained(str(tmp_path / "m"))
    full = load_model(tmp_path / "m", with_tokenizer=False)
    lazy = load_model(tmp_path / "m", with_tokenizer=False, lazy=True)
    tokens = _tokens(3, n_ctx=48)  # Gemma-3's sliding window of 16 < 48: per-layer masks are the model's own
    want = _whole_model_moments(full, tokens)
    for lm in (full, lazy):
        got = output_fisher(lm, tokens)
        assert set(got) == set(want)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-12 * want[name].max(), err_msg=name)
    assert all(p.is_meta for p in lazy.model.parameters())  # every block went back to the meta device


def test_fisher_table_is_in_the_units_of_the_measured_one_matrix_kld(tmp_path):
    lm = tiny_llama(seed=2, layers=3)
    tokens = _tokens(8)
    imatrix = calibrate(lm, tokens).imatrix()
    slots = slots_for(lm.matrices(), FORMATS)
    cache = QuantCache(tmp_path / "q")
    table = fisher_table(lm, slots, output_fisher(lm, tokens), imatrix, cache)
    assert set(table) == {(s.gguf_name, f) for s in slots for f in s.formats}
    # a format with less error costs less, matrix by matrix
    assert all(table[(n, "Q2_K")] > table[(n, "Q4_K")] > table[(n, "Q8_0")] for n in (s.gguf_name for s in slots))
    ref = fp_reference(lm, tokens[:4], top_k=16, n_tail=8)
    measured = measure_kld(lm, BlockRunner(lm, ref), slots, 1, cache, imatrix, progress=False)
    ratios = np.array([measured[k] / table[k] for k in measured])
    # the second-order estimate is the measured KLD up to the model's own noise: no gain fitted on this model
    assert 0.5 < float(np.median(ratios)) < 2.0
    assert float(np.mean(np.abs(np.log(ratios)) < np.log(3.0))) >= 0.75
    assert kl_divergence(lm, ref).mean == pytest.approx(0.0, abs=1e-6)  # the model is FP again


def test_fisher_table_names_a_matrix_it_cannot_price(tmp_path):
    lm = tiny_llama(seed=2, layers=2)
    tokens = _tokens(2)
    imatrix = calibrate(lm, tokens).imatrix()
    slots = slots_for(lm.matrices(), FORMATS)
    fisher = output_fisher(lm, tokens)
    name = slots[1].gguf_name
    with pytest.raises(ValueError, match=rf"{name}: no output-gradient moments or imatrix entry"):
        fisher_table(lm, slots, {k: v for k, v in fisher.items() if k != name}, imatrix, QuantCache(tmp_path / "q"))
    bad = {**fisher, name: fisher[name][:-1]}
    with pytest.raises(ValueError, match=rf"{name}: weights .* do not match"):
        fisher_table(lm, slots, bad, imatrix, QuantCache(tmp_path / "q"))
