"""Stage train: SAC learns per-matrix formats on the folded model, rewarded by KLD on calibration windows.

Reads ``data/embed/embedding.parquet``, ``data/fold/`` (folded model, imatrix, action space) and
``data/calibrate/tokens.safetensors``. Writes ``data/train/`` (``policy/``: the actor and its feature statistics
as safetensors + JSON; ``best_allocation.json``; ``demos.json``: the measured demonstrations; ``checkpoint/``),
the learning curve ``data/plots/train_history.csv`` and the stage metrics.

Demonstrations (``train.demos``, :func:`ramp.pipeline.sensitivity.starts`): the greedy knapsack on the fold stage's
cost table, the uniform-level start filled the same way, and the knapsacks on the sensitivity stage's measured and
gradient tables are measured first, the best cloned by the actor (``sac.bc_steps``, ``sac.bc_weight``) and all
explored around; ``[]`` trains from scratch.

The training budget is the policy's own and independent of ``allocate``'s, so changing the deployment budget
never retrains (SPEC §2: a budget change reruns only allocate -> export).

Pooled training (issue 17, ``train.sources``): the listed models are prepared like this pipeline's own (calibrate ->
embed -> fold, and sensitivity when a demonstration needs its tables) by :func:`ramp.pipeline.stamps.run_stages`
in workspaces of their own under ``cache/sources/`` (reused while their params and code are unchanged), and one
policy is trained on all of them with :func:`ramp.sac.pool.train_pool`, each at ``train.budget_bpw`` of its own
matrices. ``include_target: false`` leaves the pipeline's own model out: the policy it allocates with then never
saw it (zero-shot). ``standardize``: ``model`` standardises each model's features by that model's own statistics
(and allocate does the same on the model it allocates), ``pooled`` fits one set on all training models.
``ensemble: N`` trains N SAC seeds on the pool and saves the policy averaging them (``policy/``) and each seed's
(``members/seed<N>/``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
from dataclasses import dataclass
from typing import Any

from ramp.io import atomic_dir, atomic_path, write_json
from ramp.params import EMBEDDING_AUTO, PipelineParams, TrainParams, as_dict
from ramp.pipeline.workspace import Timer, Workspace

log = logging.getLogger("ramp.pipeline.train")
SOURCES_DIR = ("cache", "sources")  # under the workspace root: one prepared workspace per source model
TARGET = "target"  # the pipeline's own model in a pool, when it has no source name


@dataclass
class ModelTask:
    """One model's training inputs: its environment (reward measured on its own calibration windows), its measured
    demonstrations, its standardiser and the quantization cache its evaluator uses."""

    name: str
    env: Any
    demos: dict[str, dict[str, str]]
    standardizer: Any
    table: Any
    cache: Any
    budget: Any  # ramp.budget.ResolvedBudget on this model
    lm: Any  # the folded model its evaluator swaps formats into

    def restandardize(self, standardizer: Any) -> None:
        """Observe this model's features through ``standardizer`` (e.g. one fitted on a whole pool)."""
        from ramp.sac.env import check_features

        self.standardizer = standardizer
        self.env.features = check_features(standardizer.transform(self.table), self.env.n_slots, self.env.feature_names)


