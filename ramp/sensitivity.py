"""Per-matrix sensitivity, measured and from one gradient, as cost tables for the knapsacks.

Two ways to price "matrix m stored in format f" (lower is better), the strong baselines of the quality issue and
SAC's demonstrations:

* **measured** (the way ExLlamaV3's measurement and the GGUF-Tool-Suite work): the KLD against the FP model on
  calibration windows when that one matrix is quantized and every other stays FP. Because every block before the
  matrix's own is FP, its input hidden states are the FP ones: :class:`BlockRunner` records them once and each
  measurement runs the model from the matrix's block on (a matrix in the last block costs a tenth of a forward).
  Measuring every (matrix, format) pair is a few thousand forwards; ``probes`` formats per matrix are measured
  and the others are priced by the matrix's own measured KLD per unit of imatrix-weighted error (the fold stage's
  proxy), interpolated between its probes by bits per weight. Within a matrix the proxy ranks formats well; what
  it misses is how much a unit of error in *this* matrix costs at the output, which the measurement supplies.
* **gradient** (MLX ``dynamic_quant``'s estimate, generalised from two bit widths to the action space): one
  backward pass of the KLD against the FP reference at the model with every matrix in its cheapest format; the
  first-order change of that KLD when matrix m goes from its cheapest format to f is
  ``sum(grad_m * (deq_f(W_m) - deq_cheapest(W_m)))``.

Both tables are keyed like :mod:`ramp.knapsack`'s (``(gguf_name, format) -> cost``), so the greedy and
Lagrangian knapsacks run on them unchanged (:func:`best_knapsack`).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from ramp.allocation import Allocation, Slot
from ramp.evaluate.kld import FPReference, _module, kl_terms
from ramp.evaluate.perplexity import EvaluationError
from ramp.formats import get_format
from ramp.knapsack import CostTable, allocation_cost, dequantize_direct, greedy_knapsack, lagrangian_knapsack

log = logging.getLogger(__name__)

Imatrix = Mapping[str, np.ndarray]


class _Pass(torch.nn.Module):
    """A decoder layer that hands its input hidden states on unchanged (the blocks before the one measured)."""

    def forward(self, *args: object, **kwargs: object) -> object:
        return args[0] if args else kwargs["hidden_states"]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM, in order."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise EvaluationError(f"{type(model).__name__}: no decoder layers found (model.get_decoder().layers)")
    return layers


class BlockRunner:
    """Runs a model from any block on, with the FP hidden states that enter that block recorded once.

    The reference's windows go through the FP model once; a forward pre-hook on every decoder layer keeps its
    input (float32 ``[n_seq, n_ctx, hidden]`` per block). :meth:`kld_from` then replaces the blocks before
    ``block`` by pass-throughs and feeds the recorded input as the embeddings, so only ``block`` .. the last
    block, the final norm and the output head run. Embedding scales (Gemma) are inside the embedding module and
    are part of the recorded input; masks and positions are rebuilt by the model as in a full forward.
    """

    def __init__(self, lm: object, ref: FPReference, batch_size: int = 4) -> None:
        self.model = _module(lm)
        self.ref = ref
        self.batch_size = batch_size
        self.layers = decoder_layers(self.model)
        self.inputs: list[list[torch.Tensor]] = [[] for _ in self.layers]
        hooks = [
            layer.register_forward_pre_hook(self._recorder(i), with_kwargs=True) for i, layer in enumerate(self.layers)
        ]
        try:
            with torch.inference_mode():
                for s in range(0, ref.tokens.shape[0], batch_size):
                    self.model(input_ids=ref.tokens[s : s + batch_size], use_cache=False, logits_to_keep=1)
        finally:
            for h in hooks:
                h.remove()
        self.nbytes = sum(t.numel() * t.element_size() for parts in self.inputs for t in parts)

    def _recorder(self, i: int):  # noqa: ANN202 - a hook
        def hook(_module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self.inputs[i].append(hidden.detach().to(torch.float32).clone())

        return hook

    @contextlib.contextmanager
    def _skipping(self, block: int) -> Iterator[None]:
        saved = [self.layers[i] for i in range(block)]
        try:
            for i in range(block):
                self.layers[i] = _Pass()
            yield
        finally:
            for i, layer in enumerate(saved):
                self.layers[i] = layer

    @torch.inference_mode()
    def logprobs_from(self, block: int, batch: int) -> torch.Tensor:
        """Log-probs at the reference's scored positions of window batch ``batch``, running from ``block``."""
        hidden = self.inputs[block][batch]
        n_ctx = hidden.shape[1]
        keep = torch.arange(self.ref.first, n_ctx - 1)
        dtype = next(self.model.parameters()).dtype
        with self._skipping(block):
            logits = self.model(inputs_embeds=hidden.to(dtype), use_cache=False, logits_to_keep=keep).logits
        return torch.log_softmax(logits.float(), dim=-1)

    @torch.inference_mode()
    def kld_from(self, block: int) -> float:
        """Mean KLD (nats per scored token) against the reference of the model's current weights, given that
        every block before ``block`` holds its FP weights."""
        if not 0 <= block < len(self.layers):
            raise EvaluationError(f"block {block} is outside the model's {len(self.layers)} blocks")
        total, count = 0.0, 0
        for b in range(len(self.inputs[block])):
            s = b * self.batch_size
            logq = self.logprobs_from(block, b)
            est, _ = kl_terms(logq, self.ref, slice(s, s + logq.shape[0]))
            total += float(est.double().sum())
            count += est.numel()
        return total / count


