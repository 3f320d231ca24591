"""A Hugging Face directory exported by RAMP runs in llama.cpp exactly like llama.cpp's own conversion (issue 18)."""

import json
import shutil

import gguf
import pytest

from ramp.assets import asset_path
from ramp.data import wiki_split
from ramp.gguf_export import export_model
from ramp.hf_vocab import VocabError, convert_hf, structural_pre, vocab_metadata
from ramp.llamacpp import llama_perplexity, llama_quantize
from ramp.models.loader import load_model
from ramp.models.tiny import tiny_llama
from ramp.testbed import train_tokenizer, training_text

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama with a byte-level BPE tokenizer of its own (llama.cpp does not know its pre-tokenizer hash)."""
    d = tmp_path_factory.mktemp("hf") / "tiny"
    tok = train_tokenizer(training_text(max_chars=400_000), 512)
    lm = tiny_llama(seed=7, hidden=256, intermediate=512, vocab=512)
    lm.model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_unknown_pre_tokenizer_is_one_clear_error_naming_the_fix(tmp_path, hf_dir):
    # a byte-level BPE that adds a prefix space: neither the converter's hash nor RAMP's structural check knows it
    odd = tmp_path / "odd"
    shutil.copytree(hf_dir, odd)
    spec = json.loads((odd / "tokenizer.json").read_text())
    spec["pre_tokenizer"]["add_prefix_space"] = True
    (odd / "tokenizer.json").write_text(json.dumps(spec))
    assert structural_pre(odd) == "" and structural_pre(hf_dir) == "gpt-2"
    with pytest.raises(VocabError, match=r"pre-tokenizer was not recognized.*tokenizer_pre"):
        vocab_metadata(odd)


def test_a_pre_tokenizer_llama_cpp_does_not_know_is_refused(hf_dir):
    with pytest.raises(VocabError, match=r"'gpt2' is not a pre-tokenizer llama.cpp knows \(did you mean gpt-2"):
        vocab_metadata(hf_dir, "gpt2")


def test_export_matches_llama_cpp_conversion(tmp_path, hf_dir, llama_cpp_bin):
    keys = dict((k, v) for k, v, *_ in vocab_metadata(hf_dir))  # the structural check names gpt-2
    assert keys["tokenizer.ggml.pre"] == "gpt-2" and len(keys["tokenizer.ggml.tokens"]) == 512

    ours = export_model(load_model(hf_dir), tmp_path / "ours.gguf", default_type="Q8_0").path
    ref_f32 = convert_hf(hf_dir, tmp_path / "ref-f32.gguf", "f32", tokenizer_pre="gpt-2")
    ref = llama_quantize(ref_f32, tmp_path / "ref-q8_0.gguf", "Q8_0", extra_args=["--pure"])

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(ref)
    ref_tok = {k: f.contents() for k, f in b.fields.items() if k.startswith("tokenizer.")}
    assert {k: f.contents() for k, f in a.fields.items() if k.startswith("tokenizer.")} == ref_tok
    ta = {t.name: (t.tensor_type.name, bytes(t.data)) for t in a.tensors}
    tb = {t.name: (t.tensor_type.name, bytes(t.data)) for t in b.tensors}
    assert ta.keys() == tb.keys()
    assert ta == tb  # RAMP's Q8_0 quantizer and permutations give llama.cpp's bytes

    text = tmp_path / "eval.txt"
    text.write_text(wiki_split(asset_path("wiki"))[1][:60_000], encoding="utf-8")
    ppl_ours = llama_perplexity(ours, text, n_ctx=128, chunks=4)
    ppl_ref = llama_perplexity(ref, text, n_ctx=128, chunks=4)
    assert ppl_ours == pytest.approx(ppl_ref, rel=1e-6)
    assert 1 < ppl_ours < 1e4
