"""What a matrix's quantization error costs in KLD, from the model's Fisher information: no quantized evaluation.

At the FP model the KLD of a perturbed model has zero gradient, so to second order
``KL(P_fp || P_fp+dW) = 1/2 dW^T F dW`` with ``F`` the Fisher information of the model's next-token distributions.
Per matrix ``W`` (``y = W x``), with ``F`` kept block-diagonal per matrix and, within the block, the Kronecker product
of the output gradients' and the inputs' second moments, both diagonal (K-FAC's diagonal form):

    cost(m, f) = 1/2 * sum_i G_i * sum_j A_j * (W - Q_f(W))_ij^2        (nats per scored token)

``A_j`` is the imatrix (mean ``x_j^2``, what llama.cpp weights its quantizers by) and ``G_i`` the mean over scored
tokens of ``(dL/dy_i)^2`` summed over the window's positions, ``L`` the log-likelihood of tokens drawn from the FP
model's own distributions (so that ``E[g g^T]`` is the Fisher rather than the empirical Fisher of the text). One
backward pass per calibration window; the quantized weights are the quantization cache's.

What the imatrix proxy (:func:`ramp.knapsack.weighted_error_table`, a relative error) lacks is how much a unit of error
in *this* matrix moves the output: ``G``. On SmolLM2 the log ratio of the measured one-matrix KLD to this estimate
has a standard deviation of 0.47 over the 210 measured matrices (0.92 for the imatrix proxy) and a mean of -0.06: the
estimate is in the measured units without any per-model gain, which is what a zero-shot allocation needs (issue 17).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ramp.allocation import Slot
from ramp.knapsack import CostTable

log = logging.getLogger(__name__)

FISHER_COLUMN = "fisher"  # the fold stage's action-space column holding the table


def output_fisher(lm: object, tokens: torch.Tensor, seed: int = 0) -> dict[str, np.ndarray]:
    """gguf name -> float64 ``[rows]``: per output channel of every quantizable matrix, the mean over scored tokens
    (the second half of each window of ``tokens[n_seq, n_ctx]``, as the KLD scores them) of the squared gradient of
    the log-likelihood of tokens drawn from the model itself (``torch.Generator`` seeded with ``seed``). One window
    per forward and backward pass; the model's parameters get no gradients and are left as they were."""
    from ramp.evaluate.kld import _check_windows, _module

    tokens = _check_windows(tokens)
    model = _module(lm)
    modules = dict(model.named_modules())
    infos = lm.matrices()  # type: ignore[attr-defined]
    sums: dict[str, torch.Tensor] = {}

    def hook(name: str):  # noqa: ANN202 - a forward hook that adds one to the output's gradient
        def on_output(_module: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            def on_grad(g: torch.Tensor) -> None:
                sq = g.detach().double().pow(2).sum(dim=tuple(range(g.dim() - 1)))
                sums[name] = sq if name not in sums else sums[name] + sq

            out.register_hook(on_grad)

        return on_output

    missing = [m.hf_name for m in infos if m.hf_name.removesuffix(".weight") not in modules]
    if missing:
        raise ValueError(f"matrices {missing[:3]} have no module of their own to hook")
    handles = [modules[m.hf_name.removesuffix(".weight")].register_forward_hook(hook(m.gguf_name)) for m in infos]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    gen = torch.Generator().manual_seed(seed)
    n_ctx = int(tokens.shape[1])
    keep = torch.arange(n_ctx // 2, n_ctx - 1)
    scored = 0
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        embed = model.get_input_embeddings()
        with torch.enable_grad():
            for w in tqdm(range(tokens.shape[0]), desc="Fisher (output gradients)", unit="window", leave=False):
                window = tokens[w : w + 1]
                x = embed(window).detach().requires_grad_(True)  # the graph starts here: no weight gradients
                logits = model(inputs_embeds=x, use_cache=False, logits_to_keep=keep).logits.float()
                logp = torch.log_softmax(logits, dim=-1)
                draws = torch.multinomial(logp.detach().exp().reshape(-1, logp.shape[-1]), 1, generator=gen)
                logp.reshape(-1, logp.shape[-1]).gather(-1, draws).sum().backward()
                scored += int(keep.numel())
    finally:
        for h in handles:
            h.remove()
        for p, flag in flags:
            p.requires_grad_(flag)
    absent = [m.gguf_name for m in infos if m.gguf_name not in sums]
    if absent:
        raise ValueError(f"matrices {absent[:3]} got no output gradient (not on the path to the logits?)")
    return {name: (v / scored).numpy() for name, v in sums.items()}


def fisher_table(
    lm: object,
    slots: Sequence[Slot],
    fisher: Mapping[str, np.ndarray],
    imatrix: Mapping[str, np.ndarray],
    cache: object,
) -> CostTable:
    """``(gguf_name, fmt) -> 1/2 sum_i G_i sum_j A_j (W - Q_f(W))_ij^2`` (module docstring) for every format of every
    slot, quantized as the allocators' evaluations are (the cache's dequantized weights, with the imatrix). A slot
    without its ``fisher`` row weights or its imatrix entry is a :class:`ValueError` naming it."""
    hf = {m.gguf_name: m.hf_name for m in lm.matrices()}  # type: ignore[attr-defined]
    out: dict[tuple[str, str], float] = {}
    for s in tqdm(slots, desc="Fisher table", unit="matrix", leave=False):
        if s.gguf_name not in fisher or s.gguf_name not in imatrix:
            raise ValueError(f"{s.gguf_name}: no output-gradient moments or imatrix entry to price it by")
        w = lm.weight(hf[s.gguf_name])  # type: ignore[attr-defined] - one matrix read at a time (lazy models too)
        g = torch.as_tensor(np.asarray(fisher[s.gguf_name]), dtype=torch.float64)
        a = torch.as_tensor(np.asarray(imatrix[s.gguf_name]), dtype=torch.float64)
        if g.shape != (w.shape[0],) or a.shape != (w.shape[1],):
            shapes = f"weights {tuple(w.shape)}, Fisher {tuple(g.shape)}, imatrix {tuple(a.shape)}"
            raise ValueError(f"{s.gguf_name}: {shapes} do not match")
        for fmt in s.formats:
            with torch.no_grad():
                deq = cache.dequantized(w, s.gguf_name, fmt, imatrix[s.gguf_name])  # type: ignore[attr-defined]
                err = (w.double() - deq.double()).pow(2)
                out[(s.gguf_name, fmt)] = 0.5 * float(g @ (err @ a))
    return out
