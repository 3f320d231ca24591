"""The 11-feature layer embedding: finite, ordered, scale-free where it should be; the standardizer."""

import json
import math

import numpy as np
import pytest
import torch

from ramp.calib import calibrate
from ramp.features import (
    FEATURES,
    FeatureError,
    Standardizer,
    layer_embedding,
    reference_format,
    weighted_rel_error,
)
from ramp.models.arch import ROLES
from ramp.models.tiny import tiny_llama

TOKENS = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def lm_stats():
    lm = tiny_llama(seed=0, layers=2)
    return lm, calibrate(lm, TOKENS)


@pytest.fixture(scope="module")
def table(lm_stats):
    lm, stats = lm_stats
    return layer_embedding(lm, stats)


def test_eleven_finite_features_in_order(lm_stats, table):
    lm, _ = lm_stats
    assert len(FEATURES) == 11
    assert list(table.columns[6:17]) == list(FEATURES)
    assert list(table.gguf_name) == [m.gguf_name for m in lm.matrices()]
    assert np.isfinite(table[list(FEATURES)].to_numpy()).all()
    assert (table.ref_format == "Q3_K").all()  # tiny dims are multiples of 256
    assert table.depth.tolist() == [0.0] * 7 + [1.0] * 7
    assert table.layer_type.tolist()[:7] == [i / 6 for i in range(len(ROLES))]
    assert table.rel_size.max() == 1.0 and table.rel_size.min() == pytest.approx(0.25)
    assert (table.ref_rel_err > 0).all() and (table.ref_rel_err < 0.1).all()


def test_reference_format_table():
    assert reference_format((576, 1536)) == "Q3_K"
    assert reference_format((192, 576)) == "Q4_0"  # SmolLM2 attn_k: no K-quants
    assert reference_format((8, 48)) == "F16"  # no 32-block either: lowest-bpw legal choice


def test_weighted_error_orders_formats_and_uses_imatrix():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0))
    im = np.ones(256, dtype=np.float32)
    im[:8] = 1000.0
    e3, e8 = weighted_rel_error(w, im, "Q3_K"), weighted_rel_error(w, im, "Q8_0")
    assert e8 < e3 / 50
    # the imatrix steers Q3_K: weighted error with it is below that of the plain quantizer on the same weighting
    from ramp.formats import get_format

    q = get_format("Q3_K")
    plain = q.dequantize(q.quantize(w, None), (64, 256))
    e_plain = float((torch.as_tensor(im).double() * ((w - plain).double() ** 2).sum(0)).sum()) / float(
        (torch.as_tensor(im).double() * (w.double() ** 2).sum(0)).sum()
    )
    assert e3 < e_plain


@pytest.mark.parametrize("factor", [10.0, 8.0])
def test_scale_free(lm_stats, table, factor):
    """Weights x c (activation stats held fixed): 6, 7, 9, 10, 11 unchanged; 5 shifts by log c; 8 unchanged up
    to fp16 block-scale rounding (exactly for a power of two); 1-4 depend on activations only."""
    lm, stats = lm_stats
    scaled = tiny_llama(seed=0, layers=2)
    with torch.no_grad():
        for m in scaled.matrices():
            scaled.model.get_parameter(m.hf_name).mul_(factor)
    t2 = layer_embedding(scaled, stats)
    for f in ("act_log_rms", "act_crest", "act_kurtosis", "act_outlier_frac", "depth", "layer_type", "rel_size"):
        np.testing.assert_array_equal(t2[f], table[f])
    exact = factor == 8.0  # x10 rounds each fp32 weight; x8 is exact
    for f in ("w_kurtosis", "w_crest"):
        np.testing.assert_allclose(t2[f], table[f], rtol=1e-12 if exact else 1e-6)
    np.testing.assert_allclose(t2.w_log_std - table.w_log_std, math.log(factor), rtol=1e-9 if exact else 1e-6)
    rtol = 1e-9 if exact else 2e-2
    np.testing.assert_allclose(t2.ref_rel_err, table.ref_rel_err, rtol=rtol)


def test_standardizer_fit_transform_json(table):
    st = Standardizer().fit(table)
    x = st.transform(table)
    assert x.shape == (14, 11) and x.dtype == np.float32
    varying = table[list(FEATURES)].std(ddof=0).to_numpy() > 0
    np.testing.assert_allclose(x.mean(0), 0, atol=1e-5)
    np.testing.assert_allclose(x.std(0)[varying], 1, rtol=1e-4)
    back = Standardizer.from_dict(json.loads(json.dumps(st.to_dict())))
    np.testing.assert_array_equal(back.transform(table), x)
    # another model is transformed with the training statistics, not its own
    other = table.copy()
    other["w_log_std"] += 1.0
    assert back.transform(other)[:, FEATURES.index("w_log_std")].mean() == pytest.approx(
        1.0 / st.std["w_log_std"], rel=1e-4
    )
    with pytest.raises(FeatureError, match="act_kurtosis"):
        st.transform(table.drop(columns=["act_kurtosis"]))
    with pytest.raises(FeatureError, match="not fitted"):
        Standardizer().transform(table)
    bad = table.copy()
    bad.loc[0, "w_crest"] = float("nan")
    with pytest.raises(FeatureError, match="w_crest"):
        st.transform(bad)


def test_missing_stats_named(lm_stats):
    lm, stats = lm_stats
    im = stats.imatrix()
    del im["blk.1.ffn_down.weight"]
    with pytest.raises(FeatureError, match=r"blk\.1\.ffn_down\.weight"):
        layer_embedding(lm, stats, im)


def _real_model_check(path, n_ctx):
    from ramp.assets import asset_path
    from ramp.calib import calibration_tokens
    from ramp.data import wiki_split
    from ramp.models.loader import load_model

    lm = load_model(path)
    text = wiki_split(asset_path("wiki"))[0][:20_000]
    stats = calibrate(lm, calibration_tokens(lm, text, 2 * n_ctx, n_ctx), batch_size=2)
    t = layer_embedding(lm, stats)
    assert len(t) == len(lm.matrices())
    assert np.isfinite(t[list(FEATURES)].to_numpy()).all()
    return t


@pytest.mark.slow
def test_smollm2_embedding():
    from ramp.assets import smollm2_gguf_path

    t = _real_model_check(smollm2_gguf_path(), 128)
    assert set(t[t.role == "down"].ref_format) == {"Q3_K"} and set(t[t.role != "down"].ref_format) == {"Q4_0"}


@pytest.mark.slow
def test_gemma3_embedding():
    from ramp.assets import gemma3_gguf_path

    t = _real_model_check(gemma3_gguf_path(), 128)
    assert set(t[t.role.isin(["o", "down"])].ref_format) == {"Q3_K"}
