"""GGUF model reader fuzzing (issue 20): mutants of a tiny Llama GGUF, each loaded by ``ramp.models.loader``.

Mutations: byte changes anywhere in the header; every key's value type (scalar -> ARRAY and unknown types);
string lengths and array counts set to extreme values; the tensor and key counts; tensor ranks, dimensions, types
and offsets; truncations and appended bytes; byte changes in the tensor data; and semantic rewrites (written by
gguf-py's writer) of the hyperparameters (block count, heads, dims, eps, rope base to zero, negative, NaN or
huge), of tensor types (F16 data relabelled), and of the tensor set (dropped, extra, reshaped).

The oracle of an accepted mutant: the logits of the loaded model on fixed tokens equal the original's, or the
mutant differs from the original only where any value is legal: tensor data that is still finite; a metadata
value the loader does not read; a float hyperparameter that is still finite and positive; a missing
``output.weight`` (a tied model, as llama.cpp reads it); a tensor of another type in a consistent layout (a type
byte changed in place to a type of exactly the same bytes, e.g. Q4_0 <-> IQ4_NL, which no reader can tell apart,
or a tensor rewritten with another type's bytes). The F16-data-labelled-Q4_0 case of the issue is a type byte
changed in place to a type of other bytes: the layout check rejects it.
Everything else accepted is ``accepted_corrupt``.
"""

from __future__ import annotations

import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fuzz import Case

READER = "gguf"
EXTREMES = (0, 1, 2**31, 2**32 - 1, 2**62, 2**63 - 1, 2**64 - 1)
LEGAL_FLOAT_KEYS = ("attention.layer_norm_rms_epsilon", "rope.freq_base")


@dataclass
class Spans:
    """Byte positions of the fields of a valid GGUF file."""

    counts: dict[str, int] = field(default_factory=dict)  # "tensor_count"/"kv_count" -> position of the u64
    kv_type: dict[str, int] = field(default_factory=dict)  # key -> position of its u32 value type
    lengths: list[int] = field(default_factory=list)  # positions of u64 string lengths / array counts
    tensor_fields: list[tuple[str, int, int]] = field(default_factory=list)  # (what, position, width)
    data_offset: int = 0


def spans(buf: bytes) -> Spans:
    s = Spans(counts={"tensor_count": 8, "kv_count": 16})
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)
    pos = 24
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}

    def string(pos: int) -> int:
        s.lengths.append(pos)
        (n,) = struct.unpack_from("<Q", buf, pos)
        return pos + 8 + n

    for _ in range(n_kv):
        klen = struct.unpack_from("<Q", buf, pos)[0]
        key = buf[pos + 8 : pos + 8 + klen].decode()
        pos = string(pos)
        s.kv_type[key] = pos
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        if vtype == 8:
            pos = string(pos)
        elif vtype == 9:
            elem, count = struct.unpack_from("<IQ", buf, pos)
            s.lengths.append(pos + 4)
            pos += 12
            if elem == 8:
                for _ in range(count):
                    pos = string(pos)
            else:
                pos += count * sizes[elem]
        else:
            pos += sizes[vtype]
    for _ in range(n_tensors):
        pos = string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        s.tensor_fields.append(("rank", pos, 4))
        pos += 4
        for _ in range(n_dims):
            s.tensor_fields.append(("dim", pos, 8))
            pos += 8
        s.tensor_fields.append(("type", pos, 4))
        s.tensor_fields.append(("offset", pos + 4, 8))
        pos += 12
    s.data_offset = -(-pos // 32) * 32
    return s


def original(workdir: Path) -> Path:
    """A tiny Llama GGUF with Q4_0 matrices, a Q8_0 embedding and F32 norms (deterministic)."""
    from ramp.gguf_export import export_gguf
    from ramp.models.tiny import tiny_llama

    path = workdir / "original.gguf"
    if not path.exists():
        lm = tiny_llama(seed=11, hidden=256, intermediate=512, heads=4, kv_heads=2, vocab=256)
        export_gguf(lm, path, default_type="Q4_0", embedding_type="Q8_0")
    return path


def _put(buf: bytearray, pos: int, fmt: str, value: int) -> None:
    struct.pack_into(fmt, buf, pos, value & ((1 << (8 * struct.calcsize(fmt))) - 1))


def byte_mutants(orig: bytes, rng: random.Random) -> list[tuple[str, bytes]]:
    """One mutant per call of each byte-level kind."""
    sp = spans(orig)
    out: list[tuple[str, bytearray | bytes]] = []

    b = bytearray(orig)
    for _ in range(rng.randint(1, 4)):
        pos = rng.randrange(sp.data_offset)
        b[pos] = rng.randrange(256)
    out.append(("header bytes", b))

    b = bytearray(orig)
    pos = rng.randrange(sp.data_offset)
    b[pos] ^= 1 << rng.randrange(8)
    out.append((f"header bit at {pos}", b))

    key = rng.choice(sorted(sp.kv_type))
    b = bytearray(orig)
    vt = rng.choice((*range(13), 13, 255, 2**32 - 1, 9, 9))
    _put(b, sp.kv_type[key], "<I", vt)
    out.append((f"value type of {key} -> {vt}", b))

    b = bytearray(orig)
    pos = rng.choice(sp.lengths)
    (n,) = struct.unpack_from("<Q", orig, pos)
    _put(b, pos, "<Q", rng.choice((*EXTREMES, n + 1, n - 1, n * 2)))
    out.append(("string/array length", b))

    b = bytearray(orig)
    what = rng.choice(("tensor_count", "kv_count"))
    (n,) = struct.unpack_from("<Q", orig, sp.counts[what])
    _put(b, sp.counts[what], "<Q", rng.choice((*EXTREMES, n + 1, n - 1)))
    out.append((what, b))

    b = bytearray(orig)
    what, pos, width = rng.choice(sp.tensor_fields)
    fmt = "<I" if width == 4 else "<Q"
    (v,) = struct.unpack_from(fmt, orig, pos)
    choices = {
        "rank": (0, 3, 5, 2**32 - 1),
        "dim": (0, v + 1, v * 2, v // 2, 2**40, 2**63),
        "type": (*range(42), 2**31),
        "offset": (v + 1, v + 32, v - 32, v + 2**20, 2**63, 0),
    }[what]
    _put(b, pos, fmt, rng.choice(choices))
    out.append((f"tensor {what}", b))

    cut = rng.randrange(1, len(orig))
    out.append((f"truncated at {cut}", orig[:cut]))
    out.append(("appended bytes", orig + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))))

    b = bytearray(orig)
    for _ in range(rng.randint(1, 8)):
        b[rng.randrange(sp.data_offset, len(orig))] = rng.randrange(256)
    out.append(("data bytes", b))
    return [(name, bytes(m)) for name, m in out]