def model_task(
    name: str,
    params: TrainParams,
    ws: Workspace,
    gains: dict[str, float] | None = None,
    embedding_type: str = EMBEDDING_AUTO,
    norm_type: str = "F32",
) -> ModelTask:
    """The environment of ``ws``'s folded model at ``params``' budget (resolved on this model, its fixed bytes those
    of an export with ``embedding_type`` and ``norm_type``, allocate's), with its demonstrations; features
    standardised by this model's own statistics (:meth:`ModelTask.restandardize` changes that). ``gains``: the
    pool's cost gains (``train.cost_gain``), which price the residual map's prior."""
    from safetensors.torch import load_file

    from ramp.allocate import residual_prior
    from ramp.budget import Budget
    from ramp.evaluate.kld import fp_reference
    from ramp.evaluate.quantized import AllocationEvaluator
    from ramp.features import FEATURES, Standardizer
    from ramp.pipeline.allocate import resolve_asked
    from ramp.pipeline.fold import action_space, folded_imatrix_of
    from ramp.pipeline.sensitivity import starts
    from ramp.sac.env import AllocationEnv, EnvConfig

    lm = ws.folded_model()
    slots, cost = action_space(ws, lm)
    asked = Budget(file_bytes=params.budget_file_bytes, bpw=params.budget_bpw, where="train")
    budget = resolve_asked(ws, lm, slots, asked, embedding_type, norm_type)[3]
    table = feature_table(ws, slots)
    standardizer = Standardizer().fit(table)
    tokens = load_file(str(ws.stage("calibrate") / "tokens.safetensors"))["tokens"][: params.reward_windows]
    ref = fp_reference(lm, tokens, top_k=params.top_k)
    cache = ws.quant_cache_store()
    evaluator = AllocationEvaluator(lm, ref, cache, folded_imatrix_of(ws))
    demos = starts(ws, slots, cost, budget.matrix_bytes, params.demos) if params.demos else {}
    if params.cost_basis == "fisher":  # the prior prices the fold stage's Fisher table instead of the proxy
        from ramp.pipeline.fold import fisher_costs

        offered = {(s.gguf_name, f) for s in slots for f in s.formats}
        cost = {k: v for k, v in fisher_costs(ws).items() if k in offered}
    if gains is not None:
        from ramp.sensitivity import gained_table, role_map

        cost = gained_table(cost, role_map(table), gains)
    knapsack = params.cost_basis == "fisher"  # the prior allocate walks from (ramp.allocate.residual_prior)
    prior = residual_prior(slots, cost, budget.matrix_bytes, knapsack) if params.action_map == "residual" else None
    env = AllocationEnv(
        slots,
        standardizer.transform(table),
        budget.matrix_bytes,
        quality_fn=lambda alloc: evaluator.evaluate(alloc).mean,
        reward=params.reward,
        config=EnvConfig(action_map=params.action_map),
        feature_names=FEATURES,
        prior=prior,
    )
    return ModelTask(name, env, demos, standardizer, table, cache, budget, lm)


def rescore_measure(params: TrainParams, ws: Workspace, task: ModelTask) -> Any:
    """The KLD on the ``rescore_windows`` calibration windows after the reward's (none of them seen by the
    reward), with the reward's top-k and quantization cache; an error names the windows the calibration lacks."""
    from safetensors.torch import load_file

    from ramp.evaluate.kld import fp_reference
    from ramp.evaluate.quantized import AllocationEvaluator
    from ramp.pipeline.fold import folded_imatrix_of

    tokens = load_file(str(ws.stage("calibrate") / "tokens.safetensors"))["tokens"]
    lo, hi = params.reward_windows, params.reward_windows + params.rescore_windows
    if hi > tokens.shape[0]:
        raise ValueError(
            f"train.rescore_windows = {params.rescore_windows}: the calibration has {tokens.shape[0]} windows, "
            f"{params.reward_windows} of them the reward's"
        )
    evaluator = AllocationEvaluator(
        task.lm, fp_reference(task.lm, tokens[lo:hi], top_k=params.top_k), task.cache, folded_imatrix_of(ws)
    )
    return lambda alloc: evaluator.evaluate(alloc).mean


def feature_table(ws: Workspace, slots: Any) -> Any:
    """The embedding stage's rows of ``slots``, in slot order."""
    import pandas as pd

    table = pd.read_parquet(ws.stage("embed") / "embedding.parquet").set_index("gguf_name")
    return table.loc[[s.gguf_name for s in slots]].reset_index()


def source_slug(source: str) -> str:
    """A folder name for a model source: the name itself when it is a plain word, else a readable stem plus the
    sha256 of the whole string (two paths never share a folder)."""
    if re.fullmatch(r"[A-Za-z0-9_.-]+", source) and source not in (".", ".."):
        return source
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", source.rstrip("/").rsplit("/", 1)[-1])[:40] or "model"
    return f"{stem}-{hashlib.sha256(source.encode()).hexdigest()[:12]}"


