"""Models that are never loaded whole: weights read one tensor at a time, forward passes run block by block.

A *lazy* :class:`ramp.models.loader.LoadedModel` holds a skeleton of the transformers model whose parameters sit
on the ``meta`` device (no memory) and a :class:`WeightStore` that reads any one weight on demand from the files
it came from, in their stored dtype, converted to float32 only for the tensor asked for. The stores read with
plain file reads rather than memory maps, so the process's resident memory holds what is in use and nothing
else: a 7B-shaped bf16 checkpoint is streamed in the memory of one block.

:func:`block_forward` runs calibration tokens through the model one decoder block at a time: the embeddings of
every window are computed first, each block's weights are read, applied to every batch, and dropped before the
next block is read. For a model loaded whole it runs the same code with nothing to read, so both give the same
bits as the model's own forward pass on the same batches.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from tqdm import tqdm

from ramp.errors import RampError
from ramp.io import atomic_path

META = torch.device("meta")


class StreamError(RampError, ValueError):
    """A weight that cannot be read from its file (the message names the file and the tensor)."""


class WeightStore(Protocol):
    """Reads one weight (Hugging Face name, HF orientation) as float32 from the model's files."""

    def names(self) -> list[str]: ...

    def read(self, name: str) -> torch.Tensor: ...


_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}


def _read_exact(path: Path, offset: int, nbytes: int) -> bytearray:
    """``nbytes`` at ``offset`` of ``path`` into a fresh buffer (a file read: nothing stays mapped)."""
    buf = bytearray(nbytes)
    with open(path, "rb", buffering=0) as f:
        f.seek(offset)
        view = memoryview(buf)
        got = 0
        while got < nbytes:
            n = f.readinto(view[got:])
            if not n:
                raise StreamError(f"{path}: file ends at byte {offset + got}, a tensor needs {offset + nbytes}")
            got += n
    return buf


@dataclass(frozen=True)
class _Span:
    path: Path
    offset: int  # absolute byte offset of the tensor's data
    nbytes: int
    dtype: str
    shape: tuple[int, ...]


