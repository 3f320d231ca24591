"""Lazy models and block-by-block forward passes (ramp.models.stream): the same bits as the whole model, no weight
in memory until read, and clear errors on damaged files."""

import json
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from ramp.calib import calibrate
from ramp.gguf_export import export_gguf
from ramp.models.loader import ModelLoadError, load_model
from ramp.models.stream import (
    SafetensorsBytes,
    StreamError,
    block_forward,
    write_safetensors,
)
from ramp.models.tiny import tiny_gemma3, tiny_llama


def _tokens(vocab: int, n: int = 6, ctx: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (n, ctx), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def hf_dir(request, tmp_path_factory):
    lm = tiny_llama(seed=4) if request.param == "llama" else tiny_gemma3(seed=4)
    path = tmp_path_factory.mktemp(request.param) / "model"
    lm.model.save_pretrained(str(path))
    return path


def test_lazy_load_holds_no_weight_and_reads_the_same_values(hf_dir):
    full = load_model(hf_dir, with_tokenizer=False)
    lazy = load_model(hf_dir, with_tokenizer=False, lazy=True)
    assert lazy.lazy and not full.lazy
    assert all(p.is_meta for p in lazy.model.parameters())
    assert [(m.gguf_name, m.shape) for m in lazy.matrices()] == [(m.gguf_name, m.shape) for m in full.matrices()]
    for name, p in full.model.named_parameters():
        if name == "lm_head.weight" and full.config.tie_word_embeddings:
            continue
        assert torch.equal(lazy.weight(name), p.detach()), name
    with pytest.raises(ModelLoadError, match="no_such"):
        lazy.weight("model.no_such.weight")


def test_block_forward_gives_the_model_forward_bits(hf_dir):
    """Per-layer masks and rotary tables (Gemma-3's sliding window of 16 < 32 tokens) are those the model uses."""
    full = load_model(hf_dir, with_tokenizer=False)
    lazy = load_model(hf_dir, with_tokenizer=False, lazy=True)
    tokens = _tokens(full.config.vocab_size)
    with torch.inference_mode():
        body = full.model.model
        want = [body(input_ids=tokens[i : i + 4]).last_hidden_state for i in (0, 4)]
    for lm in (full, lazy):
        got = block_forward(lm.model, lm.store, tokens, batch_size=4)
        with torch.inference_mode():
            normed = [body.norm(h) for h in got]
        assert all(torch.equal(a, b) for a, b in zip(normed, want, strict=True))
    assert all(p.is_meta for p in lazy.model.parameters())  # every block went back to the meta device


def test_calibration_of_a_lazy_model_is_bit_identical(hf_dir):
    full = load_model(hf_dir, with_tokenizer=False)
    lazy = load_model(hf_dir, with_tokenizer=False, lazy=True)
    tokens = _tokens(full.config.vocab_size, n=5)
    a, b = calibrate(full, tokens, batch_size=2), calibrate(lazy, tokens, batch_size=2)
    cols = [c for c in a.table.columns if c != "gguf_name"]
    assert a.table[cols].equals(b.table[cols])
    for name in a.sum_sq:
        assert np.array_equal(a.sum_sq[name], b.sum_sq[name]) and np.array_equal(a.max_abs[name], b.max_abs[name])


def test_lazy_gguf_reads_dequantized_unpermuted_weights(tmp_path):
    lm = tiny_llama(seed=5)
    path = export_gguf(lm, tmp_path / "m.gguf", allocation={m.gguf_name: "Q8_0" for m in lm.matrices()})
    full = load_model(path, with_tokenizer=False)
    lazy = load_model(path, with_tokenizer=False, lazy=True)
    assert lazy.gguf_types == full.gguf_types
    for name, p in full.model.named_parameters():
        if name != "lm_head.weight":
            assert torch.equal(lazy.weight(name), p.detach()), name
    tokens = _tokens(512)
    a, b = calibrate(full, tokens, batch_size=3), calibrate(lazy, tokens, batch_size=3)
    assert np.array_equal(a.table["act_rms"].to_numpy(), b.table["act_rms"].to_numpy())


def test_non_finite_weight_is_named_when_read(tmp_path):
    lm = tiny_llama(seed=6)
    lm.model.save_pretrained(str(tmp_path / "m"))
    shard = tmp_path / "m" / "model.safetensors"
    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["model.layers.1.mlp.up_proj.weight"][3, 7] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, str(shard), metadata={"format": "pt"})
    lazy = load_model(tmp_path / "m", with_tokenizer=False, lazy=True)  # nothing read yet
    lazy.weight("model.layers.0.mlp.up_proj.weight")
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*NaN"):
        lazy.weight("model.layers.1.mlp.up_proj.weight")


