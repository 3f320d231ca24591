"""Fuzz the imatrix, Hugging Face (safetensors + config.json) and folded-model readers (issue 20).

Each generator writes mutants of a valid tiny original (built in code: a calibrated two-block Llama and Gemma-3,
their imatrix in GGUF and legacy ``.dat`` form, their Hugging Face directories and folded safetensors) under
``workdir`` and returns one :class:`benchmarks.fuzz.Case` per mutant:

- byte-level: bit flips, random bytes, truncations, insertions, deletions (mostly inside the headers, where the
  structure lives), count/length/offset fields set to extreme values, GGUF value types changed (a scalar key
  made an ARRAY), JSON digits and dtype names edited in safetensors headers;
- semantic: NaN/inf/negative/zero values, shapes, dtypes, renamed/missing/extra/duplicate tensors, missing
  keys and wrong JSON types in configs and metadata, and a few legal edits that must be accepted.

A case's target loads the mutant with the real reader (a :class:`ramp.errors.RampError` counts as a clean
rejection) and, if it is accepted, judges the result against the original, read independently of the reader:

- ``"valid"``: the content equals the original's, or differs only where the new value is legal: a weight or
  an imatrix sum changed to another finite value (>= 0 for sums), a token count to another whole number >= 1,
  a free-text field (dataset names, source), or a config value listed in :data:`LEGAL_CONFIG` within its legal
  range; a config change outside that table counts as legal only if it changes nothing the model computes
  (the logits on a fixed input are bit-identical with and without it);
- ``"accepted_corrupt"``: anything else (missing or renamed entries, changed shapes, non-finite values, counts
  that are not whole numbers, illegal config values ...).

Run ``python -m benchmarks.fuzz_readers --n 300`` for the full run (writes ``results/fuzz_readers.json``).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import shutil
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.fuzz import Case, Report, run_cases

ROOT = Path(__file__).resolve().parents[1]
THIS = "benchmarks.fuzz_readers"
READERS = ("imatrix", "safetensors", "hf_config", "folded")
KINDS = ("llama", "gemma3")  # the two tiny originals: untied Llama (GQA), tied Gemma-3 (q/k norms, 1 + w norms)
SEMANTIC_SHARE = 0.4  # the rest are byte-level mutants

# --------------------------------------------------------------------------------------------- tiny originals


def tiny_model(kind: str, seed: int = 0) -> Any:
    """A seeded two-block model small enough that its headers are a good share of its files (hidden 64)."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    from ramp.models.arch import ARCHS
    from ramp.models.loader import LoadedModel

    if kind == "llama":
        config = LlamaConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            rms_norm_eps=1e-5,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        )
    else:
        config = Gemma3TextConfig(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            rms_norm_eps=1e-6,
            max_position_embeddings=256,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            query_pre_attn_scalar=32,
            tie_word_embeddings=True,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            },
        )
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") and kind == "llama" else 0.0
            p.copy_(base + 0.1 * torch.randn(p.shape, generator=gen))
    arch = ARCHS["llama" if kind == "llama" else "gemma3"]
    return LoadedModel(model.eval(), None, arch, Path(f"<fuzz tiny {kind}>"))


def _tokens(vocab: int = 128, length: int = 20) -> Any:
    import torch

    return (torch.arange(length).reshape(1, length) * 7 + 3) % vocab


def build_originals(workdir: str | Path) -> Path:
    """Write the valid originals once under ``workdir/originals`` (imatrix in both forms, HF dirs, folded)."""
    import torch

    from ramp.calib import calibrate
    from ramp.folding import fold_model, save_folded
    from ramp.imatrix import write_imatrix

    out = Path(workdir) / "originals"
    if (out / "done").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tokens = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    for kind in KINDS:
        lm = tiny_model(kind)
        lm.model.save_pretrained(out / f"hf_{kind}")
        stats = calibrate(lm, tokens)
        if kind == "llama":
            im = stats.imatrix()
            write_imatrix(out / "imatrix.gguf", im, n_chunks=2, dataset="wiki-calib", chunk_size=24)
            _write_expected_gguf(out / "imatrix.gguf.expected.npz", im, n_tokens=48)
            (out / "imatrix.dat").write_bytes(_legacy_bytes(_legacy_entries(im, ncall=2), chunks=2, dataset=b"wiki"))
            _write_expected_dat(out / "imatrix.dat.expected.npz", im, ncall=2)
        fold_model(lm, stats, alpha=0.5, errors=False)
        save_folded(lm, out / f"folded_{kind}.safetensors", extra={"alpha": 0.5, "enabled": True}, source="<fuzz>")
    (out / "done").write_text("ok\n")
    return out


# --------------------------------------------------------------------------------------------- byte mutations

U32_EXTREMES = (0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFE, 0xFFFFFFFF)
U64_EXTREMES = (0, 1, 2**31, 2**32 - 1, 2**32, 2**62, 2**63, 2**64 - 1, 0x0000FFFF0000FFFF)
I32_EXTREMES = (0, -1, 1, -(2**31), 2**31 - 1, 2**24, 2**30)


def _pick(rng: np.random.Generator, options: Any) -> Any:
    """One of ``options`` as it is (``rng.choice`` would turn big integers into lossy floats)."""
    options = list(options)
    return options[int(rng.integers(len(options)))]


def _bitflip(rng: np.random.Generator, raw: bytes, lo: int, hi: int) -> tuple[bytes, str]:
    pos = int(rng.integers(lo, max(hi, lo + 1)))
    bit = int(rng.integers(8))
    b = bytearray(raw)
    b[pos] ^= 1 << bit
    return bytes(b), f"bitflip@{pos}.{bit}"


def _setbyte(rng: np.random.Generator, raw: bytes, lo: int, hi: int) -> tuple[bytes, str]:
    pos = int(rng.integers(lo, max(hi, lo + 1)))
    val = _pick(rng, [0x00, 0xFF, 0x7F, 0x80, int(rng.integers(256))])
    b = bytearray(raw)
    b[pos] = val
    return bytes(b), f"byte@{pos}={val:#x}"


def _truncate(rng: np.random.Generator, raw: bytes, lo: int, hi: int) -> tuple[bytes, str]:
    pos = int(rng.integers(0, len(raw)))
    return raw[:pos], f"truncate@{pos}"


def _insert(rng: np.random.Generator, raw: bytes, lo: int, hi: int) -> tuple[bytes, str]:
    pos = int(rng.integers(lo, max(hi, lo + 1)))
    n = int(rng.integers(1, 17))
    return raw[:pos] + rng.bytes(n) + raw[pos:], f"insert{n}@{pos}"


def _delete(rng: np.random.Generator, raw: bytes, lo: int, hi: int) -> tuple[bytes, str]:
    pos = int(rng.integers(lo, max(hi, lo + 1)))
    n = int(rng.integers(1, 17))
    return raw[:pos] + raw[pos + n :], f"delete{n}@{pos}"


def _append(rng: np.random.Generator, raw: bytes, lo: int, hi: int) -> tuple[bytes, str]:
    n = int(rng.integers(1, 33))
    return raw + rng.bytes(n), f"append{n}"


BYTE_OPS: tuple[Callable[..., tuple[bytes, str]], ...] = (_bitflip, _bitflip, _bitflip, _setbyte, _insert, _delete)


