"""Stage sensitivity: what each matrix costs in calibration KLD in each offered format, measured and from one
gradient (:mod:`ramp.sensitivity`), for the knapsack baselines and SAC's demonstrations.

Reads ``data/fold/`` (folded model, imatrix, action space) and ``data/calibrate/tokens.safetensors``. Writes
``data/sensitivity/costs.parquet``: per matrix and offered format its file bytes, the fold stage's proxy error,
the measured KLD (probed formats only), the calibrated KLD table and the gradient table; and the stage metrics
(evaluations, tasks, seconds per evaluation).

The measurement is a list of independent :class:`BlockTask` (one per decoder block: every probe of that block's
matrices), each run by :func:`measure_block`, a function of the task alone that loads what it needs from the
workspace (once per process: :class:`_Loaded`) and returns ``(gguf_name, fmt) -> KLD``. A *mapper* runs the list:
in this process by default, or as Prefect tasks on a Dask cluster (``flows/fanout.py``, params ``distributed``).
Results are merged in task order, and a measurement does not depend on the process, the order or torch's thread
count, so the table is the same to the bit whatever ran it (tests/pipeline/test_fanout.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ramp.io import atomic_dir
from ramp.params import SensitivityParams, as_dict
from ramp.pipeline.workspace import Timer, Workspace

log = logging.getLogger("ramp.pipeline.sensitivity")
COSTS = "costs.parquet"
EMBEDDING = "embedding.parquet"  # the embedding's formats: file bytes and measured KLD (allocate.embedding_type)
# allocation starts by name: on the fold stage's proxy table (ramp.knapsack) or on this stage's tables
PROXY_STARTS = ("greedy", "uniform")
TABLE_STARTS = {"sensitivity": "kld", "gradient": "gradient"}
FISHER_START = "fisher"  # the better knapsack on the fold stage's Fisher table (ramp.fisher; no evaluation)
START_KINDS = (*PROXY_STARTS, *TABLE_STARTS, FISHER_START)
# what a measurement reads (relative to the workspace's data/): a worker's loaded model is reused while these match
MEASUREMENT_INPUTS = (
    "calibrate/model.json",
    "calibrate/tokens.safetensors",
    "fold/model.json",  # holds the folded weights' sha256 when folding is enabled
    "fold/imatrix.safetensors",
    "fold/action_space.parquet",
)

Measured = dict[tuple[str, str], float]


@dataclass(frozen=True)
class BlockTask:
    """One unit of the measurement fan-out: every probe ``(gguf_name, fmt)`` of decoder block ``block``'s matrices
    (``jobs``, table order), measured from the fold and calibrate outputs of ``workspace`` (absolute paths: a worker
    may run elsewhere, on a shared file system). ``inputs``: the digest of those outputs (:func:`inputs_digest`),
    so that a worker reuses a model it loaded only for the same files. Small and picklable."""

    workspace: Workspace
    block: int
    jobs: tuple[tuple[str, str], ...]
    params: SensitivityParams
    inputs: str


# mapper(fn, tasks) -> [fn(t) for t in tasks], results in task order (flows.fanout.prefect_mapper runs them on Dask)
Mapper = Callable[[Callable[[BlockTask], Measured], Sequence[BlockTask]], list[Measured]]


def in_process(fn: Callable[[BlockTask], Measured], tasks: Sequence[BlockTask]) -> list[Measured]:
    """The default mapper: every task in this process, one after the other, with a bar over the measurements."""
    from tqdm import tqdm

    out = []
    with tqdm(total=sum(len(t.jobs) for t in tasks), desc="measuring sensitivity", unit="measurement") as bar:
        for t in tasks:
            out.append(fn(t))
            bar.update(len(t.jobs))
    return out


def inputs_digest(ws: Workspace) -> str:
    """sha256 over the files a measurement reads (:data:`MEASUREMENT_INPUTS`: the calibrate and fold outputs)."""
    h = hashlib.sha256()
    for rel in MEASUREMENT_INPUTS:
        path = ws.data / rel
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: run the calibrate and fold stages first")
        h.update(rel.encode() + b"\0")
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
    return h.hexdigest()


class _Loaded:
    """What measuring needs, built once per process: the folded model, its slots and imatrix, the quantization
    cache, the FP reference on the first ``windows`` calibration windows and (on first use) the block runner.
    ``lock``: tasks of one process share the model (a measurement swaps one of its weights), so they take turns."""

    def __init__(self, ws: Workspace, params: SensitivityParams) -> None:
        from safetensors.torch import load_file

        from ramp.evaluate.kld import fp_reference
        from ramp.pipeline.fold import action_space, folded_imatrix_of

        self.lm = ws.folded_model()
        self.slots, self.proxy = action_space(ws, self.lm)
        self.imatrix = folded_imatrix_of(ws)
        self.cache = ws.quant_cache_store()
        tokens = load_file(str(ws.stage("calibrate") / "tokens.safetensors"))["tokens"][: params.windows]
        self.ref = fp_reference(self.lm, tokens, top_k=params.top_k)
        self._runner: Any = None
        self.lock = threading.Lock()

    @property
    def runner(self) -> Any:
        if self._runner is None:
            from ramp.sensitivity import BlockRunner

            self._runner = BlockRunner(self.lm, self.ref)
        return self._runner


_MEMO: dict[tuple, _Loaded] = {}  # at most one entry: a model is large
_MEMO_LOCK = threading.Lock()


def _loaded(ws: Workspace, params: SensitivityParams, inputs: str) -> _Loaded:
    key = (ws, inputs, params.windows, params.top_k)
    with _MEMO_LOCK:
        hit = _MEMO.get(key)
        if hit is None:
            _MEMO.clear()
            hit = _MEMO[key] = _Loaded(ws, params)
        return hit


def forget_loaded() -> None:
    """Drop this process's loaded model (the stage's own process, once it is done with it)."""
    with _MEMO_LOCK:
        _MEMO.clear()


def _absolute(ws: Workspace) -> Workspace:
    return dataclasses.replace(ws, root=ws.root.resolve(), quant_cache=ws.cache.resolve())


def measure_block(task: BlockTask) -> Measured:
    """``(gguf_name, fmt) -> KLD`` for the measurements of ``task`` (:func:`ramp.sensitivity.measure_pairs`), with the
    model, reference and runner loaded from the task's workspace (once per process and inputs digest)."""
    from ramp.evaluate.perplexity import EvaluationError
    from ramp.sensitivity import measure_pairs

    state = _loaded(task.workspace, task.params, task.inputs)
    by_name = {s.gguf_name: s for s in state.slots}
    jobs = []
    for name, fmt in task.jobs:
        slot = by_name.get(name)
        if slot is None or slot.block != task.block:
            raise EvaluationError(f"block task {task.block}: {name!r} is not a matrix of that block of the model")
        jobs.append((slot, fmt))
    with state.lock:
        return measure_pairs(state.lm, state.runner, jobs, state.cache, state.imatrix)


