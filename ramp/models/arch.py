"""Per-architecture tables: tensor names (Hugging Face <-> GGUF), quantizable matrices, norms, fold groups.

Adding an architecture is one ``ArchSpec`` row: its tensor-name tables, how to build the transformers config
from GGUF metadata (and back, for export), whether llama.cpp permutes ``attn_q``/``attn_k`` rows, and the
Scale Folding groups (SPEC §5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from transformers import Gemma3TextConfig, LlamaConfig, PretrainedConfig, Qwen2Config, Qwen3Config

from ramp.errors import RampError

# Matrix roles in block order; the index is the layer-type code of the embedding (SPEC §4, feature 10).
ROLES: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(frozen=True)
class TensorName:
    """One tensor's name in both worlds; ``{i}`` stands for the block index."""

    hf: str
    gguf: str

    def at(self, block: int) -> TensorName:
        return TensorName(self.hf.format(i=block), self.gguf.format(i=block))


@dataclass(frozen=True)
class FoldGroup:
    """Scale Folding group: ``source`` (a norm or a matrix) absorbs 1/s; ``targets`` get columns * s."""

    source: str  # a norm key of ``ArchSpec.block_norms`` or a matrix role ("v", "up")
    targets: tuple[str, ...]  # matrix roles whose input columns are scaled


LLAMA_MATRICES = {
    "q": TensorName("model.layers.{i}.self_attn.q_proj.weight", "blk.{i}.attn_q.weight"),
    "k": TensorName("model.layers.{i}.self_attn.k_proj.weight", "blk.{i}.attn_k.weight"),
    "v": TensorName("model.layers.{i}.self_attn.v_proj.weight", "blk.{i}.attn_v.weight"),
    "o": TensorName("model.layers.{i}.self_attn.o_proj.weight", "blk.{i}.attn_output.weight"),
    "gate": TensorName("model.layers.{i}.mlp.gate_proj.weight", "blk.{i}.ffn_gate.weight"),
    "up": TensorName("model.layers.{i}.mlp.up_proj.weight", "blk.{i}.ffn_up.weight"),
    "down": TensorName("model.layers.{i}.mlp.down_proj.weight", "blk.{i}.ffn_down.weight"),
}
LLAMA_NORMS = {
    "attn_norm": TensorName("model.layers.{i}.input_layernorm.weight", "blk.{i}.attn_norm.weight"),
    "ffn_norm": TensorName("model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.ffn_norm.weight"),
}
GLOBALS = {
    "token_embd": TensorName("model.embed_tokens.weight", "token_embd.weight"),
    "output_norm": TensorName("model.norm.weight", "output_norm.weight"),
    "output": TensorName("lm_head.weight", "output.weight"),
}
QK_NORMS = {
    "attn_q_norm": TensorName("model.layers.{i}.self_attn.q_norm.weight", "blk.{i}.attn_q_norm.weight"),
    "attn_k_norm": TensorName("model.layers.{i}.self_attn.k_norm.weight", "blk.{i}.attn_k_norm.weight"),
}
QKV_BIASES = {
    f"{r}_bias": TensorName(f"model.layers.{{i}}.self_attn.{r}_proj.bias", f"blk.{{i}}.attn_{r}.bias")
    for r in ("q", "k", "v")
}
LLAMA_FOLDS = (
    FoldGroup("attn_norm", ("q", "k", "v")),
    FoldGroup("ffn_norm", ("gate", "up")),
    FoldGroup("v", ("o",)),
    FoldGroup("up", ("down",)),
)