def prepare_source(source: str, pipeline: PipelineParams, ws: Workspace) -> Workspace:
    """Run calibrate -> embed -> fold (and sensitivity when ``train.demos`` needs its tables) for model ``source``
    with ``pipeline``'s sections (and the source's ``train.source_overlays``) in ``<ws.root>/cache/sources/<slug>/``;
    returns that workspace."""
    from ramp.params import source_pipeline
    from ramp.pipeline.sensitivity import TABLE_STARTS
    from ramp.pipeline.stamps import run_stages

    sub = Workspace(
        ws.root.joinpath(*SOURCES_DIR, source_slug(source)),
        quant_cache=ws.cache,
        cache_disk_bytes=ws.cache_disk_bytes,
        cache_memory_bytes=ws.cache_memory_bytes,
    )
    params = source_pipeline(pipeline, source)
    stages = ["calibrate", "embed", "fold"]
    if any(k in TABLE_STARTS for k in pipeline.train.demos) or pipeline.train.cost_gain != "none":
        stages.append("sensitivity")
    log.info("preparing source model %s in %s (%s)", source, sub.root, " -> ".join(stages))
    run_stages(params, sub, stages, _prepare_stage)
    return sub


def _prepare_stage(name: str, params: PipelineParams, ws: Workspace) -> dict[str, Any]:
    """A source model's stage (the stages before train only: this module must not import train's downstream)."""
    from ramp.pipeline import calibrate, embed, fold, sensitivity

    calls = {
        "calibrate": lambda: calibrate.calibrate(params.model, params.calibrate, params.seed, ws),
        "embed": lambda: embed.embed(params.embed, ws),
        "fold": lambda: fold.fold(params.fold, ws),
        "sensitivity": lambda: sensitivity.sensitivity(params.sensitivity, ws),
    }
    return calls[name]()


def train(params: TrainParams, seed: int, ws: Workspace, pipeline: PipelineParams | None = None) -> dict[str, Any]:
    """Train the policy on the workspace's folded model (and ``params.sources``, prepared with ``pipeline``'s
    sections); returns the stage metrics."""
    if params.sources:
        if pipeline is None:
            raise ValueError("train.sources needs the pipeline's params to prepare the source models")
        return _train_pool(params, seed, ws, pipeline)
    import pandas as pd
    import torch

    from ramp.allocate import save_policy
    from ramp.allocation import save_allocation
    from ramp.sac.train import train_policy

    ws.begin("train")
    timer = Timer()
    sac = run_config(params, seed)
    torch.manual_seed(sac.seed)
    allocate = pipeline.allocate if pipeline else None
    task = model_task(
        TARGET,
        params,
        ws,
        embedding_type=allocate.embedding_type if allocate else EMBEDDING_AUTO,
        norm_type=allocate.norm_type if allocate else "F32",
    )
    rescore = rescore_measure(params, ws, task) if params.rescore_top else None
    with atomic_dir(ws.stage("train")) as tmp:
        result = train_policy(
            task.env,
            sac,
            checkpoint_dir=tmp / "checkpoint",
            standardizer=task.standardizer.to_dict(),
            demonstrations=list(task.demos.values()),
            rescore=rescore,
            rescore_top=params.rescore_top,
        )
        save_policy(dataclasses.replace(result.policy, cost_basis=params.cost_basis), tmp / "policy")
        if result.best_allocation is not None:
            save_allocation(tmp / "best_allocation.json", task.env.slots, result.best_allocation)
        write_json(tmp / "demos.json", task.demos)
    history = pd.DataFrame(result.log)
    _write_history(ws, history)
    log.info("train done in %.1f s: %d episodes, best KLD %s", timer.seconds, result.episodes, result.best_degradation)
    task.cache.trim()
    log.info("%s", task.cache.usage_line())
    return ws.write_metrics(
        "train",
        {
            "episodes": result.episodes,
            "evaluations": result.evaluations,
            "budget_file_bytes": task.budget.file_bytes,
            "budget_matrix_bytes": task.env.budget_matrix_bytes,
            "best_kld": result.best_degradation,
            "best_matrix_bytes": result.best_bytes,
            "policy_matches_best": result.policy_matches_best,
            "final_reward": float(history["reward"].iloc[-1]) if len(history) else None,
            "trained_on": [pipeline.model.source] if pipeline is not None else None,
            "cost_basis": params.cost_basis,
            **(
                {"rescored": result.rescored, "best_rescored_kld": min(r["rescored"] for r in result.rescored)}
                if result.rescored
                else {}
            ),
            "sac": as_dict(sac),
            "seconds": timer.seconds,
        },
    )