def block_tasks(ws: Workspace, params: SensitivityParams, slots: Sequence[Any], inputs: str) -> list[BlockTask]:
    """The measurement as one :class:`BlockTask` per decoder block (ascending), with the workspace made absolute."""
    from ramp.sensitivity import jobs_by_block

    absolute = _absolute(ws)
    return [BlockTask(absolute, b, jobs, params, inputs) for b, jobs in jobs_by_block(slots, params.probes).items()]


def measure_tasks(tasks: Sequence[BlockTask], mapper: Mapper | None = None) -> Measured:
    """Run ``tasks`` through ``mapper`` (None: :func:`in_process`) and merge their results in task order, each task's
    in its jobs' order (never in completion order). A result that is not exactly its task's jobs is an error."""
    results = (mapper or in_process)(measure_block, list(tasks))
    if len(results) != len(tasks):
        raise RuntimeError(f"the mapper returned {len(results)} results for {len(tasks)} tasks")
    out: Measured = {}
    for task, result in zip(tasks, results, strict=True):
        if set(result) != set(task.jobs):
            raise RuntimeError(f"block task {task.block}: results for {sorted(result)}, expected {list(task.jobs)}")
        out.update((key, float(result[key])) for key in task.jobs)
    return out


def sensitivity(params: SensitivityParams, ws: Workspace, mapper: Mapper | None = None) -> dict[str, Any]:
    """Measure the folded model's sensitivity tables; returns the stage metrics.

    ``mapper`` runs the per-block measurement tasks (:func:`block_tasks`): None in this process, one after the other;
    ``flows.fanout.prefect_mapper`` as Prefect tasks on a Dask cluster. The result is the same to the bit."""
    ws.begin("sensitivity")
    try:
        return _sensitivity(params, ws, mapper)
    finally:
        forget_loaded()  # the model is not kept for the stages after this one (run_pipeline, the CLI)


