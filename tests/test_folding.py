"""Scale Folding: exact in fp32 (tiny Llama with GQA, tiny Gemma-3 with its 1 + w norms and q/k norms,
SmolLM2), GQA-tied scales, the folded imatrix, save/load."""

import numpy as np
import pytest
import torch

from ramp.calib import calibrate
from ramp.folding import FoldingError, fold_model, folded_imatrix, load_folded, save_folded
from ramp.models.arch import FoldGroup
from ramp.models.tiny import tiny_gemma3, tiny_llama

TOKENS = torch.randint(0, 512, (2, 48), generator=torch.Generator().manual_seed(0))


def _logits(lm):
    with torch.no_grad():
        return lm.model(input_ids=TOKENS).logits


def _outlier_channels(lm, block=0):
    # Make a few input channels of every norm large, as real LLMs have: folding then has something to do.
    with torch.no_grad():
        for key in ("attn_norm", "ffn_norm"):
            lm.model.get_parameter(lm.arch.block_norms[key].at(block).hf)[:4] += 20.0


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
@pytest.mark.parametrize("alpha", [0.3, 0.5, 0.8])
def test_fold_is_exact(make, alpha):
    lm = make(seed=0)
    _outlier_channels(lm)
    ref = _logits(lm)
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    res = fold_model(lm, calibrate(lm, TOKENS), alpha=alpha, errors=False)
    new = _logits(lm)
    assert (new - ref).abs().max() < 1e-3
    assert torch.equal(new.argmax(-1), ref.argmax(-1))
    # something actually moved: every target's columns and every source changed
    after = lm.model.state_dict()
    assert not torch.equal(
        after[lm.arch.block_norms["attn_norm"].at(0).hf], before[lm.arch.block_norms["attn_norm"].at(0).hf]
    )
    assert len(res.scales) == 7 * lm.config.num_hidden_layers  # every matrix is a target of one group
    assert set(res.report.group) == {"attn_norm->q,k,v", "ffn_norm->gate,up", "v->o", "up->down"}


def test_gqa_tied_scales_and_folded_imatrix():
    lm = tiny_llama(seed=1)  # 4 query heads, 2 KV heads, head_dim 128
    _outlier_channels(lm)
    stats = calibrate(lm, TOKENS)
    res = fold_model(lm, stats, alpha=0.5, errors=False)
    s_o = res.scales["blk.0.attn_output.weight"].reshape(4, 128)
    np.testing.assert_array_equal(s_o[0], s_o[1])  # heads 0, 1 share KV head 0
    np.testing.assert_array_equal(s_o[2], s_o[3])
    assert not np.array_equal(s_o[0], s_o[2])
    # q, k, v share one scale
    np.testing.assert_array_equal(res.scales["blk.0.attn_q.weight"], res.scales["blk.0.attn_v.weight"])
    # the folded model's own imatrix equals imatrix / s^2
    expected = folded_imatrix(stats.imatrix(), res.scales)
    measured = calibrate(lm, TOKENS).imatrix()
    for name in expected:
        np.testing.assert_allclose(measured[name], expected[name], rtol=2e-3)


def test_report_and_outlier_benefit():
    lm = tiny_llama(seed=2)
    for b in range(lm.config.num_hidden_layers):
        _outlier_channels(lm, b)
    res = fold_model(lm, calibrate(lm, TOKENS), alpha=0.5)
    r = res.report
    assert list(r.columns) == ["block", "group", "targets", "s_min", "s_max", "s_median", "err_before", "err_after"]
    assert len(r) == 8 and (r.s_min > 0).all() and (r.s_max >= r.s_min).all()
    assert np.isfinite(r[["err_before", "err_after"]].to_numpy()).all()
    # with outlier input channels, folding lowers the weighted 3-bit error of the norm-fed groups
    norm_groups = r[r.group.str.contains("norm")]
    assert (norm_groups.err_after < norm_groups.err_before).all()
    assert len(res.matrix_report) == 14


def test_bad_input():
    lm = tiny_llama(seed=0)
    stats = calibrate(lm, TOKENS)
    with pytest.raises(FoldingError, match="alpha=1.5"):
        fold_model(lm, stats, alpha=1.5)
    with pytest.raises(FoldingError, match="'nope'"):
        fold_model(lm, stats, groups=(FoldGroup("nope", ("q",)),), errors=False)
    lm2 = tiny_llama(seed=0)
    with pytest.raises(FoldingError, match="two fold groups"):
        fold_model(lm2, stats, groups=(FoldGroup("attn_norm", ("q",)), FoldGroup("attn_norm", ("q",))), errors=False)
    with pytest.raises(FoldingError, match="missing from the imatrix"):
        folded_imatrix({}, {"blk.0.attn_q.weight": np.ones(4)})


def test_save_load_roundtrip(tmp_path):
    lm = tiny_gemma3(seed=3)
    fold_model(lm, calibrate(lm, TOKENS), alpha=0.5, errors=False)
    path = save_folded(lm, tmp_path / "folded.safetensors", extra={"alpha": 0.5})
    assert [p.name for p in tmp_path.iterdir()] == ["folded.safetensors"]
    back = load_folded(path, base=lm)
    assert torch.equal(_logits(back), _logits(lm))
    assert load_folded(path).arch.gguf_arch == "gemma3"
    with pytest.raises(FoldingError, match="no such"):
        load_folded(tmp_path / "missing.safetensors")


@pytest.mark.slow
def test_smollm2_fold_exact():
    from ramp.assets import asset_path, smollm2_gguf_path
    from ramp.calib import calibration_tokens
    from ramp.data import wiki_split
    from ramp.models.loader import load_model

    lm = load_model(smollm2_gguf_path())
    calib_text, eval_text = wiki_split(asset_path("wiki"))
    stats = calibrate(lm, calibration_tokens(lm, calib_text[:20_000], 4 * 128, 128), batch_size=2)
    tokens = calibration_tokens(lm, eval_text[:20_000], 3 * 128, 128)
    with torch.no_grad():
        ref = lm.model(input_ids=tokens).logits
    res = fold_model(lm, stats, alpha=0.5, errors=False)
    with torch.no_grad():
        new = lm.model(input_ids=tokens).logits
    assert (new - ref).abs().max() < 1e-3
    assert torch.equal(new.argmax(-1), ref.argmax(-1))
    assert res.report.s_max.max() > 1.0
