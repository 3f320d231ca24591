"""Calibration statistics: exact sums against a direct computation, determinism, bad input, save/load."""

import numpy as np
import pytest
import torch

from ramp.assets import smollm2_gguf_path
from ramp.calib import CalibrationError, calibrate, calibration_tokens, load_stats, save_stats
from ramp.models.loader import LoadedModel, gguf_tokenizer
from ramp.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(seed=0, layers=2)


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 512, (3, 32), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def stats(lm, tokens):
    return calibrate(lm, tokens, batch_size=2)


def _with_tokenizer(lm: LoadedModel, add_bos: bool) -> LoadedModel:
    # The real SmolLM2 tokenizer on a tiny model: tokenization only, the model is never run.
    return LoadedModel(
        lm.model, gguf_tokenizer(smollm2_gguf_path()), lm.arch, lm.source, {"tokenizer.ggml.add_bos_token": add_bos}
    )


TEXT = "The quick brown fox jumps over the lazy dog. " * 40


@pytest.mark.parametrize("add_bos", [False, True])
def test_calibration_tokens_windows_and_bos(lm, add_bos):
    tlm = _with_tokenizer(lm, add_bos)
    ids = tlm.tokenizer(TEXT, add_special_tokens=False).input_ids
    windows = calibration_tokens(tlm, TEXT, n_tokens=64, n_ctx=16)
    assert windows.shape == (4, 16) and windows.dtype == torch.long
    expected = torch.tensor(ids[:64]).reshape(4, 16)
    if add_bos:
        expected[:, 0] = tlm.tokenizer.bos_token_id
    assert torch.equal(windows, expected)


