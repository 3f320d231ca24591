"""The imatrix, Hugging Face and folded-model readers under fuzzing (issue 20): a seeded subset of every
generator in benchmarks/fuzz_readers.py run in isolated workers with zero defects, and the specific failures
the issue named (a scalar GGUF key turned ARRAY, struct.error and NaN in the legacy reader, a list config.json,
raw SafetensorErrors) each rejected with one project error naming the file."""

import json
import shutil
import struct

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks.fuzz import DEFECTS, Case, run_cases
from benchmarks.fuzz_readers import READERS, build_originals, reader_cases
from ramp.errors import RampError
from ramp.folding import FoldingError, load_folded
from ramp.imatrix import ImatrixError, read_imatrix_file
from ramp.models.loader import ModelLoadError, load_hf_dir

N_PER_READER = 40


@pytest.fixture(scope="module")
def originals(tmp_path_factory):
    return build_originals(tmp_path_factory.mktemp("fuzz_readers"))


def test_seeded_subset_has_no_defects(originals):
    cases = reader_cases(seed=0, n=N_PER_READER, workdir=originals.parent)
    report = run_cases(cases, timeout_s=60)
    summary = report.summary()
    assert sorted(summary) == sorted(READERS)
    for reader, row in summary.items():
        assert row["cases"] == N_PER_READER, reader
        assert {d: row[d] for d in DEFECTS} == dict.fromkeys(DEFECTS, 0), (reader, report.defects[:5])
        assert row["clean"] > 0 and row["valid"] > 0, (reader, row)  # both verdicts are exercised


def test_generators_are_seeded(originals, tmp_path):
    again = build_originals(tmp_path)
    a = [c.name for c in reader_cases(seed=3, n=10, workdir=originals.parent)]
    b = [c.name for c in reader_cases(seed=3, n=10, workdir=again.parent)]
    assert a == b
    assert a != [c.name for c in reader_cases(seed=4, n=10, workdir=again.parent)]


# ------------------------------------------------------------------------------------------------ imatrix


def _vtype_offset(raw: bytes, key: str) -> int:
    """Byte offset of ``key``'s value type in a GGUF file written by gguf-py."""
    needle = struct.pack("<Q", len(key)) + key.encode()
    return raw.index(needle) + len(needle)


def test_gguf_scalar_key_turned_array_is_rejected_without_hanging(originals, tmp_path):
    raw = (originals / "imatrix.gguf").read_bytes()
    b = bytearray(raw)
    struct.pack_into("<I", b, _vtype_offset(raw, "imatrix.chunk_count"), 9)  # UINT32 -> ARRAY
    path = tmp_path / "array.gguf"
    path.write_bytes(bytes(b))
    # gguf-py alone loops over ~8e18 array items here; the worker's timeout would call that a hang.
    report = run_cases([Case("imatrix", "array trick", "ramp.imatrix:read_imatrix", (str(path),))], timeout_s=60)
    assert report.summary()["imatrix"]["clean"] == 1, report.defects
    with pytest.raises(ImatrixError, match=r"array\.gguf: invalid GGUF"):
        read_imatrix_file(path)


