"""Stage allocate: the trained policy picks a GGUF type for every matrix of the target model under the budget.

Reads params ``allocate``. Reads ``data/train/policy/`` (``policy: file``) or the MLflow registry's
``models:/ramp-policy@champion`` (``policy: champion``), ``data/embed/embedding.parquet`` and the folded model
(``data/fold/model``, for shapes and the file overhead). Writes ``data/allocate/`` (``allocation.json``,
``allocation.parquet``, ``tensor_types.txt``: the llama-quantize ``--tensor-type-file`` recipe, ``budget.json``)
and ``data/metrics/allocate.json``.

The budget is the size of the whole exported GGUF file in bytes (``budget_bytes``), or bits per weight of the
quantizable matrices (``budget_bpw``); exactly one is set. Matrix budget = file budget - the bytes that do not
depend on the allocation (:func:`ramp.gguf_export.file_overhead`: header, embeddings, norms).
"""

from __future__ import annotations

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from stages._common import (
    DATA,
    Timer,
    as_dict,
    atomic_dir,
    load_folded_model,
    load_params,
    setup_logging,
    write_json,
    write_metrics,
)

log = logging.getLogger("stages.allocate")
OUT = DATA / "allocate"
POLICY_DIR = DATA / "train" / "policy"
CHAMPION_URI = "models:/ramp-policy@champion"


@dataclass(frozen=True)
class AllocateParams:
    """Budget and fixed tensor types. ``policy``: ``file`` (this pipeline's train stage) or ``champion`` (the
    registry's ``models:/ramp-policy@champion``; DVC cannot see the registry, so rerun with ``dvc repro -f -s
    allocate`` after a promotion)."""

    policy: Literal["file", "champion"]
    budget_bytes: int | None  # whole GGUF file, bytes
    budget_bpw: float | None  # bits per weight of the quantizable matrices (data bytes)
    embedding_type: str  # GGUF type of token_embd (and an untied output)
    norm_type: str

    def __post_init__(self) -> None:
        if (self.budget_bytes is None) == (self.budget_bpw is None):
            raise ValueError(
                f"set exactly one of budget_bytes ({self.budget_bytes}) and budget_bpw ({self.budget_bpw})"
            )
        for name in ("budget_bytes", "budget_bpw"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}={v} must be > 0")


def champion_policy_dir(dest: Path, uri: str = CHAMPION_URI) -> tuple[Path, str]:
    """Download the registered champion's policy files; returns (folder, ``models:/ramp-policy/<version>``)."""
    import mlflow
    from mlflow import MlflowClient

    project = Path.cwd()
    mlflow.set_tracking_uri(os.environ.get("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}"))
    name, alias = uri.removeprefix("models:/").split("@")
    try:
        version = MlflowClient().get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException as e:
        raise LookupError(f"{uri}: no such registered policy ({e}); train and promote one, or use policy: file") from e
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version.version}", dst_path=str(dest))
    )
    policy = next((p.parent for p in local.rglob("policy.json")), None)
    if policy is None:
        raise FileNotFoundError(f"{uri} (version {version.version}) holds no policy.json artifact")
    return policy, f"models:/{name}/{version.version}"


def matrix_budget(params: AllocateParams, slots: list, overhead: int) -> tuple[int, int]:
    """(file budget bytes, matrix budget bytes) for either way of stating the budget."""
    if params.budget_bytes is not None:
        return params.budget_bytes, params.budget_bytes - overhead
    n = sum(s.params for s in slots)
    matrices = int(params.budget_bpw * n / 8)
    return overhead + matrices, matrices


def main() -> None:
    setup_logging()
    timer = Timer()
    params = load_params("allocate", AllocateParams)

    import pandas as pd

    from ramp.allocate import allocate, load_policy
    from ramp.allocation import (
        AllocationError,
        bits_per_weight,
        matrix_bytes,
        min_matrix_bytes,
        save_allocation,
        slots_for,
        tensor_type_recipe,
    )
    from ramp.gguf_export import Provenance, file_overhead

    lm = load_folded_model()
    slots = slots_for(lm.matrices())
    with tempfile.TemporaryDirectory() as tmp_policy:
        if params.policy == "champion":
            policy_dir, policy_version = champion_policy_dir(Path(tmp_policy))
        else:
            policy_dir, policy_version = POLICY_DIR, f"file:{POLICY_DIR}"
        policy = load_policy(policy_dir)
    provenance = Provenance(policy_version=policy_version, budget_bytes=0, method="ramp")
    overhead = file_overhead(lm, params.embedding_type, params.norm_type, provenance)
    file_budget, budget = matrix_budget(params, slots, overhead)
    if budget < min_matrix_bytes(slots):
        raise AllocationError(
            f"budget {file_budget:,d} B leaves {budget:,d} B for the matrices, below the smallest legal allocation "
            f"{min_matrix_bytes(slots) + overhead:,d} B for this model ({overhead:,d} B are header, embeddings, norms)"
        )
    table = pd.read_parquet(DATA / "embed" / "embedding.parquet").set_index("gguf_name")
    features = table.loc[[s.gguf_name for s in slots]].reset_index()
    allocation = allocate(policy, slots, features, budget)
    used = matrix_bytes(slots, allocation)
    if used > budget:
        raise AllocationError(f"the policy spent {used:,d} B of a {budget:,d} B matrix budget")
    with atomic_dir(OUT) as tmp:
        save_allocation(tmp / "allocation.json", slots, allocation)
        save_allocation(tmp / "allocation.parquet", slots, allocation)
        (tmp / "tensor_types.txt").write_text(tensor_type_recipe(allocation))
        write_json(
            tmp / "budget.json",
            {
                "file_budget_bytes": file_budget,
                "matrix_budget_bytes": budget,
                "overhead_bytes": overhead,
                "matrix_bytes": used,
                "policy_version": policy_version,
                **as_dict(params),
            },
        )
    counts = pd.Series(list(allocation.values())).value_counts().to_dict()
    write_metrics(
        "allocate",
        {
            "file_budget_bytes": file_budget,
            "predicted_file_bytes": overhead + used,
            "matrix_bytes": used,
            "budget_used": used / budget,
            "bpw": bits_per_weight(slots, allocation),
            "formats": {k: int(v) for k, v in sorted(counts.items())},
            "seconds": timer.seconds,
        },
    )
    log.info(
        "allocate done in %.1f s: %d matrices, %s B of %s B (%.3f bpw) -> %s",
        timer.seconds,
        len(allocation),
        f"{used:,}",
        f"{budget:,}",
        bits_per_weight(slots, allocation),
        OUT,
    )


if __name__ == "__main__":
    main()