def safetensors_spans(path: Path) -> dict[str, _Span]:
    """Every tensor's data span in a safetensors file (its header is checked by ``safe_open`` beforehand)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        start, end = entry["data_offsets"]
        out[name] = _Span(path, 8 + n + int(start), int(end) - int(start), entry["dtype"], tuple(entry["shape"]))
    return out


class SafetensorsStore:
    """Weights of safetensors shards (a Hugging Face directory or a folded model file), read per tensor."""

    def __init__(self, shards: list[Path], error: type[Exception] = StreamError) -> None:
        self.error = error
        self.spans: dict[str, _Span] = {}
        for shard in shards:
            self.spans.update(safetensors_spans(Path(shard)))

    def names(self) -> list[str]:
        return list(self.spans)

    def read(self, name: str) -> torch.Tensor:
        from ramp.models.sanity import check_finite

        span = self.spans.get(name)
        if span is None:
            raise self.error(f"no tensor {name!r} in {sorted({s.path.name for s in self.spans.values()})}")
        dtype = _ST_DTYPES.get(span.dtype)
        if dtype is None:
            raise self.error(f"{span.path}: tensor {name!r} has dtype {span.dtype}, not a float weight")
        buf = _read_exact(span.path, span.offset, span.nbytes)
        if span.nbytes:
            t = torch.frombuffer(buf, dtype=dtype).reshape(span.shape)
        else:
            t = torch.empty(span.shape, dtype=dtype)
        w = t.to(torch.float32) if dtype != torch.float32 else t
        check_finite(name, w, str(span.path), self.error)  # after the cast: a float64 1e300 is inf here
        return w


class GGUFStore:
    """Weights of a GGUF file, each dequantized on read with gguf-py (llama.cpp's q/k row order and Gemma's
    ``1 + w`` norms undone, as :func:`ramp.models.loader.load_gguf` does for a whole model)."""

    def __init__(self, path: Path, plan: Any, error: type[Exception] = StreamError) -> None:
        self.path, self.plan, self.error = Path(path), plan, error
        self.tensors = {plan.names[t.name][0]: t for t in plan.reader.tensors}

    def names(self) -> list[str]:
        return list(self.tensors)

    def read(self, name: str) -> torch.Tensor:
        import gguf

        from ramp.models.arch import unpermute_from_gguf
        from ramp.models.sanity import check_finite

        t = self.tensors.get(name)
        if t is None:
            raise self.error(f"{self.path}: no tensor for {name!r}")
        offset = int(t.data_offset)
        raw = np.frombuffer(_read_exact(self.path, offset, int(t.n_bytes)), dtype=np.uint8)
        try:
            with np.errstate(all="ignore"):  # corrupt scales give inf/NaN, rejected just below
                arr = gguf.quants.dequantize(raw, t.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError as e:
            raise self.error(
                f"{self.path}: tensor {t.name!r} has type {t.tensor_type.name}, which RAMP cannot read"
            ) from e
        arr = arr.reshape([int(d) for d in reversed(t.shape)])
        check_finite(t.name, arr, str(self.path), self.error)
        w = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
        _, kind = self.plan.names[t.name]
        arch, config = self.plan.arch, self.plan.config
        if arch.permute_qk and kind in ("q", "k"):
            n_head = config.num_attention_heads if kind == "q" else config.num_key_value_heads
            w = unpermute_from_gguf(w, n_head).contiguous()
        if kind == "norm" and arch.norm_offset:
            w = w - arch.norm_offset
        return w


def _libc_trim() -> Callable[[], None]:
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return lambda: libc.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back explicitly
        return lambda: None


release_memory = _libc_trim()
"""Hand freed heap memory back to the OS (glibc keeps freed blocks of a few MB in its heap, so without this a
block-by-block run's resident memory would creep up with the number of blocks although nothing is kept)."""


def skeleton(config: Any) -> torch.nn.Module:
    """The eval-mode causal LM of ``config`` with every parameter on the meta device (buffers such as rotary
    frequencies are real: they are computed from the config, not read)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def is_meta(module: torch.nn.Module) -> bool:
    return any(p.is_meta for p in module.parameters(recurse=True))


def _body(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "model", model)


def _layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    return _body(model).layers


@contextlib.contextmanager
def loaded(model: torch.nn.Module, prefix: str, module: torch.nn.Module, store: WeightStore | None) -> Iterator[None]:
    """Within the block, ``module`` (the submodule of ``model`` at ``prefix``) holds its weights read from
    ``store``; afterwards they go back to the meta device. A module whose weights are real is left as it is."""
    if store is None or not is_meta(module):
        yield
        return
    names = [n for n, p in module.named_parameters() if p.is_meta]
    state = {n: store.read(f"{prefix}.{n}" if prefix else n) for n in names}
    module.load_state_dict(state, strict=False, assign=True)
    try:
        yield
    finally:
        for n in names:
            owner, _, leaf = n.rpartition(".")
            sub = module.get_submodule(owner) if owner else module
            empty = torch.empty_like(getattr(sub, leaf), device=META)
            setattr(sub, leaf, torch.nn.Parameter(empty, requires_grad=False))
        del state
        release_memory()


class _Recorder(torch.nn.Module):
    """Stands in for decoder layer ``index`` while the embeddings and the layers' keyword arguments are recorded."""

    def __init__(self, index: int, calls: list[list[tuple[tuple, dict]]], inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.index, self.calls, self.inputs = index, calls, inputs

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.index == 0:
            self.inputs.append(hidden_states)
        self.calls[self.index].append((args, kwargs))
        return hidden_states


def _first(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple) else out


@torch.inference_mode()
def block_forward(
    model: torch.nn.Module,
    store: WeightStore | None,
    tokens: torch.Tensor,
    batch_size: int,
    desc: str = "blocks",
    after_block: Callable[[int], None] | None = None,
) -> list[torch.Tensor]:
    """Hidden states after the last decoder block (before the final norm) of ``tokens[n_seq, n_ctx]`` in batches
    of ``batch_size``, computed block by block. ``store`` is the lazy model's :class:`WeightStore` (None for a
    model loaded whole). Forward hooks on the model's modules see every batch, block after block;
    ``after_block(i)`` is called once block ``i`` has seen every batch."""
    layers = _layers(model)
    n = len(layers)
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in range(n)]
    hidden: list[torch.Tensor] = []
    originals = list(layers)
    body = _body(model)
    with contextlib.ExitStack() as stack:
        for name, mod in body.named_children():
            if name != "layers":  # embedding, final norm (rotary embeddings hold no parameters)
                stack.enter_context(loaded(model, _prefix(model, body, name), mod, store))
        try:
            for i in range(n):
                layers[i] = _Recorder(i, calls, hidden)
            for start in range(0, tokens.shape[0], batch_size):
                body(input_ids=tokens[start : start + batch_size], use_cache=False)
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
    prefix = _prefix(model, body, "layers")
    for i in tqdm(range(n), desc=desc, unit="block", leave=False):
        with loaded(model, f"{prefix}.{i}", layers[i], store):
            for b, (args, kwargs) in enumerate(calls[i]):
                hidden[b] = _first(layers[i](hidden[b], *args, **kwargs))
        calls[i] = []
        if after_block is not None:
            after_block(i)
    return hidden


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a causal LM."""
    return _layers(model)


def layer_prefix(model: torch.nn.Module) -> str:
    """The parameter-name prefix of the decoder blocks (``model.layers``)."""
    return _prefix(model, _body(model), "layers")


def _prefix(model: torch.nn.Module, body: torch.nn.Module, child: str) -> str:
    for name, mod in model.named_modules():
        if mod is body:
            return f"{name}.{child}" if name else child
    raise StreamError("the decoder body is not a submodule of the model")


def read_all(store: WeightStore, names: Mapping[str, Any] | list[str]) -> dict[str, torch.Tensor]:
    """Every named weight (a whole-model load from a store)."""
    return {n: store.read(n) for n in names}


_NP_ST = {np.dtype(np.uint8): "U8", np.dtype(np.float32): "F32"}


def write_safetensors(
    path: Path,
    specs: list[tuple[str, np.dtype, tuple[int, ...]]],
    arrays: Iterator[tuple[str, np.ndarray]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """A safetensors file of the tensors ``specs`` announces (name, dtype, shape), written as ``arrays`` yields
    them in that order: the header first (every size is known), then each tensor's bytes, so one tensor is in
    memory at a time. Written to a temporary file renamed into place when complete. ``metadata`` (string to
    string) goes into the header's ``__metadata__``, keys sorted."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {k: metadata[k] for k in sorted(metadata)}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        span = [offset, offset + nbytes]
        header[name] = {"dtype": _NP_ST[np.dtype(dtype)], "shape": list(shape), "data_offsets": span}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a failure leaves no file behind
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, dtype, shape), (got, arr) in zip(specs, arrays, strict=True):
            if got != name or arr.dtype != dtype or tuple(arr.shape) != tuple(shape):
                raise StreamError(
                    f"{path}: tensor {got!r} {arr.dtype}{list(arr.shape)} where {name!r} {np.dtype(dtype)}"
                    f"{list(shape)} was announced"
                )
            f.write(np.ascontiguousarray(arr).data)


