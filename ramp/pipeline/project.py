"""The pipeline as a DVC project of its own in any folder: the workspace ``ramp quantize`` runs ``dvc repro`` in.

The folder gets the repository's ``dvc.yaml`` with every code dependency (``ramp/``, ``stages/``, the assets
manifest) made an absolute path into this checkout, so DVC reruns a stage when the code it imports changed, as in
the repository itself; the user's model (and imatrix) become dependencies of ``calibrate``, so a changed file is
seen too. ``params.yaml`` is the repository's with the user's overlay laid over it, and ``dvc repro`` recomputes
only what changed. With ``allocate.policy: champion`` the ``train`` stage is left out and ``allocate`` depends on
the pulled champion (``policies/champion``) instead: a new champion reruns allocate and everything after it.

The stage commands (``python -m stages.<name>``) run with this checkout on ``PYTHONPATH`` and the venv's python
first on ``PATH``; their outputs live under the folder's ``data/``, their DVC cache under its ``.dvc/``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from ramp.errors import RampError
from ramp.io import atomic_write_text
from ramp.params import PipelineParams, pipeline_from_dict
from ramp.pipeline.dag import stage_graph

REPO = Path(__file__).resolve().parents[2]
CHAMPION_DEP = "policies/champion"


class ProjectError(RampError, RuntimeError):
    """A workspace project could not be set up, or one of its stages failed."""


def _is_code(dep: str, outputs: set[str]) -> bool:
    """A dependency that is this checkout's code or assets, not another stage's output."""
    return not any(dep == o or dep.startswith(o.rstrip("/") + "/") for o in outputs)


def sensitivity_readers(params: PipelineParams, skip_train: bool = False, skip_evaluate: bool = False) -> list[str]:
    """The stages under ``params`` that read the pipeline's own model's sensitivity tables (``data/sensitivity``):
    ``train`` when it trains on that model and a demonstration, ``train.cost_gain`` or a measured embedding needs
    them; ``allocate`` for a measured embedding under a file budget (a bpw budget prices the matrices only:
    ``auto``); ``evaluate`` for a knapsack baseline on a measured table. Left-out stages read nothing."""
    from ramp.params import EMBEDDING_MEASURED
    from ramp.pipeline.sensitivity import TABLE_STARTS

    train, allocate = params.train, params.allocate
    measured = allocate.embedding_type == EMBEDDING_MEASURED
    out = []
    trains_on_it = train.include_target or not train.sources
    if not skip_train and trains_on_it:
        train_measured = measured and train.budget_bpw is None
        if any(k in TABLE_STARTS for k in train.demos) or train.cost_gain != "none" or train_measured:
            out.append("train")
    if measured and allocate.budget_bpw is None:
        out.append("allocate")
    if not skip_evaluate and any(k in TABLE_STARTS for k in params.evaluate.knapsack):
        out.append("evaluate")
    return out


def skipped_stages(params: PipelineParams, skip_train: bool, skip_evaluate: bool) -> set[str]:
    """Stages left out: ``train`` (a registered policy instead), ``evaluate`` (no torch evaluation: large models;
    the report says not evaluated), and ``sensitivity`` when no stage left reads it under ``params``
    (:func:`sensitivity_readers`)."""
    out = {"train"} if skip_train else set()
    if skip_evaluate:
        out.add("evaluate")
    if not sensitivity_readers(params, skip_train, skip_evaluate):
        out.add("sensitivity")
    return out


def project_dvc_yaml(
    pipeline: PipelineParams,
    skip_train: bool = False,
    extra_calibrate_deps: tuple[str, ...] = (),
    repo: Path = REPO,
    skip_evaluate: bool = False,
) -> dict[str, Any]:
    """The repository's ``dvc.yaml`` for a workspace elsewhere with params ``pipeline`` (see the module docstring;
    the stages left out: :func:`skipped_stages`)."""
    stages = stage_graph(repo / "dvc.yaml")  # read and checked once per file; specs are copied below, not changed
    outputs = {str(o if isinstance(o, str) else next(iter(o))) for spec in stages.values() for o in spec["outs"]}
    outputs |= {str(next(iter(m))) for spec in stages.values() for m in spec.get("metrics", [])}
    skipped = skipped_stages(pipeline, skip_train, skip_evaluate)
    dropped = {f"data/{s}" for s in skipped - {"train"}}  # outputs of left-out stages: optional to their readers
    out: dict[str, Any] = {}
    for name, spec in stages.items():
        if name in skipped:
            continue
        spec = dict(spec)
        deps = []
        for dep in map(str, spec.get("deps", [])):
            if dep in dropped:
                continue
            if dep == "data/train" and skip_train:
                deps.append(CHAMPION_DEP)
            elif _is_code(dep, outputs):
                deps.append(str(repo / dep))
            else:
                deps.append(dep)
        if name == "calibrate":
            deps += [str(Path(d).resolve()) for d in extra_calibrate_deps]
        spec["deps"] = deps
        out[name] = spec
    return {"stages": out}


def project_env(repo: Path = REPO) -> dict[str, str]:
    """What the stage commands need: this checkout importable, the venv's python and dvc first on PATH, the
    checkout's offline assets (unless ``RAMP_ASSETS`` says otherwise)."""
    from ramp.offline import OFFLINE_ENV

    env = {**OFFLINE_ENV, **os.environ}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(repo), env.get("PYTHONPATH", "")) if p)
    env.setdefault("RAMP_ASSETS", str(repo / "data" / "assets"))
    return env


