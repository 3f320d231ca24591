"""Tiny models built in code for tests: Llamas with every dimension a multiple of 256 (so every GGUF format is
legal) and a two-block Gemma-3 (sliding and full attention, 1 + w norms, q/k norms)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

from ramp.models.arch import ARCHS
from ramp.models.loader import LoadedModel


def tiny_llama_config(
    hidden: int = 512,
    intermediate: int = 1024,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab: int = 512,
    tied: bool = False,
) -> LlamaConfig:
    for name, v in (("hidden", hidden), ("intermediate", intermediate), ("vocab", vocab)):
        if v % 256:
            raise ValueError(f"tiny model {name}={v} must be a multiple of 256 so every GGUF format is legal")
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        rms_norm_eps=1e-5,
        max_position_embeddings=1024,
        tie_word_embeddings=tied,
        bos_token_id=1,
        eos_token_id=2,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def tiny_llama(seed: int = 0, **kwargs: int | bool) -> LoadedModel:
    """A seeded random tiny Llama (fp32, eval). Weights use std 0.05 and norms vary around 1, so logits are
    not flat and quantization visibly changes them."""
    config = tiny_llama_config(**kwargs)
    gen = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    model.eval()
    return LoadedModel(model, None, ARCHS["llama"], source=Path(f"<tiny-llama seed={seed}>"))


def tiny_gemma3(seed: int = 0) -> LoadedModel:
    """A seeded random two-block Gemma-3 text model (fp32, eval), hidden 256."""
    config = Gemma3TextConfig(
        vocab_size=512,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=128,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=128,
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
            scale = 0.3 if name.endswith("norm.weight") else 0.05  # Gemma norms: gain 1 + w, w around 0
            p.copy_(scale * torch.randn(p.shape, generator=gen))
    model.eval()
    return LoadedModel(model, None, ARCHS["gemma3"], Path(f"<tiny-gemma3 seed={seed}>"))
