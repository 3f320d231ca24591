"""Load a causal LM for torch from a Hugging Face directory or a GGUF file (fp32, eval mode).

GGUF loading dequantizes every tensor with gguf-py, maps GGUF names to transformers' through the
architecture table, undoes llama.cpp's ``attn_q``/``attn_k`` row permutation and Gemma's ``1 + w`` norm
storage, and builds the tokenizer from the GGUF metadata (cached as ``tokenizer.json`` after the first
build, keyed by the file's size and mtime).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from tqdm import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.initialization import no_init_weights

from ramp.errors import RampError
from ramp.gguf_check import FLOAT_TYPES, INTEGER_TYPES, GGUFLayout, validate_gguf
from ramp.models import hf_check
from ramp.models.arch import ROLES, ArchSpec, arch_for_gguf, unpermute_from_gguf
from ramp.models.sanity import MAX_LAYERS, check_config, check_finite, check_shapes
from ramp.models.stream import GGUFStore, SafetensorsStore, WeightStore, skeleton

log = logging.getLogger(__name__)


class ModelLoadError(RampError, ValueError):
    """A model path that cannot be loaded (the message names the file and what was expected)."""


@dataclass(frozen=True)
class MatrixInfo:
    """One quantizable matrix: ``shape`` is ``[rows, cols]`` (cols = GGUF row length ne0)."""

    block: int
    role: str
    hf_name: str
    gguf_name: str
    shape: tuple[int, int]

    @property
    def params(self) -> int:
        return self.shape[0] * self.shape[1]


def matrix_infos(arch: ArchSpec, blocks: int, shapes: dict[str, tuple[int, ...]]) -> list[MatrixInfo]:
    """The quantizable matrices of a model with these (Hugging Face name -> shape) weights, in block order."""
    out = []
    for i in range(blocks):
        for role in ROLES:
            name = arch.matrices[role].at(i)
            rows, cols = shapes[name.hf]
            out.append(MatrixInfo(i, role, name.hf, name.gguf, (int(rows), int(cols))))
    return out


@dataclass(frozen=True)
class ModelSummary:
    """What ``ramp info`` shows, read from the file headers only (no weight is read or converted)."""

    source: Path
    arch: ArchSpec
    blocks: int
    matrices: list[MatrixInfo]
    parameters: int  # every weight once (a tied output head is the embedding)


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: Any
    arch: ArchSpec
    source: Path
    gguf_metadata: dict[str, Any] = field(default_factory=dict)  # scalar/array KV fields of a GGUF source
    gguf_types: dict[str, str] = field(default_factory=dict)  # tensor name -> GGUF type of a GGUF source
    # lazy models (``load_model(..., lazy=True)``): parameters on the meta device, weights read per tensor from here
    store: WeightStore | None = None

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def lazy(self) -> bool:
        """True when no weight is held in memory (each is read from the files on demand, :mod:`ramp.models.stream`)."""
        return self.store is not None

    def weight(self, hf_name: str) -> torch.Tensor:
        """One weight as float32 (Hugging Face name and orientation): read from the files for a lazy model."""
        if self.store is not None:
            return self.store.read(hf_name)
        try:
            return self.model.get_parameter(hf_name).detach().to(torch.float32)
        except AttributeError as e:
            raise ModelLoadError(f"{self.source}: the model has no weight {hf_name!r}") from e

    @property
    def add_bos(self) -> bool:
        if "tokenizer.ggml.add_bos_token" in self.gguf_metadata:
            return bool(self.gguf_metadata["tokenizer.ggml.add_bos_token"])
        return bool(getattr(self.tokenizer, "add_bos_token", False))

    def matrices(self) -> list[MatrixInfo]:
        """Every quantizable matrix in block order, roles in ``ROLES`` order."""
        shapes = {k: tuple(v.shape) for k, v in self.model.named_parameters()}
        return matrix_infos(self.arch, self.config.num_hidden_layers, shapes)

    def state_dict_fp32(self) -> dict[str, torch.Tensor]:
        if self.store is not None:
            return {k: self.store.read(k) for k in self.model.state_dict() if k in set(self.store.names())}
        return {k: v.detach() for k, v in self.model.state_dict().items()}


def _field_value(f: gguf.ReaderField) -> Any:
    try:
        return f.contents()
    except Exception:  # noqa: BLE001 - a field gguf-py cannot decode is kept out, not guessed
        return None


def open_gguf(path: Path) -> tuple[GGUFLayout, gguf.GGUFReader]:
    """Check a GGUF file's structure (:func:`ramp.gguf_check.validate_gguf`), then open it with gguf-py."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file (expected a GGUF file or a Hugging Face model directory)")
    layout = validate_gguf(path, error=ModelLoadError)
    try:
        return layout, gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - anything the structural check let through is still one clear error
        raise ModelLoadError(f"{path}: corrupt GGUF file ({type(e).__name__}: {e})") from e