def _params_by_name(lm: object) -> dict[str, torch.nn.Parameter]:
    params = dict(lm.model.named_parameters())  # type: ignore[attr-defined]
    return {m.gguf_name: params[m.hf_name] for m in lm.matrices()}  # type: ignore[attr-defined]


@contextlib.contextmanager
def _swapped(param: torch.nn.Parameter, value: torch.Tensor) -> Iterator[None]:
    saved = param.data
    try:
        param.data = value
        yield
    finally:
        param.data = saved


def probe_formats(slot: Slot, probes: int) -> tuple[str, ...]:
    """The formats of ``slot`` to measure: ``probes`` of them spread over its list by index, the cheapest first."""
    if probes < 1:
        raise ValueError(f"probes={probes} must be >= 1")
    k = len(slot.formats)
    picks = sorted({int(round(x)) for x in np.linspace(0, k - 1, min(probes, k))})
    return tuple(slot.formats[i] for i in picks)


def measurement_jobs(slots: Sequence[Slot], probes: int) -> list[tuple[Slot, str]]:
    """Every measurement of the table, in table order: ``(slot, fmt)`` for the :func:`probe_formats` of each slot."""
    return [(s, f) for s in slots for f in probe_formats(s, probes)]


def jobs_by_block(slots: Sequence[Slot], probes: int) -> dict[int, tuple[tuple[str, str], ...]]:
    """:func:`measurement_jobs` as ``(gguf_name, fmt)`` pairs grouped by decoder block (blocks ascending, table order
    within a block): the independent units of a fan-out. A block's measurements share its recorded FP inputs."""
    out: dict[int, list[tuple[str, str]]] = {}
    for s, f in measurement_jobs(slots, probes):
        out.setdefault(s.block, []).append((s.gguf_name, f))
    return {b: tuple(out[b]) for b in sorted(out)}


def measure_kld(
    lm: object,
    runner: BlockRunner,
    slots: Sequence[Slot],
    probes: int,
    cache: object,
    imatrix: Imatrix | None,
    progress: bool = True,
) -> dict[tuple[str, str], float]:
    """``(gguf_name, fmt) -> KLD`` with only that matrix quantized (to ``fmt``, RAMP's quantizers, the imatrix
    where the format takes one), for the :func:`probe_formats` of every slot."""
    return measure_pairs(lm, runner, measurement_jobs(slots, probes), cache, imatrix, progress)


