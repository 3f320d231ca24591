"""MLflow tracking and the policy registry (local sqlite backend + artifact folder inside the project).

* :func:`log_stage_run` records one pipeline stage (its params section, its metrics JSON, small artifacts).
* :func:`register_policy` logs the two files :func:`ramp.allocate.save_policy` wrote (``policy.safetensors`` +
  ``policy.json``) as plain run artifacts and registers that folder as a new version of ``ramp-policy``. A version
  is data only: no ``MLmodel``, no Python code, no pickle, so nothing stored in the artifact store is ever imported
  or unpickled. :func:`download_policy` / :func:`pull_champion` fetch a version's two files and read them with
  :func:`ramp.allocate.load_policy`.
* :func:`promote_if_better` is the gate: alias ``champion`` moves to a version only if its held-out metric
  (lower is better, e.g. KLD) beats the champion's recorded value at the same budget; otherwise the version is
  tagged ``rejected`` with both numbers. The first version becomes champion. Read-compare-set runs under an
  inter-process lock beside the tracking store (:func:`promotion_lock_path`), and the alias is read back after it
  is written (compare-and-set), so a version reported promoted holds ``champion`` when the call returns.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
from filelock import FileLock, Timeout
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from ramp.allocate import POLICY_JSON, POLICY_WEIGHTS, PolicyError, load_policy
from ramp.errors import RampError

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parent.parent
MODEL_NAME = "ramp-policy"
CHAMPION = "champion"
EXPERIMENT = "ramp-pipeline"
POLICY_ARTIFACT = "policy"  # the run's artifact folder that a version points at
POLICY_FILES = (POLICY_JSON, POLICY_WEIGHTS)
# Where a version's policy files sit inside its download: versions registered as plain artifacts (now) and the
# pyfunc versions of earlier releases (the logged model's artifacts/policy/; their code is downloaded, never run).
POLICY_LAYOUTS = (".", "artifacts/policy")
LOCK_TIMEOUT_S = 120.0  # a promotion holds the lock for well under a second; longer means a stuck holder
CAS_ATTEMPTS = 5  # alias writes before giving up on a writer that keeps moving it outside the lock


class RegistryError(RampError, RuntimeError):
    """The registry lacks what a call needs (a version, the champion, a metric at a budget), or the promotion
    lock cannot be taken."""


class GateError(RampError, ValueError):
    """A metric value the gate cannot compare (NaN, infinite)."""


def tracking_uri(project: str | Path = PROJECT) -> str:
    """``MLFLOW_TRACKING_URI`` if the user set it, else the project's sqlite file."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(project).resolve() / 'mlflow.db'}"


def artifact_root(project: str | Path = PROJECT) -> str | None:
    """Where a new experiment keeps its artifacts: the project's ``mlartifacts/`` for a file or sqlite store; for an
    MLflow tracking server (http/https) None, the server's own artifact store (``mlflow server
    --artifacts-destination``, proxied), so that every machine of a team reads and writes the same artifacts."""
    if tracking_uri(project).startswith(("http://", "https://")):
        return None
    return (Path(project).resolve() / "mlartifacts").as_uri()


