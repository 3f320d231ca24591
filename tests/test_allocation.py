import json
import re

import pytest

from ramp.allocation import (
    AllocationError,
    allocation_hash,
    bits_per_weight,
    load_allocation,
    matrix_bytes,
    min_matrix_bytes,
    save_allocation,
    slots_for,
    tensor_type_recipe,
    uniform,
    validate,
)
from ramp.formats import get_format
from ramp.models.loader import MatrixInfo


def _matrices():
    return [
        MatrixInfo(0, "q", "q", "blk.0.attn_q.weight", (576, 576)),
        MatrixInfo(0, "down", "d", "blk.0.ffn_down.weight", (576, 1536)),
    ]


def test_slots_order_formats_by_bpw_and_respect_row_length():
    q, down = slots_for(_matrices())
    assert "Q4_K" not in q.formats and "Q4_K" in down.formats
    assert q.formats[0] in ("IQ4_NL", "Q4_0") and down.formats[0] == "Q2_K"
    bpw = [get_format(f).bpw for f in down.formats]
    assert bpw == sorted(bpw)


def test_bytes_are_padded_to_alignment_and_exact():
    q, down = slots_for(_matrices())
    assert q.data_bytes("Q4_0") == 576 * 576 // 32 * 18
    assert q.file_bytes("Q4_0") % 32 == 0 and q.file_bytes("Q4_0") >= q.data_bytes("Q4_0")
    alloc = {q.gguf_name: "Q8_0", down.gguf_name: "Q4_K"}
    assert matrix_bytes([q, down], alloc) == q.file_bytes("Q8_0") + down.file_bytes("Q4_K")
    assert min_matrix_bytes([q, down]) == q.file_bytes("Q4_0") + down.file_bytes("Q2_K")
    assert bits_per_weight([q, down], uniform([q, down], "Q8_0")) == pytest.approx(8.5)


@pytest.mark.parametrize(
    "alloc, match",
    [
        ({"blk.0.attn_q.weight": "Q4_K", "blk.0.ffn_down.weight": "Q4_K"}, r"Q4_K.*not legal.*\[576, 576\]"),
        ({"blk.0.attn_q.weight": "Q4_0"}, r"without a format"),
        ({"blk.0.attn_q.weight": "Q4_0", "blk.0.ffn_down.weight": "Q4_0", "blk.9.x.weight": "Q4_0"}, r"blk\.9\.x"),
    ],
)
def test_bad_allocations_name_the_problem(alloc, match):
    with pytest.raises(AllocationError, match=match):
        validate(slots_for(_matrices()), alloc)


def test_uniform_never_falls_back():
    with pytest.raises(AllocationError, match="attn_q"):
        uniform(slots_for(_matrices()), "Q3_K")


@pytest.mark.parametrize("suffix", [".parquet", ".json"])
def test_save_load_round_trip(tmp_path, suffix):
    slots = slots_for(_matrices())
    alloc = {"blk.0.attn_q.weight": "IQ4_NL", "blk.0.ffn_down.weight": "Q3_K"}
    path = save_allocation(tmp_path / f"a{suffix}", slots, alloc)
    assert load_allocation(path) == alloc
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_hash_ignores_order_and_sees_changes():
    a = {"x": "Q4_0", "y": "Q8_0"}
    assert allocation_hash(a) == allocation_hash(dict(reversed(list(a.items()))))
    assert allocation_hash(a) != allocation_hash({"x": "Q4_0", "y": "Q6_K"})


def test_recipe_lines_match_exactly_one_tensor():
    alloc = {"blk.1.ffn_down.weight": "Q4_K", "blk.11.ffn_down.weight": "Q2_K"}
    lines = tensor_type_recipe(alloc).split()
    assert lines[1].endswith("=q2_k")
    pattern = re.compile(lines[0].split("=")[0])
    assert pattern.search("blk.1.ffn_down.weight") and not pattern.search("blk.11.ffn_down.weight")
    assert json.dumps(alloc)  # plain dict
