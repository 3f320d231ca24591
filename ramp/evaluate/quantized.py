"""Evaluate an allocation by swapping dequantized weights into the FP model.

Each (matrix, format, imatrix) is quantized once with RAMP's ggml-identical quantizers and its dequantized
float32 weight is cached on disk (safetensors, keyed by the sha256 of weight bytes + format + imatrix bytes)
and in an in-memory LRU. Storing the dequantized fp32 rather than the GGUF bytes is deliberate: reading a
576x1536 fp32 matrix back takes ~0.25 ms, dequantizing its Q4_0/IQ4_NL bytes 4-10 ms.

Both parts are bounded. The disk part (``disk_bytes``, params.yaml ``cache.disk_bytes``) orders the entry files
by their mtimes: a disk hit refreshes the entry's mtime, and a write that takes the folder above the bound
removes the least recently used entries (never the one just written) until it fits again. Several processes may
share one folder: each keeps a running total (a scan when it starts, plus its own writes) and rescans the
folder whenever it evicts, and an entry another process removed is simply computed again. ``disk_bytes=0``
turns the disk part off (nothing read or written).

Both parts resist scans (``admission="reuse"``, the default). The pipeline's access pattern is a cycle: every
reward evaluation asks for every matrix in its format, so once the formats in play outgrow a bound, plain LRU
evicts each entry just before it is asked for again and never hits (measured: zero memory hits above ~0.27B
matrix parameters). Here a new entry may only displace entries that were last used before the new key's own
previous request (its reuse distance is shorter than their idle time). A key asked for the first time into a
full cache, or whose displacement would push out entries used more recently, is not stored, so a cycle larger
than the cache keeps hitting the part that fits (hit rate ~ bound / working set instead of 0), while a shift to
new keys still replaces idle entries on their second request. The disk part remembers a missed key's last
request as an empty ``<key>.seen`` marker (removed when the entry is written, or once it is older than every
entry). ``admission="lru"`` is plain LRU.

Swapping replaces each parameter's storage (``param.data = dequantized``) instead of copying into it, so
a swap costs no copies and the FP tensors are never written to; on exit the original storage goes back,
also on an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ramp.allocation import allocation_hash, slots_for, validate
from ramp.evaluate.kld import FPReference, KLDResult, kl_divergence
from ramp.evaluate.perplexity import EvaluationError
from ramp.formats import get_format
from ramp.io import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

Imatrix = Mapping[str, np.ndarray]
IDENTITY_FORMATS = ("F32",)  # stored as-is: the FP weight is the "dequantized" one
DEFAULT_MEMORY_BYTES = 1 << 30  # the in-memory LRU (params.yaml cache.memory_bytes)
DEFAULT_DISK_BYTES = 4 << 30  # the entries on disk (params.yaml cache.disk_bytes)
ENTRY_SUFFIX = ".safetensors"
SEEN_SUFFIX = ".seen"  # disk marker: the last request of a key with no entry (mtime)
ADMISSIONS = ("reuse", "lru")
GHOST_LIMIT = 1 << 16  # keys whose last request the in-memory part remembers (~10 MB)


def weight_digest(weight: torch.Tensor) -> str:
    """sha256 of a weight's float32 bytes and shape."""
    w = weight.detach().to(torch.float32).contiguous()
    h = hashlib.sha256(str(tuple(w.shape)).encode())
    h.update(memoryview(w.numpy()).cast("B"))
    return h.hexdigest()


def imatrix_digest(imatrix: np.ndarray | None) -> str:
    if imatrix is None:
        return "none"
    return hashlib.sha256(np.ascontiguousarray(imatrix, dtype=np.float32).tobytes()).hexdigest()


class _Discard(Exception):
    """An entry the disk part does not keep (the temp file goes)."""


class _NotAdmitted(_Discard):
    """An entry that may not displace the more recently used ones (``admission="reuse"``)."""


