"""Perplexity as llama.cpp's ``llama-perplexity`` computes it.

The token stream is cut into non-overlapping windows of ``n_ctx`` tokens; when the model adds a BOS token,
the first token of each window is replaced by BOS. Only the second half of each window is scored: the
logits at positions ``n_ctx/2 .. n_ctx-2`` predict tokens ``n_ctx/2+1 .. n_ctx-1`` (255 per window at
n_ctx 512). ``full_window=True`` scores every position instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ramp.errors import RampError


class EvaluationError(RampError, ValueError):
    pass


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens_scored: int
    chunks: int
    n_ctx: int

    def as_dict(self) -> dict:
        return {
            "ppl": self.ppl,
            "nll": self.nll,
            "tokens_scored": self.tokens_scored,
            "chunks": self.chunks,
            "n_ctx": self.n_ctx,
        }


def make_windows(tokens: torch.Tensor, n_ctx: int, n_chunks: int | None, bos_id: int | None) -> torch.Tensor:
    """``[n, n_ctx]`` non-overlapping windows; BOS replaces each window's first token when ``bos_id`` is set."""
    tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    available = tokens.numel() // n_ctx
    if available == 0:
        raise EvaluationError(f"text has {tokens.numel()} tokens, fewer than one window of n_ctx={n_ctx}")
    n = available if n_chunks is None else min(n_chunks, available)
    if n_chunks is not None and n_chunks > available:
        raise EvaluationError(f"{n_chunks} chunks of {n_ctx} tokens requested but the text has only {available}")
    windows = tokens[: n * n_ctx].reshape(n, n_ctx).clone()
    if bos_id is not None:
        windows[:, 0] = bos_id
    return windows


@torch.inference_mode()
def perplexity(
    model: torch.nn.Module,
    tokens: torch.Tensor,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    bos_id: int | None = None,
    batch_size: int = 4,
    full_window: bool = False,
    desc: str = "perplexity",
) -> PerplexityResult:
    """llama.cpp-compatible perplexity of ``model`` on ``tokens`` (a 1-D tensor of token ids)."""
    windows = make_windows(tokens, n_ctx, n_chunks, bos_id)
    first = 0 if full_window else n_ctx // 2
    nll_sum = 0.0
    count = 0
    for start in tqdm(range(0, windows.shape[0], batch_size), desc=desc, unit="batch", leave=False):
        batch = windows[start : start + batch_size]
        logits = model(input_ids=batch).logits[:, first : n_ctx - 1].float()
        targets = batch[:, first + 1 :]
        logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        nll_sum += float(-logp.double().sum())
        count += targets.numel()
    nll = nll_sum / count
    return PerplexityResult(math.exp(nll), nll, count, windows.shape[0], n_ctx)
