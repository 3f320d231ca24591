"""Allocation evaluation by weight swapping: the quantization cache, the swap, and the memoised evaluator."""

import json

import numpy as np
import pytest
import torch

from ramp.allocation import AllocationError, slots_for, uniform
from ramp.evaluate.kld import fp_reference, kl_divergence
from ramp.evaluate.perplexity import EvaluationError
from ramp.evaluate.quantized import AllocationEvaluator, QuantCache, swap_allocation, weight_digest
from ramp.formats import get_format
from ramp.models.tiny import tiny_llama


def fp_state(lm) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lm.model.state_dict().items()}


def assert_fp_intact(lm, state) -> None:
    now = lm.model.state_dict()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


def test_cache_returns_ggml_dequantized_bytes_and_persists(tmp_path):
    w = 0.05 * torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    im = np.linspace(0.1, 2.0, 512, dtype=np.float32)
    cache = QuantCache(tmp_path, memory_bytes=3 << 19)  # room for three of the four entries below
    fmt = get_format("Q4_K")
    want = fmt.dequantize(fmt.quantize(w, im, "x"), (256, 512))
    got = cache.dequantized(w, "x", "Q4_K", im)
    assert torch.equal(got, want) and cache.stats["quantized"] == 1
    assert cache.dequantized(w, "x", "Q4_K", im) is got and cache.stats["memory_hits"] == 1
    # the imatrix is part of the key for formats that use it ...
    plain = cache.dequantized(w, "x", "Q4_K", None)
    assert not torch.equal(plain, got) and cache.stats["quantized"] == 2
    # ... and not for those that ignore it
    q8a = cache.dequantized(w, "x", "Q8_0", im)
    q8b = cache.dequantized(w, "x", "Q8_0", None)
    assert q8a is q8b and cache.stats["quantized"] == 3
    # F16 is a rounding to half precision, F32 the weight itself
    assert torch.equal(cache.dequantized(w, "x", "F16"), w.half().float())
    assert torch.equal(cache.dequantized(w, "x", "F32"), w)
    # a fresh cache on the same folder reads the disk entry instead of quantizing
    again = QuantCache(tmp_path)
    assert torch.equal(again.dequantized(w, "x", "Q4_K", im), want)
    assert again.stats == {
        "memory_hits": 0,
        "disk_hits": 1,
        "quantized": 0,
        "quantize_seconds": 0.0,
        "evicted": 0,
        "evicted_bytes": 0,
        "not_admitted": 0,
    }
    # the in-memory part stays under its byte bound: F16, asked for once, found it full
    assert cache._lru_bytes <= 3 << 19 and cache.stats["not_admitted"] == 1


def test_corrupt_cache_entry_is_an_error(tmp_path):
    w = torch.randn(4, 256)
    cache = QuantCache(tmp_path, memory_bytes=0)
    cache.dequantized(w, "x", "Q4_0")
    (path,) = list(tmp_path.rglob("*.safetensors"))
    path.write_bytes(b"garbage")
    with pytest.raises(EvaluationError, match="unreadable quantization cache entry"):
        cache.dequantized(w, "x", "Q4_0")