class QuantCache:
    """Dequantized weights per (weight content, format, imatrix): disk under ``root`` plus an in-memory LRU.

    ``memory_bytes`` bounds the in-memory LRU (bytes of fp32 tensors kept in RAM); 0 disables it.
    ``disk_bytes`` bounds the entry files under ``root`` (an LRU on their mtimes, shared with any other process
    using the folder); 0 disables the disk part. A memory hit does not touch the disk entry's recency.

    A write that takes the folder over ``disk_bytes`` evicts down to ``low_water`` of it, so that a full cache is
    not rescanned on every write (a scan stats every entry: ~7 us each). The running total is refreshed by a scan
    at least every ``rescan_seconds`` of writing, which bounds how long other processes' writes go unseen.
    """

    low_water = 0.9
    rescan_seconds = 60.0

    def __init__(
        self,
        root: str | Path,
        memory_bytes: int = DEFAULT_MEMORY_BYTES,
        disk_bytes: int = DEFAULT_DISK_BYTES,
        admission: str = "reuse",
    ) -> None:
        for name, value in (("memory_bytes", memory_bytes), ("disk_bytes", disk_bytes)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"QuantCache {name} = {value!r}: expected an integer >= 0 (bytes; 0 = off)")
        if admission not in ADMISSIONS:
            raise ValueError(f"QuantCache admission = {admission!r}: expected one of {', '.join(ADMISSIONS)}")
        self.root = Path(root)
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes
        self.admission = admission
        self._lru: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lru_bytes = 0
        self._clock = 0  # requests so far (the in-memory part's time)
        self._last: OrderedDict[str, int] = OrderedDict()  # key -> its last request (resident or not), oldest first
        self.stats = {
            "memory_hits": 0,
            "disk_hits": 0,
            "quantized": 0,
            "quantize_seconds": 0.0,
            "evicted": 0,
            "evicted_bytes": 0,
            "not_admitted": 0,
        }
        self._disk_total = 0  # bytes of entries under root: the last scan plus this object's writes since
        self._scanned_at = time.monotonic()
        if self.disk_bytes > 0:
            self.root.mkdir(parents=True, exist_ok=True)
            self.disk_usage()

    @staticmethod
    def key(weight_sha: str, fmt: str, imatrix: np.ndarray | None) -> str:
        """Cache key; the imatrix only counts for formats whose quantizer uses it."""
        f = get_format(fmt)
        im = imatrix_digest(imatrix if f.uses_imatrix else None)
        return hashlib.sha256(f"{weight_sha}|{f.name}|{im}".encode()).hexdigest()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{ENTRY_SUFFIX}"

    def seen_path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}{SEEN_SUFFIX}"

    # ------------------------------------------------------------------------------------------ disk bound

    def _scan(self, markers: list[tuple[int, Path]] | None = None) -> list[tuple[int, int, Path]]:
        """(mtime_ns, bytes, path) of every entry under ``root`` now; entries removed meanwhile are skipped.
        ``markers``, when given, receives (mtime_ns, path) of every ``.seen`` marker."""
        self._scanned_at = time.monotonic()
        out: list[tuple[int, int, Path]] = []
        try:
            folders = [e.path for e in os.scandir(self.root) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            return out
        for folder in folders:
            try:
                entries = list(os.scandir(folder))
            except FileNotFoundError:
                continue
            for e in entries:
                if e.name.startswith("."):  # ".<name>.<pid>.<x>.tmp": a write in progress
                    continue
                entry = e.name.endswith(ENTRY_SUFFIX)
                if not entry and not (markers is not None and e.name.endswith(SEEN_SUFFIX)):
                    continue
                try:
                    st = e.stat(follow_symlinks=False)
                except FileNotFoundError:  # evicted by another process between listing and stat
                    continue
                if entry:
                    out.append((st.st_mtime_ns, st.st_size, Path(e.path)))
                else:
                    markers.append((st.st_mtime_ns, Path(e.path)))  # type: ignore[union-attr]
        return out

    @staticmethod
    def _touch(path: Path) -> None:
        """Mark ``path`` as used now (its mtime is the LRU order; set explicitly, finer than the file system's)."""
        now = time.time_ns()
        with contextlib.suppress(FileNotFoundError, PermissionError):  # evicted meanwhile / another user's file
            os.utime(path, ns=(now, now))

    def _evict(self, target: int, keep: Path | None = None, before_ns: int | None = None) -> int:
        """Remove least recently used entries (never ``keep``; only those last used before ``before_ns`` when
        given) until the folder holds at most ``target`` bytes; rescans the folder (other processes may have
        written, read or removed entries) and returns the bytes freed. Markers older than every entry left go
        too (they can no longer displace anything)."""
        markers: list[tuple[int, Path]] = []
        entries = sorted(self._scan(markers), key=lambda e: (e[0], e[2].name))
        total = sum(size for _, size, _ in entries)
        freed = 0
        gone: set[Path] = set()
        for mtime, size, path in entries:
            if total <= target or (before_ns is not None and mtime >= before_ns):
                break
            if path == keep:
                continue
            gone.add(path)
            try:
                path.unlink()
            except FileNotFoundError:  # another process evicted it first: it is gone all the same
                total -= size
                continue
            total -= size
            freed += size
            self.stats["evicted"] += 1
            self.stats["evicted_bytes"] += size
        self._disk_total = total
        oldest = min((m for m, _, p in entries if p not in gone), default=None)
        for mtime, marker in markers:
            if oldest is None or mtime < oldest:
                with contextlib.suppress(FileNotFoundError):
                    marker.unlink()
        if freed:
            log.debug("quantization cache %s: evicted %d bytes, %d bytes left", self.root, freed, total)
        return freed

    def _fits_after_eviction(self, size: int, before_ns: int | None) -> bool:
        """Whether removing the entries last used before ``before_ns`` (all of them: None) makes room for
        ``size`` more bytes within ``disk_bytes`` (a fresh scan)."""
        entries = self._scan()
        total = sum(s for _, s, _ in entries)
        self._disk_total = total
        movable = sum(s for m, s, _ in entries if before_ns is None or m < before_ns)
        return total - movable + size <= self.disk_bytes

    def trim(self) -> int:
        """Evict least recently used entries until the folder is within ``disk_bytes`` now (all of them when the
        disk part is off); returns the bytes freed."""
        return self._evict(self.disk_bytes)

    def disk_usage(self) -> int:
        """Bytes of the entries under ``root`` now (a fresh scan: other processes may share the folder)."""
        self._disk_total = sum(size for _, size, _ in self._scan())
        return self._disk_total

    def usage_line(self) -> str:
        """``quantization cache: X MB of Y MB`` (a fresh scan), for the stages' logs."""
        if self.disk_bytes == 0:
            return f"quantization cache: disk part off ({self.root})"
        mb = 1e6
        return f"quantization cache: {self.disk_usage() / mb:.1f} MB of {self.disk_bytes / mb:.1f} MB ({self.root})"

    def _read(self, path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
        """The entry at ``path``, or None when there is none (never written, or evicted, by any process)."""
        try:
            t = load_file(str(path))["weight"]
        except FileNotFoundError:
            return None
        except (SafetensorError, KeyError, OSError) as e:
            raise EvaluationError(f"{path}: unreadable quantization cache entry ({e}); delete it") from e
        if tuple(t.shape) != shape:
            raise EvaluationError(f"{path}: cached shape {tuple(t.shape)} != weight shape {shape}")
        self._touch(path)
        return t

    def _previous_request_ns(self, key: str) -> int | None:
        """The disk part's memory of ``key``'s last request while it had no entry (its ``.seen`` marker)."""
        try:
            return self.seen_path(key).stat().st_mtime_ns
        except FileNotFoundError:
            return None

    def _write(self, key: str, t: torch.Tensor, gguf_name: str, fmt: str, previous_ns: int | None) -> None:
        """Store ``key``'s entry when it fits, or when it may displace entries idle since ``previous_ns``
        (``admission="reuse"``; any entry under ``"lru"``); otherwise remember this request in its marker."""
        path = self.path_for(key)
        nbytes = t.numel() * t.element_size()
        if nbytes > self.disk_bytes:  # could never fit: keep the folder's other entries
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        before_ns = None if self.admission == "lru" else (previous_ns if previous_ns is not None else -1)
        try:
            with atomic_path(path) as tmp:
                save_file({"weight": t}, str(tmp), metadata={"tensor": gguf_name, "format": fmt})
                size = tmp.stat().st_size
                if size > self.disk_bytes:  # the header took it over a bound smaller than one entry
                    raise _Discard
                full = self._disk_total + size > self.disk_bytes
                if full and before_ns is not None and not self._fits_after_eviction(size, before_ns):
                    raise _NotAdmitted
                self._touch(tmp)
        except _NotAdmitted:
            self.stats["not_admitted"] += 1
            seen = self.seen_path(key)
            with contextlib.suppress(OSError):
                seen.touch()
                self._touch(seen)
            return
        except _Discard:
            return
        self.seen_path(key).unlink(missing_ok=True)
        self._disk_total += size
        if time.monotonic() - self._scanned_at > self.rescan_seconds:
            self.disk_usage()
        if self._disk_total > self.disk_bytes:
            self._evict(int(self.disk_bytes * self.low_water), keep=path, before_ns=before_ns)
            if self._disk_total > self.disk_bytes:  # others wrote meanwhile: the bound wins over this entry
                self._evict(self.disk_bytes, keep=None, before_ns=None)

    # ---------------------------------------------------------------------------------------------- lookup

    def _request(self, key: str) -> int | None:
        """Count a request of ``key``; returns the time of its previous request (None: the first remembered)."""
        self._clock += 1
        previous = self._last.pop(key, None)
        self._last[key] = self._clock
        if len(self._last) > GHOST_LIMIT:
            self._last.popitem(last=False)
        return previous

    def _remember(self, key: str, t: torch.Tensor, previous: int | None) -> None:
        if self.memory_bytes <= 0:
            return
        size = t.numel() * t.element_size()
        if size > self.memory_bytes:
            return
        if self.admission == "reuse" and self._lru_bytes + size > self.memory_bytes:
            # the entries that would have to go (oldest first) must all be idle since this key's previous request
            need, last_victim = self._lru_bytes + size - self.memory_bytes, None
            for k, v in self._lru.items():
                if need <= 0:
                    break
                need -= v.numel() * v.element_size()
                last_victim = k
            if previous is None or self._last.get(last_victim, 0) >= previous:  # type: ignore[arg-type]
                self.stats["not_admitted"] += 1
                return
        self._lru[key] = t
        self._lru_bytes += size
        while self._lru_bytes > self.memory_bytes:
            _, old = self._lru.popitem(last=False)
            self._lru_bytes -= old.numel() * old.element_size()

    def dequantized(
        self,
        weight: torch.Tensor,
        gguf_name: str,
        fmt: str,
        imatrix: np.ndarray | None = None,
        weight_sha: str | None = None,
    ) -> torch.Tensor:
        """float32 ``[rows, cols]``: ``weight`` quantized to ``fmt`` (with ``imatrix``) and dequantized.

        The returned tensor is shared with the cache: treat it as read-only. ``weight_sha`` (from
        :func:`weight_digest`) skips hashing the weight again.
        """
        f = get_format(fmt)
        if f.name in IDENTITY_FORMATS:
            return weight.detach().to(torch.float32)
        if weight.ndim != 2:
            raise EvaluationError(f"{gguf_name}: expected a 2-D weight, got shape {tuple(weight.shape)}")
        key = self.key(weight_sha or weight_digest(weight), f.name, imatrix)
        previous = self._request(key)
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            self.stats["memory_hits"] += 1
            return hit
        path = self.path_for(key)
        t = self._read(path, tuple(weight.shape)) if self.disk_bytes > 0 else None
        if t is not None:
            self.stats["disk_hits"] += 1
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                w = weight.detach().to(torch.float32)
                data = f.quantize(w, imatrix if f.uses_imatrix else None, name=gguf_name)
                t = f.dequantize(data, tuple(w.shape)).contiguous()
            self.stats["quantize_seconds"] += time.perf_counter() - t0
            self.stats["quantized"] += 1
            if self.disk_bytes > 0:
                self._write(key, t, gguf_name, f.name, self._previous_request_ns(key))
        self._remember(key, t, previous)
        return t

    def warm(
        self,
        lm: object,
        formats: Iterable[str],
        imatrix: Imatrix | None = None,
        digests: Mapping[str, str] | None = None,
    ) -> int:
        """Fill the cache for every matrix of ``lm`` in each of ``formats`` where legal; returns entries touched."""
        params = dict(lm.model.named_parameters())  # type: ignore[attr-defined]
        mats = lm.matrices()  # type: ignore[attr-defined]
        jobs = [(m, f) for f in formats for m in mats if get_format(f).is_legal(m.shape)]
        for m, f in tqdm(jobs, desc="quantizing", unit="matrix", leave=False):
            im = None if imatrix is None else imatrix.get(m.gguf_name)
            sha = digests[m.gguf_name] if digests else None
            self.dequantized(params[m.hf_name], m.gguf_name, f, im, weight_sha=sha)
        return len(jobs)


def _targets(lm: object) -> dict[str, tuple[str, torch.nn.Parameter]]:
    """gguf_name -> (hf_name, parameter) for every quantizable matrix."""
    params = dict(lm.model.named_parameters())  # type: ignore[attr-defined]
    return {m.gguf_name: (m.hf_name, params[m.hf_name]) for m in lm.matrices()}  # type: ignore[attr-defined]


@contextlib.contextmanager
def swap_allocation(
    lm: object,
    allocation: Mapping[str, str],
    cache: QuantCache,
    imatrix: Imatrix | None = None,
    digests: Mapping[str, str] | None = None,
) -> Iterator[object]:
    """Inside the block, every matrix of ``lm`` holds its weight quantized per ``allocation`` and dequantized.

    The allocation is validated first (unknown tensor, missing tensor, illegal format raise
    ``AllocationError``). The FP weights are restored on exit, also when the block raises.
    """
    validate(slots_for(lm.matrices()), allocation)  # type: ignore[attr-defined]
    targets = _targets(lm)
    originals: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for name, fmt in allocation.items():
                _, p = targets[name]
                im = None if imatrix is None else imatrix.get(name)
                sha = digests[name] if digests is not None else None
                deq = cache.dequantized(p.data, name, fmt, im, weight_sha=sha)
                originals[name] = p.data
                p.data = deq
        yield lm
    finally:
        for name, orig in originals.items():
            targets[name][1].data = orig


class AllocationEvaluator:
    """KLD of allocations of one model against one FP reference, memoised per allocation hash.

    ``memo_path`` (JSON) keeps results across runs; it is tied to the model weights, the reference and the
    imatrix through a context hash and refuses a file written for another context.
    """

    def __init__(
        self,
        lm: object,
        ref: FPReference,
        cache: QuantCache,
        imatrix: Imatrix | None = None,
        memo_path: str | Path | None = None,
        batch_size: int = 4,
    ) -> None:
        self.lm, self.ref, self.cache, self.imatrix = lm, ref, cache, imatrix
        self.batch_size = batch_size
        self.slots = slots_for(lm.matrices())  # type: ignore[attr-defined]
        targets = _targets(lm)
        # detach() shares the parameter's version counter (in-place edits bump it) and keeps the storage
        # alive, so (data_ptr, version) identifies the FP weights exactly.
        self._fp = {name: p.detach() for name, (_, p) in targets.items()}
        self._fp_state = {name: (t.data_ptr(), t._version) for name, t in self._fp.items()}
        self._params = {name: weakref.ref(p) for name, (_, p) in targets.items()}
        self.digests = {name: weight_digest(t) for name, t in self._fp.items()}
        self.context = self._context_hash()
        self.memo: dict[str, KLDResult] = {}
        self.memo_path = Path(memo_path) if memo_path else None
        if self.memo_path and self.memo_path.exists():
            self._load_memo()
        self.stats = {"evaluations": 0, "memo_hits": 0, "seconds": 0.0}

    def _context_hash(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.digests):
            h.update(f"{name}:{self.digests[name]}:".encode())
            im = None if self.imatrix is None else self.imatrix.get(name)
            h.update(imatrix_digest(im).encode())
        for t in (self.ref.tokens, self.ref.topk_logp, self.ref.topk_idx):
            h.update(memoryview(t.contiguous().numpy()).cast("B"))
        h.update(str(self.ref.first).encode())
        return h.hexdigest()

    def _load_memo(self) -> None:
        assert self.memo_path is not None
        data = json.loads(self.memo_path.read_text())
        if data.get("context") != self.context:
            raise EvaluationError(
                f"{self.memo_path}: memo was written for another model/reference/imatrix "
                f"(context {str(data.get('context'))[:12]}, expected {self.context[:12]}); "
                "delete it or pass another path"
            )
        for h, d in data["results"].items():
            self.memo[h] = KLDResult.from_dict(d)

    def _save_memo(self) -> None:
        if self.memo_path is None:
            return
        out = {"context": self.context, "results": {h: r.as_dict() for h, r in sorted(self.memo.items())}}
        atomic_write_text(self.memo_path, json.dumps(out, indent=1) + "\n")

    def _check_fp_intact(self) -> None:
        for name, t in self._fp.items():
            p = self._params[name]()
            if p is None or p.data.data_ptr() != self._fp_state[name][0] or t._version != self._fp_state[name][1]:
                raise EvaluationError(
                    f"{name}: the model's FP weights changed after the evaluator was built; build a new evaluator"
                )

    def evaluate(self, allocation: Mapping[str, str]) -> KLDResult:
        """KLD of ``allocation`` vs the FP reference (one forward pass over the reference tokens, or memo)."""
        h = allocation_hash(allocation)
        if h in self.memo:
            self.stats["memo_hits"] += 1
            return self.memo[h]
        validate(self.slots, allocation)
        self._check_fp_intact()
        t0 = time.perf_counter()
        with swap_allocation(self.lm, allocation, self.cache, self.imatrix, digests=self.digests):
            res = kl_divergence(self.lm, self.ref, batch_size=self.batch_size)
        self.stats["seconds"] += time.perf_counter() - t0
        self.stats["evaluations"] += 1
        self.memo[h] = res
        self._save_memo()
        return res

    def evaluate_many(self, allocations: Iterable[Mapping[str, str]]) -> list[KLDResult]:
        return [self.evaluate(a) for a in tqdm(list(allocations), desc="allocations", unit="alloc", leave=False)]