def measure_pairs(
    lm: object,
    runner: BlockRunner,
    jobs: Sequence[tuple[Slot, str]],
    cache: object,
    imatrix: Imatrix | None,
    progress: bool = False,
) -> dict[tuple[str, str], float]:
    """:func:`measure_kld` for the given ``(slot, fmt)`` pairs only (one fan-out task's share), in their order.
    Each value depends on its pair alone: the model is FP again after every measurement."""
    params = _params_by_name(lm)
    out: dict[tuple[str, str], float] = {}
    for s, fmt in tqdm(jobs, desc="measuring sensitivity", unit="eval", disable=not progress):
        p = params[s.gguf_name]
        im = None if imatrix is None else imatrix.get(s.gguf_name)
        deq = cache.dequantized(p.data, s.gguf_name, fmt, im)  # type: ignore[attr-defined]
        with _swapped(p, deq):
            out[(s.gguf_name, fmt)] = max(0.0, runner.kld_from(s.block))
    return out


def calibrated_table(slots: Sequence[Slot], proxy: CostTable, measured: Mapping[tuple[str, str], float]) -> CostTable:
    """Every (slot, format) priced in measured KLD: measured pairs as they are, the others as the proxy times the
    slot's measured KLD per unit of proxy, interpolated linearly in bits per weight between its measured formats
    (constant beyond them). A slot with no measured format is an error naming it."""
    out: dict[tuple[str, str], float] = {}
    for s in slots:
        points = sorted(
            (get_format(f).bpw, measured[(s.gguf_name, f)] / max(float(proxy[(s.gguf_name, f)]), 1e-30))
            for f in s.formats
            if (s.gguf_name, f) in measured
        )
        if not points:
            raise EvaluationError(f"{s.gguf_name}: no measured format to calibrate its costs with")
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        for f in s.formats:
            key = (s.gguf_name, f)
            ratio = float(np.interp(get_format(f).bpw, xs, ys))
            out[key] = measured[key] if key in measured else float(proxy[key]) * ratio
    return out


def log_prices(costs: pd.DataFrame) -> pd.DataFrame:
    """The rows of a sensitivity ``costs.parquet`` with a positive measurement and proxy error, with ``log_price``:
    ``log(measured / proxy)``, what a unit of proxy error costs in measured KLD (:func:`role_gains`)."""
    m = costs[costs["measured"].notna() & (costs["measured"] > 0) & (costs["proxy"] > 0)]
    return m.assign(log_price=np.log(m["measured"].to_numpy(np.float64) / m["proxy"].to_numpy(np.float64)))


def role_map(table: pd.DataFrame) -> dict[str, str]:
    """gguf name -> role (q, k, v, o, gate, up, down) of a feature or embedding table; a table without a ``role``
    column is a :class:`ValueError`."""
    if "role" not in table.columns:
        raise ValueError("costs are priced per role, but the feature table has no 'role' column")
    return dict(zip(table["gguf_name"], table["role"], strict=True))


