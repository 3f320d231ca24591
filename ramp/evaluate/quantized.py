"""Evaluate an allocation by swapping dequantized weights into the FP model.

Each (matrix, format, imatrix) is quantized once with RAMP's ggml-identical quantizers and its dequantized
float32 weight is cached on disk (safetensors, keyed by the sha256 of weight bytes + format + imatrix bytes)
and in an in-memory LRU. Storing the dequantized fp32 rather than the GGUF bytes is deliberate: reading a
576x1536 fp32 matrix back takes ~0.25 ms, dequantizing its Q4_0/IQ4_NL bytes 4-10 ms.

Swapping replaces each parameter's storage (``param.data = dequantized``) instead of copying into it, so
a swap costs no copies and the FP tensors are never written to; on exit the original storage goes back,
also on an exception.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
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


class QuantCache:
    """Dequantized weights per (weight content, format, imatrix): disk under ``root`` plus an in-memory LRU.

    ``memory_bytes`` bounds the LRU (bytes of fp32 tensors kept in RAM); 0 disables it.
    """

    def __init__(self, root: str | Path, memory_bytes: int = 1 << 30) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.memory_bytes = int(memory_bytes)
        self._lru: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lru_bytes = 0
        self.stats = {"memory_hits": 0, "disk_hits": 0, "quantized": 0, "quantize_seconds": 0.0}

    @staticmethod
    def key(weight_sha: str, fmt: str, imatrix: np.ndarray | None) -> str:
        """Cache key; the imatrix only counts for formats whose quantizer uses it."""
        f = get_format(fmt)
        im = imatrix_digest(imatrix if f.uses_imatrix else None)
        return hashlib.sha256(f"{weight_sha}|{f.name}|{im}".encode()).hexdigest()

    def path_for(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def _remember(self, key: str, t: torch.Tensor) -> None:
        if self.memory_bytes <= 0:
            return
        size = t.numel() * t.element_size()
        if size > self.memory_bytes:
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
        hit = self._lru.get(key)
        if hit is not None:
            self._lru.move_to_end(key)
            self.stats["memory_hits"] += 1
            return hit
        path = self.path_for(key)
        if path.exists():
            try:
                t = load_file(str(path))["weight"]
            except (SafetensorError, KeyError, OSError) as e:
                raise EvaluationError(f"{path}: unreadable quantization cache entry ({e}); delete it") from e
            if tuple(t.shape) != tuple(weight.shape):
                raise EvaluationError(f"{path}: cached shape {tuple(t.shape)} != weight shape {tuple(weight.shape)}")
            self.stats["disk_hits"] += 1
        else:
            t0 = time.perf_counter()
            with torch.no_grad():
                w = weight.detach().to(torch.float32)
                data = f.quantize(w, imatrix if f.uses_imatrix else None, name=gguf_name)
                t = f.dequantize(data, tuple(w.shape)).contiguous()
            self.stats["quantize_seconds"] += time.perf_counter() - t0
            self.stats["quantized"] += 1
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                save_file({"weight": t}, str(tmp), metadata={"tensor": gguf_name, "format": f.name})
        self._remember(key, t)
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
