"""The stage graph, read from ``dvc.yaml`` (the one place it is declared): stage -> upstream stages."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import yaml

from ramp.pipeline import STAGES

DVC_YAML = Path(__file__).resolve().parents[2] / "dvc.yaml"


@lru_cache(maxsize=4)
def stage_graph(path: Path = DVC_YAML) -> dict[str, dict]:
    """The ``stages`` mapping of ``dvc.yaml`` (cmd, deps, params, outs, ...) in file order."""
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, dict) or list(stages) != list(STAGES):
        raise ValueError(f"{path}: expected the stages {list(STAGES)} in that order, got {list(stages or [])}")
    return stages


def upstream(path: Path = DVC_YAML) -> dict[str, tuple[str, ...]]:
    """stage -> the stages whose outputs it depends on (a dep under ``data/<stage>``), in DAG order."""
    graph = stage_graph(path)
    out = {}
    for name, spec in graph.items():
        deps = [str(d) for d in spec.get("deps", [])]
        out[name] = tuple(s for s in STAGES if s != name and any(d.startswith(f"data/{s}") for d in deps))
    return out