def run_config(params: TrainParams, seed: int) -> Any:
    """The SAC settings of this run: seeded by the pipeline's ``seed`` plus ``train.sac.seed`` (0 unless set), so a
    second SAC run on the same calibration data needs no new calibration (the pipeline seed is calibrate's too)."""
    return dataclasses.replace(params.sac, seed=seed + params.sac.seed)


def _write_history(ws: Workspace, history: Any) -> None:
    ws.plots.mkdir(parents=True, exist_ok=True)
    with atomic_path(ws.plots / "train_history.csv") as tmp_csv:
        history.to_csv(tmp_csv, index=False)


def pool_names(params: TrainParams, pipeline: PipelineParams) -> list[str]:
    """The training models of a pooled run, in pool order: the target (by its ``model.source``) when included,
    then ``params.sources``; a source equal to the target's is an error naming it."""
    target = pipeline.model.source
    if target in params.sources:
        raise ValueError(
            f"train.sources lists {target!r}, the pipeline's own model (model.source); train.include_target "
            "says whether it is trained on"
        )
    return ([target] if params.include_target else []) + list(params.sources)


def _train_pool(params: TrainParams, seed: int, ws: Workspace, pipeline: PipelineParams) -> dict[str, Any]:
    import pandas as pd
    import torch

    from ramp.allocate import save_policy
    from ramp.allocation import save_allocation
    from ramp.features import Standardizer
    from ramp.params import source_pipeline
    from ramp.sac.pool import PoolMember, train_pool

    names = pool_names(params, pipeline)
    ws.begin("train")
    timer = Timer()
    workspaces = {n: (ws if n == pipeline.model.source else prepare_source(n, pipeline, ws)) for n in names}
    prepared = timer.seconds
    sac = run_config(params, seed)
    torch.manual_seed(sac.seed)
    gains = pool_gains(workspaces, params.cost_basis) if params.cost_gain == "role" else None
    if gains is not None:
        log.info("cost gains per role from %s: %s", names, {k: round(v, 3) for k, v in gains.items()})
    # a source is rewarded with its own train.source_overlays reward (the target with train.reward)
    tasks = [
        model_task(
            n,
            params if w is ws else source_pipeline(pipeline, n).train,
            w,
            gains,
            pipeline.allocate.embedding_type,
            pipeline.allocate.norm_type,
        )
        for n, w in workspaces.items()
    ]
    pooled = None
    if params.standardize == "pooled":  # one fit over every model's rows, instead of each model's own
        pooled = Standardizer().fit(pd.concat([t.table for t in tasks], ignore_index=True))
        for t in tasks:
            t.restandardize(pooled)
    kept = pooled.to_dict() if pooled is not None else tasks[0].standardizer.to_dict()
    kept["mode"] = params.standardize
    members = [PoolMember(t.name, t.env, list(t.demos.values())) for t in tasks]
    seeds = [sac.seed + i for i in range(params.ensemble)]  # an ensemble's members: consecutive SAC seeds
    runs = []
    for i, member_seed in enumerate(seeds):  # members share the environments: an allocation is measured once
        if len(seeds) > 1:
            log.info("ensemble member %d of %d (SAC seed %d)", i + 1, len(seeds), member_seed)
        runs.append(train_pool(members, dataclasses.replace(sac, seed=member_seed), standardizer=kept))
    result = _merge_runs(runs, members)
    # the policy allocates with the table and gains it was trained with (ramp.allocate.policy_costs)
    priced = {"cost_gains": gains, "cost_basis": params.cost_basis}
    result = dataclasses.replace(result, policy=dataclasses.replace(result.policy, **priced))
    runs = [dataclasses.replace(r, policy=dataclasses.replace(r.policy, **priced)) for r in runs]
    target = pipeline.model.source if params.include_target else None
    with atomic_dir(ws.stage("train")) as tmp:
        save_policy(result.policy, tmp / "policy")
        if params.ensemble > 1:  # each seed's own policy too, beside the one that averages them
            for member_seed, run in zip(seeds, runs, strict=True):
                save_policy(run.policy, tmp / "members" / f"seed{member_seed}")
        if target is not None and result.best[target] is not None:
            save_allocation(tmp / "best_allocation.json", tasks[0].env.slots, result.best[target]["allocation"])
        write_json(tmp / "demos.json", {t.name: t.demos for t in tasks})
        write_json(
            tmp / "pool.json",
            {
                t.name: {
                    "budget_file_bytes": t.budget.file_bytes,
                    "budget_matrix_bytes": t.budget.matrix_bytes,
                    "best_kld": (result.best[t.name] or {}).get("degradation"),
                    "evaluations": result.evaluations[t.name],
                    "policy_matches_best": result.policy_matches_best.get(t.name),
                }
                for t in tasks
            },
        )
    history = pd.DataFrame(result.log)
    _write_history(ws, history)
    log.info(
        "pooled train done in %.1f s (%.1f s preparing sources): %d episodes over %s",
        timer.seconds,
        prepared,
        result.episodes,
        names,
    )
    for t in tasks:
        t.cache.trim()
    own = result.best.get(target) if target is not None else None
    return ws.write_metrics(
        "train",
        {
            "episodes": result.episodes,
            "evaluations": sum(result.evaluations.values()),
            "target_evaluations": result.evaluations.get(target, 0) if target is not None else 0,
            "trained_on": names,
            "zero_shot": not params.include_target,
            "budget_bpw": params.budget_bpw,
            "best_kld": own["degradation"] if own else None,
            "best_kld_by_model": {k: (v or {}).get("degradation") for k, v in result.best.items()},
            "policy_matches_best": result.policy_matches_best.get(target) if target is not None else None,
            "final_reward": float(history["reward"].iloc[-1]) if len(history) else None,
            "sac": as_dict(sac),
            "ensemble_seeds": seeds,
            "cost_gains": gains,
            "cost_basis": params.cost_basis,
            "seconds": timer.seconds,
            "prepare_seconds": prepared,
        },
    )