def read_gguf(path: Path) -> gguf.GGUFReader:
    """Open a GGUF file whose structure was checked first, turning every problem into one clear message."""
    return open_gguf(path)[1]


INT_KEYS = (
    "block_count",
    "embedding_length",
    "feed_forward_length",
    "context_length",
    "attention.head_count",
    "attention.head_count_kv",
    "attention.key_length",
    "attention.value_length",
    "attention.sliding_window",
    "rope.dimension_count",
)
NOT_WEIGHT_TYPES = ("I8", "I16", "I32", "I64")  # integer tensors: never the weights of a model
FLOAT_KEYS = ("attention.layer_norm_rms_epsilon", "rope.freq_base")


def _check_hparam_types(layout: GGUFLayout, arch: str, path: Path) -> None:
    """The hyperparameter keys the loader reads are scalars of the right kind: positive integer counts and
    dimensions, numeric epsilons and rope bases (their ranges are checked on the built config)."""
    for suffix in INT_KEYS:
        key = f"{arch}.{suffix}"
        if key in layout.value_types:
            value = layout.scalars.get(key)
            if layout.value_types[key] not in INTEGER_TYPES or value < 1:
                raise ModelLoadError(f"{path}: GGUF key {key!r} = {value!r}: expected a positive integer scalar")
    for suffix in FLOAT_KEYS:
        key = f"{arch}.{suffix}"
        if key in layout.value_types and layout.value_types[key] not in FLOAT_TYPES | INTEGER_TYPES:
            raise ModelLoadError(
                f"{path}: GGUF key {key!r} has value type {layout.value_types[key]}, expected a number"
            )


def _check_blocks(tensor_names: list[str], block_count: int, path: Path) -> None:
    """Tensors exist for blocks 0 .. block_count - 1 and no others (checked before anything is built)."""
    seen = {int(n.split(".")[1]) for n in tensor_names if n.startswith("blk.") and n.split(".")[1].isdigit()}
    if seen != set(range(block_count)):
        extra = sorted(seen - set(range(block_count)))[:3]
        missing = sorted(set(range(block_count)) - seen)[:3]
        raise ModelLoadError(
            f"{path}: block_count = {block_count} but the file has tensors for {len(seen)} blocks "
            f"(missing {missing}, unexpected {extra})"
        )


def _tokenizer_cache_dir(path: Path) -> Path:
    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    from ramp.llamacpp import cache_root

    return cache_root() / "tokenizers" / key


def gguf_tokenizer(path: Path) -> Any:
    """The tokenizer described by a GGUF file's metadata (built by transformers' GGUF converter)."""
    cache = _tokenizer_cache_dir(path)
    if (cache / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(cache))
    log.info("building the tokenizer from %s metadata (cached afterwards)", path.name)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    cache.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(cache))
    return tok


def _build_model(config: Any) -> PreTrainedModel:
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model