def _put(raw: bytes, offset: int, fmt: str, value: int) -> bytes:
    b = bytearray(raw)
    struct.pack_into(fmt, b, offset, value)
    return bytes(b)


def _byte_mutant(rng: np.random.Generator, raw: bytes, header_end: int) -> tuple[bytes, str]:
    """A generic byte mutation: 75% inside ``[0, header_end)``, the rest anywhere (data, truncation, append)."""
    r = rng.random()
    if r < 0.08:
        return _truncate(rng, raw, 0, len(raw))
    if r < 0.12:
        return _append(rng, raw, 0, len(raw))
    lo, hi = (0, header_end) if r < 0.8 else (0, len(raw))
    op = BYTE_OPS[int(rng.integers(len(BYTE_OPS)))]
    return op(rng, raw, lo, hi)


# --------------------------------------------------------------------------------------------- imatrix: files

GGUF_TYPES = {"UINT8": 0, "INT8": 1, "UINT16": 2, "INT16": 3, "UINT32": 4, "INT32": 5, "FLOAT32": 6, "BOOL": 7}
GGUF_TYPES |= {"STRING": 8, "ARRAY": 9, "UINT64": 10, "INT64": 11, "FLOAT64": 12}
GGUF_SCALAR_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _gguf_fields(raw: bytes) -> tuple[list[tuple[int, str, str]], int]:
    """Numeric header fields of a (trusted) GGUF file as (offset, struct format, label), and the data offset."""
    fields: list[tuple[int, str, str]] = [(8, "<Q", "tensor_count"), (16, "<Q", "kv_count")]
    n_tensors, n_kv = struct.unpack_from("<QQ", raw, 8)
    pos = 24

    def string(label: str) -> None:
        nonlocal pos
        fields.append((pos, "<Q", f"len:{label}"))
        (n,) = struct.unpack_from("<Q", raw, pos)
        pos += 8 + n

    for i in range(n_kv):
        (klen,) = struct.unpack_from("<Q", raw, pos)
        key = raw[pos + 8 : pos + 8 + klen].decode()
        string(f"key{i}")
        (vtype,) = struct.unpack_from("<I", raw, pos)
        fields.append((pos, "<I", f"vtype:{key}"))
        pos += 4
        if vtype == 8:
            string(f"value:{key}")
        elif vtype == 9:
            (itype,) = struct.unpack_from("<I", raw, pos)
            fields.append((pos, "<I", f"itype:{key}"))
            fields.append((pos + 4, "<Q", f"alen:{key}"))
            (alen,) = struct.unpack_from("<Q", raw, pos + 4)
            pos += 12
            for j in range(alen):
                if itype == 8:
                    string(f"{key}[{j}]")
                else:
                    pos += GGUF_SCALAR_SIZE[itype]
        else:
            fields.append((pos, "<I" if GGUF_SCALAR_SIZE[vtype] == 4 else "<Q", f"value:{key}"))
            pos += GGUF_SCALAR_SIZE[vtype]
    for i in range(n_tensors):
        string(f"tensor{i}.name")
        (n_dims,) = struct.unpack_from("<I", raw, pos)
        fields.append((pos, "<I", f"tensor{i}.n_dims"))
        pos += 4
        for d in range(n_dims):
            fields.append((pos, "<Q", f"tensor{i}.dim{d}"))
            pos += 8
        fields.append((pos, "<I", f"tensor{i}.type"))
        fields.append((pos + 4, "<Q", f"tensor{i}.offset"))
        pos += 12
    return fields, -(-pos // 32) * 32


def _vtype_offsets(raw: bytes) -> list[tuple[int, str]]:
    fields, _ = _gguf_fields(raw)
    return [(off, label.removeprefix("vtype:")) for off, _fmt, label in fields if label.startswith("vtype:")]


GGUF_SCALAR_FORMAT = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q"}
GGUF_SCALAR_FORMAT |= {12: "<d"}
GGML_TYPES = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.int32): 26}


def _gguf_value(value: Any, vtype: int, sub: int | None) -> bytes:
    if vtype == GGUF_TYPES["STRING"]:
        raw = value.encode()
        return struct.pack("<Q", len(raw)) + raw
    if vtype == GGUF_TYPES["ARRAY"]:
        return struct.pack("<IQ", sub, len(value)) + b"".join(_gguf_value(v, sub, None) for v in value)
    return struct.pack(GGUF_SCALAR_FORMAT[vtype], value)


def _write_gguf(path: Path, kv: list[tuple[str, Any, str, str | None]], tensors: list[tuple[str, np.ndarray]]) -> None:
    """A GGUF v3 file with exactly the given keys ((key, value, type name, array element type name)) and
    tensors, laid out as gguf-py writes it (written here so that any key, type and empty array can be made)."""
    raw = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kv))
    for key, value, vtype, sub in kv:
        t, s = GGUF_TYPES[vtype], GGUF_TYPES[sub] if sub else None
        raw += _gguf_value(key, GGUF_TYPES["STRING"], None) + struct.pack("<I", t) + _gguf_value(value, t, s)
    data, offset = b"", 0
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        dims = tuple(reversed(arr.shape))
        raw += _gguf_value(name, GGUF_TYPES["STRING"], None) + struct.pack(f"<I{len(dims)}Q", len(dims), *dims)
        raw += struct.pack("<IQ", GGML_TYPES[arr.dtype], offset)
        blob = arr.tobytes()
        blob += b"\0" * (-len(blob) % 32)
        data += blob
        offset += len(blob)
    raw += b"\0" * (-len(raw) % 32)
    path.write_bytes(raw + data)


def _imatrix_kv(datasets: Any = ("wiki-calib",), chunk_count: Any = 2, chunk_size: Any = 24) -> list:
    return [
        ("general.type", "imatrix", "STRING", None),
        ("imatrix.datasets", list(datasets), "ARRAY", "STRING"),
        ("imatrix.chunk_count", chunk_count, "UINT32", None),
        ("imatrix.chunk_size", chunk_size, "UINT32", None),
    ]


def _imatrix_tensors(im: dict[str, np.ndarray], n_tokens: int) -> list[tuple[str, np.ndarray]]:
    out = []
    for name in sorted(im):
        out.append((name + ".in_sum2", (im[name].astype(np.float64) * n_tokens).astype(np.float32).reshape(1, -1)))
        out.append((name + ".counts", np.array([[float(n_tokens)]], dtype=np.float32)))
    return out


def _write_expected_gguf(path: Path, im: dict[str, np.ndarray], n_tokens: int) -> None:
    arrays = {}
    for name, arr in _imatrix_tensors(im, n_tokens):
        arrays[name] = arr.reshape(-1)
    meta = {"legacy": False, "datasets": ["wiki-calib"], "chunk_count": 2, "chunk_size": 24}
    np.savez(path, __meta__=np.array(json.dumps(meta)), **arrays)


def _legacy_entries(im: dict[str, np.ndarray], ncall: int) -> list[tuple[bytes, int, int, bytes]]:
    return [
        (name.encode(), ncall, im[name].size, (im[name].astype(np.float64) * ncall).astype("<f4").tobytes())
        for name in sorted(im)
    ]


