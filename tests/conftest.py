"""Test configuration: offline environment and shared fixtures."""

import os

# Nothing may try a hub or phone home during tests (SPEC §9); set before any library import.
for _k, _v in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}.items():
    os.environ.setdefault(_k, _v)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llama_cpp_bin():
    """llama.cpp's tools and libggml-base.so, built once into the cache (several minutes the first time)."""
    from ramp.llamacpp import ensure_built

    return ensure_built()