def role_gains(
    models: Sequence[tuple[pd.DataFrame, pd.DataFrame]],
    embeddings: Sequence[tuple[Mapping[str, float], Mapping[str, float]] | None] | None = None,
) -> dict[str, float]:
    """Per layer type (``role``: q, k, v, o, gate, up, down), the log of what a unit of proxy error costs in measured
    KLD, learned from other models' measured tables: the price a zero-shot allocation puts on the proxy (issue 17).

    ``models``: per model, (the sensitivity stage's ``costs.parquet``, the embed stage's ``embedding.parquet``).
    For every measured (matrix, format) pair with a positive measurement and proxy, ``log(measured / proxy)``; per
    model, each role's mean minus the mean over the model's measured pairs (a common factor changes no knapsack,
    and it differs between families); then each role's average over the models that have it. On SmolLM2 and
    Gemma-3 the role ranking is nearly the same (``ffn_down`` costs 2.4-2.8x the model's mean per unit of proxy error,
    ``attn_q`` 0.42-0.46x), while a regression on the other features ranks worse (results/cost_gains.json).

    ``embeddings``: per model (same order), None or (the sensitivity stage's measured embedding KLD by format, the
    embedding's proxy error by format, :func:`embedding_proxy`); the models that have one give the gain
    :data:`EMBEDDING_ROLE`, the embedding's mean log price over its formats with a positive KLD and proxy, minus
    the model's mean over its matrices as above: what :func:`predicted_embedding_kld` prices the embedding by.
    SmolLM2, Gemma-3 and the testbed: 4.76, 4.15, 4.68 (a unit of embedding error costs ~100x a matrix's).

    Raises :class:`ValueError` naming the model (by position) that has no measured pair, an embedding without a
    ``role`` column or a matrix without a role.
    """
    if embeddings is not None and len(embeddings) != len(models):
        raise ValueError(f"{len(embeddings)} embedding tables for {len(models)} models")
    sums: dict[str, list[float]] = {}
    for i, (costs, embedding) in enumerate(models):
        m = log_prices(costs)
        if m.empty:
            raise ValueError(f"model {i} of the pool has no measured sensitivity with a positive proxy error")
        try:
            roles = pd.Series(role_map(embedding))
        except ValueError as e:
            raise ValueError(f"model {i} of the pool: {e}") from e
        missing = sorted(set(m["gguf_name"]) - set(roles.index))
        if missing:
            raise ValueError(f"model {i} of the pool: matrices {missing[:3]} are measured but have no embedding row")
        r = m["log_price"].to_numpy(np.float64)
        by_role = pd.Series(r - r.mean()).groupby(roles.loc[m["gguf_name"]].to_numpy()).mean()
        for role, v in by_role.items():
            sums.setdefault(str(role), []).append(float(v))
        emb = None if embeddings is None else embeddings[i]
        if emb is not None:
            kld, proxy = emb
            logs = [math.log(kld[f] / proxy[f]) for f in kld if f in proxy and kld[f] > 0 and proxy[f] > 0]
            if not logs:
                raise ValueError(f"model {i} of the pool: no embedding format with a positive KLD and proxy error")
            sums.setdefault(EMBEDDING_ROLE, []).append(float(np.mean(logs)) - float(r.mean()))
    return {role: float(np.mean(v)) for role, v in sorted(sums.items())}


def predicted_embedding_kld(proxy: Mapping[str, float], gains: Mapping[str, float] | None) -> dict[str, float]:
    """The embedding's cost per format in the units of a gained table (:func:`gained_table`): its proxy error
    (:func:`embedding_proxy`) times ``exp(gains[EMBEDDING_ROLE])`` (:func:`role_gains`), what
    ``allocate.embedding_type: predicted`` trades against the matrices with no evaluation on the model. Gains
    without an embedding gain (or none) are a :class:`ValueError` saying how to get one."""
    if gains is None or EMBEDDING_ROLE not in gains:
        raise ValueError(
            f"the embedding is priced by an {EMBEDDING_ROLE!r} cost gain, and the policy has "
            f"{'none' if gains is None else sorted(gains)}: train it with train.cost_gain role on models whose "
            "sensitivity stage measured sensitivity.embedding_formats"
        )
    return {f: float(v) * math.exp(gains[EMBEDDING_ROLE]) for f, v in proxy.items()}


def gained_table(proxy: CostTable, roles: Mapping[str, str], gains: Mapping[str, float]) -> CostTable:
    """``proxy`` with every matrix's costs times ``exp(gains[role])`` (:func:`role_gains`); ``roles`` maps a
    matrix's gguf name to its role. A matrix whose role has no gain is a :class:`ValueError` naming both."""
    out: dict[tuple[str, str], float] = {}
    for (name, fmt), c in proxy.items():
        role = roles.get(name)
        if role not in gains:
            raise ValueError(f"{name}: role {role!r} has no cost gain (the gains cover {sorted(gains)})")
        out[(name, fmt)] = float(c) * math.exp(gains[role])
    return out