def test_truncated_shard_is_one_error_naming_the_file(tmp_path):
    lm = tiny_llama(seed=7)
    lm.model.save_pretrained(str(tmp_path / "m"))
    shard = tmp_path / "m" / "model.safetensors"
    from ramp.models.stream import SafetensorsStore

    store = SafetensorsStore([shard])
    last = max(store.spans.values(), key=lambda s: s.offset)
    name = next(k for k, v in store.spans.items() if v is last)
    with open(shard, "r+b") as f:
        f.truncate(last.offset + 10)
    with pytest.raises(StreamError, match=r"model\.safetensors: file ends at byte"):
        SafetensorsStore([shard]).read(name)


def test_streamed_safetensors_round_trip_and_announced_shapes(tmp_path):
    arrays = [("a", np.arange(12, dtype=np.uint8).reshape(3, 4)), ("b", np.full((2, 5), 7, dtype=np.uint8))]
    specs = [(n, a.dtype, a.shape) for n, a in arrays]
    write_safetensors(tmp_path / "t.safetensors", specs, iter(arrays))
    with safe_open(str(tmp_path / "t.safetensors"), framework="np") as f:
        assert sorted(f.keys()) == ["a", "b"]
        assert all(np.array_equal(f.get_tensor(n), a) for n, a in arrays)
    lazy = SafetensorsBytes(tmp_path / "t.safetensors")
    assert "a" in lazy and "c" not in lazy and len(lazy) == 2
    assert np.array_equal(lazy["b"], arrays[1][1])
    wrong = [("a", np.uint8, (3, 4)), ("b", np.uint8, (2, 6))]
    with pytest.raises(StreamError, match=r"tensor 'b' uint8\[2, 5\] where 'b' uint8\[2, 6\] was announced"):
        write_safetensors(tmp_path / "u.safetensors", wrong, iter(arrays))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.safetensors"]  # nothing partial left behind


CHILD = """
import sys, torch
from ramp.models.loader import load_model
from ramp.models.stream import block_forward

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS, after the imports
base = status("VmRSS")
lm = load_model(sys.argv[1], with_tokenizer=False, lazy=sys.argv[2] == "lazy")
tokens = torch.randint(0, lm.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
block_forward(lm.model, lm.store, tokens, batch_size=2)
print(base, status("VmHWM"))
"""


def test_peak_memory_grows_with_one_block_not_the_model(tmp_path):
    """Models of 6 and 12 blocks of 15 MB: run lazily block by block, their peaks (fresh processes, peak reset after
    the imports) differ by less than one block; loaded whole, by about the six extra blocks."""
    from transformers import AutoModelForCausalLM

    from ramp.models.tiny import tiny_llama_config

    added: dict[tuple[str, int], int] = {}
    for layers in (6, 12):
        config = tiny_llama_config(hidden=512, intermediate=1792, layers=layers, heads=4, kv_heads=4, vocab=512)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(str(tmp_path / f"m{layers}"))
        block = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
        del model
        for mode in ("lazy", "full"):
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(tmp_path / f"m{layers}"), mode], capture_output=True, text=True
            )
            assert out.returncode == 0, out.stderr[-2000:]
            base, peak = (int(v) for v in out.stdout.split())
            added[(mode, layers)] = peak - base
    assert abs(added[("lazy", 12)] - added[("lazy", 6)]) < block, added
    assert added[("full", 12)] - added[("full", 6)] > 0.6 * 6 * block, added