def _sensitivity(params: SensitivityParams, ws: Workspace, mapper: Mapper | None) -> dict[str, Any]:
    import math

    import pandas as pd

    from ramp.sensitivity import calibrated_table, gradient_table

    timer = Timer()
    inputs = inputs_digest(ws)
    state = _loaded(_absolute(ws), params, inputs)
    lm, slots, proxy, ref = state.lm, state.slots, state.proxy, state.ref
    tasks = block_tasks(ws, params, slots, inputs)
    t_measure = Timer()
    measured = measure_tasks(tasks, mapper)
    measure_seconds = t_measure.seconds
    kld = calibrated_table(slots, proxy, measured)
    t_grad = Timer()
    with state.lock:
        grad = gradient_table(lm, ref, slots, state.cache, state.imatrix) if params.gradient else {}
    grad_seconds = t_grad.seconds if params.gradient else 0.0
    embedding_rows, embedding_seconds = measure_embedding_formats(params, state)
    cache = state.cache
    rows = [
        {
            "gguf_name": s.gguf_name,
            "format": f,
            "file_bytes": s.file_bytes(f),
            "proxy": float(proxy[(s.gguf_name, f)]),
            "measured": measured.get((s.gguf_name, f), math.nan),
            "kld": kld[(s.gguf_name, f)],
            "gradient": grad.get((s.gguf_name, f), math.nan),
        }
        for s in slots
        for f in s.formats
    ]
    with atomic_dir(ws.stage("sensitivity")) as tmp:
        pd.DataFrame(rows).to_parquet(tmp / COSTS, index=False)
        if embedding_rows:
            pd.DataFrame(embedding_rows).to_parquet(tmp / EMBEDDING, index=False)
    log.info(
        "sensitivity done in %.1f s: %d measurements in %d block tasks (%.2f s each), gradient %.1f s",
        timer.seconds,
        len(measured),
        len(tasks),
        measure_seconds / max(1, len(measured)),
        grad_seconds,
    )
    cache.trim()
    log.info("%s", cache.usage_line())
    return ws.write_metrics(
        "sensitivity",
        {
            **as_dict(params),
            "scored_tokens": ref.n_tokens,
            "evaluations": len(measured),
            "tasks": len(tasks),
            "seconds_per_evaluation": measure_seconds / max(1, len(measured)),
            "measure_seconds": measure_seconds,
            "gradient_seconds": grad_seconds,
            "embedding_evaluations": len(embedding_rows),
            "embedding_seconds": embedding_seconds,
            "seconds": timer.seconds,
        },
    )


