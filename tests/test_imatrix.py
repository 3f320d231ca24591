"""imatrix files: GGUF round trip, the legacy reader, and agreement with llama.cpp's own llama-imatrix."""

import re
import struct
import subprocess

import gguf
import numpy as np
import pytest
import torch

from ramp.calib import calibrate
from ramp.imatrix import ImatrixError, read_imatrix, read_imatrix_file, write_imatrix
from ramp.models.tiny import tiny_llama


@pytest.fixture(scope="module")
def stats():
    lm = tiny_llama(seed=0, layers=1)
    return calibrate(lm, torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0)))


def test_gguf_roundtrip_and_layout(tmp_path, stats):
    im = stats.imatrix()
    path = write_imatrix(tmp_path / "im.gguf", im, n_chunks=2, dataset="wiki-calib", chunk_size=32)
    back = read_imatrix(path)
    assert sorted(back) == sorted(im)
    for k in im:
        np.testing.assert_allclose(back[k], im[k], rtol=1e-6)
    f = read_imatrix_file(path)
    assert (f.datasets, f.chunk_count, f.chunk_size, f.legacy) == (["wiki-calib"], 2, 32, False)
    assert all(int(c[0]) == 64 for c in f.counts.values())
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.type"].contents() == "imatrix"
    assert "general.architecture" not in reader.fields  # as llama-imatrix writes it
    names = [t.name for t in reader.tensors]
    assert names[0::2] == sorted(names[0::2]) and all(n.endswith(".in_sum2") for n in names[0::2])
    assert [n.removesuffix(".counts") for n in names[1::2]] == [n.removesuffix(".in_sum2") for n in names[0::2]]
    t = {t.name: t for t in reader.tensors}
    assert list(t["blk.0.attn_q.weight.in_sum2"].shape) == [512, 1]  # ggml ne: [cols, n_mat]
    assert list(t["blk.0.attn_q.weight.counts"].shape) == [1, 1]


def test_legacy_dat_reader(tmp_path):
    vals = np.array([1.0, 4.0, 9.0], dtype=np.float32)
    name = b"blk.0.attn_q.weight"
    raw = struct.pack("<i", 1) + struct.pack("<i", len(name)) + name + struct.pack("<ii", 5, 3)
    raw += (vals * 5).astype("<f4").tobytes() + struct.pack("<ii", 5, 4) + b"wiki"
    (tmp_path / "im.dat").write_bytes(raw)
    f = read_imatrix_file(tmp_path / "im.dat")
    assert f.legacy and f.chunk_count == 5 and f.datasets == ["wiki"]
    np.testing.assert_allclose(read_imatrix(tmp_path / "im.dat")["blk.0.attn_q.weight"], vals)


def test_bad_input(tmp_path):
    with pytest.raises(ImatrixError, match="empty"):
        write_imatrix(tmp_path / "a.gguf", {}, 1, "d")
    with pytest.raises(ImatrixError, match="'blk.0.attn_q.weight' must be a non-empty, finite, non-negative"):
        write_imatrix(tmp_path / "a.gguf", {"blk.0.attn_q.weight": np.array([1.0, -1.0])}, 1, "d")
    with pytest.raises(ImatrixError, match="'blk.0.x' is not a llama.cpp weight name"):
        write_imatrix(tmp_path / "a.gguf", {"blk.0.x": np.array([1.0])}, 1, "d")
    with pytest.raises(ImatrixError, match="dataset"):
        write_imatrix(tmp_path / "a.gguf", {"blk.0.x": np.array([1.0])}, 1, [])
    assert not list(tmp_path.iterdir())  # nothing partial left behind
    with pytest.raises(ImatrixError, match="no such imatrix file"):
        read_imatrix(tmp_path / "missing.gguf")


def _gguf_imatrix(path, sums, counts, chunk_count=("UINT32", 2), kind="imatrix"):
    """A GGUF imatrix with one entry, written with gguf-py so that any value can be stored."""
    w = gguf.GGUFWriter(str(path), "imatrix")
    w.kv_data[0].clear()
    w.add_string("general.type", kind)
    w.add_array("imatrix.datasets", ["d"])
    w.add_key_value("imatrix.chunk_count", chunk_count[1], gguf.GGUFValueType[chunk_count[0]])
    w.add_uint32("imatrix.chunk_size", 4)
    if sums is not None:
        w.add_tensor("blk.0.attn_q.weight.in_sum2", np.asarray(sums))
    if counts is not None:
        w.add_tensor("blk.0.attn_q.weight.counts", np.asarray(counts))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