def setup(project: str | Path = PROJECT, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the project's store and select ``experiment`` (created with the project's artifact
    folder); returns the experiment id."""
    user_uri = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri(project))
    # set_tracking_uri also exports MLFLOW_TRACKING_URI, which tracking_uri() reads as the user's choice: left
    # there, the first project set up in a process would capture every later project (and spawned workers)
    if user_uri is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
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


def _ensure_registered_model(client: MlflowClient, model_name: str) -> None:
    try:
        client.get_registered_model(model_name)
    except MlflowException:
        try:
            client.create_registered_model(model_name)
        except MlflowException as e:  # another process created it in between
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise


def trained_on_tags(metrics: Mapping[str, Any] | None) -> dict[str, str]:
    """The model version tags naming what a policy was trained on (the train stage's ``trained_on`` and
    ``zero_shot`` metrics), so the registry shows which models a pooled policy has seen, and the table its prior
    prices (``cost_basis``)."""
    out = {}
    if metrics and metrics.get("trained_on"):
        out["ramp.trained_on"] = ",".join(str(m) for m in metrics["trained_on"])
    if metrics and "zero_shot" in metrics:
        out["ramp.zero_shot"] = str(bool(metrics["zero_shot"])).lower()
    if metrics and metrics.get("cost_basis"):  # the fold stage's table the policy's prior prices (train.cost_basis)
        out["ramp.cost_basis"] = str(metrics["cost_basis"])
    return out


def register_policy(
    policy_dir: str | Path,
    metrics: Mapping[str, Any] | None = None,
    project: str | Path = PROJECT,
    tags: Mapping[str, str] | None = None,
    model_name: str = MODEL_NAME,
) -> str:
    """Log ``policy_dir``'s ``policy.safetensors`` + ``policy.json`` as run artifacts and register them as a new
    version of ``model_name``; returns the version. Raises :class:`PolicyError` unless the folder loads."""
    policy_dir = Path(policy_dir)
    load_policy(policy_dir)  # a policy that does not load is refused here, not when a later pull reads it
    setup(project)
    client = MlflowClient()
    _ensure_registered_model(client, model_name)
    with mlflow.start_run(run_name="register-policy", tags=dict(tags or {})) as run:
        if metrics:
            mlflow.log_metrics(numeric_metrics(metrics))
        for name in POLICY_FILES:
            mlflow.log_artifact(str(policy_dir / name), artifact_path=POLICY_ARTIFACT)
        source = mlflow.get_artifact_uri(POLICY_ARTIFACT)
    info = client.create_model_version(
        model_name,
        source,
        run_id=run.info.run_id,
        tags={"ramp.policy_files": ",".join(POLICY_FILES), **trained_on_tags(metrics)},
        description="ramp.allocate policy as data (safetensors + JSON); load with flows.registry.download_policy",
    )
    version = str(info.version)
    log.info("registered %s version %s (run %s)", model_name, version, run.info.run_id)
    return version


def download_policy(
    version: str | int, dst: str | Path, project: str | Path = PROJECT, model_name: str = MODEL_NAME
) -> Path:
    """Download ``models:/<model_name>/<version>``'s ``policy.json`` + ``policy.safetensors`` into ``dst`` (nothing
    else) and check they load with :func:`ramp.allocate.load_policy`; returns ``dst``.

    Raises :class:`RegistryError` when the version cannot be downloaded and :class:`PolicyError` when it holds no
    readable policy files."""
    setup(project)
    uri = f"models:/{model_name}/{version}"
    dst = Path(dst)
    with tempfile.TemporaryDirectory() as d:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=d))
        except (MlflowException, OSError) as e:
            raise RegistryError(f"{uri}: cannot download its artifacts ({str(e).splitlines()[0]})") from e
        folder = next(
            (local / sub for sub in POLICY_LAYOUTS if all((local / sub / f).is_file() for f in POLICY_FILES)), None
        )
        if folder is None:
            found = sorted(str(p.relative_to(local)) for p in local.rglob("*") if p.is_file())
            raise PolicyError(
                f"{uri} holds no policy files: expected {' and '.join(POLICY_FILES)} (ramp.allocate.save_policy) "
                f"in one of {list(POLICY_LAYOUTS)}, found {found[:8] or 'nothing'}"
            )
        dst.mkdir(parents=True, exist_ok=True)
        for name in POLICY_FILES:
            shutil.copyfile(folder / name, dst / name)
    try:
        load_policy(dst)
    except PolicyError as e:
        raise PolicyError(f"{uri}: {e}") from e
    return dst


def _metric_tag(metric_name: str, budget: int) -> str:
    return f"eval.{metric_name}.{int(budget)}"


def promotion_lock_path(project: str | Path = PROJECT) -> Path:
    """The file :func:`promote_if_better` locks: ``<db>.lock`` beside a sqlite store (every process that sees the
    database sees the lock); for another store, a file in the temp folder named after its tracking URI (one machine
    only: the read-back after the alias write covers writers elsewhere)."""
    uri = tracking_uri(project)
    if uri.startswith("sqlite:///") and ":memory:" not in uri:
        db = Path(uri.removeprefix("sqlite:///").split("?", 1)[0]).resolve()
        return db.with_name(db.name + ".lock")
    return Path(tempfile.gettempdir()) / f"ramp-promote-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


@contextlib.contextmanager
def _promotion_lock(project: str | Path) -> Iterator[None]:
    path = promotion_lock_path(project)
    lock = FileLock(path, timeout=LOCK_TIMEOUT_S)
    try:
        lock.acquire()
    except Timeout as e:
        raise RegistryError(
            f"promotion lock {path} is still held after {LOCK_TIMEOUT_S:.0f} s; another promotion is stuck"
        ) from e
    except OSError as e:
        raise RegistryError(f"promotion lock {path} cannot be taken ({e.strerror or e})") from e
    try:
        yield
    finally:
        lock.release()


@dataclass(frozen=True)
class Promotion:
    version: str
    promoted: bool
    value: float
    champion_version: str | None  # the champion it was compared with (None: there was none)
    champion_value: float | None
    reason: str


_ABSENT = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")  # no such model / no such alias


def _champion(client: MlflowClient, model_name: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(model_name, CHAMPION)
    except MlflowException as e:
        if e.error_code in _ABSENT:
            return None
        raise


def _recorded(mv: ModelVersion, tag: str) -> float | None:
    """The value recorded on ``mv`` under ``tag`` (None: none recorded)."""
    value = mv.tags.get(tag)
    if value is None:
        return None
    try:
        return float(value)
    except ValueError as e:
        raise RegistryError(f"{mv.name} v{mv.version}: tag {tag!r} is {value!r}, not a number") from e


def _reject(
    client: MlflowClient, model_name: str, version: str, reason: str, value: float, champ: str, champ_value: float
) -> None:
    client.set_model_version_tag(model_name, version, "rejected", reason)
    client.set_model_version_tag(model_name, version, "rejected.value", repr(value))
    client.set_model_version_tag(model_name, version, "rejected.champion_value", repr(champ_value))
    client.set_model_version_tag(model_name, version, "rejected.champion_version", champ)


def _compare_and_set(
    client: MlflowClient, model_name: str, version: str, metric_name: str, value: float, budget: int
) -> Promotion:
    """The gate itself; the caller holds the promotion lock. After writing the alias it is read back: a version
    that a writer outside the lock promoted in between keeps it only if it is better (lower value, ties: the
    older version); otherwise the alias is written again."""
    tag = _metric_tag(metric_name, budget)
    at = f"at budget {budget} B"
    client.set_model_version_tag(model_name, version, tag, repr(value))
    champ = _champion(client, model_name)
    if champ is not None and str(champ.version) == version:
        return Promotion(version, True, value, None, None, f"already champion; {metric_name} {value:.6g} {at} recorded")
    compared: tuple[str, float] | tuple[None, None] = (None, None)
    if champ is None:
        reason = f"first {model_name} version with {metric_name} {at}: champion"
    else:
        champ_value = _recorded(champ, tag)
        if champ_value is None:
            raise RegistryError(
                f"champion {model_name} v{champ.version} has no {metric_name} recorded {at} "
                f"(tag {tag!r}); evaluate it at this budget first so the comparison is at the same size"
            )
        compared = (str(champ.version), champ_value)
        if value >= champ_value:
            reason = f"{metric_name} {value:.6g} >= champion v{champ.version} {champ_value:.6g} {at}"
            _reject(client, model_name, version, reason, value, *compared)
            log.info("%s v%s: %s", model_name, version, reason)
            return Promotion(version, False, value, *compared, reason)
        reason = f"{metric_name} {value:.6g} < champion v{champ.version} {champ_value:.6g} {at}"
    for _ in range(CAS_ATTEMPTS):
        client.set_registered_model_alias(model_name, CHAMPION, version)
        holder = _champion(client, model_name)
        if holder is not None and str(holder.version) == version:
            client.set_model_version_tag(model_name, version, "promoted", reason)
            log.info("%s v%s: %s", model_name, version, reason)
            return Promotion(version, True, value, *compared, reason)
        if holder is None:
            continue  # the alias was deleted in between: write it again
        theirs = _recorded(holder, tag)
        if theirs is None or (theirs, int(holder.version)) < (value, int(version)):
            # promoted meanwhile by a writer outside the lock: it stays unless we are known to be better
            reason = (
                f"{metric_name} {value:.6g}: champion moved to v{holder.version} "
                f"({'no value' if theirs is None else f'{theirs:.6g}'} {at}) during this promotion"
            )
            _reject(
                client, model_name, version, reason, value, str(holder.version), math.nan if theirs is None else theirs
            )
            log.info("%s v%s: %s", model_name, version, reason)
            return Promotion(version, False, value, str(holder.version), theirs, reason)
    raise RegistryError(
        f"{model_name}@{CHAMPION} kept moving during {CAS_ATTEMPTS} writes for v{version}: another writer promotes "
        "without the promotion lock"
    )


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
    numbers. No champion yet: ``version`` becomes champion. The value is recorded on ``version`` either way.

    Atomic across processes: the whole read-compare-set holds :func:`promotion_lock_path`, and a version reported
    promoted holds ``champion`` when this returns (a strictly better one may take it later)."""
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise GateError(f"{metric_name}={value!r} is not a number; refusing to gate on it") from e
    if not math.isfinite(value):
        raise GateError(f"{metric_name}={value} is not a finite number; refusing to gate on it")
    setup(project)
    client = MlflowClient()
    version = str(version)
    try:
        client.get_model_version(model_name, version)
    except MlflowException as e:
        raise RegistryError(f"models:/{model_name}/{version}: no such registered version ({e.message})") from e
    with _promotion_lock(project):
        return _compare_and_set(client, model_name, version, metric_name, value, budget)


