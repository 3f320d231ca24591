"""MLflow tracking and the policy registry (local sqlite backend + artifact folder inside the project).

* :func:`log_stage_run` records one pipeline stage (its params section, its metrics JSON, small artifacts).
* :func:`register_policy` logs the trained policy as an MLflow pyfunc (:class:`RampPolicyModel`: embedding
  table + budget -> allocation) and registers it as a version of ``ramp-policy``. The model is logged "from
  code" (no pickled Python objects): the policy itself is safetensors + JSON written by ``ramp.allocate``.
* :func:`promote_if_better` is the gate: alias ``champion`` moves to a version only if its held-out metric
  (lower is better, e.g. KLD) beats the champion's recorded value at the same budget; otherwise the version is
  tagged ``rejected`` with both numbers. The first version becomes champion.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types import ParamSchema, ParamSpec

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parent.parent
MODEL_NAME = "ramp-policy"
CHAMPION = "champion"
EXPERIMENT = "ramp-pipeline"
POLICY_ARTIFACT = "policy"  # key in the pyfunc's artifacts: the folder ramp.allocate.save_policy wrote


def tracking_uri(project: str | Path = PROJECT) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the project's sqlite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(project).resolve() / 'mlflow.db'}"


def artifact_root(project: str | Path = PROJECT) -> str:
    return (Path(project).resolve() / "mlartifacts").as_uri()


def setup(project: str | Path = PROJECT, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the project's store and select ``experiment`` (created with the project's artifact
    folder); returns the experiment id."""
    mlflow.set_tracking_uri(tracking_uri(project))
    exp = mlflow.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id if exp else mlflow.create_experiment(experiment, artifact_location=artifact_root(project))
    )
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{key}."))
        else:
            out[key] = v
    return out


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Finite numbers of a (nested) metrics dict, keys joined with dots; bools count as 0/1."""
    out = {}
    for k, v in _flat(metrics).items():
        if isinstance(v, bool):
            v = float(v)
        if isinstance(v, int | float) and math.isfinite(float(v)):
            out[k] = float(v)
    return out


def log_stage_run(
    stage: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    artifacts: Iterable[str | Path] = (),
    project: str | Path = PROJECT,
    tags: Mapping[str, str] | None = None,
) -> str:
    """One MLflow run for one stage execution: flattened params, numeric metrics, files as artifacts."""
    setup(project)
    with mlflow.start_run(run_name=stage, tags={"ramp.stage": stage, **(tags or {})}) as run:
        flat = {k: json.dumps(v) if isinstance(v, list | tuple | dict) else v for k, v in _flat(params).items()}
        if flat:
            mlflow.log_params(flat)
        nums = numeric_metrics(metrics)
        if nums:
            mlflow.log_metrics(nums)
        for path in artifacts:
            path = Path(path)
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.exists():
                mlflow.log_artifact(str(path))
            else:
                raise FileNotFoundError(f"artifact {path} of stage {stage} does not exist")
    log.info("logged stage %s as MLflow run %s", stage, run.info.run_id)
    return run.info.run_id


class RampPolicyModel(PythonModel):
    """pyfunc: ``predict(embedding_table, params={"matrix_bytes": budget of the quantizable matrices in bytes})`` ->
    DataFrame
    ``gguf_name, format`` (one row per matrix of the table, in table order)."""

    def load_context(self, context: Any) -> None:
        from ramp.allocate import load_policy

        self.policy = load_policy(Path(context.artifacts[POLICY_ARTIFACT]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from ramp.allocate import allocate
        from ramp.allocation import slots_for

        budget = (params or {}).get("matrix_bytes") or 0
        if budget <= 0:
            raise ValueError(f"params must give matrix_bytes > 0 (bytes of the quantizable matrices), got {budget}")
        table = model_input.reset_index(drop=True)
        missing = [c for c in ("gguf_name", "block", "role", "rows", "cols") if c not in table.columns]
        if missing:
            raise ValueError(f"embedding table lacks column(s) {missing}")
        mats = [_Matrix(r.gguf_name, int(r.block), str(r.role), (int(r.rows), int(r.cols))) for r in table.itertuples()]
        alloc = allocate(self.policy, slots_for(mats), table, int(budget))
        return pd.DataFrame({"gguf_name": [m.gguf_name for m in mats], "format": [alloc[m.gguf_name] for m in mats]})


@dataclass(frozen=True)
class _Matrix:
    gguf_name: str
    block: int
    role: str
    shape: tuple[int, int]


_MODEL_CODE = "import mlflow\nfrom flows.registry import RampPolicyModel\nmlflow.models.set_model(RampPolicyModel())\n"


def register_policy(
    policy_dir: str | Path,
    metrics: Mapping[str, Any] | None = None,
    project: str | Path = PROJECT,
    tags: Mapping[str, str] | None = None,
) -> str:
    """Log ``policy_dir`` as a pyfunc model and register it as a new version of ``ramp-policy``; returns it."""
    policy_dir = Path(policy_dir)
    if not policy_dir.is_dir():
        raise FileNotFoundError(f"{policy_dir}: no policy folder (expected ramp.allocate.save_policy output)")
    setup(project)
    with tempfile.TemporaryDirectory() as d, mlflow.start_run(run_name="register-policy", tags=dict(tags or {})) as run:
        code = Path(d) / "ramp_policy_model.py"
        code.write_text(_MODEL_CODE)
        if metrics:
            mlflow.log_metrics(numeric_metrics(metrics))
        info = mlflow.pyfunc.log_model(
            name="policy",
            python_model=str(code),
            artifacts={POLICY_ARTIFACT: str(policy_dir)},
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=["ramp"],  # explicit: inferring them would import the model in a subprocess
            signature=ModelSignature(params=ParamSchema([ParamSpec("matrix_bytes", "long", 0)])),
            registered_model_name=MODEL_NAME,
        )
    version = str(info.registered_model_version)
    log.info("registered %s version %s (run %s)", MODEL_NAME, version, run.info.run_id)
    return version


def _metric_tag(metric_name: str, budget: int) -> str:
    return f"eval.{metric_name}.{int(budget)}"


@dataclass(frozen=True)
class Promotion:
    version: str
    promoted: bool
    value: float
    champion_version: str | None  # the champion it was compared with (None: there was none)
    champion_value: float | None
    reason: str


def promote_if_better(
    version: str | int,
    metric_name: str,
    value: float,
    budget: int,
    project: str | Path = PROJECT,
    model_name: str = MODEL_NAME,
) -> Promotion:
    """Move alias ``champion`` to ``version`` if ``value`` (lower is better) beats the champion's value of
    ``metric_name`` recorded at the same ``budget`` (bytes); else tag ``version`` ``rejected`` with both
    numbers. No champion yet: ``version`` becomes champion. The value is recorded on ``version`` either way."""
    if not math.isfinite(float(value)):
        raise ValueError(f"{metric_name}={value} is not a finite number; refusing to gate on it")
    setup(project)
    client = MlflowClient()
    version = str(version)
    client.get_model_version(model_name, version)  # raises naming the version if it does not exist
    tag = _metric_tag(metric_name, budget)
    client.set_model_version_tag(model_name, version, tag, repr(float(value)))
    try:
        champ = client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException:
        champ = None
    if champ is None or str(champ.version) == version:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        reason = f"first {model_name} version with {metric_name} at budget {budget} B: champion"
        log.info("%s v%s: %s", model_name, version, reason)
        return Promotion(version, True, float(value), None, None, reason)
    if tag not in champ.tags:
        raise LookupError(
            f"champion {model_name} v{champ.version} has no {metric_name} recorded at budget {budget} B "
            f"(tag {tag!r}); evaluate it at this budget first so the comparison is at the same size"
        )
    champ_value = float(champ.tags[tag])
    champ_version = str(champ.version)
    if float(value) < champ_value:
        client.set_registered_model_alias(model_name, CHAMPION, version)
        reason = f"{metric_name} {value:.6g} < champion v{champ_version} {champ_value:.6g} at budget {budget} B"
        client.set_model_version_tag(model_name, version, "promoted", reason)
        promoted = True
    else:
        reason = f"{metric_name} {value:.6g} >= champion v{champ_version} {champ_value:.6g} at budget {budget} B"
        client.set_model_version_tag(model_name, version, "rejected", reason)
        client.set_model_version_tag(model_name, version, "rejected.value", repr(float(value)))
        client.set_model_version_tag(model_name, version, "rejected.champion_value", repr(champ_value))
        client.set_model_version_tag(model_name, version, "rejected.champion_version", champ_version)
        promoted = False
    log.info("%s v%s: %s", model_name, version, reason)
    return Promotion(version, promoted, float(value), champ_version, champ_value, reason)


def champion_version(project: str | Path = PROJECT, model_name: str = MODEL_NAME) -> str | None:
    setup(project)
    try:
        return str(MlflowClient().get_model_version_by_alias(model_name, CHAMPION).version)
    except MlflowException:
        return None


CHAMPION_DIR = Path("policies") / "champion"  # where the allocate stage reads a pulled champion (stages/allocate.py)


def pull_champion(project: str | Path = PROJECT, model_name: str = MODEL_NAME) -> str:
    """Copy the registry's champion policy files to ``<project>/policies/champion/policy`` (atomically, with
    ``version.txt`` = ``models:/ramp-policy/<version>``) for ``allocate.policy: champion``; returns that URI."""
    import shutil

    from ramp.io import atomic_dir

    setup(project)
    try:
        version = MlflowClient().get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as e:
        raise LookupError(f"models:/{model_name}@{CHAMPION}: no such registered policy; train and promote one") from e
    uri = f"models:/{model_name}/{version.version}"
    with tempfile.TemporaryDirectory() as d, atomic_dir(Path(project) / CHAMPION_DIR) as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=d))
        policy = next((p.parent for p in local.rglob("policy.json")), None)
        if policy is None:
            raise FileNotFoundError(f"{uri} holds no policy.json artifact")
        shutil.copytree(policy, tmp / "policy")
        (tmp / "version.txt").write_text(uri + "\n")
    log.info("pulled %s into %s", uri, Path(project) / CHAMPION_DIR)
    return uri


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["pull-champion"]:
        sys.exit("usage: python -m flows.registry pull-champion")
    print(pull_champion(Path.cwd()))