def measure_embedding_formats(params: SensitivityParams, state: _Loaded) -> tuple[list[dict[str, Any]], float]:
    """The rows of :data:`EMBEDDING` (format, file bytes, KLD with only the embedding quantized) for the
    ``embedding_formats`` legal for the model's embedding rows, and the seconds they took; none listed: no rows."""
    from ramp.sensitivity import embedding_bytes, legal_embedding_formats, measure_embedding

    if not params.embedding_formats:
        return [], 0.0
    timer = Timer()
    legal = legal_embedding_formats(state.lm, params.embedding_formats)
    left = [f for f in params.embedding_formats if f not in legal]
    if left:
        log.info("embedding formats %s are not legal for the embedding's rows: not offered", left)
    if not legal:
        raise ValueError(
            f"sensitivity.embedding_formats {list(params.embedding_formats)}: none is legal for this model's "
            "embedding rows"
        )
    log.info("measuring the embedding in %s (a whole forward each)", list(legal))
    with state.lock:
        kld = measure_embedding(state.lm, state.ref, legal, state.cache)
    rows = [{"format": f, "file_bytes": embedding_bytes(state.lm, f), "kld": kld[f]} for f in legal]
    log.info("embedding KLD: %s", {f: round(v, 5) for f, v in kld.items()})
    return rows, timer.seconds


def embedding_costs(ws: Workspace) -> dict[str, float]:
    """Format -> measured KLD of the embedding (this stage's :data:`EMBEDDING`); an error naming the param when the
    stage measured none."""
    import pandas as pd

    path = ws.stage("sensitivity") / EMBEDDING
    if not path.exists():
        raise ValueError(
            f"{path} is missing: allocate.embedding_type 'measured' needs the sensitivity stage run with "
            "sensitivity.embedding_formats"
        )
    frame = pd.read_parquet(path)
    return {str(f): float(k) for f, k in zip(frame["format"], frame["kld"], strict=True)}


def embedding_prices(ws: Workspace) -> tuple[dict[str, float], dict[str, float]] | None:
    """(measured KLD, proxy error) of the embedding by format (:func:`embedding_costs`,
    :func:`ramp.sensitivity.embedding_proxy` on the folded model), what :func:`ramp.sensitivity.role_gains` learns the
    embedding's gain from; None where this stage measured no embedding."""
    from ramp.sensitivity import embedding_proxy

    if not (ws.stage("sensitivity") / EMBEDDING).exists():
        return None
    measured = embedding_costs(ws)
    return measured, embedding_proxy(ws.folded_model(lazy=True), list(measured))


def cost_tables(ws: Workspace) -> dict[str, dict[tuple[str, str], float]]:
    """This stage's tables by start name (``sensitivity``: calibrated KLD; ``gradient`` when it was computed)."""
    import pandas as pd

    frame = pd.read_parquet(ws.stage("sensitivity") / COSTS)
    out = {}
    for kind, column in TABLE_STARTS.items():
        if frame[column].notna().all():
            keys = zip(frame["gguf_name"], frame["format"], strict=True)
            out[kind] = {k: float(v) for k, v in zip(keys, frame[column], strict=True)}
    return out


def starts(
    ws: Workspace, slots: Sequence[Any], proxy: dict, budget_matrix_bytes: int, kinds: Sequence[str]
) -> dict[str, dict[str, str]]:
    """Allocations within ``budget_matrix_bytes`` by start kind (:data:`START_KINDS`): ``greedy`` / ``uniform`` on
    the proxy table (:func:`ramp.knapsack.knapsack_starts`), ``sensitivity`` / ``gradient`` the better knapsack on
    this stage's table and ``fisher`` on the fold stage's Fisher table (:func:`ramp.sensitivity.best_knapsack`). A
    table that was not computed is an error."""
    from ramp.knapsack import knapsack_starts
    from ramp.pipeline.fold import fisher_costs
    from ramp.sensitivity import best_knapsack

    out = knapsack_starts(slots, proxy, budget_matrix_bytes, [k for k in kinds if k in PROXY_STARTS])
    if FISHER_START in kinds:
        out[FISHER_START] = best_knapsack(slots, fisher_costs(ws), budget_matrix_bytes)
    wanted = [k for k in kinds if k in TABLE_STARTS]
    tables = cost_tables(ws) if wanted else {}
    for kind in wanted:
        if kind not in tables:
            raise ValueError(f"start {kind!r} needs the sensitivity stage's {kind} table (sensitivity.gradient: true)")
        out[kind] = best_knapsack(slots, tables[kind], budget_matrix_bytes)
    return {k: out[k] for k in kinds}