def semantic_mutants(path: Path, rng: random.Random, workdir: Path, tag: str) -> list[tuple[str, Path]]:
    """Rewrites of the original with gguf-py's writer: hyperparameters, tensor types and the tensor set."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path)
    fields = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    nb = int(fields["llama.block_count"].contents())
    heads = int(fields["llama.attention.head_count"].contents())
    hidden = int(fields["llama.embedding_length"].contents())
    kinds = {
        "llama.block_count": (0, nb - 1, nb + 1, 10**6, 2**32 - 1),
        "llama.attention.head_count": (0, 3, 7, hidden * 2),
        "llama.attention.head_count_kv": (0, 3, heads * 2),
        "llama.attention.key_length": (0, 3, 1),
        "llama.embedding_length": (0, hidden + 1, hidden * 2),
        "llama.feed_forward_length": (0, 1, 2**31),
        "llama.context_length": (0,),
        "llama.attention.layer_norm_rms_epsilon": (float("nan"), float("inf"), -1e-5, 0.0, 1.5),
        "llama.rope.freq_base": (float("nan"), float("inf"), -1.0, 0.0),
    }
    out: list[tuple[str, Path]] = []

    def write(name: str, meta: dict, tensors: list[tuple[str, np.ndarray, int, tuple]]) -> None:
        """``tensors``: (name, bytes as uint8 of shape (rows, bytes per row), type, element shape)."""
        dest = workdir / f"{tag}-sem{len(out)}.gguf"
        w = gguf.GGUFWriter(dest, arch="llama")
        for k, (vtype, value) in meta.items():
            if k in ("general.architecture",):
                continue
            if vtype == gguf.GGUFValueType.ARRAY:
                w.add_array(k, value)
            else:
                w.add_key_value(k, value, vtype)
        for tname, data, ttype, _shape in tensors:
            w.add_tensor(tname, data, raw_dtype=gguf.GGMLQuantizationType(ttype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        out.append((name, dest))

    meta = {}
    for k, f in fields.items():
        vtype = f.types[0]
        meta[k] = (vtype, f.contents())
    tensors = [
        (t.name, np.array(t.data), int(t.tensor_type), tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors
    ]
    key = rng.choice(sorted(kinds))
    value = rng.choice(kinds[key])
    vtype = gguf.GGUFValueType.FLOAT32 if isinstance(value, float) else gguf.GGUFValueType.UINT32
    if isinstance(value, int) and value >= 2**32:
        vtype = gguf.GGUFValueType.UINT64
    write(f"{key} = {value}", {**meta, key: (vtype, value)}, tensors)
    key = rng.choice(sorted(kinds))
    write(f"{key} as a string", {**meta, key: (gguf.GGUFValueType.STRING, "12")}, tensors)

    i = rng.randrange(len(tensors))
    name, data, ttype, shape = tensors[i]
    new_type = rng.choice([int(q) for q in gguf.GGML_QUANT_SIZES if int(q) != ttype])
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(new_type)]
    raw = data.reshape(-1)
    rows = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
    if shape[-1] % block == 0:  # relabel the bytes as another type, truncated or zero-padded to its size
        need = shape[-1] // block * size * rows
        raw = raw[:need] if need <= raw.size else np.concatenate([raw, np.zeros(need - raw.size, np.uint8)])
        new = [*tensors]
        new[i] = (name, raw.reshape(rows, -1) if len(shape) > 1 else raw, new_type, shape)
        old_name, new_name = gguf.GGMLQuantizationType(ttype).name, gguf.GGMLQuantizationType(new_type).name
        write(f"tensor {name} relabelled {old_name} -> {new_name}", meta, new)
    new = [t for j, t in enumerate(tensors) if j != i]
    write(f"tensor {name} dropped", meta, new)
    new = [*tensors, (name.replace("blk.0", "blk.9") if "blk.0" in name else name + ".extra", data, ttype, shape)]
    write("an extra tensor", meta, new)
    return out


def cases(seed: int, n: int, workdir: str | Path) -> list[Case]:
    """``n`` seeded mutants of the tiny GGUF (about 4 in 5 byte-level, 1 in 5 semantic rewrites)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    orig_path = original(workdir)
    orig = orig_path.read_bytes()
    rng = random.Random(seed)
    out: list[Case] = []
    round_ = 0
    while len(out) < n:
        tag = f"s{seed}r{round_}"
        muts: list[tuple[str, Path]] = []
        for name, data in byte_mutants(orig, rng):
            p = workdir / f"{tag}-b{len(muts)}.gguf"
            p.write_bytes(data)
            muts.append((name, p))
        muts += semantic_mutants(orig_path, rng, workdir, tag)
        out += [Case(READER, name, "benchmarks.fuzz_gguf:check", (str(p), str(orig_path))) for name, p in muts]
        round_ += 1
    return out[:n]


