"""Serve ``retrain-policy`` as a deployment on the local Prefect server with the cron schedule of params.yaml.

``make serve`` starts ``prefect server start --host 127.0.0.1`` and runs this module, which creates (or
updates) the deployment ``retrain-policy/scheduled`` with ``retrain.cron`` and executes its runs until stopped.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from flows.retrain import PROJECT, retrain_params, retrain_policy

log = logging.getLogger(__name__)

DEPLOYMENT = "scheduled"


def deployment(project: str | Path = PROJECT):  # noqa: ANN201 - prefect's RunnerDeployment
    """The ``retrain-policy/scheduled`` deployment with the cron schedule from params.yaml."""
    from prefect.schedules import Cron

    cron = retrain_params(project).cron
    return retrain_policy.to_deployment(
        name=DEPLOYMENT,
        schedule=Cron(cron, timezone="UTC"),
        parameters={"project": str(Path(project).resolve())},
        description=f"Retrain the RAMP policy on fresh calibration data; cron {cron!r} from params.yaml",
    )


def serve(project: str | Path = PROJECT) -> None:
    """Create the deployment and execute its scheduled runs until interrupted (needs a Prefect server)."""
    from prefect import serve as prefect_serve

    dep = deployment(project)
    log.info("serving retrain-policy/%s (cron %s)", DEPLOYMENT, retrain_params(project).cron)
    prefect_serve(dep)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    serve(sys.argv[1] if len(sys.argv) > 1 else PROJECT)
