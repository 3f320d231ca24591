"""The sensitivity measurement in-process vs on a local Dask cluster (issue 19): wall time, tasks, identity.

Usage:
  .venv/bin/python benchmarks/distributed.py                      # SmolLM2, 2 single-threaded workers
  .venv/bin/python benchmarks/distributed.py --workers 2 --threads-per-worker 1 --out results/distributed.json

The workspace (``~/.cache/ramp/bench/distributed/<model>``) gets the calibrate, embed and fold stages through
:func:`ramp.pipeline.run.run_pipeline` with ``params.yaml``'s settings (reused when up to date); then the sensitivity
stage function runs twice on it: in this process (torch's default threads), timing each block task, and with
:func:`flows.fanout.prefect_mapper` on a ``distributed.LocalCluster`` of ``--workers`` processes (Prefect flow
``sensitivity-fanout``, one ``measure-block`` task per decoder block). ``in_process_seconds`` and
``cluster_seconds`` are the stage's ``measure_seconds``: the cluster's includes starting the cluster, each worker
importing torch and loading the model, reference and block inputs, and closing it. Prefect's ephemeral server is
started (and timed) before, as a stage run under a running Prefect server would find it. ``identical``: the two
``costs.parquet`` files are the same bytes and every measured KLD has the same bits (``float.hex``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pickle
import platform
import shutil
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
# run as a script, this file's folder comes first on sys.path, where this file would stand in for the package
# `distributed` (here and in the cluster's worker processes, which inherit sys.path): the repository root instead
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

log = logging.getLogger("bench-distributed")


def measured_hex(ws: Any) -> dict[str, str]:
    import pandas as pd

    from ramp.pipeline.sensitivity import COSTS

    frame = pd.read_parquet(ws.stage("sensitivity") / COSTS).dropna(subset=["measured"])
    rows = zip(frame["gguf_name"], frame["format"], frame["measured"], strict=True)
    return {f"{n}:{f}": float(v).hex() for n, f, v in rows}


def timing_mapper(record: list[dict[str, Any]]) -> Any:
    """An in-process mapper (the default's loop) that records each task's seconds and pickled result size."""

    def mapper(fn: Any, tasks: list[Any]) -> list[Any]:
        out = []
        for t in tasks:
            start = time.perf_counter()
            result = fn(t)
            record.append(
                {
                    "block": t.block,
                    "measurements": len(t.jobs),
                    "seconds": round(time.perf_counter() - start, 3),
                    "result_bytes": len(pickle.dumps(result)),
                    "task_bytes": len(pickle.dumps(t)),
                }
            )
            out.append(result)
        return out

    return mapper


def warm_prefect() -> float:
    """Seconds to bring up Prefect's API (the ephemeral server when no PREFECT_API_URL is set) with one empty flow."""
    from prefect import flow

    @flow(name="bench-distributed-warmup")
    def warmup() -> int:
        return 1

    start = time.perf_counter()
    warmup()
    return round(time.perf_counter() - start, 3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2", help="params.yaml model.source (default smollm2)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads-per-worker", type=int, default=1)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "distributed.json")
    ap.add_argument("--workspace", type=Path, default=None, help="default: ~/.cache/ramp/bench/distributed/<model>")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("gguf").setLevel(logging.WARNING)

    import torch

    from flows.fanout import prefect_mapper
    from ramp.io import atomic_write_text
    from ramp.llamacpp import cache_root
    from ramp.offline import set_offline_env
    from ramp.params import DistributedParams, as_dict, load_pipeline
    from ramp.pipeline.run import run_pipeline
    from ramp.pipeline.sensitivity import COSTS, sensitivity
    from ramp.pipeline.workspace import Workspace

    set_offline_env()
    params = load_pipeline(REPO / "params.yaml", {"model": {"source": args.model}})
    root = args.workspace or cache_root() / "bench" / "distributed" / args.model
    ws = Workspace(root, quant_cache=cache_root() / "quant")
    t0 = time.perf_counter()
    run_pipeline(params, ws, ("calibrate", "embed", "fold"))
    setup_seconds = round(time.perf_counter() - t0, 1)

    tasks: list[dict[str, Any]] = []
    load = {"before_in_process": os.getloadavg()[0]}
    local = sensitivity(params.sensitivity, ws, mapper=timing_mapper(tasks))
    load["after_in_process"] = os.getloadavg()[0]
    local_costs = ws.root / "costs.in-process.parquet"
    shutil.copyfile(ws.stage("sensitivity") / COSTS, local_costs)
    local_measured = measured_hex(ws)

    prefect_seconds = warm_prefect()
    dist = DistributedParams(engine="dask", workers=args.workers, threads_per_worker=args.threads_per_worker)
    load["before_cluster"] = os.getloadavg()[0]
    cluster = sensitivity(params.sensitivity, ws, mapper=prefect_mapper(dist))
    load["after_cluster"] = os.getloadavg()[0]
    same_bytes = (ws.stage("sensitivity") / COSTS).read_bytes() == local_costs.read_bytes()
    cluster_measured = measured_hex(ws)
    differing = sorted(k for k in local_measured if cluster_measured.get(k) != local_measured[k])

    seconds = [t["seconds"] for t in tasks]
    doc = {
        "command": "make bench-distributed",
        "engine": "dask",
        "workers": args.workers,
        "threads_per_worker": args.threads_per_worker,
        "tasks": local["tasks"],
        "evaluations": local["evaluations"],
        "in_process_seconds": local["measure_seconds"],
        "cluster_seconds": cluster["measure_seconds"],
        "speedup": round(local["measure_seconds"] / cluster["measure_seconds"], 3),
        "identical": same_bytes and not differing and len(local_measured) == local["evaluations"],
        "costs_parquet_identical": same_bytes,
        "measurements_differing": len(differing),
        "in_process_torch_threads": torch.get_num_threads(),
        "model": args.model,
        "sensitivity": as_dict(params.sensitivity),
        "per_task": {
            "seconds_mean": round(sum(seconds) / len(seconds), 3),
            "seconds_min": min(seconds),
            "seconds_max": max(seconds),
            "result_bytes_max": max(t["result_bytes"] for t in tasks),
            "task_bytes_max": max(t["task_bytes"] for t in tasks),
            "note": "block 0's task also records every block's FP inputs (the BlockRunner), once per process",
        },
        "tasks_in_process": tasks,
        "prefect_api_start_seconds": prefect_seconds,
        "gradient_seconds": local["gradient_seconds"],
        "setup_seconds": setup_seconds,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "load_average_1min": load,  # other work on the machine during the runs (2 cores: above ~2 they compete)
        "versions": {p: version(p) for p in ("torch", "prefect", "prefect-dask", "dask", "distributed")},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(
        f"{doc['tasks']} tasks ({doc['evaluations']} measurements): in-process {doc['in_process_seconds']:.1f} s, "
        f"{args.workers} Dask workers {doc['cluster_seconds']:.1f} s (x{doc['speedup']}), identical={doc['identical']}"
    )
    if not doc["identical"]:
        sys.exit(f"the cluster's table differs from the in-process one: {differing[:5]}")


if __name__ == "__main__":
    main()
