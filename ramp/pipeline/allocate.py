"""Stage allocate: a policy picks a GGUF type for every matrix of the model under the budget.

Reads ``data/train/policy/`` (``policy: file``) or a policy folder given by the caller (``policy: champion``: the
flows layer downloads the registry's champion; ``ramp`` itself never talks to MLflow), the embedding and the fold
stage's action space. Writes ``data/allocate/`` (``allocation.json``, ``allocation.parquet``,
``tensor_types.txt``: the llama-quantize ``--tensor-type-file`` recipe, ``budget.json``).

The budget is the size of the whole exported GGUF file (``budget_file_bytes``) or bits per weight of the
quantizable matrices (``budget_bpw``), resolved by :class:`ramp.budget.Budget` against the bytes that do not
depend on the allocation (:func:`overhead_bytes`: header, embeddings, norms, provenance keys).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ramp.io import atomic_dir, write_json
from ramp.params import EMBEDDING_AUTO, EMBEDDING_MEASURED, EMBEDDING_PREDICTED, AllocateParams, as_dict
from ramp.pipeline.workspace import Timer, Workspace

log = logging.getLogger("ramp.pipeline.allocate")
POLICY_FILE = "file:data/train/policy"  # provenance of a policy of this pipeline's train stage


def overhead_bytes(
    lm: Any, embedding_type: str = EMBEDDING_AUTO, norm_type: str = "F32", policy: str = POLICY_FILE
) -> int:
    """File bytes of an export of ``lm`` that do not depend on the allocation (with RAMP's provenance keys), its
    embeddings of ``embedding_type`` (``allocate.embedding_type``; the train stage reads that key too)."""
    from ramp.gguf_export import Provenance, file_overhead

    provenance = Provenance(policy_version=policy, budget_file_bytes=0, method="ramp")
    return file_overhead(lm, embedding_type, norm_type, provenance)


def embedding_type(lm: Any, name: str) -> str:
    """``allocate.embedding_type`` as the GGUF type the export writes (``auto`` resolved for ``lm``)."""
    from ramp.presets import resolve_embedding_type

    return resolve_embedding_type(name, int(lm.config.hidden_size))


def resolve_embedding(
    ws: Workspace,
    lm: Any,
    slots: Any,
    name: str,
    budget: Any,
    norm_type: str = "F32",
    policy: str = POLICY_FILE,
    priced: tuple[Any, Any, Any] | None = None,
) -> tuple[str, int, dict[str, float]]:
    """``allocate.embedding_type`` ``name`` for ``budget`` (a :class:`ramp.budget.Budget`) on ``ws``'s model: the GGUF
    type the export writes, the file's fixed bytes with it (:func:`overhead_bytes`) and, for ``measured``, every
    measured type's predicted KLD (:func:`ramp.sensitivity.embedding_choice` on the sensitivity stage's KLD table
    and embedding measurements). ``predicted``: the same choice with no evaluation on this model, among the
    ``formats`` of ``priced`` = (cost table, cost gains, formats): the policy's gained proxy table and its embedding
    gain times the embedding's proxy error (:func:`ramp.sensitivity.predicted_embedding_kld`); without ``priced``
    (training, which has no policy yet) it is an error. A bpw budget prices the matrices only, so there is nothing
    to trade: ``measured`` and ``predicted`` are ``auto`` for it (the lowest KLD would always be the largest type,
    and the file would outgrow llama.cpp's at the same bpw). Any other name: as given (``auto`` resolved), no
    predictions."""
    if name in (EMBEDDING_MEASURED, EMBEDDING_PREDICTED) and budget.file_bytes is None:
        name = EMBEDDING_AUTO
    if name not in (EMBEDDING_MEASURED, EMBEDDING_PREDICTED):
        return embedding_type(lm, name), overhead_bytes(lm, name, norm_type, policy), {}
    from ramp.sensitivity import embedding_choice

    kld, table = _measured_costs(ws) if name == EMBEDDING_MEASURED else _predicted_costs(lm, priced)
    overheads = {f: overhead_bytes(lm, f, norm_type, policy) for f in kld}
    best, predicted = embedding_choice(slots, table, kld, overheads, budget)
    log.info(
        "embedding type %s for %s (%s; predicted cost by type: %s)",
        best,
        budget.describe(),
        "measured" if name == EMBEDDING_MEASURED else "no evaluation: gained-proxy units",
        {f: round(v, 5) for f, v in predicted.items()},
    )
    return best, overheads[best], predicted


def _measured_costs(ws: Workspace) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """``measured``: the sensitivity stage's embedding KLD by type and its calibrated KLD table."""
    from ramp.pipeline.sensitivity import cost_tables, embedding_costs

    measured = embedding_costs(ws)
    table = cost_tables(ws).get("sensitivity")
    if table is None:
        raise ValueError(f"allocate.embedding_type {EMBEDDING_MEASURED!r}: {ws.stage('sensitivity')} has no KLD table")
    return measured, table


def _predicted_costs(lm: Any, priced: tuple[Any, Any, Any] | None) -> tuple[dict[str, float], Any]:
    """``predicted``: the embedding's proxy error priced by the policy's embedding gain, per legal type of
    ``priced``'s formats, and ``priced``'s (gained proxy) table."""
    from ramp.sensitivity import embedding_proxy, legal_embedding_formats, predicted_embedding_kld

    if priced is None:
        raise ValueError(
            f"allocate.embedding_type {EMBEDDING_PREDICTED!r} prices the embedding with a trained policy's cost gains, "
            "which a model's training does not have yet: train on a bpw budget (train.budget_bpw), or use measured"
        )
    cost, gains, formats = priced
    legal = legal_embedding_formats(lm, formats)
    if not legal:
        raise ValueError(f"sensitivity.embedding_formats {list(formats)}: none is legal for this model's embedding")
    try:
        return predicted_embedding_kld(embedding_proxy(lm, legal), gains), cost
    except ValueError as e:
        raise ValueError(f"allocate.embedding_type {EMBEDDING_PREDICTED!r}: {e}") from e


def resolve_budget(
    params: AllocateParams,
    ws: Workspace,
    lm: Any,
    slots: Any,
    policy: str = POLICY_FILE,
    priced: tuple[Any, Any, Any] | None = None,
) -> tuple[str, int, dict[str, float], Any]:
    """The allocate stage's budget on ``ws``'s model (``lm``, its quantizable ``slots``): the embedding's GGUF type,
    the file's fixed bytes with it, the measured or predicted types' predictions (:func:`resolve_embedding`, with
    ``priced``) and the resolved :class:`ramp.budget.Budget` (its ``matrix_bytes`` is what the allocation may
    spend)."""
    from ramp.budget import Budget

    asked = Budget(file_bytes=params.budget_file_bytes, bpw=params.budget_bpw, where="allocate")
    return resolve_asked(ws, lm, slots, asked, params.embedding_type, params.norm_type, policy, priced)


def resolve_asked(
    ws: Workspace,
    lm: Any,
    slots: Any,
    asked: Any,
    embedding: str,
    norm_type: str = "F32",
    policy: str = POLICY_FILE,
    priced: tuple[Any, Any, Any] | None = None,
) -> tuple[str, int, dict[str, float], Any]:
    """:func:`resolve_budget` of the :class:`ramp.budget.Budget` ``asked`` (the train stage's own budget) with
    ``allocate.embedding_type`` ``embedding`` and ``norm_type``: the export's fixed bytes, then the matrices'."""
    emb_type, overhead, predicted = resolve_embedding(ws, lm, slots, embedding, asked, norm_type, policy, priced)
    return emb_type, overhead, predicted, asked.resolve(slots, overhead)


def own_best(ws: Workspace, policy_dir: Path, walk: str, matrix_bytes: int) -> dict[str, str] | None:
    """The train stage's best allocation (``best_allocation.json``: with rescoring, the best on the fresh windows)
    when ``policy_dir`` is that stage's own policy, walked as in training (``wall``), at the matrix budget it was
    trained at: what the policy was distilled onto, which its walk may miss in a few matrices (a 99 % copy moved
    SmolLM2's last ``ffn_down`` down a type: +0.024 KLD). Otherwise None: the policy's walk is the allocation."""
    from ramp.allocation import load_allocation

    train = ws.stage("train")
    path = train / "best_allocation.json"
    if walk != "wall" or policy_dir.resolve() != (train / "policy").resolve() or not path.is_file():
        return None
    metrics = ws.read_json("metrics/train.json")
    if int(metrics.get("budget_matrix_bytes") or -1) != int(matrix_bytes):
        return None
    return load_allocation(path)


def allocate(
    params: AllocateParams,
    ws: Workspace,
    policy_dir: Path | None = None,
    policy_version: str | None = None,
    embedding_formats: tuple[str, ...] = (),
) -> dict[str, Any]:
    """Allocate with the train stage's policy (or ``policy_dir``, named ``policy_version``); returns the metrics.
    ``embedding_formats`` (``sensitivity.embedding_formats``): the types ``embedding_type: predicted`` chooses
    among."""
    import pandas as pd

    from ramp.allocate import allocate as run_policy
    from ramp.allocate import load_policy, policy_costs, resolve_walk
    from ramp.allocation import (
        AllocationError,
        bits_per_weight,
        matrix_bytes,
        save_allocation,
        tensor_type_recipe,
    )
    from ramp.pipeline.fold import action_space, fisher_costs

    ws.begin("allocate")
    timer = Timer()
    if policy_dir is None:
        if params.policy != "file":
            raise ValueError(f"allocate.policy is {params.policy!r}: the caller must fetch that policy's folder")
        policy_dir, policy_version = ws.stage("train") / "policy", POLICY_FILE
    version = policy_version or str(policy_dir)  # recorded in the file's ramp.policy_version key
    policy = load_policy(policy_dir)
    lm = ws.folded_model(lazy=True)  # shapes and names only
    slots, cost = action_space(ws, lm)
    table = pd.read_parquet(ws.stage("embed") / "embedding.parquet")
    fisher = fisher_costs(ws) if policy.cost_basis == "fisher" else None
    cost = policy_costs(policy, slots, table, cost, fisher)  # its basis table, priced by its cost gains if it has them
    priced = (cost, policy.cost_gains, embedding_formats)
    emb_type, overhead, emb_predicted, budget = resolve_budget(params, ws, lm, slots, version, priced)
    fill_cost = cost if params.fill == "proxy" else None
    walk = resolve_walk(policy, params.walk)  # auto: by the policy's action map
    if walk != params.walk:
        log.info("walk %s: %s for this policy's %s action map", params.walk, walk, policy.env_config.get("action_map"))
    allocation = run_policy(
        policy,
        slots,
        table,
        budget.matrix_bytes,
        fill_cost=fill_cost,
        walk=walk,
        clip=params.clip,
        prior_cost=cost,
    )
    walked, best = allocation, own_best(ws, policy_dir, walk, budget.matrix_bytes)
    allocation = best if best is not None else walked  # what the policy was distilled onto, not the walk's near copy
    agreement = sum(walked[s.gguf_name] == allocation[s.gguf_name] for s in slots) / len(slots)
    source = "policy-walk" if best is None else "train-best"
    if best is not None:
        log.info("the train stage's best allocation; the policy's walk gives it on %.1f %%", 100 * agreement)
    used = matrix_bytes(slots, allocation)
    if used > budget.matrix_bytes:
        raise AllocationError(f"the policy spent {used:,d} B of a {budget.matrix_bytes:,d} B matrix budget")
    with atomic_dir(ws.stage("allocate")) as tmp:
        save_allocation(tmp / "allocation.json", slots, allocation)
        save_allocation(tmp / "allocation.parquet", slots, allocation)
        (tmp / "tensor_types.txt").write_text(tensor_type_recipe(allocation))
        write_json(
            tmp / "budget.json",
            {
                "budget_file_bytes": budget.file_bytes,
                "budget_matrix_bytes": budget.matrix_bytes,
                "overhead_bytes": overhead,
                "matrix_bytes": used,
                "policy_version": version,
                "embedding_type": emb_type,
                "embedding_predicted_kld": emb_predicted,
                "norm_type": params.norm_type,
                "walk": walk,
                "source": source,
                "policy_walk_agreement": agreement,
                "params": as_dict(params),
            },
        )
    counts = pd.Series(list(allocation.values())).value_counts().to_dict()
    bpw = bits_per_weight(slots, allocation)
    log.info(
        "allocate done in %.1f s: %d matrices, %d of %d B, %.3f bpw",
        timer.seconds,
        len(slots),
        used,
        budget.matrix_bytes,
        bpw,
    )
    return ws.write_metrics(
        "allocate",
        {
            "budget_file_bytes": budget.file_bytes,
            "budget_matrix_bytes": budget.matrix_bytes,
            "file_bytes": overhead + used,
            "matrix_bytes": used,
            "budget_used": used / budget.matrix_bytes,
            "bpw": bpw,
            "walk": walk,
            "source": source,
            "policy_walk_agreement": agreement,
            "formats": {k: int(v) for k, v in sorted(counts.items())},
            "seconds": timer.seconds,
        },
    )
