"""Synthetic random-weight Llama checkpoints (bf16 safetensors shards, a Hugging Face directory) at real shapes.

    python benchmarks/synthetic_llama.py --shape 7B [--out DIR]

Shapes: ``0.13B`` (hidden 768, FFN 2048, 12 layers), ``1.1B`` (TinyLlama: 2048, 5632, 22 layers, 4 KV heads)
and ``7B`` (Llama-2-7B: 4096, 11008, 32 layers, untied 32,000-token head), all with a 32,000-token byte-level
BPE tokenizer trained on the Wikipedia asset (so calibration text encodes and llama.cpp can load the export).
Weights are seeded per tensor (N(0, 0.02), norms 1), so the same shape and seed give the same bytes; shards of
at most 2 GB as ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``, as Hugging Face
writes them. Written to ``~/.cache/ramp/synthetic/<shape>-s<seed>/`` (never committed) through a temporary
folder that is renamed into place when complete. Time on the 2-core machine: ~10 s (0.13B), ~1 min (1.1B),
~6 min (7B, 13.5 GB).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ramp.llamacpp import cache_root  # noqa: E402

log = logging.getLogger("synthetic_llama")
SHAPES: dict[str, dict[str, int]] = {
    "0.13B": {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 12,
              "num_key_value_heads": 12},
    "1.1B": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
             "num_key_value_heads": 4},
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32},
}  # fmt: skip
VOCAB = 32000
SHARD_BYTES = 2_000_000_000
STD = 0.02


def config_for(shape: str) -> dict:
    s = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **s,
        "head_dim": s["hidden_size"] // s["num_attention_heads"],
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def tensor_shapes(config: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every weight of the Llama the config describes, in Hugging Face order."""
    h, f, n = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, h))]
    for i in range(n):
        p = f"model.layers.{i}"
        out += [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (f, h)),
            (f"{p}.mlp.up_proj.weight", (f, h)),
            (f"{p}.mlp.down_proj.weight", (h, f)),
        ]
    return [*out, ("model.norm.weight", (h,)), ("lm_head.weight", (VOCAB, h))]


def make_tensor(name: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little"))
    return (torch.randn(shape, generator=g) * STD).to(torch.bfloat16)


def default_dir(shape: str, seed: int) -> Path:
    return cache_root() / "synthetic" / f"{shape}-s{seed}"


def build(shape: str, out: Path | None = None, seed: int = 0) -> Path:
    """The checkpoint directory (built when missing; an existing complete one is reused)."""
    if shape not in SHAPES:
        raise SystemExit(f"--shape {shape!r}: expected one of {', '.join(SHAPES)}")
    out = Path(out) if out is not None else default_dir(shape, seed)
    if (out / "model.safetensors.index.json").exists():
        return out
    from ramp.assets import asset_path
    from ramp.testbed import train_tokenizer

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    config = config_for(shape)
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tok = train_tokenizer(asset_path("wiki").read_text(encoding="utf-8"), VOCAB)
    tok.save_pretrained(str(tmp))
    specs = tensor_shapes(config)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shp in specs:
        nbytes = 2 * int(torch.Size(shp).numel())
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, shp))
        size += nbytes
    weight_map, total = {}, 0
    bar = tqdm(total=sum(2 * torch.Size(s).numel() for _, s in specs), unit="B", unit_scale=True, desc=f"{shape}")
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shp in shard:
            tensors[name] = make_tensor(name, shp, seed)
            weight_map[name] = fname
            total += tensors[name].numel() * 2
            bar.update(tensors[name].numel() * 2)
        save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
        del tensors
    bar.close()
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    log.info("%s: %d tensors, %.2f B parameters, %.2f GB in %d shards", out, len(specs), total / 2e9, total / 1e9,
             len(shards))  # fmt: skip
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", required=True, choices=list(SHAPES))
    ap.add_argument(
        "--out", type=Path, default=None, help="directory (default ~/.cache/ramp/synthetic/<shape>-s<seed>)"
    )
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(build(args.shape, args.out, args.seed))


if __name__ == "__main__":
    main()
