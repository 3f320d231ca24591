"""The offline environment (SPEC §9): nothing may try a hub or phone home. Import-light on purpose, so that it
can run before any library that reads these variables at import time."""

from __future__ import annotations

import os

OFFLINE_ENV: dict[str, str] = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
}


def set_offline_env() -> None:
    """Set every variable of :data:`OFFLINE_ENV` that the caller has not set already."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
