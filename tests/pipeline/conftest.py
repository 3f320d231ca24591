"""Pipeline tests: ``stages``/``flows``/``tests.pipeline.harness`` importable from the repository root (pytest
runs in importlib mode) and the tiny pipeline fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.pipeline.harness import dvc, make_pipeline_copy  # noqa: E402


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory) -> Path:
    """The tiny pipeline after one full ``dvc repro`` (shared by the DAG tests; each test leaves it as it found it)."""
    root = make_pipeline_copy(tmp_path_factory.mktemp("pipeline") / "repo")
    dvc(root, "repro")
    return root
