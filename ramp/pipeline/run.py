"""Run the pipeline's stage functions in a workspace, recomputing only what changed.

This is how a benchmark or the CLI runs the product path outside DVC: the same stage functions as ``dvc repro``,
with a params overlay, in a workspace folder of its own. A stage reruns when its params sections, an upstream
stage's stamp, or one of its code deps in ``dvc.yaml`` changed (``data/.stamps/<stage>.json``), as DVC decides
for the repository's own pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ramp.io import write_json
from ramp.params import STAGE_SECTIONS, PipelineParams, as_dict
from ramp.pipeline import STAGES
from ramp.pipeline.workspace import Workspace

log = logging.getLogger("ramp.pipeline.run")
REPO = Path(__file__).resolve().parents[2]


def run_stage(name: str, params: PipelineParams, ws: Workspace, policy_dir: Path | None = None) -> dict[str, Any]:
    """Run one stage function with its sections of ``params``; returns its metrics."""
    from ramp.pipeline import allocate, calibrate, embed, evaluate, export, fold, quantize, sensitivity, train
    from ramp.report import pipeline_sections

    p = params
    calls: dict[str, Callable[[], dict[str, Any]]] = {
        "calibrate": lambda: calibrate.calibrate(p.model, p.calibrate, p.seed, ws),
        "embed": lambda: embed.embed(p.embed, ws),
        "fold": lambda: fold.fold(p.fold, ws),
        "sensitivity": lambda: sensitivity.sensitivity(p.sensitivity, ws),
        "train": lambda: train.train(p.train, p.seed, ws),
        "allocate": lambda: allocate.allocate(p.allocate, ws, policy_dir=policy_dir),
        "quantize": lambda: quantize.quantize(p.quantize, ws),
        "evaluate": lambda: evaluate.evaluate(p.evaluate, ws),
        "export": lambda: export.export(p.export, ws, pipeline_params=pipeline_sections(p)),
    }
    if name not in calls:
        raise ValueError(f"unknown stage {name!r}; stages are {list(STAGES)}")
    return calls[name]()


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
    sections = {s: (params.seed if s == "seed" else as_dict(params.section(s))) for s in STAGE_SECTIONS[name]}
    blob = json.dumps({"stage": name, "params": sections, "up": list(upstream_stamps), "code": code, "extra": extra})
    return hashlib.sha256(blob.encode()).hexdigest()


def run_pipeline(
    params: PipelineParams,
    ws: Workspace,
    stages: Sequence[str] = STAGES,
    policy_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (in DAG order) in ``ws``, skipping those whose stamp is unchanged; returns stage -> metrics.

    ``policy_dir``: a policy folder for allocate instead of the train stage's (zero-shot use of another policy).
    """
    from ramp.pipeline.dag import upstream

    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ValueError(f"unknown stage(s) {unknown}; stages are {list(STAGES)}")
    graph = upstream()
    stamps: dict[str, str] = {}
    out: dict[str, dict[str, Any]] = {}
    stamp_dir = ws.stamps
    for name in STAGES:
        ups = [stamps.get(u, _read_stamp(stamp_dir, u)) for u in graph[name]]
        extra = str(policy_dir.resolve()) if (name == "allocate" and policy_dir is not None) else ""
        stamp = _stamp(name, params, ups, code_digest(name), extra)
        stamps[name] = stamp
        if name not in stages:
            continue
        metrics_file = ws.metrics / f"{name}.json"
        if _read_stamp(stamp_dir, name) == stamp and ws.stage(name).exists() and metrics_file.exists():
            log.info("stage %s is up to date in %s", name, ws.root)
            out[name] = json.loads(metrics_file.read_text())
            continue
        log.info("running stage %s in %s", name, ws.root)
        (stamp_dir / f"{name}.json").unlink(missing_ok=True)  # not done until the stage finishes (killed: rerun)
        out[name] = run_stage(name, params, ws, policy_dir=policy_dir)
        write_json(stamp_dir / f"{name}.json", {"stamp": stamp})
    return out


def _read_stamp(stamp_dir: Path, name: str) -> str:
    path = stamp_dir / f"{name}.json"
    return json.loads(path.read_text())["stamp"] if path.exists() else ""