def _legacy(name: bytes, ncall: int, values: list[float], nval: int | None = None, tail: bytes = b"") -> bytes:
    nval = len(values) if nval is None else nval
    raw = struct.pack("<ii", 1, len(name)) + name + struct.pack("<ii", ncall, nval)
    return raw + np.asarray(values, dtype="<f4").tobytes() + tail


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        (_legacy(b"blk.0.attn_q.weight", 5, [1.0, 2.0], nval=1000), r"1000 values of 'blk.0.attn_q.weight' claims"),
        (struct.pack("<ii", 1, 2**31 - 1) + bytes(20), r"name of entry #0 claims 2147483647 bytes, 20 left"),
        (_legacy(b"blk.0.attn_q.weight", 5, [1.0, 2.0])[:-3], r"2 values of 'blk.0.attn_q.weight' claims 8 bytes"),
        (struct.pack("<i", 2**30) + bytes(40), r"entry count 1073741824: expected 1 to 2 for the file's size"),
        (_legacy(b"blk.0.attn_q.weight", 5, [1.0, float("nan")]), r"'blk.0.attn_q.weight' holds nan"),
        (_legacy(b"blk.0.attn_q.weight", 5, [1.0, -2.0]), r"'blk.0.attn_q.weight' holds -2.0"),
        (_legacy(b"blk.0.attn_q.weight", 0, [1.0]), r"ncall=0, nval=1; expected both >= 1"),
        (_legacy(b"blk.0.attn_q.weight", 5, [1.0], tail=struct.pack("<ii", 5, 2) + b"wiki"), r"2 bytes of trailing"),
        (_legacy(b"blk.0.attn_q.weigh\xff", 5, [1.0]), r"name of entry #0 is not UTF-8"),
        (_legacy(b"blk.0.attn_qq.weight", 5, [1.0]), r"'blk.0.attn_qq.weight' is not a llama.cpp weight name"),
    ],
    ids=[
        "nval-past-end",
        "name-length",
        "truncated",
        "entry-count",
        "nan",
        "negative",
        "ncall-0",
        "trailing",
        "utf8",
        "name",
    ],
)
def test_legacy_reader_rejects_with_one_error(tmp_path, raw, match):
    path = tmp_path / "im.dat"
    path.write_bytes(raw)
    with pytest.raises(ImatrixError, match=match) as e:
        read_imatrix_file(path)
    assert str(e.value).startswith(str(path))


# ------------------------------------------------------------------------------------------------ Hugging Face


@pytest.fixture
def hf_dir(originals, tmp_path):
    d = tmp_path / "hf"
    shutil.copytree(originals / "hf_llama", d)
    return d


@pytest.mark.parametrize("text", ["[1, 2]", '"llama"', "3", "null"])
def test_config_that_is_not_an_object(hf_dir, text):
    (hf_dir / "config.json").write_text(text)
    with pytest.raises(ModelLoadError, match=r"config\.json: holds a JSON \w+, expected an object"):
        load_hf_dir(hf_dir, with_tokenizer=False)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda raw: raw[:100], r"model\.safetensors: corrupt safetensors file \(SafetensorError"),
        (lambda raw: struct.pack("<Q", 2**60) + raw[8:], r"model\.safetensors: corrupt safetensors file"),
        (lambda raw: raw[:8] + b"[" + raw[9:], r"model\.safetensors: corrupt safetensors file"),
        (lambda raw: raw + b"\0" * 4, r"model\.safetensors: corrupt safetensors file"),
        (lambda raw: b"", r"model\.safetensors: corrupt safetensors file"),
    ],
    ids=["truncated", "header-length", "header-json", "trailing", "empty"],
)
def test_safetensors_errors_name_the_shard(hf_dir, edit, match):
    shard = hf_dir / "model.safetensors"
    shard.write_bytes(edit(shard.read_bytes()))
    with pytest.raises(ModelLoadError, match=match):
        load_hf_dir(hf_dir, with_tokenizer=False)


def _edit_weights(hf_dir, edit):
    tensors = load_file(str(hf_dir / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})


Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda t: t[Q].view(-1).__setitem__(3, float("nan")), f"tensor '{Q}' holds NaN"),
        (lambda t: t.__setitem__(Q, t[Q][:-1].clone()), rf"'{Q}' has shape \[63, 64\], the config expects \[64, 64\]"),
        (lambda t: t.__setitem__(Q, t[Q].to(torch.int32)), f"'{Q}' has dtype I32"),
        (lambda t: t.pop(Q), f"tensors missing: \\['{Q}'\\]"),
        (lambda t: t.__setitem__("model.layers.0.extra", torch.ones(2)), "unexpected tensor 'model.layers.0.extra'"),
        (
            lambda t: t.__setitem__(Q.replace("0", "7"), t[Q].clone()),
            r"num_hidden_layers = 2 but the weights have 3 layers",
        ),
    ],
    ids=["nan", "shape", "dtype", "missing", "extra", "layers"],
)
def test_weights_are_checked_against_the_config(hf_dir, edit, match):
    _edit_weights(hf_dir, edit)
    with pytest.raises(ModelLoadError, match=match):
        load_hf_dir(hf_dir, with_tokenizer=False)