class SafetensorsBytes(Mapping[str, np.ndarray]):
    """The uint8 tensors of a safetensors file (the quantize stage's GGUF block bytes), each read when indexed."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.spans = safetensors_spans(self.path)

    def __getitem__(self, name: str) -> np.ndarray:
        span = self.spans[name]
        if span.dtype != "U8":
            raise StreamError(f"{self.path}: tensor {name!r} has dtype {span.dtype}, expected U8 block bytes")
        return np.frombuffer(_read_exact(self.path, span.offset, span.nbytes), dtype=np.uint8).reshape(span.shape)

    def __contains__(self, name: object) -> bool:
        return name in self.spans

    def __iter__(self) -> Iterator[str]:
        return iter(self.spans)

    def __len__(self) -> int:
        return len(self.spans)


class DequantizedStore:
    """The weights of ``base`` with some matrices replaced by GGUF block bytes, dequantized when read: a lazy model of
    what a quantized file computes. ``matrices``: Hugging Face name -> (GGUF name, GGUF type, ``[rows, cols]``, heads
    whose q/k rows llama.cpp reorders or None); ``tensors``: GGUF name -> uint8 block bytes (e.g.
    :class:`SafetensorsBytes` of the quantize stage)."""

    def __init__(
        self,
        base: WeightStore,
        matrices: Mapping[str, tuple[str, str, tuple[int, int], int | None]],
        tensors: Mapping[str, np.ndarray],
    ) -> None:
        self.base, self.matrices, self.tensors = base, dict(matrices), tensors

    def names(self) -> list[str]:
        return self.base.names()

    def read(self, name: str) -> torch.Tensor:
        from ramp.formats import get_format
        from ramp.models.arch import unpermute_from_gguf

        if name not in self.matrices:
            return self.base.read(name)
        gguf_name, type_name, shape, heads = self.matrices[name]
        data = self.tensors[gguf_name]
        w = get_format(type_name).dequantize(torch.from_numpy(np.ascontiguousarray(data)), shape).to(torch.float32)
        return w if heads is None else unpermute_from_gguf(w, heads).contiguous()


@contextlib.contextmanager
def output_head(model: torch.nn.Module, store: WeightStore | None) -> Iterator[Callable[[torch.Tensor], torch.Tensor]]:
    """Within the block, a function from last-block hidden states to logits (final norm, LM head, and the logit
    soft-capping of models that have one), with those weights read from ``store`` for a lazy model."""
    body = _body(model)
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)
    with loaded(model, _prefix(model, body, "norm"), body.norm, store):
        original = head.weight
        if store is not None and original.is_meta:
            names = set(store.names())
            tied = "lm_head.weight" not in names
            source = _prefix(model, body, "embed_tokens") + ".weight" if tied else "lm_head.weight"
            head.weight = torch.nn.Parameter(store.read(source), requires_grad=False)

        def logits(h: torch.Tensor) -> torch.Tensor:
            out = head(body.norm(h))
            return torch.tanh(out / cap) * cap if cap else out

        try:
            yield logits
        finally:
            head.weight = original
            release_memory()