_REFERENCE: dict[str, tuple] = {}


def _logits(model):  # noqa: ANN001, ANN202
    import torch

    ids = torch.arange(0, 48).reshape(2, 24) % model.config.vocab_size
    with torch.no_grad():
        return model(input_ids=ids).logits


def check(path: str, orig_path: str) -> str:
    """Load a mutant with the real reader; judge an accepted one against the original (module docstring)."""
    import torch

    from ramp.gguf_check import validate_gguf
    from ramp.models.loader import load_gguf

    if orig_path not in _REFERENCE:
        _REFERENCE[orig_path] = (validate_gguf(orig_path), _logits(load_gguf(orig_path, with_tokenizer=False).model))
    ref_layout, ref_logits = _REFERENCE[orig_path]
    lm = load_gguf(path, with_tokenizer=False)
    logits = _logits(lm.model)
    if logits.shape == ref_logits.shape and torch.allclose(logits, ref_logits, atol=1e-5):
        return "valid"
    # (logits may overflow: changed data bytes can give finite weights of 1e25; the file is still a legal one)
    layout = validate_gguf(path)
    ref_tensors = {t.name: t for t in ref_layout.tensors}
    for t in layout.tensors:  # the layout passed validation: types and offsets may differ, shapes may not
        r = ref_tensors.get(t.name)
        if r is None or r.shape != t.shape:
            return "accepted_corrupt"
    if {t.name for t in layout.tensors} not in (set(ref_tensors), set(ref_tensors) - {"output.weight"}):
        return "accepted_corrupt"  # (without output.weight a model is tied, as in llama.cpp: legal)
    changed = {
        k for k in set(layout.scalars) | set(ref_layout.scalars) if layout.scalars.get(k) != ref_layout.scalars.get(k)
    }
    changed |= {
        k for k in set(layout.arrays) | set(ref_layout.arrays) if layout.arrays.get(k) != ref_layout.arrays.get(k)
    }
    from ramp.models.loader import FLOAT_KEYS, INT_KEYS

    for k in changed:
        arch, _, suffix = k.partition(".")
        if arch != "llama" or suffix not in (*INT_KEYS, *FLOAT_KEYS):
            continue  # a key the loader does not read
        v = layout.scalars.get(k)
        if suffix in FLOAT_KEYS and (v is None or (isinstance(v, int | float) and v > 0)):
            continue  # a legal float hyperparameter (or its default)
        if suffix == "context_length":
            continue  # any positive context length is legal and does not change these logits
        return "accepted_corrupt"
    return "valid"  # data bytes or metadata the loader does not read: a legal file with other weights