def small_weights(n: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` distinct 4x256 weights (one disk entry each: 4 KiB of fp32 plus the safetensors header)."""
    g = torch.Generator().manual_seed(seed)
    return [0.05 * torch.randn(4, 256, generator=g) for _ in range(n)]


def q8(w: torch.Tensor) -> torch.Tensor:
    fmt = get_format("Q8_0")
    return fmt.dequantize(fmt.quantize(w, None), tuple(w.shape))


def entries(root) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in root.rglob("*.safetensors")}


def entry_size(tmp_path) -> int:
    """Bytes of one entry of :func:`small_weights` on disk."""
    probe = QuantCache(tmp_path / "probe", memory_bytes=0)
    probe.dequantized(small_weights(1, seed=99)[0], "w0", "Q8_0")  # the name is in the header: same length
    (size,) = entries(tmp_path / "probe").values()
    return size


def test_disk_stays_within_its_bound_over_many_writes(tmp_path):
    """Plain LRU (``admission="lru"``)."""
    size = entry_size(tmp_path)
    bound = 3 * size + size // 2  # room for three entries
    cache = QuantCache(tmp_path / "q", memory_bytes=0, admission="lru", disk_bytes=bound)
    weights = small_weights(10)
    for i, w in enumerate(weights):
        assert torch.equal(cache.dequantized(w, f"w{i}", "Q8_0"), q8(w))
        on_disk = entries(tmp_path / "q")
        assert sum(on_disk.values()) <= bound and len(on_disk) == min(i + 1, 3)
        assert cache.disk_usage() == sum(on_disk.values())
        assert cache.path_for(cache.key(weight_digest(w), "Q8_0", None)).exists()  # never the one just written
    assert cache.stats["evicted"] == 7 and cache.stats["evicted_bytes"] == 7 * size
    assert cache.stats["quantized"] == 10 and cache.trim() == 0


def test_the_entry_just_written_is_never_evicted(tmp_path):
    """Plain LRU (``admission="lru"``)."""
    size = entry_size(tmp_path)
    # room for one; 90 % is less
    cache = QuantCache(tmp_path / "q", memory_bytes=0, admission="lru", disk_bytes=size + size // 20)
    for i, w in enumerate(small_weights(3)):
        cache.dequantized(w, f"w{i}", "Q8_0")
        assert list(entries(tmp_path / "q")) == [cache.path_for(cache.key(weight_digest(w), "Q8_0", None)).name]
    # an entry larger than the whole bound is not written (it would evict everything and still not fit)
    small = QuantCache(tmp_path / "q", memory_bytes=0, admission="lru", disk_bytes=size // 2)
    (w,) = small_weights(1, seed=5)
    assert torch.equal(small.dequantized(w, "w9", "Q8_0"), q8(w)) and len(entries(tmp_path / "q")) == 1


def test_disk_evicts_the_least_recently_used_entry(tmp_path):
    """Plain LRU (``admission="lru"``)."""
    size = entry_size(tmp_path)
    a, b, c, d = small_weights(4)
    cache = QuantCache(tmp_path / "q", memory_bytes=0, admission="lru", disk_bytes=3 * size)
    for i, w in enumerate((a, b, c)):
        cache.dequantized(w, f"w{i}", "Q8_0")
    path = {
        n: cache.path_for(cache.key(weight_digest(w), "Q8_0", None)) for n, w in zip("abcd", (a, b, c, d), strict=True)
    }
    assert torch.equal(cache.dequantized(a, "w0", "Q8_0"), q8(a))  # a disk hit makes a the most recent
    assert cache.stats["disk_hits"] == 1 and cache.stats["evicted"] == 0
    cache.dequantized(d, "w3", "Q8_0")  # 4 entries > 3: evict down to 90 % of the bound, oldest first
    assert not path["b"].exists() and not path["c"].exists()  # the two oldest go ...
    assert path["a"].exists() and path["d"].exists()  # ... the one read recently and the new one stay
    assert cache.stats["evicted"] == 2 and cache.stats["evicted_bytes"] == 2 * size
    assert torch.equal(cache.dequantized(b, "w1", "Q8_0"), q8(b))  # recomputed, written again
    assert path["b"].exists() and cache.stats["quantized"] == 5 and cache.disk_usage() == 3 * size


def test_a_memory_hit_needs_no_disk_entry(tmp_path):
    (w,) = small_weights(1)
    cache = QuantCache(tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 20)
    first = cache.dequantized(w, "x", "Q8_0")
    for p in tmp_path.rglob("*.safetensors"):
        p.unlink()
    assert cache.dequantized(w, "x", "Q8_0") is first and cache.stats["memory_hits"] == 1


def test_disk_bytes_zero_writes_nothing_and_still_answers(tmp_path):
    root = tmp_path / "q"
    cache = QuantCache(root, memory_bytes=1 << 20, disk_bytes=0)
    weights = small_weights(3)
    for i, w in enumerate(weights):
        assert torch.equal(cache.dequantized(w, f"w{i}", "Q8_0"), q8(w))
    assert not root.exists() or not list(root.rglob("*"))
    assert cache.dequantized(weights[0], "w0", "Q8_0") is not None and cache.stats["memory_hits"] == 1
    nothing = QuantCache(root, memory_bytes=0, disk_bytes=0)
    assert torch.equal(nothing.dequantized(weights[1], "w1", "Q8_0"), q8(weights[1]))
    assert nothing.stats["quantized"] == 1 and nothing.disk_usage() == 0 and nothing.trim() == 0
    # the disk part off also ignores (and trims away) entries an earlier run left
    QuantCache(root, memory_bytes=0).dequantized(weights[2], "w2", "Q8_0")
    off = QuantCache(root, memory_bytes=0, disk_bytes=0)
    off.dequantized(weights[2], "w2", "Q8_0")
    assert off.stats["disk_hits"] == 0 and off.stats["quantized"] == 1
    assert off.trim() > 0 and not list(root.rglob("*.safetensors"))


def test_a_vanished_entry_is_computed_again(tmp_path):
    (w,) = small_weights(1)
    cache = QuantCache(tmp_path, memory_bytes=0)
    want = cache.dequantized(w, "x", "Q8_0")
    (path,) = tmp_path.rglob("*.safetensors")
    path.unlink()  # another process evicted it
    assert torch.equal(cache.dequantized(w, "x", "Q8_0"), want)
    assert cache.stats["quantized"] == 2 and cache.stats["disk_hits"] == 0 and path.exists()
    assert cache.disk_usage() == path.stat().st_size


def test_two_caches_on_one_folder_stay_within_the_bound(tmp_path):
    """Plain LRU (``admission="lru"``)."""
    size = entry_size(tmp_path)
    bound = 4 * size
    root = tmp_path / "q"
    weights = small_weights(8)
    one = QuantCache(root, memory_bytes=0, admission="lru", disk_bytes=bound)
    one.rescan_seconds = 0.0  # (60 s by default) every write refreshes its total: the other's writes count at once
    for i, w in enumerate(weights[:3]):
        one.dequantized(w, f"w{i}", "Q8_0")
    two = QuantCache(root, memory_bytes=0, admission="lru", disk_bytes=bound)  # its scan sees the other's three
    for i, w in enumerate(weights[3:6], start=3):
        two.dequantized(w, f"w{i}", "Q8_0")
    assert sum(entries(root).values()) <= bound and two.stats["evicted"] == 2  # the other's two oldest
    assert not one.path_for(one.key(weight_digest(weights[0]), "Q8_0", None)).exists()
    # the first reads what the second evicted: computed again, and the folder stays within the bound
    for i, w in enumerate(weights):
        assert torch.equal(one.dequantized(w, f"w{i}", "Q8_0"), q8(w))
        assert sum(entries(root).values()) <= bound
    assert one.stats["quantized"] >= 3 + 3 and one.stats["quantized"] + one.stats["disk_hits"] == 3 + 8
    assert one.disk_usage() == two.disk_usage() == sum(entries(root).values())
    # a smaller bound on the same folder trims it now, oldest first
    small = QuantCache(root, memory_bytes=0, admission="lru", disk_bytes=2 * size)
    before = len(entries(root))
    assert small.trim() == (before - 2) * size and len(entries(root)) == 2
    assert small.stats["evicted"] == before - 2 and two.disk_usage() == 2 * size


def cycle(cache: QuantCache, weights: list[torch.Tensor], rounds: int, start: int = 0) -> None:
    """Ask for every weight in turn, ``rounds`` times over (the reward evaluations' access pattern)."""
    for _ in range(rounds):
        for i, w in enumerate(weights, start=start):
            assert torch.equal(cache.dequantized(w, f"w{i}", "Q8_0"), q8(w))


@pytest.mark.parametrize("part", ["memory", "disk"])
def test_a_cycle_larger_than_the_cache_keeps_hitting_what_fits(tmp_path, part):
    """8 weights asked for in turn, room for 3: plain LRU evicts each entry just before it is asked for again
    and never hits; reuse admission keeps 3 of them and hits those every round."""
    size = entry_size(tmp_path) if part == "disk" else 4 * 256 * 4
    bound = 3 * size + size // 2
    limits = {"memory_bytes": bound, "disk_bytes": 0} if part == "memory" else {"memory_bytes": 0, "disk_bytes": bound}
    hits = f"{part}_hits"
    weights = small_weights(8)
    lru = QuantCache(tmp_path / "lru", admission="lru", **limits)
    cycle(lru, weights, rounds=5)
    assert lru.stats[hits] == 0 and lru.stats["quantized"] == 40
    reuse = QuantCache(tmp_path / "reuse", **limits)
    cycle(reuse, weights, rounds=5)
    assert reuse.stats[hits] == 3 * 4 and reuse.stats["quantized"] == 40 - 12
    assert reuse.stats["not_admitted"] == 5 + 5 * 4 and reuse.stats["evicted"] == 0
    if part == "disk":
        assert len(entries(tmp_path / "reuse")) == 3 and sum(entries(tmp_path / "reuse").values()) <= bound
        assert len(list((tmp_path / "reuse").rglob("*.seen"))) == 5  # the last request of each key left out
    # the pattern moves on to 3 other weights: their second request displaces the idle entries, then they hit
    others = small_weights(3, seed=7)
    cycle(reuse, others, rounds=4, start=8)
    assert reuse.stats[hits] == 12 + 3 * 2 and reuse.stats["evicted"] == (3 if part == "disk" else 0)
    if part == "disk":
        kept = {reuse.path_for(reuse.key(weight_digest(w), "Q8_0", None)).name for w in others}
        assert set(entries(tmp_path / "reuse")) == kept
        assert sum(entries(tmp_path / "reuse").values()) <= bound


def test_reuse_admission_across_processes_reads_the_markers(tmp_path):
    """A second cache on the folder (another process) sees the first one's requests: a key the first asked
    for displaces entries idle since then."""
    size = entry_size(tmp_path)
    root = tmp_path / "q"
    a, b, c = small_weights(3)
    one = QuantCache(root, memory_bytes=0, disk_bytes=2 * size)
    cycle(one, [a, b], rounds=1)
    one.dequantized(c, "w2", "Q8_0")  # full: not admitted, remembered on disk
    assert one.stats["not_admitted"] == 1 and len(list(root.rglob("*.seen"))) == 1
    two = QuantCache(root, memory_bytes=0, disk_bytes=2 * size)
    two.dequantized(b, "w1", "Q8_0")  # b used after c's request; a idle since before it
    two.dequantized(c, "w2", "Q8_0")  # second request: may displace a, not b
    assert two.stats["disk_hits"] == 1 and two.stats["not_admitted"] == 0 and two.stats["evicted"] == 1
    names = {two.path_for(two.key(weight_digest(w), "Q8_0", None)).name: w for w in (a, b, c)}
    assert set(entries(root)) == {n for n, w in names.items() if w is not a}
    assert not list(root.rglob("*.seen"))  # c's marker went with its write, a has none


def test_cache_bounds_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"QuantCache disk_bytes = -1: expected an integer >= 0"):
        QuantCache(tmp_path, disk_bytes=-1)
    with pytest.raises(ValueError, match=r"QuantCache memory_bytes = 1.5: expected an integer >= 0"):
        QuantCache(tmp_path, memory_bytes=1.5)
    with pytest.raises(ValueError, match=r"QuantCache admission = 'mru': expected one of reuse, lru"):
        QuantCache(tmp_path, admission="mru")


def test_swap_puts_dequantized_weights_in_and_restores_fp(tmp_path):
    lm = tiny_llama(seed=0)
    state = fp_state(lm)
    slots = slots_for(lm.matrices())
    alloc = {s.gguf_name: ("Q2_K" if s.block == 0 else "Q8_0") for s in slots}
    cache = QuantCache(tmp_path)
    params = dict(lm.model.named_parameters())
    m0 = lm.matrices()[0]
    with swap_allocation(lm, alloc, cache) as swapped:
        assert swapped is lm
        fmt = get_format("Q2_K")
        want = fmt.dequantize(fmt.quantize(state[m0.hf_name], None), m0.shape)
        assert torch.equal(params[m0.hf_name], want)
        assert not torch.equal(params[m0.hf_name], state[m0.hf_name])
    assert_fp_intact(lm, state)
    with pytest.raises(RuntimeError, match="boom"), swap_allocation(lm, alloc, cache):
        raise RuntimeError("boom")
    assert_fp_intact(lm, state)


def test_swap_rejects_bad_allocations_without_touching_weights(tmp_path):
    lm = tiny_llama(seed=0)
    state = fp_state(lm)
    alloc = uniform(slots_for(lm.matrices()), "Q4_0")
    cache = QuantCache(tmp_path)
    with (
        pytest.raises(AllocationError, match="blk.99.ffn_up.weight"),
        swap_allocation(lm, {**alloc, "blk.99.ffn_up.weight": "Q4_0"}, cache),
    ):
        pass
    with (
        pytest.raises(AllocationError, match="'BF16' is not legal"),
        swap_allocation(lm, {**alloc, "blk.0.attn_q.weight": "BF16"}, cache),
    ):
        pass
    missing = dict(alloc)
    missing.pop("blk.1.ffn_down.weight")
    with pytest.raises(AllocationError, match="without a format"), swap_allocation(lm, missing, cache):
        pass
    assert_fp_intact(lm, state)


def test_evaluator_memoises_orders_formats_and_keeps_fp(tmp_path):
    lm = tiny_llama(seed=0)
    state = fp_state(lm)
    toks = torch.randint(0, 512, (2, 64), generator=torch.Generator().manual_seed(0))
    ref = fp_reference(lm, toks, top_k=32, n_tail=16)
    slots = slots_for(lm.matrices())
    memo = tmp_path / "memo.json"
    ev = AllocationEvaluator(lm, ref, QuantCache(tmp_path / "q"), memo_path=memo)
    res = {f: ev.evaluate(uniform(slots, f)) for f in ("Q2_K", "Q4_0", "Q8_0", "F16")}
    assert res["Q2_K"].mean > res["Q4_0"].mean > res["Q8_0"].mean > res["F16"].mean
    assert abs(res["F16"].mean) < 1e-4  # unbiased tail estimate: ~0, either sign, for a near-lossless format
    assert_fp_intact(lm, state)
    # FP ppl through the evaluator's reference equals a direct run on the intact model
    assert kl_divergence(lm, ref).mean < 1e-6
    again = ev.evaluate(uniform(slots, "Q4_0"))
    assert again is res["Q4_0"] and ev.stats["memo_hits"] == 1 and ev.stats["evaluations"] == 4
    assert [r.mean for r in ev.evaluate_many([uniform(slots, "Q2_K"), uniform(slots, "F16")])] == [
        res["Q2_K"].mean,
        res["F16"].mean,
    ]
    # the memo file serves a new evaluator without any forward pass
    assert len(json.loads(memo.read_text())["results"]) == 4
    ev2 = AllocationEvaluator(lm, ref, QuantCache(tmp_path / "q"), memo_path=memo)
    assert ev2.evaluate(uniform(slots, "Q4_0")).mean == res["Q4_0"].mean and ev2.stats["evaluations"] == 0
    # ... but not one built on another imatrix
    im = {m.gguf_name: np.ones(m.shape[1], dtype=np.float32) for m in lm.matrices()}
    with pytest.raises(EvaluationError, match="another model/reference/imatrix"):
        AllocationEvaluator(lm, ref, QuantCache(tmp_path / "q"), imatrix=im, memo_path=memo)
    # changing the FP weights under an evaluator is caught, not silently scored
    with torch.no_grad():
        dict(lm.model.named_parameters())[lm.matrices()[3].hf_name].mul_(1.01)
    with pytest.raises(EvaluationError, match="FP weights changed"):
        ev.evaluate(uniform(slots, "Q5_0"))
