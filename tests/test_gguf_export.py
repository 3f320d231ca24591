"""GGUF export: round trip, exact size accounting, provenance, read-back verification and bad input."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from ramp.allocation import matrix_bytes, slots_for, uniform
from ramp.formats import get_format
from ramp.gguf_export import ExportError, Provenance, export_gguf, export_model, file_overhead
from ramp.models.arch import ARCHS, permute_for_gguf
from ramp.models.loader import LoadedModel, load_model
from ramp.models.tiny import tiny_llama


def _mixed(lm):
    """A different legal type per role, so every family is written at least once."""
    by_role = {"q": "Q2_K", "k": "Q3_K", "v": "IQ4_NL", "o": "Q4_K", "gate": "Q5_0", "up": "Q6_K", "down": "Q8_0"}
    return {m.gguf_name: by_role[m.role] for m in lm.matrices()}


@pytest.fixture(scope="module")
def lm():
    return tiny_llama(seed=11)


def test_round_trip_gives_the_quantizers_weights_and_provenance(lm, tmp_path):
    alloc = _mixed(lm)
    prov = Provenance(policy_version="models:/ramp-policy/7", budget_file_bytes=10**9, method="test")
    res = export_model(lm, tmp_path / "m.gguf", allocation=alloc, provenance=prov)
    back = load_model(res.path, with_tokenizer=False)
    src = dict(lm.model.state_dict())
    got = dict(back.model.state_dict())
    for m in lm.matrices():
        w = src[m.hf_name]
        fmt = get_format(alloc[m.gguf_name])
        if m.role in ("q", "k"):  # quantized in llama.cpp's row order; rows are independent
            n_head = lm.config.num_attention_heads if m.role == "q" else lm.config.num_key_value_heads
            w_file = permute_for_gguf(w, n_head)
            want = fmt.dequantize(fmt.quantize(w_file), tuple(w_file.shape))
            assert torch.equal(permute_for_gguf(got[m.hf_name], n_head), want), m.gguf_name
        else:
            assert torch.equal(got[m.hf_name], fmt.dequantize(fmt.quantize(w), tuple(w.shape))), m.gguf_name
        assert res.tensors[m.gguf_name][0] == fmt.name
    for name in src:
        if "norm" in name:
            assert torch.equal(got[name], src[name]), name
    reader = gguf.GGUFReader(res.path)
    assert reader.fields["ramp.policy_version"].contents() == "models:/ramp-policy/7"
    assert reader.fields["ramp.budget_file_bytes"].contents() == 10**9
    assert reader.fields["ramp.allocation_hash"].contents() == res.allocation_hash
    assert reader.fields["general.quantization_version"].contents() == gguf.GGML_QUANT_VERSION


@pytest.mark.parametrize("fmt", ["Q4_0", "Q3_K", "F16"])
def test_file_size_is_overhead_plus_matrix_bytes(lm, tmp_path, fmt):
    slots = slots_for(lm.matrices())
    alloc = uniform(slots, fmt)
    res = export_model(lm, tmp_path / "m.gguf", allocation=alloc)
    assert res.file_bytes == os.path.getsize(res.path) == file_overhead(lm) + matrix_bytes(slots, alloc)


def test_prequantized_bytes_are_written_as_given(lm, tmp_path):
    alloc = _mixed(lm)
    name = "blk.1.ffn_down.weight"
    w = dict(lm.model.state_dict())["model.layers.1.mlp.down_proj.weight"]
    data = get_format("Q8_0").quantize(w)
    data[0, 2] ^= 1  # a marker: the exporter must not re-quantize what it was given
    res = export_model(lm, tmp_path / "m.gguf", allocation=alloc, tensor_data={name: data})
    stored = {t.name: t for t in gguf.GGUFReader(res.path).tensors}[name]
    assert np.array_equal(np.asarray(stored.data).reshape(data.shape), data)
    with pytest.raises(ExportError, match=r"blk.1.ffn_down.weight: pre-quantized data has shape \[511"):
        export_model(lm, tmp_path / "x.gguf", allocation=alloc, tensor_data={name: data[:-1]})


def test_budget_is_enforced_before_writing(lm, tmp_path):
    alloc = uniform(slots_for(lm.matrices()), "Q4_0")
    size = export_model(lm, tmp_path / "ok.gguf", allocation=alloc).file_bytes
    export_model(lm, tmp_path / "exact.gguf", allocation=alloc, provenance=Provenance(budget_file_bytes=size))
    with pytest.raises(ExportError, match=f"above the budget of {size - 1:,}"):
        export_model(lm, tmp_path / "over.gguf", allocation=alloc, provenance=Provenance(budget_file_bytes=size - 1))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exact.gguf", "ok.gguf"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (lambda a: a.pop("blk.0.attn_v.weight"), "without a format"),
        (lambda a: a.update({"blk.0.attn_q.weight": "Q7_K"}), "Q7_K"),
        (lambda a: a.update({"blk.5.attn_q.weight": "Q4_0"}), r"blk\.5\.attn_q"),
    ],
)
def test_bad_allocation_is_one_clear_error_and_no_file(lm, tmp_path, edit, match):
    alloc = _mixed(lm)
    edit(alloc)
    with pytest.raises(ExportError, match=match):
        export_gguf(lm, tmp_path / "x.gguf", allocation=alloc)
    assert list(tmp_path.iterdir()) == []


def test_illegal_format_for_shape_is_named(tmp_path):
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=288,
        intermediate_size=512,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=256,
    )
    lm = LoadedModel(LlamaForCausalLM(cfg).eval(), None, ARCHS["llama"], source=Path("<288-wide llama>"))
    alloc = {m.gguf_name: "Q4_K" if m.role == "down" else "Q4_0" for m in lm.matrices()}
    alloc["blk.0.attn_q.weight"] = "Q4_K"
    with pytest.raises(ExportError, match=r"blk.0.attn_q.weight: format 'Q4_K' is not legal for shape \[288, 288\]"):
        export_gguf(lm, tmp_path / "x.gguf", allocation=alloc)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_targets_leave_nothing(lm, tmp_path):
    with pytest.raises(OSError, match="does not exist"):
        export_gguf(lm, tmp_path / "missing" / "x.gguf")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions do not bind, the disk-full case covers it
            pass
        else:
            with pytest.raises(OSError):
                export_gguf(lm, ro / "x.gguf")
            assert list(ro.iterdir()) == []
    finally:
        ro.chmod(0o700)


def test_disk_full_leaves_no_partial_file(tmp_path):
    """A write limit (RLIMIT_FSIZE) makes the disk 'full' half-way through the file."""
    script = textwrap.dedent(
        f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        from ramp.models.tiny import tiny_llama
        from ramp.gguf_export import export_gguf
        lm = tiny_llama(seed=2)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))
        try:
            export_gguf(lm, {str(tmp_path / "full.gguf")!r}, default_type="Q8_0")
        except OSError as e:
            print(type(e).__name__, e)
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "OutputPathError" in out.stdout and "full.gguf: writing failed" in out.stdout, out.stdout + out.stderr
    assert list(tmp_path.iterdir()) == []
