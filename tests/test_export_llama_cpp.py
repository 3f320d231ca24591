"""Slow: an exported SmolLM2 GGUF is run by llama.cpp's own llama-perplexity (issue 8)."""

import pytest
import torch

from ramp.allocation import slots_for, uniform
from ramp.assets import asset_path
from ramp.data import wiki_split
from ramp.evaluate.perplexity import perplexity
from ramp.gguf_export import Provenance, export_gguf, export_model
from ramp.llamacpp import llama_kld, llama_kld_base
from ramp.models.loader import load_model

pytestmark = pytest.mark.slow
CHUNKS = 8  # 3 chunks gave 1.1 % apart (sampling noise of 768 tokens); 8 gave 0.5 % in bench-export


def test_llama_cpp_runs_our_export_and_agrees_with_torch(tmp_path, llama_cpp_bin):
    lm = load_model(asset_path("smollm2"))
    text = wiki_split(asset_path("wiki"))[1]
    text_file = tmp_path / "eval.txt"
    text_file.write_text(text, encoding="utf-8")
    f32 = export_gguf(lm, tmp_path / "f32.gguf", default_type="F32", embedding_type="F32")
    base = tmp_path / "base.kld"
    llama_kld_base(f32, text_file, base, n_ctx=512, chunks=CHUNKS)
    f32.unlink()

    slots = slots_for(lm.matrices())
    alloc = uniform(slots, "Q4_0")
    alloc.update({s.gguf_name: "Q3_K" for s in slots if s.role == "down"})
    budget = 91_726_912  # llama.cpp's Q4_0 file for SmolLM2 (SPEC §10)
    res = export_model(lm, tmp_path / "mix.gguf", allocation=alloc, provenance=Provenance(budget_file_bytes=budget))
    assert res.file_bytes <= budget
    ll = llama_kld(res.path, base)
    assert ll["warnings"] == []
    assert 0.0 < ll["kld_mean"] < 1.0 and 0.5 < ll["same_top_p"] <= 1.0
    # per-chunk means recovered from the running means: CHUNKS of them, averaging to llama.cpp's mean
    assert len(ll["kld_chunks"]) == CHUNKS and all(c > 0 for c in ll["kld_chunks"])
    assert sum(ll["kld_chunks"]) / CHUNKS == pytest.approx(ll["kld_mean"], abs=2e-5)
    back = load_model(res.path, with_tokenizer=False)
    ids = torch.tensor(lm.tokenizer(text, add_special_tokens=False).input_ids)
    ppl_torch = perplexity(back.model, ids, n_ctx=512, n_chunks=CHUNKS).ppl
    assert ppl_torch == pytest.approx(ll["ppl"], rel=0.01)
