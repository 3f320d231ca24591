"""Tiny Llama models built in code for tests: every dimension a multiple of 256, so every GGUF format is legal."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

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