def gradient_table(
    lm: object,
    ref: FPReference,
    slots: Sequence[Slot],
    cache: object,
    imatrix: Imatrix | None,
    batch_size: int = 4,
) -> CostTable:
    """First-order KLD change of moving each matrix from its cheapest format to each of its formats, from the
    gradient of the KLD at the model with every matrix in its cheapest format (module docstring)."""
    model = _module(lm)
    params = _params_by_name(lm)

    def deq(s: Slot, fmt: str) -> torch.Tensor:  # fetched when needed: all formats at once would be ~2 GB on SmolLM2
        im = None if imatrix is None else imatrix.get(s.gguf_name)
        return cache.dequantized(params[s.gguf_name].data, s.gguf_name, fmt, im)  # type: ignore[attr-defined]

    cheapest = {s.gguf_name: deq(s, s.formats[0]) for s in slots}
    # the reference was built under inference mode; autograd needs ordinary tensors
    r = FPReference(**{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in vars(ref).items()})
    saved = {name: (p.data, p.requires_grad) for name, p in params.items()}
    others = [p for p in model.parameters() if all(p is not q for q in params.values())]
    frozen = [(p, p.requires_grad) for p in others]
    grads: dict[str, torch.Tensor] = {}
    n_tokens = r.target.numel()
    try:
        for p, _ in frozen:
            p.requires_grad_(False)
        for s in slots:
            p = params[s.gguf_name]
            p.data = cheapest[s.gguf_name]
            p.requires_grad_(True)
            p.grad = None
        with torch.enable_grad():
            for start in tqdm(range(0, r.tokens.shape[0], batch_size), desc="KLD gradient", unit="batch", leave=False):
                batch = r.tokens[start : start + batch_size]
                keep = torch.arange(r.first, batch.shape[1] - 1)
                logits = model(input_ids=batch, use_cache=False, logits_to_keep=keep).logits
                est, _ = kl_terms(torch.log_softmax(logits.float(), dim=-1), r, slice(start, start + batch.shape[0]))
                (est.sum() / n_tokens).backward()
        grads = {s.gguf_name: params[s.gguf_name].grad.detach().clone() for s in slots}  # type: ignore[union-attr]
    finally:
        for name, p in params.items():
            p.grad = None
            p.data, flag = saved[name]
            p.requires_grad_(flag)
        for p, flag in frozen:
            p.requires_grad_(flag)
    out: dict[tuple[str, str], float] = {}
    for s in slots:
        g, low = grads[s.gguf_name].double(), cheapest[s.gguf_name].double()
        for f in s.formats:
            out[(s.gguf_name, f)] = float((g * (deq(s, f).double() - low)).sum())
    return out


def best_knapsack(slots: Sequence[Slot], cost: CostTable, budget_matrix_bytes: int) -> Allocation:
    """The greedy or the Lagrangian knapsack on ``cost``, whichever has the lower table cost (ties: greedy)."""
    greedy = greedy_knapsack(slots, cost, budget_matrix_bytes)
    lagrange = lagrangian_knapsack(slots, cost, budget_matrix_bytes)
    if allocation_cost(slots, cost, lagrange) < allocation_cost(slots, cost, greedy):
        return lagrange
    return greedy


# ------------------------------------------------------------------------------------------- the embedding's type

EMBEDDING_TENSOR = "token_embd.weight"
EMBEDDING_ROLE = "embedding"  # role_gains' key for the embedding tensors (allocate.embedding_type: predicted)
OUTPUT_TENSOR = "output.weight"


def embedding_params(lm: object) -> dict[str, torch.nn.Parameter]:
    """GGUF name -> parameter of the tensors ``allocate.embedding_type`` stores: ``token_embd.weight`` (also the
    output head of a tied model) and, when the config does not tie them, ``output.weight`` (as the export plans)."""
    model = _module(lm)
    out = {EMBEDDING_TENSOR: model.get_input_embeddings().weight}
    if not bool(getattr(lm.config, "tie_word_embeddings", False)):  # type: ignore[attr-defined]
        out[OUTPUT_TENSOR] = model.get_output_embeddings().weight
    return out