def _legacy_bytes(entries: list[tuple[bytes, int, int, bytes]], chunks: int | None, dataset: bytes | None) -> bytes:
    """The legacy ``.dat`` layout: int32 n; per entry int32 len, name, int32 ncall, int32 nval, float32[nval];
    optional int32 chunks, int32 len, dataset."""
    raw = struct.pack("<i", len(entries))
    for name, ncall, nval, values in entries:
        raw += struct.pack("<i", len(name)) + name + struct.pack("<ii", ncall, nval) + values
    if chunks is not None:
        raw += struct.pack("<ii", chunks, len(dataset or b"")) + (dataset or b"")
    return raw


def _write_expected_dat(path: Path, im: dict[str, np.ndarray], ncall: int) -> None:
    arrays = {}
    for name in sorted(im):
        arrays[name + ".in_sum2"] = (im[name].astype(np.float64) * ncall).astype(np.float32)
        arrays[name + ".counts"] = np.array([float(ncall)], dtype=np.float32)
    meta = {"legacy": True, "datasets": ["wiki"], "chunk_count": 2, "chunk_size": 0}
    np.savez(path, __meta__=np.array(json.dumps(meta)), **arrays)


def _legacy_fields(raw: bytes) -> list[tuple[int, str]]:
    """(offset, label) of every int32 field of a (trusted) legacy file."""
    (n,) = struct.unpack_from("<i", raw, 0)
    fields, pos = [(0, "n_entries")], 4
    for i in range(n):
        (ln,) = struct.unpack_from("<i", raw, pos)
        fields.append((pos, f"e{i}.len"))
        pos += 4 + ln
        (_ncall, nval) = struct.unpack_from("<ii", raw, pos)
        fields += [(pos, f"e{i}.ncall"), (pos + 4, f"e{i}.nval")]
        pos += 8 + 4 * nval
    if pos < len(raw):
        fields += [(pos, "chunks"), (pos + 4, "dataset_len")]
    return fields


# --------------------------------------------------------------------------------------------- imatrix: mutants


