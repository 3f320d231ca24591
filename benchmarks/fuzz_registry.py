"""Concurrent registry promotions (issue 20): two processes call ``promote_if_better`` at the same moment.

Each trial makes a fresh registry (sqlite, from a copy of the empty schema, and an artifact folder) under
``root``, registers a champion (value 1.0) and two contenders with distinct random values below it, then starts
two OS processes (forked from a server that has mlflow imported) that wait at a barrier and
promote one contender each. The trial has a wrong champion when

- the alias ``champion`` ends on anything but the better contender, or
- the better contender reports that it was not promoted (it beats every version it can be compared with), or
- the worse contender reports a promotion although the better one was not compared against it: both compared
  with the old champion, so the worse one's "promoted" was a lost update, not a promotion a better one followed.

A worker that raises, hangs or dies counts as an error. ``--unlocked`` runs the same race on the gate without
the promotion lock (a reference: it shows the race is real and that this harness sees it).

    python -m benchmarks.fuzz_registry --trials 50 --root /tmp/race
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import multiprocessing as mp
import os
import queue
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

METRIC = "kld_mean"
BUDGET = 123_456  # bytes; any fixed budget, the gate compares values recorded at the same one
CHAMPION_VALUE = 1.0
WORKER_TIMEOUT_S = 120.0  # a promotion takes well under a second; a worker past this is hung


def tiny_policy_dir(path: str | Path, seed: int = 0) -> Path:
    """A small random policy written by :func:`ramp.allocate.save_policy` (hidden width 8) at ``path``."""
    import torch

    from ramp.allocate import save_policy
    from ramp.features import FEATURES
    from ramp.sac.agent import Actor, Policy, SACConfig
    from ramp.sac.env import BUDGET_STATE

    torch.manual_seed(seed)
    sac = SACConfig(hidden=8)
    actor = Actor(len(FEATURES) + len(BUDGET_STATE), sac.hidden, sac.log_std_min, sac.log_std_max)
    return save_policy(Policy(actor, tuple(FEATURES), sac, {}, None), path)


def promote_unlocked(version: str, metric_name: str, value: float, budget: int, project: str) -> Any:
    """The reference: the gate's read-compare-set without the promotion lock (what ``promote_if_better`` did
    before issue 20, plus the read-back)."""
    from mlflow import MlflowClient

    from flows import registry

    registry.setup(project)
    return registry._compare_and_set(MlflowClient(), registry.MODEL_NAME, str(version), metric_name, value, budget)


def _resolve(target: str) -> Any:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _promote_at_barrier(
    project: str, version: str, value: float, target: str, barrier: Any, results: Any
) -> None:  # pragma: no cover - runs in the spawned workers
    from ramp.offline import set_offline_env

    set_offline_env()
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        from flows import registry

        promote = _resolve(target)
        registry.setup(project)  # engine and schema check before the barrier, so the two calls overlap
        registry.champion_version(project)
        barrier.wait(timeout=WORKER_TIMEOUT_S)
        p = promote(version, METRIC, value, BUDGET, project=project)
        results.put((version, "ok", p.promoted, p.champion_version, p.reason))
    except BaseException as e:  # noqa: BLE001 - every failure of a worker is reported, then counted
        barrier.abort()  # the other worker stops waiting for this one
        results.put((version, "error", False, None, f"{type(e).__name__}: {e}"))


@contextlib.contextmanager
def _own_store() -> Iterator[None]:
    """``MLFLOW_TRACKING_URI`` would send every trial to one shared store; each trial needs its own sqlite file."""
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def empty_store(path: Path) -> Path:
    """An empty, migrated MLflow sqlite database at ``path``: each trial starts from a copy (creating the schema
    takes seconds; copying it, milliseconds)."""
    from mlflow import MlflowClient

    MlflowClient(tracking_uri=f"sqlite:///{path.resolve()}").search_experiments()
    return path


def _trial(index: int, root: Path, store: Path, policy_dir: Path, target: str, rng: Any, ctx: Any) -> dict[str, Any]:
    from flows import registry

    project = root / f"trial-{index:03d}"
    project.mkdir(parents=True)
    shutil.copyfile(store, project / "mlflow.db")
    first = registry.register_policy(policy_dir, project=project)
    registry.promote_if_better(first, METRIC, CHAMPION_VALUE, BUDGET, project=project)
    contenders = [registry.register_policy(policy_dir, project=project) for _ in range(2)]
    low, high = sorted(rng.choice(np.arange(1, 100), size=2, replace=False) / 100.0)
    better, worse = (contenders[0], contenders[1]) if rng.random() < 0.5 else (contenders[1], contenders[0])
    values = {better: float(low), worse: float(high)}
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [
        ctx.Process(target=_promote_at_barrier, args=(str(project), v, values[v], target, barrier, results))
        for v in contenders
    ]
    for p in procs:
        p.start()
    answers: dict[str, tuple] = {}
    deadline = time.monotonic() + WORKER_TIMEOUT_S + 60
    while len(answers) < 2 and time.monotonic() < deadline:
        try:
            answer = results.get(timeout=1.0)
            answers[answer[0]] = answer
        except queue.Empty:
            if not any(p.is_alive() for p in procs) and results.empty():
                break
    for p in procs:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    final = registry.champion_version(project)
    trial = {"trial": index, "better": better, "worse": worse, "values": values, "champion": final}
    if len(answers) < 2 or any(a[1] != "ok" for a in answers.values()):
        trial["error"] = [a[4] for a in answers.values() if a[1] != "ok"] or ["a worker hung or died"]
        return trial
    b, w = answers[better], answers[worse]
    trial["reports"] = {better: b[2:], worse: w[2:]}
    trial["wrong"] = final != better or not b[2] or (w[2] and b[3] != worse)
    return trial


def promotion_race(
    trials: int, root: str, target: str = "flows.registry:promote_if_better", seed: int = 0, verbose: bool = False
) -> dict[str, int]:
    """``trials`` races of two processes promoting at once, each in a fresh registry under ``root``; returns
    ``{"trials", "wrong_champion", "errors"}`` (goal: 0 wrong champions, 0 errors). ``target`` is the promote
    function the workers call (``"benchmarks.fuzz_registry:promote_unlocked"``: the unlocked reference)."""
    root_path = Path(root)
    root_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["flows.registry"])  # each worker forks with mlflow imported: trials stay cheap
    wrong = errors = 0
    with _own_store(), tempfile.TemporaryDirectory(dir=root_path) as d:
        policy_dir = tiny_policy_dir(Path(d) / "policy")
        store = empty_store(Path(d) / "mlflow.db")
        for i in range(trials):
            trial = _trial(i, root_path, store, policy_dir, target, rng, ctx)
            errors += "error" in trial
            wrong += bool(trial.get("wrong"))
            if verbose or "error" in trial or trial.get("wrong"):
                print(json.dumps(trial, default=str), file=sys.stderr)
    return {"trials": trials, "wrong_champion": wrong, "errors": errors}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=50)
    ap.add_argument("--root", default=None, help="folder for the trial registries (default: a temp folder)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the contenders' values and order")
    ap.add_argument("--unlocked", action="store_true", help="race the unlocked reference gate instead")
    ap.add_argument("--verbose", action="store_true", help="print every trial, not only the wrong ones")
    args = ap.parse_args(argv)
    target = "benchmarks.fuzz_registry:promote_unlocked" if args.unlocked else "flows.registry:promote_if_better"
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        root = args.root or stack.enter_context(tempfile.TemporaryDirectory(prefix="ramp-race-"))
        result = promotion_race(args.trials, root, target, args.seed, args.verbose)
    print(json.dumps({"target": target, **result, "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()