def pool_gains(workspaces: dict[str, Workspace], basis: str = "proxy") -> dict[str, float]:
    """:func:`ramp.sensitivity.role_gains` of the training models' sensitivity and embedding tables; a model without
    a sensitivity table is an error naming it. The models whose sensitivity stage measured the embedding
    (``sensitivity.embedding_formats``) also give the embedding's gain, with its proxy error computed here
    (:func:`ramp.sensitivity.embedding_proxy`, a second or so per format on SmolLM2). ``basis`` (``train.cost_basis``):
    the table whose unit is priced, the fold stage's ``proxy`` or its ``fisher`` table (:func:`basis_costs`). On the
    Fisher basis every matrix role's gain is 0 (the table is in measured KLD on the model itself; another family's
    per-role errors do not transfer: Gemma-3's ffn_down, behind its post-FFN norm, is priced e^2.45 too high at Q2_K
    and would lower SmolLM2's, results/cost_gains_fisher.json) and the embedding's gain is its price in KLD itself
    (:func:`absolute_embedding_price`), averaged over the models."""
    import pandas as pd

    from ramp.pipeline.sensitivity import embedding_prices
    from ramp.sensitivity import EMBEDDING_ROLE, role_gains

    models, embeddings = [], []
    for name, w in workspaces.items():
        costs = w.stage("sensitivity") / "costs.parquet"
        if not costs.exists():
            raise ValueError(f"train.cost_gain role: {name} has no sensitivity table ({costs})")
        table = basis_costs(pd.read_parquet(costs), w, basis)
        models.append((table, pd.read_parquet(w.stage("embed") / "embedding.parquet")))
        embeddings.append(embedding_prices(w))
    try:
        gains = role_gains(models, embeddings)
    except ValueError as e:  # name the model rather than its position
        raise ValueError(f"train.cost_gain role on {list(workspaces)}: {e}") from e
    if basis == "fisher":  # the matrices' table is in KLD already: only the embedding is priced by the pool
        gains = {role: 0.0 for role in gains if role != EMBEDDING_ROLE}
        logs = [absolute_embedding_price(*e) for e in embeddings if e is not None]
        if logs:
            gains[EMBEDDING_ROLE] = sum(logs) / len(logs)
    return dict(sorted(gains.items()))


