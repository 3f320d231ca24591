"""What a matrix's quantization error costs in KLD, from the model's Fisher information: no quantized evaluation.

At the FP model the KLD of a perturbed model has zero gradient, so to second order
``KL(P_fp || P_fp+dW) = 1/2 dW^T F dW`` with ``F`` the Fisher information of the model's next-token distributions.
Per matrix ``W`` (``y = W x``), with ``F`` kept block-diagonal per matrix and, within the block, the Kronecker product
of the output gradients' and the inputs' second moments, both diagonal (K-FAC's diagonal form):

    cost(m, f) = 1/2 * sum_i G_i * sum_j A_j * (W - Q_f(W))_ij^2        (nats per scored token)

``A_j`` is the imatrix (mean ``x_j^2``, what llama.cpp weights its quantizers by) and ``G_i`` the mean over scored
tokens of ``(dL/dy_i)^2`` summed over the window's positions, ``L`` the log-likelihood of tokens drawn from the FP
model's own distributions (so that ``E[g g^T]`` is the Fisher rather than the empirical Fisher of the text). One
forward and one backward pass per calibration window, block by block (a lazy model is never loaded whole); the
quantized weights are the quantization cache's.

What the imatrix proxy (:func:`ramp.knapsack.weighted_error_table`, a relative error) lacks is how much a unit of error
in *this* matrix moves the output: ``G``. On SmolLM2 the log ratio of the measured one-matrix KLD to this estimate
has a standard deviation of 0.52 over the 210 measured matrices (0.92 for the imatrix proxy) and a mean of +0.08: the
estimate is in the measured units without any per-model gain, which is what a zero-shot allocation needs (issue 17).
Where a norm follows the matrix (Gemma-3's post-FFN norm, its k-norm) the second-order term overprices large errors:
Gemma-3's ``ffn_down`` at Q2_K by e^2.45 on average (results/cost_gains_fisher.json).
"""

from __future__ import annotations

import contextlib
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
    the log-likelihood of tokens drawn from the model itself (``torch.Generator`` seeded with ``seed``).

    Block by block, so that a lazy model (:mod:`ramp.models.stream`) is never loaded whole: the windows run forward
    one block at a time with each block's input kept (``n_seq * n_ctx * hidden`` floats per block), the output head
    draws the tokens and starts the gradient, then each block, from the last down, is read again, run forward on
    its kept input and back-propagated, its matrices' output gradients squared and summed on the way, its input
    gradient handed to the block below. A model loaded whole runs the same code. Weights get no gradients."""
    from ramp.evaluate.kld import _module

    flags = [(p, p.requires_grad) for p in _module(lm).parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        return _output_fisher(lm, tokens, seed)
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _output_fisher(lm: object, tokens: torch.Tensor, seed: int) -> dict[str, np.ndarray]:
    from ramp.evaluate.kld import _check_windows, _module
    from ramp.models.stream import _body, _first, _prefix, _Recorder, decoder_layers, loaded, output_head

    tokens = _check_windows(tokens)
    model = _module(lm)
    store = getattr(lm, "store", None)
    body, layers = _body(model), decoder_layers(model)
    n = len(layers)
    infos = lm.matrices()  # type: ignore[attr-defined]
    by_block: dict[int, list] = {}
    for m in infos:
        by_block.setdefault(m.block, []).append(m)
    prefix = _prefix(model, body, "layers")
    # 1. embeddings and every block's call arguments (masks, positions), recorded without the inference mode so that
    #    autograd may use them; then the forward, block by block, keeping each block's inputs
    calls: list[list[tuple[tuple, dict]]] = [[] for _ in range(n)]
    hidden: list[torch.Tensor] = []
    originals = list(layers)
    with torch.no_grad(), contextlib.ExitStack() as stack:
        for name, mod in body.named_children():
            if name != "layers":
                stack.enter_context(loaded(model, _prefix(model, body, name), mod, store))
        try:
            for i in range(n):
                layers[i] = _Recorder(i, calls, hidden)
            for w in range(tokens.shape[0]):
                body(input_ids=tokens[w : w + 1], use_cache=False)
        finally:
            for i, layer in enumerate(originals):
                layers[i] = layer
    inputs: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for i in tqdm(range(n), desc="Fisher: forward", unit="block", leave=False):
            inputs.append(list(hidden))
            with loaded(model, f"{prefix}.{i}", layers[i], store):
                hidden = [_first(layers[i](h, *a, **k)) for h, (a, k) in zip(hidden, calls[i], strict=True)]
    # 2. the head: tokens drawn from the model's own next-token distributions, the gradient of their log-likelihood
    gen = torch.Generator().manual_seed(seed)
    n_ctx = int(tokens.shape[1])
    keep = slice(n_ctx // 2, n_ctx - 1)
    grads: list[torch.Tensor] = []
    with torch.enable_grad(), output_head(model, store) as head:
        for h in hidden:
            h = h.detach().requires_grad_(True)
            logits = head(h[:, keep]).float()
            logp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), dim=-1)
            draws = torch.multinomial(logp.detach().exp(), 1, generator=gen)
            logp.gather(-1, draws).sum().backward()
            grads.append(h.grad.detach())  # type: ignore[union-attr]
    scored = tokens.shape[0] * (n_ctx - 1 - n_ctx // 2)
    # 3. the blocks from the last down: forward on the kept input, backward with the gradient from above
    sums: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name: str):  # noqa: ANN202 - a forward hook that adds one to the output's gradient
        def on_output(_module: torch.nn.Module, _args: tuple, out: torch.Tensor) -> None:
            def on_grad(g: torch.Tensor) -> None:
                sq = g.detach().double().pow(2).sum(dim=tuple(range(g.dim() - 1)))
                sums[name] = sq if name not in sums else sums[name] + sq

            out.register_hook(on_grad)

        return on_output

    for i in tqdm(range(n - 1, -1, -1), desc="Fisher: backward", unit="block", leave=False):
        with loaded(model, f"{prefix}.{i}", layers[i], store), torch.enable_grad():
            for p in layers[i].parameters():  # a lazy block's weights were just read in
                p.requires_grad_(False)
            handles = [
                modules[m.hf_name.removesuffix(".weight")].register_forward_hook(hook(m.gguf_name))
                for m in by_block.get(i, [])
            ]
            try:
                below = []
                for x, g, (a, k) in zip(inputs[i], grads, calls[i], strict=True):
                    x = x.detach().requires_grad_(True)
                    _first(layers[i](x, *a, **k)).backward(g)
                    below.append(x.grad.detach())  # type: ignore[union-attr]
            finally:
                for h in handles:
                    h.remove()
        grads, inputs[i] = below, []
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