def champion_version(project: str | Path = PROJECT, model_name: str = MODEL_NAME) -> str | None:
    setup(project)
    champ = _champion(MlflowClient(), model_name)
    return None if champ is None else str(champ.version)


CHAMPION_DIR = Path("policies") / "champion"  # where the allocate stage reads a pulled champion (stages/allocate.py)


def pull_champion(project: str | Path = PROJECT, model_name: str = MODEL_NAME) -> str:
    """Copy the registry's champion policy files to ``<project>/policies/champion/policy`` (atomically, with
    ``version.txt`` = ``models:/ramp-policy/<version>``) for ``allocate.policy: champion``; returns that URI.
    The files are read as data (:func:`download_policy`); nothing stored with the version is executed."""
    from ramp.io import atomic_dir

    setup(project)
    champ = _champion(MlflowClient(), model_name)
    if champ is None:
        raise RegistryError(f"models:/{model_name}@{CHAMPION}: no such registered policy; train and promote one")
    uri = f"models:/{model_name}/{champ.version}"
    with atomic_dir(Path(project) / CHAMPION_DIR) as tmp:
        download_policy(champ.version, tmp / "policy", project, model_name)
        (tmp / "version.txt").write_text(uri + "\n")
    log.info("pulled %s into %s", uri, Path(project) / CHAMPION_DIR)
    return uri


def main(argv: list[str]) -> int:
    """``python -m flows.registry pull-champion``: a failure is one line on stderr and exit status 1."""
    import sys

    if argv != ["pull-champion"]:
        print("usage: python -m flows.registry pull-champion", file=sys.stderr)
        return 2
    try:
        print(pull_champion(Path.cwd()))
    except (RampError, MlflowException) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        print(f"flows.registry pull-champion: {type(e).__name__}: {first}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