def _get(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    if key in meta:
        return meta[key]
    if default is None:
        raise KeyError(f"GGUF metadata key {key!r} is missing")
    return default


def _common_hparams(meta: dict[str, Any], arch: str, vocab_size: int, tied: bool) -> dict[str, Any]:
    n_head = int(_get(meta, f"{arch}.attention.head_count"))
    hidden = int(_get(meta, f"{arch}.embedding_length"))
    return dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=int(_get(meta, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_get(meta, f"{arch}.block_count")),
        num_attention_heads=n_head,
        num_key_value_heads=int(meta.get(f"{arch}.attention.head_count_kv", n_head)),
        head_dim=int(meta.get(f"{arch}.attention.key_length", hidden // n_head)),
        rms_norm_eps=float(_get(meta, f"{arch}.attention.layer_norm_rms_epsilon")),
        max_position_embeddings=int(_get(meta, f"{arch}.context_length")),
        tie_word_embeddings=tied,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )


def _llama_config(meta: dict[str, Any], vocab_size: int, tied: bool) -> PretrainedConfig:
    hp = _common_hparams(meta, "llama", vocab_size, tied)
    theta = float(meta.get("llama.rope.freq_base", 10000.0))
    return LlamaConfig(**hp, rope_parameters={"rope_type": "default", "rope_theta": theta})


def _qwen_config(cls: type[PretrainedConfig], arch: str) -> Callable[..., PretrainedConfig]:
    def build(meta: dict[str, Any], vocab_size: int, tied: bool) -> PretrainedConfig:
        hp = _common_hparams(meta, arch, vocab_size, tied)
        theta = float(meta.get(f"{arch}.rope.freq_base", 10000.0))
        return cls(**hp, rope_parameters={"rope_type": "default", "rope_theta": theta})

    return build


def _gemma3_config(meta: dict[str, Any], vocab_size: int, tied: bool) -> PretrainedConfig:
    hp = _common_hparams(meta, "gemma3", vocab_size, tied)
    n_layers = hp["num_hidden_layers"]
    # llama.cpp's gemma3: every 6th layer attends globally with the file's rope base; the others use a
    # sliding window with rope base 10000 (not stored in the GGUF).
    layer_types = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(n_layers)]
    theta = float(meta.get("gemma3.rope.freq_base", 1_000_000.0))
    return Gemma3TextConfig(
        **hp,
        layer_types=layer_types,
        sliding_window=int(meta.get("gemma3.attention.sliding_window", 512)),
        query_pre_attn_scalar=hp["head_dim"],
        rope_parameters={
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            "full_attention": {"rope_type": "default", "rope_theta": theta},
        },
    )


@dataclass(frozen=True)
class ArchSpec:
    """Everything RAMP needs to know about one model family."""

    gguf_arch: str  # general.architecture in GGUF
    hf_model_types: tuple[str, ...]  # config.model_type values in Hugging Face directories
    matrices: dict[str, TensorName]  # role -> names (quantizable matrices)
    block_norms: dict[str, TensorName]  # norms (and other small per-block tensors) kept in F32
    build_config: Callable[[dict[str, Any], int, bool], PretrainedConfig]
    permute_qk: bool = False  # llama.cpp reorders attn_q/attn_k rows for its RoPE layout
    norm_offset: float = 0.0  # GGUF norm weight = HF weight + offset (Gemma stores 1 + w)
    fold_groups: tuple[FoldGroup, ...] = LLAMA_FOLDS
    globals: dict[str, TensorName] = field(default_factory=lambda: dict(GLOBALS))

    def block_tensors(self, block: int) -> dict[str, TensorName]:
        return {k: v.at(block) for k, v in {**self.matrices, **self.block_norms}.items()}


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", ("llama", "mistral"), LLAMA_MATRICES, LLAMA_NORMS, _llama_config, permute_qk=True),
    "qwen2": ArchSpec(
        "qwen2", ("qwen2",), LLAMA_MATRICES, {**LLAMA_NORMS, **QKV_BIASES}, _qwen_config(Qwen2Config, "qwen2")
    ),
    "qwen3": ArchSpec(
        "qwen3", ("qwen3",), LLAMA_MATRICES, {**LLAMA_NORMS, **QK_NORMS}, _qwen_config(Qwen3Config, "qwen3")
    ),
    "gemma3": ArchSpec(
        "gemma3",
        ("gemma3_text",),
        LLAMA_MATRICES,
        {
            "attn_norm": LLAMA_NORMS["attn_norm"],
            "post_attention_norm": TensorName(
                "model.layers.{i}.post_attention_layernorm.weight", "blk.{i}.post_attention_norm.weight"
            ),
            "ffn_norm": TensorName("model.layers.{i}.pre_feedforward_layernorm.weight", "blk.{i}.ffn_norm.weight"),
            "post_ffw_norm": TensorName(
                "model.layers.{i}.post_feedforward_layernorm.weight", "blk.{i}.post_ffw_norm.weight"
            ),
            **QK_NORMS,
        },
        _gemma3_config,
        norm_offset=1.0,
    ),
}


class UnsupportedArchitecture(RampError, ValueError):
    pass


def arch_for_gguf(name: str, source: str) -> ArchSpec:
    if name not in ARCHS:
        raise UnsupportedArchitecture(
            f"{source}: architecture {name!r} is not supported; supported: {', '.join(sorted(ARCHS))}"
        )
    return ARCHS[name]


def arch_for_hf(model_type: str, source: str) -> ArchSpec:
    for spec in ARCHS.values():
        if model_type in spec.hf_model_types:
            return spec
    known = sorted(t for s in ARCHS.values() for t in s.hf_model_types)
    raise UnsupportedArchitecture(
        f"{source}: model_type {model_type!r} is not supported; supported: {', '.join(known)}"
    )


def permute_for_gguf(w, n_head: int):  # noqa: ANN001, ANN201 - numpy or torch
    """HF -> llama.cpp row order of attn_q/attn_k (interleaved rotary halves within each head)."""
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_from_gguf(w, n_head: int):  # noqa: ANN001, ANN201
    """llama.cpp -> HF row order; the inverse of :func:`permute_for_gguf`."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
