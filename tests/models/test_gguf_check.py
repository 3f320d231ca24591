"""The GGUF reader refuses corrupt files in one clear error before trusting any number in them (issue 20)."""

import struct

import gguf
import pytest

from benchmarks.fuzz import run_cases
from benchmarks.fuzz_gguf import cases, original, spans
from ramp.errors import RampError
from ramp.gguf_check import validate_gguf
from ramp.models.loader import ModelLoadError, load_gguf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return original(tmp_path_factory.mktemp("gguf"))


def _mutant(tmp_path, orig, edit, name="m.gguf"):
    b = bytearray(orig.read_bytes())
    edit(b, spans(bytes(b)))
    p = tmp_path / name
    p.write_bytes(bytes(b))
    return p


def test_original_loads_and_validates(tiny):
    layout = validate_gguf(tiny)
    assert layout.scalars["general.architecture"] == "llama"
    assert {t.type_name for t in layout.tensors} == {"Q4_0", "Q8_0", "F32"}
    assert load_gguf(tiny, with_tokenizer=False).config.num_hidden_layers == 2


def test_scalar_key_turned_array_is_refused_at_once(tmp_path, tiny):
    # gguf-py alone loops over ~8e18 items on this file
    p = _mutant(tmp_path, tiny, lambda b, s: struct.pack_into("<I", b, s.kv_type["general.architecture"], 9))
    with pytest.raises(ModelLoadError, match=r"m.gguf: invalid GGUF: .*general.architecture"):
        load_gguf(p, with_tokenizer=False)


def test_f16_data_relabelled_is_refused(tmp_path, tiny):
    # a matrix's type byte changed in place from Q4_0 to Q8_0: the data layout no longer adds up
    layout = validate_gguf(tiny)
    index = next(i for i, t in enumerate(layout.tensors) if t.type_name == "Q4_0")

    def edit(b, s):
        types = [pos for what, pos, _ in s.tensor_fields if what == "type"]
        struct.pack_into("<I", b, types[index], int(gguf.GGMLQuantizationType.Q8_0))

    with pytest.raises(ModelLoadError, match=r"(gap|overlaps|past the end|after the last)"):
        load_gguf(_mutant(tmp_path, tiny, edit), with_tokenizer=False)


def test_tensor_count_one_short_is_refused(tmp_path, tiny):
    def edit(b, s):
        (n,) = struct.unpack_from("<Q", b, 8)
        struct.pack_into("<Q", b, 8, n - 1)

    with pytest.raises(ModelLoadError, match="invalid GGUF"):
        load_gguf(_mutant(tmp_path, tiny, edit), with_tokenizer=False)


def test_overlapping_offsets_are_refused(tmp_path, tiny):
    def edit(b, s):
        offsets = [pos for what, pos, _ in s.tensor_fields if what == "offset"]
        struct.pack_into("<Q", b, offsets[1], struct.unpack_from("<Q", b, offsets[0])[0])

    with pytest.raises(ModelLoadError, match="overlaps|gap"):
        load_gguf(_mutant(tmp_path, tiny, edit), with_tokenizer=False)


def _rewrite(tmp_path, tiny, key, value, vtype):
    reader = gguf.GGUFReader(tiny)
    p = tmp_path / "rewritten.gguf"
    w = gguf.GGUFWriter(p, arch="llama")
    for k, f in reader.fields.items():
        if k.startswith("GGUF.") or k == "general.architecture":
            continue
        if k == key:
            w.add_key_value(k, value, vtype)
        elif f.types[0] == gguf.GGUFValueType.ARRAY:
            w.add_array(k, f.contents())
        else:
            w.add_key_value(k, f.contents(), f.types[0])
    for t in reader.tensors:
        w.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p


U32, F32 = gguf.GGUFValueType.UINT32, gguf.GGUFValueType.FLOAT32


@pytest.mark.parametrize(
    ("key", "value", "vtype", "match"),
    [
        ("llama.block_count", 10**6, U32, "block_count"),
        ("llama.block_count", 3, U32, "block_count = 3"),
        ("llama.attention.head_count", 0, U32, "head_count"),
        ("llama.attention.head_count", 3, U32, "hyperparameters rejected|num_attention_heads"),
        ("llama.attention.head_count_kv", 3, U32, "num_key_value_heads"),
        ("llama.attention.key_length", 0, U32, "key_length"),
        ("llama.attention.layer_norm_rms_epsilon", -1e-5, F32, "rms_norm_eps"),
        ("llama.attention.layer_norm_rms_epsilon", float("nan"), F32, "not finite"),
        ("llama.rope.freq_base", float("inf"), F32, "not finite"),
        ("llama.rope.freq_base", -1.0, F32, "rope_theta"),
        ("llama.embedding_length", 257, U32, "shape|hidden"),
        ("llama.block_count", "2", gguf.GGUFValueType.STRING, "block_count"),
    ],
)
def test_bad_hyperparameters_give_one_clear_error(tmp_path, tiny, key, value, vtype, match):
    p = _rewrite(tmp_path, tiny, key, value, vtype)
    with pytest.raises(ModelLoadError, match=match) as e:
        load_gguf(p, with_tokenizer=False)
    assert str(p) in str(e.value)


def test_seeded_fuzz_subset_has_no_defects(tmp_path):
    report = run_cases(cases(seed=20, n=150, workdir=tmp_path), timeout_s=60)
    s = report.summary()["gguf"]
    assert s["cases"] == 150 and s["clean"] > 100, s
    assert not report.defects, report.defects[:3]


def test_project_error_root(tiny):
    assert issubclass(ModelLoadError, RampError)