def embedding_proxy(lm: object, formats: Sequence[str]) -> dict[str, float]:
    """Per format, the relative squared error ``||E - Q(E)||^2 / ||E||^2`` of the embedding tensors
    (:func:`embedding_params`) stored in it as the export writes them (no imatrix): the embedding's proxy error,
    priced by :data:`EMBEDDING_ROLE`'s gain. Weights are read one tensor at a time (from the files for a lazy model).
    A format not legal for the embedding's rows is a :class:`ValueError` naming it."""
    params = embedding_params(lm)
    legal = legal_embedding_formats(lm, formats)
    illegal = [f for f in formats if get_format(f).name not in legal]
    if illegal:
        raise ValueError(f"embedding formats {illegal} are not legal for this model's embedding rows")
    names = {id(p): n for n, p in _module(lm).named_parameters()}
    err = dict.fromkeys(formats, 0.0)
    total = 0.0
    for gguf_name, p in params.items():
        w = lm.weight(names[id(p)])  # type: ignore[attr-defined]
        total += float(w.double().pow(2).sum())
        for fmt in formats:
            err[fmt] += float((w - dequantize_direct(w, gguf_name, fmt, None)).double().pow(2).sum())
    return {f: e / max(total, 1e-30) for f, e in err.items()}


def legal_embedding_formats(lm: object, formats: Sequence[str]) -> tuple[str, ...]:
    """The ``formats`` (registry spelling, order kept) whose block divides every embedding tensor's rows."""
    shapes = [tuple(p.shape) for p in embedding_params(lm).values()]
    return tuple(get_format(f).name for f in formats if all(get_format(f).is_legal(s) for s in shapes))


def embedding_bytes(lm: object, fmt: str) -> int:
    """File data bytes of the embedding tensors stored in ``fmt``."""
    return sum(get_format(fmt).bytes_for(tuple(p.shape)) for p in embedding_params(lm).values())


def measure_embedding(
    lm: object,
    ref: FPReference,
    formats: Sequence[str],
    cache: object,
    batch_size: int = 4,
) -> dict[str, float]:
    """``fmt -> KLD`` against ``ref`` with only the embedding tensors (:func:`embedding_params`) quantized to
    ``fmt`` (RAMP's quantizers without an imatrix, as the export writes them), every matrix FP: a whole forward per
    format, since the token embedding feeds the first block and, tied, is the output head."""
    from ramp.evaluate.kld import kl_divergence

    params = embedding_params(lm)
    out: dict[str, float] = {}
    for fmt in formats:
        with contextlib.ExitStack() as stack:
            for name, p in params.items():
                stack.enter_context(_swapped(p, cache.dequantized(p.data, name, fmt)))  # type: ignore[attr-defined]
            out[fmt] = max(0.0, float(kl_divergence(lm, ref, batch_size, desc=f"embedding in {fmt}").mean))
    return out


def embedding_choice(
    slots: Sequence[Slot],
    cost: CostTable,
    embedding_kld: Mapping[str, float],
    overheads: Mapping[str, int],
    budget: object,
) -> tuple[str, dict[str, float]]:
    """The embedding type of the lowest predicted KLD under ``budget`` (a :class:`ramp.budget.Budget`), and every
    feasible type's prediction: its measured KLD (``embedding_kld``) plus the table cost of the better knapsack on
    ``cost`` (:func:`best_knapsack`) within the matrix bytes that the file's fixed bytes with that type
    (``overheads``) leave. The same additivity the knapsack itself assumes; a smaller embedding buys the matrices
    bytes, a larger one costs less KLD. Ties go to the larger type. A type that leaves less than the smallest legal
    allocation is not offered; none feasible is the :class:`ramp.budget.BudgetError` of the largest."""
    from ramp.budget import BudgetError

    predicted: dict[str, float] = {}
    errors: dict[str, BudgetError] = {}
    for fmt, kld in embedding_kld.items():
        try:
            matrix_bytes = budget.resolve(slots, overheads[fmt]).matrix_bytes  # type: ignore[attr-defined]
        except BudgetError as e:
            errors[fmt] = e
            continue
        predicted[fmt] = float(kld) + allocation_cost(slots, cost, best_knapsack(slots, cost, matrix_bytes))
    if not predicted:
        if not errors:
            raise ValueError("no embedding format to choose from: the measured table is empty")
        raise errors[max(errors, key=lambda f: overheads[f])]
    best = min(predicted, key=lambda f: (predicted[f], -overheads[f]))
    return best, predicted
