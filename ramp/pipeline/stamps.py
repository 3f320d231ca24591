"""The stamps behind :func:`ramp.pipeline.run.run_pipeline`: which stages of a workspace are up to date.

A stage's stamp hashes its params sections, its upstream stages' stamps and its code deps in ``dvc.yaml``
(``data/.stamps/<stage>.json``). :func:`run_stages` runs the stages whose stamp changed with a given runner, so a
caller that runs only some stages (the train stage preparing its source models) imports only their code.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ramp.io import write_json
from ramp.params import STAGE_SECTIONS, PipelineParams, section_data
from ramp.pipeline import STAGES
from ramp.pipeline.workspace import Workspace

log = logging.getLogger("ramp.pipeline.run")
REPO = Path(__file__).resolve().parents[2]
Runner = Callable[[str, PipelineParams, Workspace], dict[str, Any]]


def code_digest(stage: str) -> str:
    """sha256 over the stage's code deps in ``dvc.yaml`` (files, folders under ``ramp/``, ``stages/``, ``flows/``)."""
    from ramp.pipeline.dag import stage_graph

    h = hashlib.sha256()
    for dep in sorted(str(d) for d in stage_graph()[stage].get("deps", [])):
        if not dep.startswith(("ramp/", "stages/", "flows/")):
            continue
        path = REPO / dep
        for p in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(p.relative_to(REPO)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def _stamp(name: str, params: PipelineParams, upstream_stamps: Sequence[str], code: str, extra: str) -> str:
    sections = {s: section_data(params, s) for s in STAGE_SECTIONS[name]}
    blob = json.dumps({"stage": name, "params": sections, "up": list(upstream_stamps), "code": code, "extra": extra})
    return hashlib.sha256(blob.encode()).hexdigest()


def read_stamp(stamp_dir: Path, name: str) -> str:
    path = stamp_dir / f"{name}.json"
    return json.loads(path.read_text())["stamp"] if path.exists() else ""


def run_stages(
    params: PipelineParams,
    ws: Workspace,
    stages: Sequence[str],
    runner: Runner,
    policy_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (in DAG order) in ``ws`` with ``runner(name, params, ws)``, skipping those whose stamp is
    unchanged; returns stage -> metrics. ``policy_dir``: the folder allocate's runner uses instead of the train
    stage's policy (it enters allocate's stamp)."""
    from ramp.pipeline.dag import upstream

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    graph = upstream()
    stamps: dict[str, str] = {}
    out: dict[str, dict[str, Any]] = {}
    stamp_dir = ws.stamps
    for name in STAGES:
        ups = [stamps.get(u, read_stamp(stamp_dir, u)) for u in graph[name]]
        extra = str(policy_dir.resolve()) if (name == "allocate" and policy_dir is not None) else ""
        stamp = _stamp(name, params, ups, code_digest(name), extra)
        stamps[name] = stamp
        if name not in stages:
            continue
        metrics_file = ws.metrics / f"{name}.json"
        if read_stamp(stamp_dir, name) == stamp and ws.stage(name).exists() and metrics_file.exists():
            log.info("stage %s is up to date in %s", name, ws.root)
            out[name] = json.loads(metrics_file.read_text())
            continue
        log.info("running stage %s in %s", name, ws.root)
        (stamp_dir / f"{name}.json").unlink(missing_ok=True)  # not done until the stage finishes (killed: rerun)
        out[name] = runner(name, params, ws)
        write_json(stamp_dir / f"{name}.json", {"stamp": stamp})
    return out
