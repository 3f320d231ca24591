"""Sanity checks of a model's hyperparameters and weights, shared by the GGUF and Hugging Face loaders.

A config that passes has positive dimensions, heads that divide what they must, finite positive epsilons and
rope bases; weights that pass have the shapes the config's model expects and finite values. Everything is
checked before a model is built, so that a corrupt file never allocates a model of the size it claims.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from transformers.configuration_utils import ALLOWED_ATTN_LAYER_TYPES

MAX_LAYERS = 1024  # far above any real model; a bigger block count is a corrupt file
MAX_DIM = 2**20  # hidden/FFN/vocab width cap, likewise


def finite_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _check_rope(config: Any, source: str, error: type[Exception]) -> None:
    """One rope entry (type and finite positive base) for the model, or one per layer type it uses."""
    rp = getattr(config, "rope_parameters", None)
    if not isinstance(rp, dict) or not rp:
        raise error(f"{source}: rope_parameters = {rp!r}: expected an object with rope_type and rope_theta")
    entries = {"rope_parameters": rp}
    if "rope_type" not in rp:  # nested: one entry per attention layer type
        layer_types = set(getattr(config, "layer_types", None) or ())
        unknown = sorted(set(rp) - set(ALLOWED_ATTN_LAYER_TYPES))
        if unknown or not layer_types <= set(rp):
            raise error(
                f"{source}: rope_parameters has entries {sorted(rp)}; expected one per layer type {sorted(layer_types)}"
            )
        entries = {f"rope_parameters.{k}": v for k, v in rp.items()}
    for field, entry in entries.items():
        theta = entry.get("rope_theta") if isinstance(entry, dict) else None
        if not isinstance(entry, dict) or not isinstance(entry.get("rope_type"), str) or not finite_number(theta):
            raise error(f"{source}: {field} = {entry!r}: expected an object with rope_type and a finite rope_theta")
        if theta <= 0:
            raise error(f"{source}: {field}.rope_theta = {theta!r}: expected a positive rope base")


def check_config(config: Any, source: str, error: type[Exception]) -> None:
    """Raise ``error`` naming ``source`` and the field when ``config`` cannot describe a working model."""

    def bad(field: str, value: Any, expected: str) -> Exception:
        return error(f"{source}: {field} = {value!r}: {expected}")

    def positive_int(field: str, cap: int = MAX_DIM) -> int:
        v = getattr(config, field, None)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= cap:
            raise bad(field, v, f"expected an integer from 1 to {cap}")
        return v

    layers = positive_int("num_hidden_layers", MAX_LAYERS)
    hidden = positive_int("hidden_size")
    positive_int("intermediate_size")
    positive_int("vocab_size", 2**24)
    positive_int("max_position_embeddings", 2**24)
    heads = positive_int("num_attention_heads", hidden)
    kv = getattr(config, "num_key_value_heads", None)
    if kv is None:
        kv = heads
    if isinstance(kv, bool) or not isinstance(kv, int) or kv < 1 or heads % kv:
        raise bad("num_key_value_heads", kv, f"expected a positive divisor of num_attention_heads = {heads}")
    head_dim = getattr(config, "head_dim", None)
    if head_dim is None:
        if hidden % heads:
            raise bad("num_attention_heads", heads, f"must divide hidden_size = {hidden} (no head_dim given)")
        head_dim = hidden // heads
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 2 or head_dim % 2:
        raise bad("head_dim", head_dim, "expected an even integer >= 2 (rotary halves)")
    eps = getattr(config, "rms_norm_eps", None)
    if not finite_number(eps) or not 0 < eps < 1:
        raise bad("rms_norm_eps", eps, "expected a finite number in (0, 1)")
    _check_rope(config, source, error)
    window = getattr(config, "sliding_window", None)
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise bad("sliding_window", window, "expected a positive integer")
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) != layers:
        raise bad("layer_types", f"<{len(layer_types)} entries>", f"expected one per layer ({layers})")


def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter name -> shape of the model ``config`` describes (built on the meta device: no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def check_shapes(
    shapes: Mapping[str, tuple[int, ...]],
    config: Any,
    source: str,
    error: type[Exception],
    names: Mapping[str, str] | None = None,
) -> None:
    """Every weight present with the shape the config's model expects (a tied ``lm_head`` may be absent).

    ``shapes`` maps Hugging Face parameter names to shapes; ``names`` maps them back to the file's own tensor
    names for the message.
    """
    names = names or {}
    want = expected_shapes(config)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for name, shape in shapes.items():
        if name not in want:
            raise error(f"{source}: unexpected tensor {names.get(name, name)!r}")
        if tuple(shape) != want[name]:
            raise error(
                f"{source}: tensor {names.get(name, name)!r} has shape {list(shape)}, the config expects "
                f"{list(want[name])}"
            )
    missing = sorted(set(want) - set(shapes) - ({"lm_head.weight"} if tied else set()))
    if missing:
        raise error(f"{source}: tensors missing: {missing[:5]}")


def check_finite(name: str, values: Any, source: str, error: type[Exception]) -> None:
    """Raise ``error`` when a weight holds NaN or infinite values."""
    ok = torch.isfinite(values).all() if isinstance(values, torch.Tensor) else np.isfinite(values).all()
    if not bool(ok):
        raise error(f"{source}: tensor {name!r} holds NaN or infinite values")
