"""Checked reading of Hugging Face model files: a ``config.json`` object and safetensors shards.

Nothing read from a file is trusted before it is checked: the config must be a JSON object naming its
dimensions explicitly (no silent class defaults for them) with sane values (:func:`ramp.models.sanity.check_config`);
safetensors headers are read (and validated against the file size by the ``safetensors`` library) before any
tensor data, every tensor's name, shape and dtype is compared with the model the config describes (built on the
meta device, so no memory), and weights must be finite. Every problem is one error of the caller's class naming
the file and the field or tensor.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, PretrainedConfig
from transformers.activations import ACT2FN

from ramp.models.arch import ArchSpec, arch_for_hf
from ramp.models.sanity import MAX_LAYERS, check_config, check_finite, expected_shapes

# Keys that fix the model's shapes and numerics: a config without them would get the config class's defaults.
REQUIRED_KEYS = (
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
    "rms_norm_eps",
)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
ACTIVATION_KEYS = ("hidden_act", "hidden_activation")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
ROPE_LOGGER = "transformers.modeling_rope_utils"
LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorHeader:
    """One tensor as a safetensors header describes it (no data read)."""

    shard: Path
    dtype: str  # safetensors dtype name ("F32", "BF16", ...)
    shape: tuple[int, ...]


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def parse_json_object(text: str | bytes, source: str, error: type[Exception]) -> dict[str, Any]:
    """JSON text (a config, a metadata value) as a dict: strict JSON (no NaN/Infinity, no repeated keys) that
    holds an object."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, parse_constant=_no_constant, object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as e:
        raise error(f"{source}: not valid JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise error(f"{source}: holds a JSON {type(value).__name__}, expected an object")
    return value


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_config_dict(d: dict[str, Any], source: str, error: type[Exception]) -> None:
    """What must hold before a config class sees the dict (it would build per-layer lists of any length)."""
    model_type = d.get("model_type")
    if not isinstance(model_type, str):
        raise error(f"{source}: model_type = {model_type!r}: expected a string naming the architecture")
    arch_for_hf(model_type, source)
    missing = [k for k in REQUIRED_KEYS if k not in d]
    # (a rope base left out is the architecture's documented default, as in many published configs)
    if missing:
        raise error(f"{source}: config lacks {', '.join(missing)} (no defaults are assumed for them)")
    layers = d["num_hidden_layers"]
    if not _is_int(layers) or not 1 <= layers <= MAX_LAYERS:
        raise error(f"{source}: num_hidden_layers = {layers!r}: expected an integer from 1 to {MAX_LAYERS}")
    vocab = d["vocab_size"]
    if not _is_int(vocab) or vocab < 1:
        raise error(f"{source}: vocab_size = {vocab!r}: expected a positive integer")
    for key in TOKEN_ID_KEYS:
        ids = d.get(key)
        for i in ids if isinstance(ids, list) else [ids]:
            if i is not None and not (_is_int(i) and 0 <= i < vocab):
                raise error(f"{source}: {key} = {ids!r}: expected null or token ids in [0, vocab_size = {vocab})")
    for key in ACTIVATION_KEYS:
        if key in d and (not isinstance(d[key], str) or d[key] not in ACT2FN):
            raise error(f"{source}: {key} = {d[key]!r}: expected one of transformers' activations")


def config_from_dict(d: Mapping[str, Any], source: str, error: type[Exception]) -> tuple[PretrainedConfig, ArchSpec]:
    """The transformers config (and RAMP architecture) a config dict describes, checked for sanity."""
    d = dict(d)
    _check_config_dict(d, source, error)
    model_type = d.pop("model_type")
    arch = arch_for_hf(model_type, source)
    try:
        with _rope_warnings() as warnings:
            config = AutoConfig.for_model(model_type, **d)
    except Exception as e:  # noqa: BLE001 - transformers' validators raise many kinds; each is one clear error
        raise error(f"{source}: invalid {model_type} config ({type(e).__name__}: {_first_line(e)})") from None
    if warnings:  # transformers only warns about unknown rope types and misspelt rope keys; we refuse them
        raise error(f"{source}: invalid rope_parameters ({warnings[0]})")
    check_config(config, source, error)
    return config, arch


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _rope_warnings() -> Iterator[list[str]]:
    """The warnings transformers' rope validation logs while the block runs."""
    logger = logging.getLogger(ROPE_LOGGER)
    handler, level = _Collect(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _first_line(e: BaseException) -> str:
    text = " ".join(str(e).split("\n")[:2])
    return text[:300]


def read_headers(shards: list[Path], error: type[Exception]) -> tuple[dict[str, TensorHeader], list[dict[str, str]]]:
    """Every tensor's header across ``shards`` (a name in two shards is an error) and each shard's metadata."""
    headers: dict[str, TensorHeader] = {}
    metadata = []
    for shard in shards:
        try:
            with safe_open(str(shard), framework="pt") as f:
                metadata.append(dict(f.metadata() or {}))
                found = []
                for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                    sl = f.get_slice(name)
                    found.append((name, str(sl.get_dtype()), tuple(int(n) for n in sl.get_shape())))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, header JSON errors: one clear error
            raise error(f"{shard}: corrupt safetensors file ({type(e).__name__}: {_first_line(e)})") from None
        for name, dtype, shape in found:
            if name in headers:
                raise error(f"{shard}: tensor {name!r} is also in {headers[name].shard.name}")
            headers[name] = TensorHeader(shard, dtype, shape)
    return headers, metadata


def check_headers(
    headers: Mapping[str, TensorHeader], config: PretrainedConfig, source: str, error: type[Exception]
) -> None:
    """Every tensor the config's model expects, with its shape and a float dtype, and no others.

    A tied ``lm_head`` may be absent. The layer count is compared with the tensors' layer indices before the
    (meta-device) model is built, so a corrupt count never builds a model of the size it claims.
    """
    for name, h in headers.items():
        if h.dtype not in FLOAT_DTYPES:
            raise error(f"{h.shard}: tensor {name!r} has dtype {h.dtype}, expected one of {sorted(FLOAT_DTYPES)}")
    layers = {int(m.group(1)) for m in map(LAYER_RE.match, headers) if m}
    if layers != set(range(config.num_hidden_layers)):
        shown = sorted(layers)[:8]
        raise error(
            f"{source}: num_hidden_layers = {config.num_hidden_layers} but the weights have {len(layers)} layers "
            f"(indices {shown}{' ...' if len(layers) > len(shown) else ''})"
        )
    try:
        want = expected_shapes(config)
    except Exception as e:  # noqa: BLE001 - a config transformers cannot build a model from
        raise error(
            f"{source}: the config describes no buildable model ({type(e).__name__}: {_first_line(e)})"
        ) from None
    for name, h in headers.items():
        if name not in want:
            raise error(f"{h.shard}: unexpected tensor {name!r} for {config.model_type}")
        if h.shape != want[name]:
            raise error(f"{h.shard}: tensor {name!r} has shape {list(h.shape)}, the config expects {list(want[name])}")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    missing = sorted(set(want) - set(headers) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise error(f"{source}: tensors missing: {missing[:5]}")


def load_tensors(headers: Mapping[str, TensorHeader], error: type[Exception]) -> dict[str, torch.Tensor]:
    """The tensors' data as float32 (headers checked first), each checked finite."""
    by_shard: dict[Path, list[str]] = {}
    for name, h in headers.items():
        by_shard.setdefault(h.shard, []).append(name)
    state: dict[str, torch.Tensor] = {}
    for shard, names in by_shard.items():
        try:
            with safe_open(str(shard), framework="pt") as f:
                raw = {name: f.get_tensor(name) for name in names}
        except Exception as e:  # noqa: BLE001 - as in read_headers
            raise error(f"{shard}: corrupt safetensors file ({type(e).__name__}: {_first_line(e)})") from None
        for name, t in raw.items():
            state[name] = t.to(torch.float32)
            check_finite(name, state[name], str(shard), error)  # after the cast: a float64 1e300 is inf here
    return state


def check_tied_head(
    state: Mapping[str, torch.Tensor], config: PretrainedConfig, source: str, error: type[Exception]
) -> None:
    """A tied model's stored ``lm_head`` (optional) must equal the embedding it is tied to, not be dropped silently."""
    head, embed = state.get("lm_head.weight"), state.get("model.embed_tokens.weight")
    if getattr(config, "tie_word_embeddings", False) and head is not None and not torch.equal(head, embed):
        raise error(f"{source}: tie_word_embeddings is true but lm_head.weight differs from model.embed_tokens.weight")