SUMS = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
COUNTS = np.array([[8.0]], dtype=np.float32)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"sums": SUMS * np.float32("nan")}, "'blk.0.attn_q.weight' holds nan"),
        ({"sums": -SUMS}, "'blk.0.attn_q.weight' holds -1.0"),
        ({"counts": COUNTS * 0}, "token count 0.0; expected a whole number >= 1"),
        ({"counts": COUNTS + 0.5}, "token count 8.5; expected a whole number >= 1"),
        ({"counts": None}, "has 'blk.0.attn_q.weight.in_sum2' but no 'blk.0.attn_q.weight.counts'"),
        ({"counts": np.full((2, 1), 8.0, np.float32)}, r"ggml shape \[1, 2\], expected \[1, 1\]"),
        ({"sums": SUMS.astype(np.float16)}, "'blk.0.attn_q.weight.in_sum2' is F16, expected F32"),
        ({"chunk_count": ("UINT64", 2)}, "'imatrix.chunk_count' = 2 must be a UINT32 >= 1"),
        ({"chunk_count": ("UINT32", 0)}, "'imatrix.chunk_count' = 0 must be a UINT32 >= 1"),
        ({"kind": "model"}, "'general.type' = 'model', expected the string 'imatrix'"),
    ],
    ids=["nan", "negative", "count-0", "count-fraction", "unpaired", "n_mat", "f16", "u64", "zero-chunks", "type"],
)
def test_gguf_reader_rejects_with_one_error(tmp_path, kw, match):
    path = _gguf_imatrix(tmp_path / "im.gguf", **({"sums": SUMS, "counts": COUNTS} | kw))
    with pytest.raises(ImatrixError, match=match) as e:
        read_imatrix_file(path)
    assert str(e.value).startswith(str(path))


def test_gguf_reader_accepts_rank_1_tensors_as_llama_imatrix_writes_them(tmp_path):
    # ggml drops trailing 1s from a tensor's rank: a dense matrix's sums are stored as [cols], counts as [1].
    path = _gguf_imatrix(tmp_path / "im.gguf", SUMS.reshape(-1) * 8, COUNTS.reshape(-1))
    np.testing.assert_array_equal(read_imatrix(path)["blk.0.attn_q.weight"], SUMS.reshape(-1))


N_CTX, N_CHUNKS = 512, 4  # 2,048 tokens keep llama-imatrix near a minute on 2 shared cores


@pytest.mark.slow
def test_matches_llama_imatrix_and_llama_quantize_accepts(tmp_path, llama_cpp_bin):
    from ramp.assets import asset_path, smollm2_gguf_path
    from ramp.calib import calibration_tokens
    from ramp.data import wiki_split
    from ramp.llamacpp import tool
    from ramp.models.loader import load_model

    src = smollm2_gguf_path()
    lm = load_model(src)
    text = wiki_split(asset_path("wiki"))[0][:60_000]
    text_file = tmp_path / "calib.txt"
    text_file.write_text(text)
    theirs_path = tmp_path / "theirs.gguf"
    run = subprocess.run(
        [
            str(tool("llama-imatrix")),
            "-m",
            str(src),
            "-f",
            str(text_file),
            "-o",
            str(theirs_path),
            "-c",
            str(N_CTX),
            "--chunks",
            str(N_CHUNKS),
            "-t",
            "2",
            "--no-ppl",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    theirs = read_imatrix_file(theirs_path)
    assert theirs.chunk_count == N_CHUNKS

    tokens = calibration_tokens(lm, text, N_CTX * N_CHUNKS, N_CTX)
    ours = calibrate(lm, tokens, batch_size=2)
    ours_im = ours.imatrix()
    their_im = theirs.means()
    names = {m.gguf_name for m in lm.matrices()}
    assert names <= set(their_im), sorted(names - set(their_im))[:5]
    corr = {n: float(np.corrcoef(ours_im[n], their_im[n])[0, 1]) for n in names}
    worst = min(corr, key=corr.get)
    assert corr[worst] >= 0.99, (worst, corr[worst])
    for n in names:  # same token count per matrix
        assert int(theirs.counts[n][0]) == ours.count[n] == N_CTX * N_CHUNKS

    ours_path = write_imatrix(tmp_path / "ours.gguf", ours_im, N_CHUNKS, str(text_file), N_CTX, ours.count)
    out = tmp_path / "q.gguf"
    q = subprocess.run(
        [
            str(tool("llama-quantize")),
            "--allow-requantize",
            "--imatrix",
            str(ours_path),
            str(src),
            str(out),
            "Q4_0",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=400,
    )
    log = q.stdout + q.stderr
    assert q.returncode == 0, log[-2000:]
    m = re.search(r"loaded (\d+) importance matrix entries", log)
    assert m and int(m.group(1)) == len(names), log[-2000:]
