"""The sub-4-bit testbed (SPEC §8): a small Llama trained from scratch on the offline calibration text.

Every dimension is a multiple of 256, so every GGUF format (K-quants included) is legal on every matrix, and
the weights are continuous (unlike SmolLM2's, which sit on a Q4_1 grid). Training text is the calibration
part of the Wikipedia split plus the C4 and TinyStories samples; the held-out Wikipedia documents are never
seen, neither by the BPE tokenizer nor by the model.

The run is deterministic: one seed drives initialisation and batch order, the thread count is fixed, and
torch's deterministic algorithms are on, so the same :class:`TestbedConfig` gives the same weight bytes.
The result is an HF directory (``config.json``, ``model.safetensors``, tokenizer files) cached under
``~/.cache/ramp/testbed/<config hash>/`` that :func:`ramp.models.loader.load_model` loads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from ramp.assets import asset_path
from ramp.data import wiki_split
from ramp.errors import RampError
from ramp.io import atomic_write_text
from ramp.llamacpp import cache_root
from ramp.models.tiny import tiny_llama_config

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2: unk, bos, eos (the ids tiny_llama_config uses)
TESTBED_VERSION = 1  # bump when the training recipe changes so cached models are rebuilt


class TestbedError(RampError, ValueError):
    """A testbed configuration that cannot be trained (the message names the field and what was expected)."""

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True)
class TestbedConfig:
    """Model shape, tokenizer and training recipe. Lengths in tokens, ``lr`` per optimizer step."""

    __test__ = False

    hidden: int = 256
    intermediate: int = 768
    layers: int = 4
    heads: int = 4  # head_dim = hidden / heads = 64
    kv_heads: int = 2
    vocab: int = 4096
    tied: bool = True
    n_ctx: int = 256  # training sequence length (tokens)
    batch_size: int = 8  # sequences per step
    steps: int = 1200  # ~20 min on 2 threads; ~10 passes over the 472k training tokens
    lr: float = 3e-3
    min_lr_frac: float = 0.1  # cosine decays to lr * min_lr_frac
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    threads: int = 2  # a fixed thread count keeps the run reproducible
    text_chars: int | None = None  # truncate the training text (tests); None = all of it

    def __post_init__(self) -> None:
        for name in ("hidden", "intermediate", "vocab"):
            if getattr(self, name) % 256:
                raise TestbedError(f"testbed {name}={getattr(self, name)} must be a multiple of 256")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise TestbedError(
                f"hidden={self.hidden}, heads={self.heads}, kv_heads={self.kv_heads}: "
                "expected heads | hidden and kv_heads | heads"
            )
        if self.steps < 1 or self.batch_size < 1 or self.n_ctx < 8:
            raise TestbedError(f"steps={self.steps}, batch_size={self.batch_size}, n_ctx={self.n_ctx} must be positive")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Content hash of the config (and recipe version): the cache directory name."""
        blob = json.dumps({"version": TESTBED_VERSION, **self.to_dict()}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def training_text(max_chars: int | None = None) -> str:
    """Calibration text only: Wikipedia calibration documents + C4 + TinyStories (never the eval split)."""
    calib, _ = wiki_split(asset_path("wiki"))
    c4 = asset_path("c4").read_text(encoding="utf-8")
    tiny = asset_path("tiny_stories").read_text(encoding="utf-8").replace("<|endoftext|>", "\n")
    text = "\n\n".join((calib, c4, tiny))
    return text if max_chars is None else text[:max_chars]


def train_tokenizer(text: str, vocab: int):
    """A byte-level BPE tokenizer with ``vocab`` entries trained on ``text`` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS[0]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    chunks = [text[i : i + 100_000] for i in range(0, len(text), 100_000)]
    tok.train_from_iterator(chunks, trainer=trainer, length=len(chunks))
    if tok.get_vocab_size() != vocab:
        raise TestbedError(f"BPE training gave {tok.get_vocab_size()} tokens, expected {vocab} (text too small?)")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token=SPECIAL_TOKENS[0],
        bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2],
        add_bos_token=True,
    )


def _lr_at(cfg: TestbedConfig, step: int) -> float:
    """Linear warm-up, then cosine from ``lr`` down to ``lr * min_lr_frac``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def _build_model(cfg: TestbedConfig) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_llama_config(
        hidden=cfg.hidden,
        intermediate=cfg.intermediate,
        layers=cfg.layers,
        heads=cfg.heads,
        kv_heads=cfg.kv_heads,
        vocab=cfg.vocab,
        tied=cfg.tied,
    )
    config.max_position_embeddings = max(1024, cfg.n_ctx)
    torch.manual_seed(cfg.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # GPT-2 style init: std 0.02 everywhere, output projections scaled down by depth
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.normal_(0.0, 0.02 / math.sqrt(2 * cfg.layers))
            else:
                p.normal_(0.0, 0.02)
    return model


def train(cfg: TestbedConfig, out_dir: str | Path, text: str | None = None) -> dict:
    """Train the tokenizer and the model of ``cfg``; write an HF directory to ``out_dir`` (replaced atomically).

    Returns the training log: losses per step (nats per token), tokens seen, seconds.
    """
    out_dir = Path(out_dir)
    text = training_text(cfg.text_chars) if text is None else text
    prev_threads = torch.get_num_threads()
    prev_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    try:
        t0 = time.perf_counter()
        tokenizer = train_tokenizer(text, cfg.vocab)
        ids = torch.tensor(tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long)
        n_seq = ids.numel() // cfg.n_ctx
        if n_seq < cfg.batch_size:
            raise TestbedError(
                f"training text has {ids.numel()} tokens: fewer than one batch of {cfg.batch_size}x{cfg.n_ctx}"
            )
        seqs = ids[: n_seq * cfg.n_ctx].reshape(n_seq, cfg.n_ctx).clone()
        seqs[:, 0] = tokenizer.bos_token_id  # every window starts with BOS, as evaluation windows do
        log.info("testbed: %d training tokens, %d sequences of %d", ids.numel(), n_seq, cfg.n_ctx)

        model = _build_model(cfg)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.95),
        )
        gen = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(n_seq, generator=gen)
        pos = 0
        losses = []
        for step in tqdm(range(cfg.steps), desc="training testbed", unit="step"):
            if pos + cfg.batch_size > n_seq:
                order, pos = torch.randperm(n_seq, generator=gen), 0
            batch = seqs[order[pos : pos + cfg.batch_size]]
            pos += cfg.batch_size
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step)
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            losses.append(loss.item())
        model.eval()
        seconds = time.perf_counter() - t0
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.config.save_pretrained(tmp)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if cfg.tied:
        state.pop("lm_head.weight", None)  # tied to embed_tokens; the loader re-ties it
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(tmp))
    train_log = {
        "config": cfg.to_dict(),
        "config_hash": cfg.hash(),
        "training_tokens": int(ids.numel()),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.n_ctx,
        "seconds": seconds,
        "loss_first": losses[0],
        "loss_last10": sum(losses[-10:]) / len(losses[-10:]),
        "losses": losses,
    }
    atomic_write_text(tmp / "train_log.json", json.dumps(train_log, indent=1) + "\n")
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return train_log


def testbed_dir(cfg: TestbedConfig) -> Path:
    return cache_root() / "testbed" / cfg.hash()


def testbed_model(cfg: TestbedConfig | None = None) -> Path:
    """Path of the trained testbed HF directory for ``cfg``; trains it first if it is not cached."""
    cfg = cfg or TestbedConfig()
    path = testbed_dir(cfg)
    if not (path / "model.safetensors").exists():
        log.info("training the testbed model %s into %s", cfg.hash(), path)
        train(cfg, path)
    return path