def absolute_embedding_price(kld: dict[str, float], proxy: dict[str, float]) -> float:
    """The mean over the embedding's formats (positive KLD and proxy error) of ``log(measured KLD / proxy error)``:
    what a unit of its proxy error costs in KLD itself, the embedding's gain next to a Fisher table (which is in KLD:
    subtracting the model's mean matrix price, as on the proxy basis, would carry over where another family's
    second-order estimate breaks down, Gemma-3's post-norm ffn_down at Q2_K: mean log price -0.54 against SmolLM2's
    +0.08, and that overpriced SmolLM2's embedding by e^0.44, results/transfer.json)."""
    import math

    logs = [math.log(kld[f] / proxy[f]) for f in kld if f in proxy and kld[f] > 0 and proxy[f] > 0]
    if not logs:
        raise ValueError("no embedding format with a positive KLD and proxy error")
    return sum(logs) / len(logs)


def basis_costs(costs: Any, ws: Workspace, basis: str) -> Any:
    """A sensitivity ``costs.parquet`` frame whose ``proxy`` column is the fold stage's table of ``basis``: as it is
    for ``proxy``, the Fisher table (:func:`ramp.pipeline.fold.fisher_costs`) for ``fisher``."""
    if basis == "proxy":
        return costs
    from ramp.pipeline.fold import fisher_costs

    table = fisher_costs(ws)
    keys = zip(costs["gguf_name"], costs["format"], strict=True)
    return costs.assign(proxy=[table[k] for k in keys])


def _merge_runs(runs: list[Any], members: list[Any]) -> Any:
    """One :class:`ramp.sac.pool.PoolResult` of an ensemble's runs on ``members``: the averaged policy, every run's
    episodes (``member`` says whose), per model the best of any run and the evaluations of all (the last run's
    count: the environments are shared); ``policy_matches_best``: how much of that best the ensemble's walk gives."""
    from ramp.sac.agent import ensemble_policy
    from ramp.sac.train import _unscored_walk

    if len(runs) == 1:
        return runs[0]
    last = runs[-1]
    best = {}
    for name in last.best:
        found = [r.best[name] for r in runs if r.best[name] is not None]
        best[name] = min(found, key=lambda b: b["degradation"]) if found else None
    policy = ensemble_policy([r.policy for r in runs])
    matches = {}
    for m in members:
        if best[m.name] is not None:
            walk, _ = _unscored_walk(m.env, lambda obs, _t: float(policy.actions(obs[None])[0][0]))
            agree = sum(walk[s.gguf_name] == best[m.name]["allocation"][s.gguf_name] for s in m.env.slots)
            matches[m.name] = agree / len(m.env.slots)
    return dataclasses.replace(
        last,
        policy=policy,
        log=[{**row, "member": i} for i, r in enumerate(runs) for row in r.log],
        best=best,
        episodes=sum(r.episodes for r in runs),
        policy_matches_best=matches,
    )