def _dvc(root: Path, *args: str, capture: bool = True, repo: Path = REPO) -> subprocess.CompletedProcess:
    dvc = Path(sys.executable).parent / "dvc"
    out = subprocess.run(
        [str(dvc), *args], cwd=root, env=project_env(repo), capture_output=capture, text=True, check=False
    )
    if out.returncode != 0:
        tail = "" if not capture else (out.stdout + out.stderr).strip()[-2000:]
        where = f"dvc {' '.join(args)} in {root} failed (exit {out.returncode})"
        raise ProjectError(f"{where}:\n{tail}" if tail else where)
    return out


def make_project(
    root: Path,
    params: dict[str, Any],
    skip_train: bool = False,
    extra_calibrate_deps: tuple[str, ...] = (),
    repo: Path = REPO,
    skip_evaluate: bool = False,
) -> Path:
    """Create or update the DVC project at ``root`` with ``params`` (the whole params mapping); returns ``root``.

    Files are rewritten only when their content changes, so an unchanged rerun finds everything up to date."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ProjectError(f"workspace {root}: is a file; expected a folder")
    root.mkdir(parents=True, exist_ok=True)
    pipeline = pipeline_from_dict(params, where=str(root / "params.yaml"))
    if not (root / ".dvc").is_dir():
        _dvc(root, "init", "--no-scm", "--quiet", repo=repo)
    files = {
        "dvc.yaml": yaml.safe_dump(
            project_dvc_yaml(pipeline, skip_train, extra_calibrate_deps, repo, skip_evaluate), sort_keys=False
        ),
        "params.yaml": yaml.safe_dump(params, sort_keys=False),
        ".dvcignore": "/cache/\n/policies/**/*.tmp\n",
    }
    for name, text in files.items():
        path = root / name
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            atomic_write_text(path, text)
    stale = False
    # left-out stages' outputs are not left for the report to read as current
    for stage in skipped_stages(pipeline, skip_train, skip_evaluate) - {"train"}:
        stale |= (root / "data" / stage).exists()
        shutil.rmtree(root / "data" / stage, ignore_errors=True)
        (root / "data" / "metrics" / f"{stage}.json").unlink(missing_ok=True)
    if stale:  # the export's report was made from them
        _forget_stage(root, "export")
    return root


def _forget_stage(root: Path, stage: str) -> None:
    """Make ``dvc repro`` run ``stage`` again: its outputs and its ``dvc.lock`` entry go. DVC compares a stage with
    its lock entry dependency by dependency and does not notice one that was dropped: with the entry kept it would
    check the old outputs out of its cache instead of running the stage."""
    shutil.rmtree(root / "data" / stage, ignore_errors=True)
    (root / "data" / "metrics" / f"{stage}.json").unlink(missing_ok=True)
    lock = root / "dvc.lock"
    if lock.exists():
        data = yaml.safe_load(lock.read_text(encoding="utf-8")) or {}
        if stage in (data.get("stages") or {}):
            del data["stages"][stage]
            atomic_write_text(lock, yaml.safe_dump(data, sort_keys=False))


def repro(root: Path, capture: bool = False, repo: Path = REPO) -> subprocess.CompletedProcess:
    """``dvc repro`` in the project at ``root`` (output streamed to the terminal unless ``capture``)."""
    return _dvc(Path(root), "repro", capture=capture, repo=repo)
