"""Prefect flow ``retrain-policy``: fresh calibration data -> retrain -> evaluate -> the registry gate.

"Fresh calibration data" is the next slice of the calibration text: ``calibrate.offset_seqs`` in params.yaml
moves by ``retrain.offset_step`` windows (wrapping to 0 past ``retrain.max_offset_seqs``), so DVC reruns the
stages from calibrate on and the run is recorded in params.yaml + dvc.lock like any other. The new policy is
registered and promoted to ``champion`` only if its held-out KLD beats the champion's at the same budget.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task

from flows.pipeline import PROJECT, read_metrics, register_and_gate, run_stage

log = logging.getLogger(__name__)

RETRAIN_STAGES = ("calibrate", "embed", "fold", "sensitivity", "train", "allocate", "quantize", "evaluate")
_OFFSET_RE = re.compile(r"(?m)^(calibrate:\n(?:[ \t]+.*\n|\s*\n)*?[ \t]+offset_seqs:[ \t]*)(\d+)")


@dataclass(frozen=True)
class RetrainParams:
    """params.yaml ``retrain``: ``cron`` schedule of the served deployment; ``offset_step`` calibration windows
    the offset moves per retraining; ``max_offset_seqs`` wraps the offset back to 0."""

    cron: str
    offset_step: int
    max_offset_seqs: int


def retrain_params(project: str | Path) -> RetrainParams:
    from ramp.params import load_params

    return load_params("retrain", RetrainParams, Path(project) / "params.yaml")


def set_offset(project: str | Path, offset: int) -> int:
    """Write ``calibrate.offset_seqs`` in params.yaml in place (comments and layout kept); returns the old one."""
    path = Path(project) / "params.yaml"
    text = path.read_text()
    matches = list(_OFFSET_RE.finditer(text))
    if len(matches) != 1:
        raise ValueError(f"{path}: expected exactly one calibrate.offset_seqs line, found {len(matches)}")
    old = int(matches[0].group(2))
    from ramp.io import atomic_write_text

    atomic_write_text(path, text[: matches[0].start(2)] + str(int(offset)) + text[matches[0].end(2) :])
    return old


@task(name="fresh-calibration-slice")
def next_offset(project: str, offset_seqs: int | None) -> int:
    params = retrain_params(project)
    from ramp.params import load_pipeline

    current = load_pipeline(Path(project) / "params.yaml").calibrate.offset_seqs
    new = offset_seqs if offset_seqs is not None else current + params.offset_step
    if new > params.max_offset_seqs:
        new = 0
    set_offset(project, new)
    log.info("calibration offset %d -> %d windows", current, new)
    return new


@flow(name="retrain-policy", log_prints=True)
def retrain_policy(project: str = str(PROJECT), offset_seqs: int | None = None) -> dict[str, Any]:
    """Retrain on the next calibration slice (or ``offset_seqs``), evaluate, and gate the new policy."""
    offset = next_offset(project, offset_seqs)
    previous = None
    for stage in RETRAIN_STAGES:
        previous = run_stage.submit(stage, project, True, wait_for=[previous] if previous else [])
    previous.result()
    verdict = register_and_gate(project)
    kld = read_metrics(Path(project), "evaluate").get("ramp_kld_mean")
    print(f"retrain-policy: offset {offset}, KLD {kld}, version {verdict['version']}: {verdict['reason']}")
    return {"offset_seqs": offset, "kld_mean": kld, **verdict}


if __name__ == "__main__":
    print(retrain_policy())