def _gguf_semantic(im: dict[str, np.ndarray]) -> list[tuple[str, Callable[[Path], None]]]:
    """(name, writer) of each semantic GGUF imatrix mutant; the ``legal:`` ones are valid files."""
    names = sorted(im)
    first = names[0]

    def tensors(edit: Callable[[dict[str, np.ndarray]], None] | None = None) -> list[tuple[str, np.ndarray]]:
        t = dict(_imatrix_tensors(im, 48))
        if edit:
            edit(t)
        return list(t.items())

    def value(tname: str, v: float, idx: int = 0) -> Callable[[dict[str, np.ndarray]], None]:
        def f(t: dict[str, np.ndarray]) -> None:
            t[tname] = t[tname].copy()
            t[tname].reshape(-1)[idx] = v

        return f

    def replace(tname: str, arr: np.ndarray | None) -> Callable[[dict[str, np.ndarray]], None]:
        def f(t: dict[str, np.ndarray]) -> None:
            if arr is None:
                del t[tname]
            else:
                t[tname] = arr

        return f

    s, c = first + ".in_sum2", first + ".counts"
    cols = im[first].size
    kv = _imatrix_kv
    base_kv = kv()
    muts: list[tuple[str, list, list]] = [
        ("sum=nan", base_kv, tensors(value(s, float("nan")))),
        ("sum=inf", base_kv, tensors(value(s, float("inf")))),
        ("sum=-inf", base_kv, tensors(value(s, float("-inf")))),
        ("sum<0", base_kv, tensors(value(s, -1.0, 3))),
        ("count=0", base_kv, tensors(value(c, 0.0))),
        ("count<0", base_kv, tensors(value(c, -48.0))),
        ("count=nan", base_kv, tensors(value(c, float("nan")))),
        ("count=inf", base_kv, tensors(value(c, float("inf")))),
        ("count=47.5", base_kv, tensors(value(c, 47.5))),
        ("counts 2 matrices", base_kv, tensors(replace(c, np.full((2, 1), 48.0, dtype=np.float32)))),
        ("sums 2x", base_kv, tensors(replace(s, np.ones((2, cols // 2), dtype=np.float32)))),
        ("sums 3-D", base_kv, tensors(replace(s, np.ones((2, 1, cols), dtype=np.float32)))),
        ("counts [2,1]", base_kv, tensors(replace(c, np.full((1, 2), 48.0, dtype=np.float32)))),
        ("sums F16", base_kv, tensors(replace(s, np.ones((1, cols), dtype=np.float16)))),
        ("counts I32", base_kv, tensors(replace(c, np.full((1, 1), 48, dtype=np.int32)))),
        ("missing counts", base_kv, tensors(replace(c, None))),
        ("missing sums", base_kv, tensors(replace(s, None))),
        ("extra tensor", base_kv, tensors(replace(first + ".other", np.ones((1, 4), dtype=np.float32)))),
        ("bare suffix", base_kv, tensors(replace(".in_sum2", np.ones((1, 4), dtype=np.float32)))),
        ("no tensors", base_kv, []),
        ("no general.type", base_kv[1:], tensors()),
        ("general.type=model", [("general.type", "model", "STRING", None), *base_kv[1:]], tensors()),
        ("general.type UINT32", [("general.type", 1, "UINT32", None), *base_kv[1:]], tensors()),
        ("no datasets", [base_kv[0], *base_kv[2:]], tensors()),
        ("no chunk_count", [*base_kv[:2], base_kv[3]], tensors()),
        ("no chunk_size", base_kv[:3], tensors()),
        ("datasets=[]", kv(datasets=[]), tensors()),
        ("datasets string", [base_kv[0], ("imatrix.datasets", "wiki", "STRING", None), *base_kv[2:]], tensors()),
        ("datasets ints", [base_kv[0], ("imatrix.datasets", [1, 2], "ARRAY", "INT32"), *base_kv[2:]], tensors()),
        ("chunk_count=0", kv(chunk_count=0), tensors()),
        ("chunk_size=0", kv(chunk_size=0), tensors()),
        ("chunk_count UINT64", [*base_kv[:2], ("imatrix.chunk_count", 2, "UINT64", None), base_kv[3]], tensors()),
        ("chunk_count INT32", [*base_kv[:2], ("imatrix.chunk_count", 2, "INT32", None), base_kv[3]], tensors()),
        ("chunk_count F32", [*base_kv[:2], ("imatrix.chunk_count", 2.0, "FLOAT32", None), base_kv[3]], tensors()),
        ("chunk_size STRING", [*base_kv[:3], ("imatrix.chunk_size", "24", "STRING", None)], tensors()),
        ("chunk_size ARRAY", [*base_kv[:3], ("imatrix.chunk_size", [24], "ARRAY", "UINT32")], tensors()),
        ("legal:datasets renamed", kv(datasets=["other", "more"]), tensors()),
        ("legal:chunk_count=7", kv(chunk_count=7), tensors()),
        ("legal:extra key", [*base_kv, ("general.name", "x", "STRING", None)], tensors()),
        ("legal:sums doubled", base_kv, tensors(replace(s, (np.asarray(dict(tensors())[s]) * 2).astype(np.float32)))),
        ("legal:count=96", base_kv, tensors(value(c, 96.0))),
    ]
    return [(name, functools.partial(_write_gguf, kv=k, tensors=t)) for name, k, t in muts]


def _dat_semantic(im: dict[str, np.ndarray]) -> list[tuple[str, bytes]]:
    entries = _legacy_entries(im, ncall=2)
    name, ncall, nval, values = entries[0]

    def with_first(**kw: Any) -> list:
        e = dict(zip(("name", "ncall", "nval", "values"), entries[0], strict=True)) | kw
        return [(e["name"], e["ncall"], e["nval"], e["values"]), *entries[1:]]

    def vals(i: int, v: float) -> bytes:
        a = np.frombuffer(values, dtype="<f4").copy()
        a[i] = v
        return a.tobytes()

    trail = {"chunks": 2, "dataset": b"wiki"}
    lb = _legacy_bytes
    return [
        ("value=nan", lb(with_first(values=vals(0, float("nan"))), **trail)),
        ("value=inf", lb(with_first(values=vals(1, float("inf"))), **trail)),
        ("value<0", lb(with_first(values=vals(2, -0.5)), **trail)),
        ("ncall=0", lb(with_first(ncall=0), **trail)),
        ("ncall<0", lb(with_first(ncall=-2), **trail)),
        ("nval=0", lb(with_first(nval=0, values=b""), **trail)),
        ("nval<0", lb(with_first(nval=-1), **trail)),
        ("nval huge", lb(with_first(nval=2**31 - 1), **trail)),
        ("nval short", lb(with_first(nval=nval - 1), **trail)),
        ("empty name", lb(with_first(name=b""), **trail)),
        ("name not utf-8", lb(with_first(name=b"blk.\xff\xfe"), **trail)),
        ("duplicate name", lb([entries[0], entries[0], *entries[1:]], **trail)),
        ("no entries", lb([], **trail)),
        ("chunks=0", lb(entries, chunks=0, dataset=b"wiki")),
        ("chunks<0", lb(entries, chunks=-3, dataset=b"wiki")),
        ("dataset not utf-8", lb(entries, chunks=2, dataset=b"\xc3\x28")),
        ("trailing garbage", lb(entries, **trail) + b"\x00\x01\x02"),
        ("half trailer", lb(entries, None, None) + struct.pack("<i", 2)),
        ("dataset_len past end", lb(entries, None, None) + struct.pack("<ii", 2, 99) + b"wiki"),
        ("dataset_len<0", lb(entries, None, None) + struct.pack("<ii", 2, -4) + b"wiki"),
        ("n_entries=-1", struct.pack("<i", -1) + lb(entries, **trail)[4:]),
        ("n_entries huge", struct.pack("<i", 2**31 - 1) + lb(entries, **trail)[4:]),
        ("empty file", b""),
        ("legal:no trailer", lb(entries, None, None)),
        ("legal:dataset renamed", lb(entries, chunks=2, dataset=b"other text")),
        ("legal:values doubled", lb(with_first(values=(np.frombuffer(values, "<f4") * 2).tobytes()), **trail)),
        ("legal:ncall=4", lb(with_first(ncall=4), **trail)),
    ]


def imatrix_cases(seed: int, n: int, workdir: str | Path) -> list[Case]:
    """``n`` mutants of the tiny imatrix (3/5 GGUF, 2/5 legacy ``.dat``) for :func:`check_imatrix`."""
    from ramp.imatrix import read_imatrix

    orig = build_originals(workdir)
    out = Path(workdir) / "imatrix"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 1])
    gguf_raw, dat_raw = (orig / "imatrix.gguf").read_bytes(), (orig / "imatrix.dat").read_bytes()
    im = read_imatrix(orig / "imatrix.gguf")
    gguf_sem, dat_sem = _gguf_semantic(im), _dat_semantic(im)
    gguf_fields, gguf_data = _gguf_fields(gguf_raw)
    vtypes = _vtype_offsets(gguf_raw)
    dat_fields = _legacy_fields(dat_raw)
    order = {"gguf": rng.permutation(len(gguf_sem)), "dat": rng.permutation(len(dat_sem))}
    cases, n_sem = [], {"gguf": 0, "dat": 0}
    for i in range(n):
        fmt = "gguf" if i % 5 < 3 else "dat"
        path = out / f"case{i:04d}.{fmt}"
        expected = str(orig / f"imatrix.{fmt}.expected.npz")
        if rng.random() < SEMANTIC_SHARE:
            sem = gguf_sem if fmt == "gguf" else dat_sem
            name, make = sem[order[fmt][n_sem[fmt] % len(sem)]]
            n_sem[fmt] += 1
            if fmt == "gguf":
                make(path)
            else:
                path.write_bytes(make)
        else:
            raw = gguf_raw if fmt == "gguf" else dat_raw
            r = rng.random()
            if fmt == "gguf" and r < 0.15:  # a key's value type changed: the ARRAY trick and every other type
                off, key = vtypes[int(rng.integers(len(vtypes)))]
                t = _pick(rng, [9, 9, *range(13), 13, 255, 2**31])
                mutant, name = _put(raw, off, "<I", t), f"vtype {key}={t}"
            elif fmt == "gguf" and r < 0.35:
                off, f, label = gguf_fields[int(rng.integers(len(gguf_fields)))]
                v = _pick(rng, U32_EXTREMES if f == "<I" else U64_EXTREMES)
                mutant, name = _put(raw, off, f, v), f"{label}={v}"
            elif fmt == "dat" and r < 0.3:
                off, label = dat_fields[int(rng.integers(len(dat_fields)))]
                old = struct.unpack_from("<i", raw, off)[0]
                v = _pick(rng, [*I32_EXTREMES, old + 1, old - 1])
                mutant, name = _put(raw, off, "<i", v), f"{label}={v}"
            else:
                mutant, name = _byte_mutant(rng, raw, gguf_data if fmt == "gguf" else len(raw))
            path.write_bytes(mutant)
        cases.append(Case("imatrix", f"{fmt}:{name}", f"{THIS}:check_imatrix", (str(path), expected)))
    return cases


def check_imatrix(path: str, expected: str) -> str:
    """Read a mutant imatrix; judge an accepted one against the original's contents (module docstring)."""
    from ramp.imatrix import KNOWN_NAME, read_imatrix_file

    f = read_imatrix_file(path)
    with np.load(expected, allow_pickle=False) as z:
        meta = json.loads(str(z["__meta__"]))
        want = {k: z[k] for k in z.files if k != "__meta__"}
    names = {k.removesuffix(".in_sum2") for k in want if k.endswith(".in_sum2")}
    if f.legacy != meta["legacy"] or set(f.counts) != set(f.sums):
        return "accepted_corrupt"
    # One entry renamed to another llama.cpp weight name (a block index flipped) is a legal file.
    new, lost = set(f.sums) - names, names - set(f.sums)
    if (new or lost) and (len(new) != 1 or len(lost) != 1 or not KNOWN_NAME.match(next(iter(new)))):
        return "accepted_corrupt"
    renamed = dict(zip(new, lost, strict=True))
    means = f.means()
    for name in f.sums:
        sums, counts = np.asarray(f.sums[name]), np.asarray(f.counts[name])
        ref = renamed.get(name, name)
        ws, wc = want[ref + ".in_sum2"], want[ref + ".counts"]
        if sums.shape != ws.shape or counts.shape != wc.shape:
            return "accepted_corrupt"
        changed = sums != ws
        if changed.any() and not (np.isfinite(sums[changed]).all() and (sums[changed] >= 0).all()):
            return "accepted_corrupt"
        if (counts != wc).any() and not (counts >= 1).all():  # int64 counts: whole numbers by type
            return "accepted_corrupt"
        if not np.isfinite(means[name]).all():
            return "accepted_corrupt"
    if not all(isinstance(d, str) for d in f.datasets):
        return "accepted_corrupt"
    if not meta["legacy"] and not _same_as_gguf_tensors(path, f):
        return "accepted_corrupt"
    if meta["legacy"]:
        no_trailer = f.chunk_count == 0 and f.datasets == []
        if not (no_trailer or (isinstance(f.chunk_count, int) and f.chunk_count >= 1)) or f.chunk_size != 0:
            return "accepted_corrupt"
    elif not (f.chunk_count >= 1 and f.chunk_size >= 1 and len(f.datasets) >= 1):
        return "accepted_corrupt"
    return "valid"


def _same_as_gguf_tensors(path: str, f: Any) -> bool:
    """What the reader returned is exactly what the accepted file's tensors hold (no rounding, no reshaping)."""
    import gguf

    raw = {t.name: np.array(t.data, dtype=np.float64).reshape(-1) for t in gguf.GGUFReader(path).tensors}
    for name in f.sums:
        if not np.array_equal(raw.get(name + ".in_sum2"), f.sums[name].astype(np.float64), equal_nan=True):
            return False
        if not np.array_equal(raw.get(name + ".counts"), f.counts[name].astype(np.float64)):
            return False
    return True


# --------------------------------------------------------------------------------------------- safetensors helpers


def _split_safetensors(raw: bytes) -> tuple[dict[str, Any], bytes]:
    (n,) = struct.unpack_from("<Q", raw, 0)
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def _join_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def _header_end(raw: bytes) -> int:
    return 8 + struct.unpack_from("<Q", raw, 0)[0]


def _tensor_file(tensors: dict[str, Any], metadata: dict[str, str] | None) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata)


def _header_mutant(rng: np.random.Generator, raw: bytes) -> tuple[bytes, str]:
    """A JSON-aware header edit: a digit (shape, offset) or a tensor's dtype name changed."""
    end = _header_end(raw)
    text = raw[8:end].decode()
    if rng.random() < 0.5:
        digits = [i for i, ch in enumerate(text) if ch.isdigit()]
        i = digits[int(rng.integers(len(digits)))]
        new = str(int(rng.integers(10)))
        return raw[:8] + (text[:i] + new + text[i + 1 :]).encode() + raw[end:], f"digit@{8 + i}={new}"
    header, data = _split_safetensors(raw)
    names = sorted(k for k in header if k != "__metadata__")
    name = names[int(rng.integers(len(names)))]
    new = _pick(rng, ["I32", "U32", "F16", "I64", "F64", "BOOL", "U8", "I8", "BF16", "F8_E4M3", "XX"])
    header[name]["dtype"] = new
    return _join_safetensors(header, data), f"dtype {name}={new}"


def _tensor_mutants(
    tensors: dict[str, Any], metadata: dict[str, str] | None, tied: bool
) -> list[tuple[str, Callable[[], dict[str, bytes]]]]:
    """Semantic weight-file mutants: (name, maker of {file name: bytes}) for one-shard models."""
    import torch

    names = sorted(tensors)
    mat = next(n for n in names if n.endswith("q_proj.weight"))
    norm = next(n for n in names if n.endswith("input_layernorm.weight"))

    def file(edit: Callable[[dict[str, Any]], None] | None = None, meta: dict[str, str] | None = metadata) -> bytes:
        t = {k: v.clone() for k, v in tensors.items()}
        if edit:
            edit(t)
        return _tensor_file(t, meta)

    def setval(name: str, v: float) -> Callable[[dict[str, Any]], None]:
        return lambda t: t[name].view(-1).__setitem__(5, v)

    def put(name: str, value: Any) -> Callable[[dict[str, Any]], None]:
        def f(t: dict[str, Any]) -> None:
            if value is None:
                del t[name]
            else:
                t[name] = value

        return f

    def rename(old: str, new: str) -> Callable[[dict[str, Any]], None]:
        return lambda t: t.__setitem__(new, t.pop(old))

    def header_edit(edit: Callable[[dict[str, Any]], None]) -> bytes:
        header, data = _split_safetensors(file())
        edit(header)
        return _join_safetensors(header, data)

    def set_dtype(name: str, dtype: str) -> Callable[[dict[str, Any]], None]:
        return lambda h: h[name].__setitem__("dtype", dtype)

    def set_shape(name: str, shape: list[int]) -> Callable[[dict[str, Any]], None]:
        return lambda h: h[name].__setitem__("shape", shape)

    def overlap(h: dict[str, Any]) -> None:
        ordered = sorted((v["data_offsets"][0], k) for k, v in h.items() if k != "__metadata__")
        a, b = ordered[0][1], ordered[1][1]
        h[b]["data_offsets"] = [
            h[a]["data_offsets"][0],
            h[a]["data_offsets"][0] + h[b]["data_offsets"][1] - h[b]["data_offsets"][0],
        ]

    rows, cols = tensors[mat].shape
    shard = "model.safetensors"
    muts: list[tuple[str, Callable[[], dict[str, bytes]]]] = [
        ("weight=nan", lambda: {shard: file(setval(mat, float("nan")))}),
        ("weight=inf", lambda: {shard: file(setval(mat, float("inf")))}),
        ("norm=-inf", lambda: {shard: file(setval(norm, float("-inf")))}),
        ("shape transposed", lambda: {shard: file(put(mat, tensors[mat].T.contiguous().clone()))})
        if rows != cols
        else ("shape 1-D", lambda: {shard: file(put(mat, tensors[mat].reshape(-1).clone()))}),
        ("rows dropped", lambda: {shard: file(put(mat, tensors[mat][:-1].clone()))}),
        ("norm longer", lambda: {shard: file(put(norm, torch.ones(tensors[norm].numel() + 1)))}),
        ("int weights", lambda: {shard: file(put(norm, tensors[norm].to(torch.int32)))}),
        ("bool weights", lambda: {shard: file(put(norm, tensors[norm] > 0))}),
        ("renamed", lambda: {shard: file(rename(mat, mat.replace("q_proj", "q_prj")))}),
        ("missing", lambda: {shard: file(put(mat, None))}),
        ("extra", lambda: {shard: file(put("model.layers.0.extra.weight", torch.ones(4)))}),
        ("extra layer", lambda: {shard: file(put(norm.replace("layers.0", "layers.2"), torch.ones(64)))}),
        ("extra layer 99", lambda: {shard: file(put(norm.replace("layers.0", "layers.99"), torch.ones(64)))}),
        (
            "duplicate across shards",
            lambda: {shard: file(), "model-2.safetensors": _tensor_file({mat: tensors[mat]}, None)},
        ),
        ("header dtype I32", lambda: {shard: header_edit(set_dtype(mat, "I32"))}),
        ("header dtype U32", lambda: {shard: header_edit(set_dtype(norm, "U32"))}),
        ("header shape swapped", lambda: {shard: header_edit(set_shape(mat, [cols, rows]))}),
        ("header shape 3-D", lambda: {shard: header_edit(set_shape(mat, [rows, cols // 2, 2]))}),
        ("header offsets overlap", lambda: {shard: header_edit(overlap)}),
        ("header not an object", lambda: {shard: struct.pack("<Q", 8) + b"[1,2,3] " + b"\x00" * 8}),
        ("header length 0", lambda: {shard: struct.pack("<Q", 0) + file()[8:]}),
        ("header length huge", lambda: {shard: struct.pack("<Q", 2**62) + file()[8:]}),
        ("metadata not strings", lambda: {shard: header_edit(lambda h: h.__setitem__("__metadata__", {"a": 1}))}),
        ("empty file", lambda: {shard: b""}),
        ("no tensors", lambda: {shard: _tensor_file({}, metadata)}),
        ("F64 beyond float32", lambda: {shard: file(put(norm, tensors[norm].double() * 1e300))}),
        ("legal:F16 weights", lambda: {shard: file(put(mat, tensors[mat].to(torch.float16)))}),
        ("legal:BF16 norm", lambda: {shard: file(put(norm, tensors[norm].to(torch.bfloat16)))}),
        ("legal:weights scaled", lambda: {shard: file(put(mat, tensors[mat] * 1.5))}),
        (
            "legal:two shards",
            lambda: {
                shard: _tensor_file({k: v for k, v in tensors.items() if k != mat}, metadata),
                "model-2.safetensors": _tensor_file({mat: tensors[mat]}, metadata),
            },
        ),
    ]
    if tied:
        emb = tensors["model.embed_tokens.weight"]
        muts += [
            ("tied head differs", lambda: {shard: file(put("lm_head.weight", emb * 2))}),
            ("legal:tied head stored", lambda: {shard: file(put("lm_head.weight", emb.clone()))}),
        ]
    else:
        muts.append(("head missing (untied)", lambda: {shard: file(put("lm_head.weight", None))}))
    return muts


# --------------------------------------------------------------------------------------------- config mutants


def _config_mutants(cfg: dict[str, Any]) -> list[tuple[str, str]]:
    """(name, JSON text) of semantic config mutants; the ``legal:`` ones are valid configs."""

    def with_(**kw: Any) -> str:
        return json.dumps(cfg | kw, indent=2)

    def without(key: str) -> str:
        return json.dumps({k: v for k, v in cfg.items() if k != key}, indent=2)

    text = json.dumps(cfg, indent=2)
    rope = cfg["rope_parameters"]
    nested = "rope_theta" not in rope
    out: list[tuple[str, str]] = [
        ("list", json.dumps([cfg])),
        ("string", '"llama"'),
        ("number", "42"),
        ("null", "null"),
        ("empty object", "{}"),
        ("deeply nested", "[" * 100_000 + "]" * 100_000),
        ("NaN literal eps", text.replace(f'"rms_norm_eps": {cfg["rms_norm_eps"]}', '"rms_norm_eps": NaN')),
        ("Infinity literal eps", text.replace(f'"rms_norm_eps": {cfg["rms_norm_eps"]}', '"rms_norm_eps": Infinity')),
        ("eps 1e999", text.replace(f'"rms_norm_eps": {cfg["rms_norm_eps"]}', '"rms_norm_eps": 1e999')),
        ("duplicate key", text.replace('"hidden_size"', '"hidden_size": 64, "hidden_size"', 1)),
        ("BOM", "\ufeff" + text),
        ("not utf-8", text.replace('"model_type"', '"model_\udcff_type"', 1)),
        ("model_type missing", without("model_type")),
        ("model_type=mamba", with_(model_type="mamba")),
        ("model_type=5", with_(model_type=5)),
        ("model_type=qwen2", with_(model_type="qwen2")),
        ("rope missing", without("rope_parameters")),
        ("rope list", with_(rope_parameters=[1])),
        ("rope int", with_(rope_parameters=5)),
        ("rope empty", with_(rope_parameters={})),
        ("eps 0", with_(rms_norm_eps=0.0)),
        ("eps<0", with_(rms_norm_eps=-1e-5)),
        ("eps 2", with_(rms_norm_eps=2.0)),
        ("eps string", with_(rms_norm_eps="1e-5")),
        ("eps null", with_(rms_norm_eps=None)),
        ("tie flipped", with_(tie_word_embeddings=not cfg["tie_word_embeddings"])),
        ("tie string", with_(tie_word_embeddings="yes")),
        ("bos<0", with_(bos_token_id=-1)),
        ("bos=vocab", with_(bos_token_id=cfg["vocab_size"])),
        ("bos huge", with_(bos_token_id=10**9)),
        ("bos string", with_(bos_token_id="1")),
        ("eos list out of range", with_(eos_token_id=[1, 10**6])),
        ("heads=3", with_(num_attention_heads=3)),
        ("kv heads=3", with_(num_key_value_heads=3)),
        ("head_dim odd", with_(head_dim=15)),
        ("head_dim null", with_(head_dim=None)),
        ("layer_types short", with_(layer_types=["full_attention"])),
        ("layer_types bad", with_(layer_types=["x", "y"][: cfg["num_hidden_layers"]])),
        ("sliding_window<0", with_(sliding_window=-1)),
        ("sliding_window 0", with_(sliding_window=0)),
        ("max_pos 0", with_(max_position_embeddings=0)),
        ("legal:eps 2e-5", with_(rms_norm_eps=2e-5)),
        ("legal:max_pos 4096", with_(max_position_embeddings=4096)),
        ("legal:bos 3", with_(bos_token_id=3)),
        ("legal:extra key", with_(my_note="hello")),
        ("legal:architectures", with_(architectures=["Other"])),
        ("legal:reformatted", json.dumps(cfg, indent=4, sort_keys=True)),
    ]
    act = "hidden_act" if "hidden_act" in cfg else "hidden_activation"
    out += [("act unknown", with_(**{act: "nope"})), ("act int", with_(**{act: 5}))]
    if nested:
        first = next(iter(rope))
        for name, v in (("0", 0.0), ("<0", -1.0), ("string", "x"), ("null", None)):
            out.append((f"rope_theta {name}", with_(rope_parameters=rope | {first: rope[first] | {"rope_theta": v}})))
        out.append(("legal:rope_theta 5e5", with_(rope_parameters=rope | {first: rope[first] | {"rope_theta": 5e5}})))
        out.append(("rope_theta removed", with_(rope_parameters=rope | {first: {"rope_type": "default"}})))
    else:
        for name, v in (("0", 0.0), ("<0", -1.0), ("string", "x"), ("null", None)):
            out.append((f"rope_theta {name}", with_(rope_parameters=rope | {"rope_theta": v})))
        out.append(("legal:rope_theta 5e5", with_(rope_parameters=rope | {"rope_theta": 5e5})))
        out.append(("rope_theta removed", with_(rope_parameters={"rope_type": "default"})))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
        out.append((f"{key} missing", without(key)))
        for label, v in (("0", 0), ("<0", -1), ("1.5", 1.5), ("str", str(cfg[key])), ("null", None), ("true", True)):
            out.append((f"{key}={label}", with_(**{key: v})))
        out.append((f"{key} huge", with_(**{key: 10**12})))
        out.append((f"{key}+1", with_(**{key: cfg[key] + 1})))
    return out


def _encode(text: str) -> bytes:
    return text.encode("utf-8", errors="surrogateescape")


# --------------------------------------------------------------------------------------------- HF dir mutants


def _copy_dir(src: Path, dst: Path, skip: set[str]) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name not in skip and f.suffix in (".json", ".safetensors"):
            shutil.copyfile(f, dst / f.name)


def _hf_cases(reader: str, seed: int, n: int, workdir: str | Path) -> list[Case]:
    from safetensors.torch import load_file

    orig = build_originals(workdir)
    out = Path(workdir) / reader
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 2 if reader == "safetensors" else 3])
    per_kind = {}
    for kind in KINDS:
        src = orig / f"hf_{kind}"
        raw_w = (src / "model.safetensors").read_bytes()
        cfg = json.loads((src / "config.json").read_text())
        tensors = load_file(str(src / "model.safetensors"))
        meta = _split_safetensors(raw_w)[0].get("__metadata__")
        sem_w = _tensor_mutants(tensors, meta, tied=cfg["tie_word_embeddings"])
        per_kind[kind] = (src, raw_w, (src / "config.json").read_bytes(), _config_mutants(cfg), sem_w)
    sem_index = 3 if reader == "hf_config" else 4
    order = {kind: rng.permutation(len(per_kind[kind][sem_index])) for kind in KINDS}  # a short run sees every kind
    cases, n_sem = [], dict.fromkeys(KINDS, 0)
    for i in range(n):
        kind = KINDS[i % 2]
        src, raw_w, raw_c, sem_c, sem_w = per_kind[kind]
        d = out / f"case{i:04d}"
        if d.exists():
            shutil.rmtree(d)
        semantic = rng.random() < SEMANTIC_SHARE
        if reader == "hf_config":
            _copy_dir(src, d, {"config.json"})
            if semantic:
                name, text = sem_c[order[kind][n_sem[kind] % len(sem_c)]]
                n_sem[kind] += 1
                mutant = _encode(text)
            else:
                mutant, name = _byte_mutant(rng, raw_c, len(raw_c))
            (d / "config.json").write_bytes(mutant)
        else:
            _copy_dir(src, d, {"model.safetensors"})
            if semantic:
                name, make = sem_w[order[kind][n_sem[kind] % len(sem_w)]]
                n_sem[kind] += 1
                files = make()
            else:
                r = rng.random()
                if r < 0.1:
                    v = _pick(rng, U64_EXTREMES + (_header_end(raw_w) - 8 + 1, _header_end(raw_w) - 8 - 1))
                    mutant, name = _put(raw_w, 0, "<Q", v), f"header_len={v}"
                elif r < 0.35:
                    mutant, name = _header_mutant(rng, raw_w)
                else:
                    mutant, name = _byte_mutant(rng, raw_w, _header_end(raw_w))
                files = {"model.safetensors": mutant}
            for fname, data in files.items():
                (d / fname).write_bytes(data)
        cases.append(Case(reader, f"{kind}:{name}", f"{THIS}:check_hf_dir", (str(d), str(src))))
    return cases


def safetensors_cases(seed: int, n: int, workdir: str | Path) -> list[Case]:
    """``n`` Hugging Face directories with a mutated ``model.safetensors`` (or an added shard)."""
    return _hf_cases("safetensors", seed, n, workdir)


def hf_config_cases(seed: int, n: int, workdir: str | Path) -> list[Case]:
    """``n`` Hugging Face directories with a mutated ``config.json``."""
    return _hf_cases("hf_config", seed, n, workdir)


# --------------------------------------------------------------------------------------------- model oracle


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _token_id(v: Any, cfg: dict[str, Any]) -> bool:
    ids = v if isinstance(v, list) else [v]
    return all(
        i is None or (isinstance(i, int) and not isinstance(i, bool) and 0 <= i < cfg["vocab_size"]) for i in ids
    )


def _rope_ok(v: Any, ref: Any) -> bool:
    """Same rope layout as the original, every base finite and positive."""
    if not isinstance(v, dict) or set(v) != set(ref):
        return False
    if "rope_theta" in ref:
        return v.get("rope_type") == ref["rope_type"] and _positive(v["rope_theta"])
    return all(_rope_ok(v[k], ref[k]) for k in ref)


# Config keys whose value may legally change (a different but sane model), with the oracle's own range check.
LEGAL_CONFIG: dict[str, Callable[[Any, dict[str, Any], dict[str, Any]], bool]] = {
    "rms_norm_eps": lambda v, cfg, ref: _positive(v) and v < 1,
    "rope_parameters": lambda v, cfg, ref: _rope_ok(v, ref["rope_parameters"]),
    "max_position_embeddings": lambda v, cfg, ref: _positive_int(v),
    "sliding_window": lambda v, cfg, ref: _positive_int(v),
    "query_pre_attn_scalar": lambda v, cfg, ref: _positive(v),
    "bos_token_id": lambda v, cfg, ref: _token_id(v, cfg),
    "eos_token_id": lambda v, cfg, ref: _token_id(v, cfg),
    "pad_token_id": lambda v, cfg, ref: _token_id(v, cfg),
    "layer_types": lambda v, cfg, ref: (
        isinstance(v, list)
        and len(v) == cfg["num_hidden_layers"]
        and all(t in ("sliding_attention", "full_attention") for t in v)
    ),
    "_name_or_path": lambda v, cfg, ref: isinstance(v, str),
}


def _model_from(cfg: dict[str, Any], state: dict[str, Any]) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(cfg)
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state, strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()


def _logits(model: Any) -> Any:
    import torch

    with torch.no_grad():
        return model(input_ids=_tokens(model.config.vocab_size)).logits


@functools.lru_cache(maxsize=8)
def _reference_hf(src: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The original's config (as transformers' ``to_dict``) and weights, read without the reader under test."""
    from safetensors.torch import load_file

    cfg = json.loads((Path(src) / "config.json").read_text())
    return _model_from(cfg, {}).config.to_dict(), load_file(str(Path(src) / "model.safetensors"))


def _judge(lm: Any, ref_cfg: dict[str, Any], ref_state: dict[str, Any], ref_arch: str) -> str:
    """``valid`` when the loaded model is the original up to legal changes (module docstring)."""
    import torch

    if lm.arch.gguf_arch != ref_arch:
        return "accepted_corrupt"
    cfg = lm.config.to_dict()
    diff = {k for k in set(cfg) | set(ref_cfg) if cfg.get(k) != ref_cfg.get(k)}
    for k in diff & set(LEGAL_CONFIG):
        if k not in cfg or not LEGAL_CONFIG[k](cfg[k], cfg, ref_cfg):
            return "accepted_corrupt"
    state = lm.model.state_dict()
    want_keys = set(ref_state) | ({"lm_head.weight"} if ref_cfg.get("tie_word_embeddings") else set())
    if set(state) != want_keys:
        return "accepted_corrupt"
    for name, w in state.items():
        ref = ref_state.get(name, ref_state.get("model.embed_tokens.weight"))
        if tuple(w.shape) != tuple(ref.shape) or w.dtype != torch.float32 or not bool(torch.isfinite(w).all()):
            return "accepted_corrupt"
    others = diff - set(LEGAL_CONFIG)
    if others:  # a change outside the table is legal only if the model computes the same without it
        reverted = {k: v for k, v in cfg.items() if k not in others} | {k: ref_cfg[k] for k in others if k in ref_cfg}
        if not torch.equal(_logits(lm.model), _logits(_model_from(reverted, state))):
            return "accepted_corrupt"
    return "valid"


def check_hf_dir(path: str, original: str) -> str:
    """Load a mutant Hugging Face directory; judge an accepted one against the original directory."""
    from ramp.models.loader import load_hf_dir

    lm = load_hf_dir(path, with_tokenizer=False)
    ref_cfg, ref_state = _reference_hf(original)
    return _judge(lm, ref_cfg, ref_state, "llama" if ref_cfg["model_type"] == "llama" else "gemma3")


# --------------------------------------------------------------------------------------------- folded mutants


def folded_cases(seed: int, n: int, workdir: str | Path) -> list[Case]:
    """``n`` mutants of the tiny folded models (metadata, config, tensors, bytes); a third load with a base."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    orig = build_originals(workdir)
    out = Path(workdir) / "folded"
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 4])
    per_kind = {}
    for kind in KINDS:
        src = orig / f"folded_{kind}.safetensors"
        with safe_open(str(src), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(str(src))
        cfg = json.loads(meta["ramp.config"])
        sem: list[tuple[str, Callable[[], bytes]]] = []
        for name, make in _tensor_mutants(tensors, meta, tied=cfg["tie_word_embeddings"]):
            files = make()
            if len(files) == 1:  # shards do not exist for a folded file
                sem.append((f"tensor {name}", functools.partial(lambda fs: fs["model.safetensors"], files)))

        def with_meta(m: dict[str, str | None], tensors: dict = tensors, meta: dict = meta) -> Callable[[], bytes]:
            new = {k: v for k, v in (meta | m).items() if v is not None}
            return lambda: _tensor_file(tensors, new)

        sem += [
            ("no ramp.config", with_meta({"ramp.config": None})),
            ("no ramp.arch", with_meta({"ramp.arch": None})),
            ("no metadata", lambda tensors=tensors: _tensor_file(tensors, None)),
            ("arch=mamba", with_meta({"ramp.arch": "mamba"})),
            ("arch mismatch", with_meta({"ramp.arch": "qwen3" if kind == "llama" else "llama"})),
            ("config not json", with_meta({"ramp.config": "{not json"})),
            ("config list", with_meta({"ramp.config": "[1, 2]"})),
            ("extra list", with_meta({"ramp.extra": "[]"})),
            ("extra not json", with_meta({"ramp.extra": "{"})),
            ("extra alpha NaN", with_meta({"ramp.extra": '{"alpha": NaN}'})),
            ("extra alpha 2", with_meta({"ramp.extra": '{"alpha": 2.0}'})),
            ("extra alpha string", with_meta({"ramp.extra": '{"alpha": "0.5"}'})),
            ("extra enabled string", with_meta({"ramp.extra": '{"enabled": "yes"}'})),
            ("legal:extra alpha 0.7", with_meta({"ramp.extra": '{"alpha": 0.7, "enabled": true}'})),
            ("legal:source changed", with_meta({"ramp.source": "/elsewhere/model.gguf"})),
            ("legal:no extra", with_meta({"ramp.extra": None})),
        ]
        for name, text in _config_mutants(cfg):
            if name != "not utf-8":  # safetensors metadata is UTF-8 by construction
                sem.append((f"config {name}", with_meta({"ramp.config": text})))
        per_kind[kind] = (src, src.read_bytes(), sem)
    order = {kind: rng.permutation(len(per_kind[kind][2])) for kind in KINDS}  # a short run sees every kind
    cases, n_sem = [], dict.fromkeys(KINDS, 0)
    for i in range(n):
        kind = KINDS[i % 2]
        src, raw, sem = per_kind[kind]
        path = out / f"case{i:04d}.safetensors"
        if rng.random() < SEMANTIC_SHARE:
            name, make = sem[order[kind][n_sem[kind] % len(sem)]]
            n_sem[kind] += 1
            path.write_bytes(make())
        else:
            r = rng.random()
            if r < 0.1:
                v = _pick(rng, U64_EXTREMES)
                mutant, name = _put(raw, 0, "<Q", v), f"header_len={v}"
            elif r < 0.35:
                mutant, name = _header_mutant(rng, raw)
            else:
                mutant, name = _byte_mutant(rng, raw, _header_end(raw))
            path.write_bytes(mutant)
        with_base = i % 3 == 2
        cases.append(
            Case(
                "folded",
                f"{kind}:{name}{' +base' if with_base else ''}",
                f"{THIS}:check_folded",
                (str(path), str(src), with_base),
            )
        )
    return cases


@functools.lru_cache(maxsize=8)
def _reference_folded(src: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(src, framework="pt") as f:
        meta = dict(f.metadata())
    cfg = json.loads(meta["ramp.config"])
    return _model_from(cfg, {}).config.to_dict(), load_file(src), meta["ramp.arch"]


def _legal_extra(path: str) -> bool:
    """The mutant's ``ramp.extra`` (read directly): absent, or an object with a legal alpha and enabled flag."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        text = (f.metadata() or {}).get("ramp.extra")
    if text is None:
        return True
    try:
        extra = json.loads(text)  # Python's json reads NaN and Infinity; the range check rejects them
    except ValueError:
        return False
    if not isinstance(extra, dict):
        return False
    alpha = extra.get("alpha", 0.0)
    alpha_ok = isinstance(alpha, int | float) and not isinstance(alpha, bool) and 0.0 <= alpha <= 1.0  # NaN fails
    return alpha_ok and isinstance(extra.get("enabled", True), bool)


def check_folded(path: str, original: str, with_base: bool) -> str:
    """Load a mutant folded model (with ``with_base``, against the original as its base); judge it."""
    from ramp.folding import load_folded
    from ramp.models.arch import ARCHS
    from ramp.models.loader import LoadedModel

    ref_cfg, ref_state, ref_arch = _reference_folded(original)
    base = None
    if with_base:
        base = LoadedModel(_model_from(ref_cfg, ref_state), None, ARCHS[ref_arch], Path("<base>"))
    lm = load_folded(path, base=base)
    if not _legal_extra(path):
        return "accepted_corrupt"
    return _judge(lm, ref_cfg, ref_state, ref_arch)


# --------------------------------------------------------------------------------------------- running

GENERATORS: dict[str, Callable[[int, int, str | Path], list[Case]]] = {
    "imatrix": imatrix_cases,
    "safetensors": safetensors_cases,
    "hf_config": hf_config_cases,
    "folded": folded_cases,
}


def reader_cases(seed: int, n: int, workdir: str | Path, readers: tuple[str, ...] = READERS) -> list[Case]:
    """``n`` cases for each reader in ``readers``."""
    return [c for r in readers for c in GENERATORS[r](seed, n, workdir)]


def run_readers(
    seed: int, n: int, workdir: str | Path, readers: tuple[str, ...] = READERS, timeout_s: float = 30.0
) -> Report:
    """Generate and run ``n`` cases per reader; the report's ``summary()`` has one row per reader."""
    return run_cases(reader_cases(seed, n, workdir, readers), timeout_s=timeout_s)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300, help="cases per reader")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=ROOT / "data" / "fuzz_readers")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "fuzz_readers.json")
    ap.add_argument("--readers", default=",".join(READERS))
    args = ap.parse_args(argv)
    readers = tuple(args.readers.split(","))
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    t0 = time.perf_counter()
    report = run_readers(args.seed, args.n, args.workdir, readers)
    summary = report.summary()
    result = {
        "command": " ".join(["python -m benchmarks.fuzz_readers", *(argv if argv is not None else sys.argv[1:])]),
        "seed": args.seed,
        "readers": summary,
        "defects": report.defects,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    from ramp.io import atomic_write_text

    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    for d in report.defects[:20]:
        print(d)
    return 0 if not report.defects else 1


if __name__ == "__main__":
    raise SystemExit(main())
