"""Run the pipeline's stage functions in a workspace, recomputing only what changed.

This is how a benchmark or the CLI runs the product path outside DVC: the same stage functions as ``dvc repro``,
with a params overlay, in a workspace folder of its own. A stage reruns when its params sections, an upstream
stage's stamp, or one of its code deps in ``dvc.yaml`` changed (``data/.stamps/<stage>.json``), as DVC decides
for the repository's own pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ramp.params import PipelineParams
from ramp.pipeline import STAGES
from ramp.pipeline.stamps import _stamp, code_digest, run_stages
from ramp.pipeline.workspace import Workspace

log = logging.getLogger("ramp.pipeline.run")
__all__ = ["_stamp", "code_digest", "run_pipeline", "run_stage"]


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
        "train": lambda: train.train(p.train, p.seed, ws, pipeline=p),
        "allocate": lambda: allocate.allocate(
            p.allocate, ws, policy_dir=policy_dir, embedding_formats=p.sensitivity.embedding_formats
        ),
        "quantize": lambda: quantize.quantize(p.quantize, ws),
        "evaluate": lambda: evaluate.evaluate(p.evaluate, ws),
        "export": lambda: export.export(p.export, ws, pipeline_params=pipeline_sections(p)),
    }
    if name not in calls:
        raise ValueError(f"unknown stage {name!r}; stages are {list(STAGES)}")
    return calls[name]()


def run_pipeline(
    params: PipelineParams,
    ws: Workspace,
    stages: Sequence[str] = STAGES,
    policy_dir: Path | None = None,
) -> dict[str, dict[str, Any]]:
    """Run ``stages`` (in DAG order) in ``ws``, skipping those whose stamp is unchanged; returns stage -> metrics.

    ``policy_dir``: a policy folder for allocate instead of the train stage's (zero-shot use of another policy).
    """
    return run_stages(params, ws, stages, lambda n, p, w: run_stage(n, p, w, policy_dir=policy_dir), policy_dir)