def test_safetensors_header_is_little_endian_length_prefixed(tmp_path):
    write_safetensors(
        tmp_path / "t.safetensors", [("x", np.dtype(np.uint8), (1, 8))], iter([("x", np.zeros((1, 8), np.uint8))])
    )
    raw = (tmp_path / "t.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0 and json.loads(raw[8 : 8 + n])["x"]["data_offsets"] == [0, 8]


def test_kld_of_a_lazy_quantized_model_is_the_whole_model_bits(hf_dir):
    """FP reference and KLD of a lazy model (its quantized matrices dequantized from block bytes when read) equal those
    of the whole model with the same matrices swapped in."""
    from ramp.evaluate.kld import fp_reference, kl_divergence
    from ramp.models.loader import LoadedModel
    from ramp.models.stream import DequantizedStore
    from ramp.pipeline.evaluate import dequantized_model
    from ramp.pipeline.quantize import quantize_allocation
    from ramp.pipeline.workspace import gguf_heads

    full = load_model(hf_dir, with_tokenizer=False)
    lazy = load_model(hf_dir, with_tokenizer=False, lazy=True)
    tokens = _tokens(full.config.vocab_size, n=3, ctx=24, seed=2)
    ref = fp_reference(full, tokens, top_k=8, n_tail=8, batch_size=2)
    ref_lazy = fp_reference(lazy, tokens, top_k=8, n_tail=8, batch_size=2)
    for key in ("topk_logp", "topk_idx", "rest", "tail_idx", "tail_logp", "target"):
        assert torch.equal(getattr(ref, key), getattr(ref_lazy, key)), key
    types = {m.gguf_name: ("Q4_0" if m.block == 0 else "Q8_0") for m in full.matrices()}
    data = quantize_allocation(full, types, {})
    dequantized_model(full, data, types)
    matrices = {
        m.hf_name: (m.gguf_name, types[m.gguf_name], m.shape, gguf_heads(full, m.role)) for m in full.matrices()
    }
    store = DequantizedStore(lazy.store, matrices, {k: v.numpy() for k, v in data.items()})
    quant = LoadedModel(lazy.model, None, lazy.arch, lazy.source, store=store)
    a, b = kl_divergence(full, ref, batch_size=2), kl_divergence(quant, ref, batch_size=2)
    assert a.mean > 0 and (a.mean, a.ppl, a.top1) == (b.mean, b.ppl, b.top1)


def test_streamed_fold_writes_the_whole_model_fold_bits(hf_dir, tmp_path):
    """fold_to_file on a lazy model (one block in memory) writes exactly the weights fold_model gives the whole
    model, with the same report; the file loads as a folded model with the base's logits."""
    from ramp.folding import FoldingError, fold_model, fold_to_file, load_folded, save_folded

    full = load_model(hf_dir, with_tokenizer=False)
    tokens = _tokens(full.config.vocab_size)
    stats = calibrate(full, tokens)
    with torch.no_grad():
        for key in ("attn_norm", "ffn_norm"):  # outlier channels: folding has something to do
            full.model.get_parameter(full.arch.block_norms[key].at(0).hf)[:4] += 20.0
    full.model.save_pretrained(str(tmp_path / "src"))
    whole = load_model(tmp_path / "src", with_tokenizer=False)
    want = fold_model(whole, stats, alpha=0.5)
    lazy = load_model(tmp_path / "src", with_tokenizer=False, lazy=True)
    with pytest.raises(FoldingError, match="block by block with fold_to_file"):
        fold_model(lazy, stats, alpha=0.5)
    got = fold_to_file(lazy, stats, tmp_path / "folded.safetensors", alpha=0.5, extra={"alpha": 0.5})
    assert all(p.is_meta for p in lazy.model.parameters())  # nothing stayed in memory
    pd_equal = want.report.equals(got.report) and want.matrix_report.equals(got.matrix_report)
    assert pd_equal and set(want.scales) == set(got.scales)
    assert all(np.array_equal(want.scales[k], got.scales[k]) for k in want.scales)
    back = load_folded(tmp_path / "folded.safetensors", base=lazy)
    ref = save_folded(whole, tmp_path / "ref.safetensors", extra={"alpha": 0.5})
    ref_state = load_folded(ref).model.state_dict()
    state = back.model.state_dict()
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    with torch.no_grad():
        a = whole.model(input_ids=tokens[:2]).logits
        b = back.model(input_ids=tokens[:2]).logits
    assert torch.equal(a, b)
