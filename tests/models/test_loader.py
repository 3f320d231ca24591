"""Model loading: HF directories, GGUF files (permutation round trip), bad input, real SmolLM2/Gemma-3."""

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from ramp.assets import asset_path
from ramp.gguf_export import export_gguf
from ramp.models.arch import ARCHS, UnsupportedArchitecture, permute_for_gguf, unpermute_from_gguf
from ramp.models.loader import ModelLoadError, load_model
from ramp.models.tiny import tiny_llama


def _logits(model: torch.nn.Module, seed: int = 0, vocab: int = 512) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_tiny_model_is_seeded_and_fast():
    a, b, c = tiny_llama(seed=1), tiny_llama(seed=1), tiny_llama(seed=2)
    assert torch.equal(_logits(a.model), _logits(b.model))
    assert not torch.equal(_logits(a.model), _logits(c.model))
    assert all(m.shape[0] % 256 == 0 and m.shape[1] % 256 == 0 for m in a.matrices())


def test_hf_directory_round_trip_gives_identical_logits(tmp_path):
    lm = tiny_llama(seed=3)
    lm.model.save_pretrained(tmp_path / "tiny")
    back = load_model(tmp_path / "tiny")
    assert back.arch.gguf_arch == "llama"
    assert torch.equal(_logits(lm.model), _logits(back.model))


@pytest.mark.parametrize("n_head", [1, 3, 4])
def test_permutation_inverts(n_head):
    w = torch.randn(n_head * 8, 16)
    assert torch.equal(unpermute_from_gguf(permute_for_gguf(w, n_head), n_head), w)
    assert torch.equal(permute_for_gguf(unpermute_from_gguf(w, n_head), n_head), w)
    assert not torch.equal(permute_for_gguf(w, n_head), w)


def test_gguf_round_trip_permutes_q_and_k(tmp_path):
    lm = tiny_llama(seed=4)
    path = export_gguf(lm, tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(path)
    stored = {t.name: t for t in reader.tensors}
    q_hf = lm.model.model.layers[0].self_attn.q_proj.weight.detach()
    q_file = np.asarray(stored["blk.0.attn_q.weight"].data).reshape(q_hf.shape)
    # The file holds llama.cpp's row order, not the HF one ...
    assert torch.equal(torch.from_numpy(q_file.copy()), permute_for_gguf(q_hf, lm.config.num_attention_heads))
    assert not torch.equal(torch.from_numpy(q_file.copy()), q_hf)
    # ... and loading undoes it exactly.
    back = load_model(path, with_tokenizer=False)
    assert torch.equal(_logits(lm.model), _logits(back.model))
    for name, p in lm.model.state_dict().items():
        assert torch.equal(p, back.model.state_dict()[name]), name


def test_missing_path_names_it(tmp_path):
    with pytest.raises(ModelLoadError, match="nope.gguf: no such file"):
        load_model(tmp_path / "nope.gguf")


def test_non_gguf_file_names_it(tmp_path):
    p = tmp_path / "model.gguf"
    p.write_bytes(b"PK\x03\x04 this is a zip, not a gguf")
    with pytest.raises(ModelLoadError, match=r"model.gguf: not a GGUF file .*expected b'GGUF'"):
        load_model(p)


def test_truncated_gguf_names_it(tmp_path):
    full = export_gguf(tiny_llama(seed=5), tmp_path / "full.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 3])
    with pytest.raises(ModelLoadError, match="cut.gguf: invalid GGUF: .*past the end of the file"):
        load_model(cut)


def test_unsupported_architecture_names_it(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedArchitecture, match=r"mamba.gguf: architecture 'mamba' is not supported"):
        load_model(tmp_path / "mamba.gguf")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text('{"model_type": "mamba"}')
    with pytest.raises(UnsupportedArchitecture, match="model_type 'mamba' is not supported"):
        load_model(tmp_path / "hf")


def test_smollm2_loads_with_expected_structure():
    lm = load_model(asset_path("smollm2"))
    mats = lm.matrices()
    assert len(mats) == 30 * 7
    assert lm.config.num_hidden_layers == 30
    assert {m.shape for m in mats if m.role == "down"} == {(576, 1536)}
    assert {m.shape for m in mats if m.role in ("k", "v")} == {(192, 576)}
    ids = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1] :])


@pytest.mark.slow
def test_gemma3_loads_with_sensible_perplexity():
    from ramp.data import wiki_split
    from ramp.evaluate.perplexity import perplexity

    lm = load_model(asset_path("gemma3"))
    assert lm.arch is ARCHS["gemma3"] and lm.add_bos
    assert len(lm.matrices()) == 18 * 7
    ids = torch.tensor(lm.tokenizer(wiki_split(asset_path("wiki"))[1]).input_ids[:1024])
    assert ids[0].item() == lm.tokenizer.bos_token_id
    # ASSETS.md: transformers' own GGUF loader gives ppl ~19 on 1,024 held-out tokens; a wrong norm offset,
    # rope base or attention pattern sends this into the hundreds.
    res = perplexity(lm.model, ids, n_ctx=1024, n_chunks=1, full_window=True)
    assert 10 < res.ppl < 25, res.ppl


def test_export_rejects_bad_allocation(tmp_path):
    from ramp.gguf_export import ExportError

    lm = tiny_llama(seed=6)
    with pytest.raises(ExportError, match="blk.9.attn_q.weight"):
        export_gguf(lm, tmp_path / "x.gguf", allocation={"blk.9.attn_q.weight": "Q4_0"})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError, match="does not exist"):
        export_gguf(lm, Path(tmp_path / "missing" / "x.gguf"))


def test_describe_model_reads_headers_only(tmp_path):
    from ramp.models.loader import describe_model

    lm = tiny_llama(seed=9, tied=True)
    g = export_gguf(lm, tmp_path / "m.gguf", default_type="Q8_0")
    lm.model.save_pretrained(tmp_path / "hf")
    for path in (g, tmp_path / "hf"):
        full = load_model(path, with_tokenizer=False)
        info = describe_model(path)
        assert info.matrices == full.matrices() and info.blocks == 2 and info.arch is full.arch
        assert info.parameters == sum(p.numel() for p in full.model.parameters())
    # weights are never read: NaN data still describes, but does not load
    data = bytearray(g.read_bytes())
    norm = next(t for t in gguf.GGUFReader(g).tensors if t.name == "output_norm.weight")
    data[int(norm.data_offset) : int(norm.data_offset) + 4] = np.float32("nan").tobytes()
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    assert describe_model(bad).parameters == info.parameters
    with pytest.raises(ModelLoadError, match="output_norm.weight.*NaN"):
        load_model(bad, with_tokenizer=False)