def model_from_state(config: Any, state: dict[str, torch.Tensor], missing_message: str) -> PreTrainedModel:
    """An fp32 eval-mode model of ``config`` holding ``state`` (a tied ``lm_head`` may be absent).

    Raises :class:`ModelLoadError` ``"{missing_message}: [names]"`` when weights are missing.
    """
    model = _build_model(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = set(model.state_dict()) - set(state) - ({"lm_head.weight"} if tied else set())
    if missing:
        raise ModelLoadError(f"{missing_message}: {sorted(missing)[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        model.tie_weights()
    return model.eval()


@dataclass
class _GGUFPlan:
    """A GGUF file whose header, hyperparameters and tensor shapes passed every check (no tensor data read)."""

    layout: GGUFLayout
    reader: gguf.GGUFReader
    meta: dict[str, Any]
    arch: ArchSpec
    config: Any
    names: dict[str, tuple[str, str]]  # gguf name -> (hf name, kind)
    shapes: dict[str, tuple[int, ...]]  # hf name -> shape


def _plan_gguf(path: Path) -> _GGUFPlan:
    layout, reader = open_gguf(path)
    meta = {k: _field_value(f) for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    arch_name = layout.scalars.get("general.architecture")
    if not isinstance(arch_name, str):
        raise ModelLoadError(f"{path}: GGUF metadata has no general.architecture string")
    arch = arch_for_gguf(arch_name, str(path))
    _check_hparam_types(layout, arch.gguf_arch, path)
    tensors = {t.name: t for t in reader.tensors}
    tok_embd = tensors.get(arch.globals["token_embd"].gguf)
    if tok_embd is None:
        raise ModelLoadError(f"{path}: missing tensor {arch.globals['token_embd'].gguf}")
    if len(tok_embd.shape) != 2:
        raise ModelLoadError(f"{path}: tensor {tok_embd.name} has rank {len(tok_embd.shape)}, expected 2")
    vocab_size = int(tok_embd.shape[1])
    tied = arch.globals["output"].gguf not in tensors
    block_count = layout.scalars.get(f"{arch.gguf_arch}.block_count")
    if not isinstance(block_count, int) or not 1 <= block_count <= MAX_LAYERS:
        raise ModelLoadError(f"{path}: {arch.gguf_arch}.block_count = {block_count!r}: expected 1 to {MAX_LAYERS}")
    _check_blocks(list(tensors), block_count, path)
    try:
        config = arch.build_config(meta, vocab_size, tied)
    except KeyError as e:
        raise ModelLoadError(f"{path}: {e.args[0]}") from e
    except Exception as e:  # noqa: BLE001 - transformers' config validators raise several unrelated classes
        first = next((line.strip() for line in str(e).splitlines() if "Error" in line), str(e).splitlines()[0])
        raise ModelLoadError(f"{path}: hyperparameters rejected: {first}") from e
    check_config(config, str(path), ModelLoadError)

    names: dict[str, tuple[str, str]] = {}  # gguf name -> (hf name, kind)
    for i in range(config.num_hidden_layers):
        for key, tn in arch.block_tensors(i).items():
            kind = "norm" if key.endswith("norm") else key
            names[tn.gguf] = (tn.hf, kind)
    for key, tn in arch.globals.items():
        if not (tied and key == "output"):
            names[tn.gguf] = (tn.hf, "norm" if key.endswith("norm") else key)
    for t in reader.tensors:
        if t.name not in names:
            raise ModelLoadError(f"{path}: unexpected tensor {t.name!r} for architecture {arch.gguf_arch}")
        if t.tensor_type.name in NOT_WEIGHT_TYPES:
            raise ModelLoadError(f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, not a weight type")
    shapes = {names[t.name][0]: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}
    check_shapes(shapes, config, str(path), ModelLoadError, {hf: g for g, (hf, _) in names.items()})
    return _GGUFPlan(layout, reader, meta, arch, config, names, shapes)


def load_gguf(path: str | Path, with_tokenizer: bool = True, lazy: bool = False) -> LoadedModel:
    """A GGUF file as an fp32 model; ``lazy``: a meta-device skeleton whose weights are dequantized per tensor
    when read (:class:`ramp.models.stream.GGUFStore`)."""
    path = Path(path)
    plan = _plan_gguf(path)
    reader, meta, arch, config, names = plan.reader, plan.meta, plan.arch, plan.config, plan.names
    if lazy:
        types = {t.name: t.tensor_type.name for t in reader.tensors}
        for t in {t.tensor_type: t for t in reader.tensors}.values():  # each type readable: one block decoded now
            _, type_size = gguf.GGML_QUANT_SIZES[t.tensor_type]
            try:
                gguf.quants.dequantize(np.zeros(type_size, dtype=np.uint8), t.tensor_type)
            except NotImplementedError as e:
                raise ModelLoadError(
                    f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which RAMP cannot read"
                ) from e
        tokenizer = gguf_tokenizer(path) if with_tokenizer else None
        store = GGUFStore(path, plan, error=ModelLoadError)
        return LoadedModel(skeleton(config), tokenizer, arch, path, meta, types, store=store)

    state: dict[str, torch.Tensor] = {}
    types: dict[str, str] = {}
    for t in tqdm(reader.tensors, desc=f"dequantizing {path.name}", unit="tensor", leave=False):
        hf_name, kind = names[t.name]
        try:
            with np.errstate(all="ignore"):  # corrupt scales give inf/NaN, rejected just below
                arr = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        except NotImplementedError as e:
            raise ModelLoadError(
                f"{path}: tensor {t.name!r} has type {t.tensor_type.name}, which RAMP cannot read"
            ) from e
        arr = arr.reshape([int(d) for d in reversed(t.shape)])
        check_finite(t.name, arr, str(path), ModelLoadError)
        w = torch.from_numpy(np.array(arr, dtype=np.float32, order="C"))
        if arch.permute_qk and kind in ("q", "k"):
            n_head = config.num_attention_heads if kind == "q" else config.num_key_value_heads
            w = unpermute_from_gguf(w, n_head).contiguous()
        if kind == "norm" and arch.norm_offset:
            w = w - arch.norm_offset
        state[hf_name] = w
        types[t.name] = t.tensor_type.name
    model = model_from_state(config, state, f"{path}: tensors missing for {arch.gguf_arch}")
    tokenizer = gguf_tokenizer(path) if with_tokenizer else None
    return LoadedModel(model, tokenizer, arch, path, meta, types)


def _plan_hf(path: Path) -> tuple[Any, ArchSpec, dict[str, hf_check.TensorHeader]]:
    """A Hugging Face directory's checked config, architecture and tensor headers (no tensor data read)."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ModelLoadError(f"{path}: no config.json (expected a Hugging Face model directory or a GGUF file)")
    try:
        raw = cfg_path.read_bytes()
    except OSError as e:
        raise ModelLoadError(f"{cfg_path}: cannot read ({e.strerror})") from None
    config, arch = hf_check.config_from_dict(
        hf_check.parse_json_object(raw, str(cfg_path), ModelLoadError), str(cfg_path), ModelLoadError
    )
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{path}: no *.safetensors weights found")
    headers, _ = hf_check.read_headers(shards, ModelLoadError)
    hf_check.check_headers(headers, config, str(path), ModelLoadError)
    return config, arch, headers


def load_hf_dir(path: str | Path, with_tokenizer: bool = True, lazy: bool = False) -> LoadedModel:
    """Load a Hugging Face directory (``config.json`` + ``*.safetensors``), checking everything first.

    The config must be a JSON object with sane values; every tensor's name, shape and dtype must match the model
    the config describes before any weight is read, and every weight must be finite
    (:mod:`ramp.models.hf_check`).
    """
    path = Path(path)
    config, arch, headers = _plan_hf(path)
    store = None
    if lazy:  # weights stay in their files, each read (and checked finite) when used
        store = SafetensorsStore(sorted({h.shard for h in headers.values()}), error=ModelLoadError)
        if getattr(config, "tie_word_embeddings", False) and "lm_head.weight" in headers:
            pair = {k: store.read(k) for k in ("lm_head.weight", "model.embed_tokens.weight")}
            hf_check.check_tied_head(pair, config, str(path), ModelLoadError)
        model = skeleton(config)
    else:
        state = hf_check.load_tensors(headers, ModelLoadError)
        hf_check.check_tied_head(state, config, str(path), ModelLoadError)
        model = model_from_state(config, state, f"{path}: tensors missing from safetensors")
    tokenizer = None
    if with_tokenizer and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json")):
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    return LoadedModel(model, tokenizer, arch, path, store=store)


def load_model(path: str | Path, with_tokenizer: bool = True, lazy: bool = False) -> LoadedModel:
    """Load from a GGUF file or a Hugging Face directory (config.json + safetensors).

    ``lazy``: read no weight now; the model is a meta-device skeleton and :meth:`LoadedModel.weight` reads each
    weight from the files when asked (constant memory in the model's size, :mod:`ramp.models.stream`)."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(
            f"{path}: no such file or directory (expected a GGUF file or a Hugging Face model directory)"
        )
    if path.is_dir():
        return load_hf_dir(path, with_tokenizer, lazy)
    return load_gguf(path, with_tokenizer, lazy)


def describe_model(path: str | Path) -> ModelSummary:
    """Architecture, quantizable matrices and parameter count of a GGUF file or Hugging Face directory, from its
    headers: every check :func:`load_model` makes before reading weights, in constant memory."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(
            f"{path}: no such file or directory (expected a GGUF file or a Hugging Face model directory)"
        )
    if path.is_dir():
        config, arch, headers = _plan_hf(path)
        shapes = {k: h.shape for k, h in headers.items()}
        if getattr(config, "tie_word_embeddings", False):
            shapes.pop("lm_head.weight", None)  # the same weights as the embedding
    else:
        plan = _plan_gguf(path)
        config, arch, shapes = plan.config, plan.arch, plan.shapes
    blocks = config.num_hidden_layers
    parameters = sum(math.prod(s) for s in shapes.values())
    return ModelSummary(path, arch, blocks, matrix_infos(arch, blocks, shapes), parameters)
