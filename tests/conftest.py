"""Test configuration: offline environment and shared fixtures."""

import os

# Nothing may try a hub or phone home during tests (SPEC §9); set before any library import.
from ramp.offline import set_offline_env  # import-light: os only

set_offline_env()
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def llama_cpp_bin():
    """llama.cpp's tools and libggml-base.so, built once into the cache (several minutes the first time)."""
    from ramp.llamacpp import ensure_built

    return ensure_built()