def test_calibration_tokens_bad_input(lm):
    tlm = _with_tokenizer(lm, False)
    n = len(tlm.tokenizer(TEXT, add_special_tokens=False).input_ids)
    with pytest.raises(CalibrationError, match=rf"has {n} tokens, fewer than the {(n // 16 + 1) * 16} requested"):
        calibration_tokens(tlm, TEXT, n_tokens=(n // 16 + 1) * 16, n_ctx=16)
    with pytest.raises(CalibrationError, match="empty"):
        calibration_tokens(tlm, "  \n", n_tokens=16, n_ctx=16)
    with pytest.raises(CalibrationError, match="multiple of n_ctx=16"):
        calibration_tokens(tlm, TEXT, n_tokens=20, n_ctx=16)


def test_stats_match_direct_computation(lm, tokens, stats):
    body = lm.model.model
    with torch.no_grad():
        x = body.layers[0].input_layernorm(body.embed_tokens(tokens)).double().reshape(-1, 512)
    name = "blk.0.attn_q.weight"
    np.testing.assert_allclose(stats.sum_sq[name], (x * x).sum(0).numpy(), rtol=1e-10)
    np.testing.assert_allclose(stats.max_abs[name], x.abs().amax(0).numpy(), rtol=1e-12)
    assert stats.count[name] == tokens.numel()
    row = stats.row(name)
    v = x.reshape(-1).numpy()
    assert row.act_rms == pytest.approx(np.sqrt((v * v).mean()), rel=1e-10)
    assert row.act_crest == pytest.approx(np.abs(v).max() / np.sqrt((v * v).mean()), rel=1e-10)
    c = v - v.mean()
    assert row.act_kurtosis == pytest.approx((c**4).mean() / (c * c).mean() ** 2, rel=1e-8)
    chan = np.sqrt((x * x).mean(0).numpy())
    assert row.outlier_frac == pytest.approx((chan > 6 * np.median(chan)).mean())
    # q, k, v read the same input
    for r in ("k", "v"):
        np.testing.assert_array_equal(stats.sum_sq[f"blk.0.attn_{r}.weight"], stats.sum_sq[name])
    im = stats.imatrix()
    assert im[name].dtype == np.float32
    np.testing.assert_allclose(im[name], (x * x).mean(0).numpy(), rtol=1e-6)
    assert list(stats.table.gguf_name) == [m.gguf_name for m in lm.matrices()]


def test_outlier_channels_counted(lm, tokens):
    # Blow up 3 channels of block 1's input norm: q/k/v of block 1 see 3 outlier channels out of 512.
    norm = lm.model.model.layers[1].input_layernorm.weight
    saved = norm.detach().clone()
    try:
        with torch.no_grad():
            norm[:3] *= 100.0
        st = calibrate(lm, tokens, batch_size=3)
    finally:
        with torch.no_grad():
            norm.copy_(saved)
    assert st.row("blk.1.attn_q.weight").outlier_frac == pytest.approx(3 / 512)
    assert st.row("blk.0.attn_q.weight").outlier_frac == 0.0


def test_deterministic_and_batch_size_free(lm, tokens, stats):
    again = calibrate(lm, tokens, batch_size=2)
    for k in stats.sum_sq:
        np.testing.assert_array_equal(again.sum_sq[k], stats.sum_sq[k])
        np.testing.assert_array_equal(again.max_abs[k], stats.max_abs[k])
    one = calibrate(lm, tokens, batch_size=1)
    for k in stats.sum_sq:
        np.testing.assert_allclose(one.sum_sq[k], stats.sum_sq[k], rtol=1e-5)


def test_nan_activation_names_matrix(tokens):
    lm = tiny_llama(seed=3, layers=2)
    with torch.no_grad():
        lm.model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")
    with pytest.raises(CalibrationError, match=r"blk\.1\.attn_output\.weight"):
        calibrate(lm, tokens)
    # hooks are removed after the failure
    assert not lm.model.model.layers[0].self_attn.q_proj._forward_pre_hooks


def test_save_load_roundtrip(tmp_path, stats):
    out = save_stats(stats, tmp_path / "stats")
    back = load_stats(out)
    assert back.table.equals(stats.table)
    assert back.count == stats.count and back.meta == stats.meta
    for k in stats.sum_sq:
        np.testing.assert_array_equal(back.sum_sq[k], stats.sum_sq[k])
        np.testing.assert_array_equal(back.sum[k], stats.sum[k])
    import pyarrow.parquet as pq

    schema = pq.read_schema(out / "stats.parquet")
    assert str(schema.field("n_tokens").type) == "int64" and str(schema.field("act_rms").type) == "double"
    assert sorted(p.name for p in out.iterdir()) == ["channels.safetensors", "stats.parquet"]  # no temp files
    (out / "channels.safetensors").unlink()
    with pytest.raises(CalibrationError, match="channels.safetensors does not exist"):
        load_stats(out)


def test_a_given_imatrix_file_replaces_the_measured_one(lm, tokens, tmp_path):
    from ramp.imatrix import ImatrixError, write_imatrix
    from ramp.pipeline.calibrate import use_imatrix_file

    st = calibrate(lm, tokens, batch_size=2)
    measured = st.imatrix()
    given = {k: (v * 3.0 + 0.25).astype(np.float32) for k, v in measured.items()}
    write_imatrix(tmp_path / "given.gguf", given, n_chunks=5, dataset="other text")
    use_imatrix_file(st, tmp_path / "given.gguf")
    for name, v in st.imatrix().items():
        np.testing.assert_allclose(v, given[name], rtol=1e-6)
    assert not np.allclose(st.imatrix()[next(iter(given))], measured[next(iter(given))])
    # an entry missing, or one of another width (another model's imatrix), is refused naming the matrix
    name = sorted(given)[0]
    write_imatrix(tmp_path / "short.gguf", {k: v for k, v in given.items() if k != name}, n_chunks=5, dataset="t")
    with pytest.raises(ImatrixError, match=f"no entry for {name}"):
        use_imatrix_file(calibrate(lm, tokens, batch_size=2), tmp_path / "short.gguf")
    write_imatrix(tmp_path / "wide.gguf", {**given, name: np.ones(7, np.float32)}, n_chunks=5, dataset="t")
    with pytest.raises(ImatrixError, match=f"{name} has 7 columns"):
        use_imatrix_file(calibrate(lm, tokens, batch_size=2), tmp_path / "wide.gguf")