def test_tensor_in_two_shards(hf_dir):
    save_file({Q: load_file(str(hf_dir / "model.safetensors"))[Q]}, str(hf_dir / "model-2.safetensors"))
    with pytest.raises(ModelLoadError, match=f"tensor '{Q}' is also in model"):
        load_hf_dir(hf_dir, with_tokenizer=False)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        ({"num_key_value_heads": 3}, r"num_key_value_heads = 3: expected a positive divisor"),
        ({"rms_norm_eps": -1e-5}, r"rms_norm_eps = -1e-05"),
        ({"num_hidden_layers": 10**12}, r"num_hidden_layers = 1000000000000: expected an integer from 1 to"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, r"rope_theta = -1.0"),
        ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4, "rope_fator": 2}}, r"invalid rope_parameters"),
        ({"bos_token_id": 128}, r"bos_token_id = 128: expected null or token ids in \[0, vocab_size = 128\)"),
        ({"hidden_act": "nope"}, r"hidden_act = 'nope'"),
        ({"tie_word_embeddings": True}, r"tie_word_embeddings is true but lm_head.weight differs"),
        ({"hidden_size": None}, r"config\.json: invalid llama config"),
    ],
    ids=["kv-heads", "eps", "layers", "theta", "rope-key", "bos", "act", "tied", "type"],
)
def test_config_values_are_checked(hf_dir, edit, match):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(cfg | edit))
    with pytest.raises(ModelLoadError, match=match):
        load_hf_dir(hf_dir, with_tokenizer=False)


def test_config_missing_a_dimension_or_with_nan(hf_dir):
    cfg = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({k: v for k, v in cfg.items() if k != "intermediate_size"}))
    with pytest.raises(ModelLoadError, match="config lacks intermediate_size"):
        load_hf_dir(hf_dir, with_tokenizer=False)
    (hf_dir / "config.json").write_text(json.dumps(cfg | {"rms_norm_eps": float("nan")}))  # writes NaN
    with pytest.raises(ModelLoadError, match="NaN is not valid JSON"):
        load_hf_dir(hf_dir, with_tokenizer=False)


# ------------------------------------------------------------------------------------------------ folded


def test_folded_metadata_and_base_are_checked(originals, tmp_path):
    src = originals / "folded_llama.safetensors"
    tensors = load_file(str(src))
    good = load_folded(src)
    meta = {"ramp.config": json.dumps(good.config.to_dict()), "ramp.arch": "llama", "ramp.extra": '{"alpha": 2}'}
    save_file(tensors, str(tmp_path / "a.safetensors"), metadata=meta)
    with pytest.raises(FoldingError, match=r"a\.safetensors: metadata ramp.extra alpha = 2"):
        load_folded(tmp_path / "a.safetensors")
    save_file(tensors, str(tmp_path / "b.safetensors"), metadata=meta | {"ramp.config": "[]", "ramp.extra": "{}"})
    with pytest.raises(FoldingError, match=r"b\.safetensors metadata ramp.config: holds a JSON list"):
        load_folded(tmp_path / "b.safetensors")
    other = load_folded(originals / "folded_gemma3.safetensors")
    with pytest.raises(FoldingError, match="folded llama model, base is gemma3"):
        load_folded(src, base=other)
    bad = dict(tensors)
    bad[Q] = bad[Q].clone()
    bad[Q][0, 0] = float("inf")
    save_file(bad, str(tmp_path / "c.safetensors"), metadata=meta | {"ramp.extra": "{}"})
    with pytest.raises(FoldingError, match=f"c\\.safetensors: tensor '{Q}' holds NaN or infinite"):
        load_folded(tmp_path / "c.safetensors")
    (tmp_path / "d.safetensors").write_bytes(src.read_bytes()[:-3])
    with pytest.raises(FoldingError, match=r"d\.safetensors: corrupt safetensors file"):
        load_folded(tmp_path / "d.safetensors")
    for e in (FoldingError, ImatrixError, ModelLoadError):
        assert issubclass(e, RampError)
