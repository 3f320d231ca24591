"""A DVC stage script that cannot run reports it in one line on stderr and exits 1, writing nothing
(``RAMP_VERBOSE=1`` shows the traceback)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from ramp.params import merge

REPO = Path(__file__).resolve().parents[2]


def test_stage_with_invalid_params_fails_in_one_line_and_writes_nothing(tmp_path):
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), {"model": {"tiny": {"heads": 0}}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAMP_VERBOSE", None)
    cmd = [sys.executable, "-m", "stages.calibrate"]
    res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1] == (
        "stage calibrate: ParamsError: params.yaml: model.tiny.heads = 0: must be in [1, 128]"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]
    verbose = subprocess.run(cmd, cwd=tmp_path, env={**env, "RAMP_VERBOSE": "1"}, capture_output=True, text=True)
    assert verbose.returncode == 1 and "Traceback (most recent call last)" in verbose.stderr


def test_stage_with_invalid_cache_section_fails_in_one_line(tmp_path):
    """The workspace (built when a stage script is imported) reads params.yaml's ``cache`` section; a bad value is
    reported like any other params error, not as a traceback from the import."""
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), {"cache": {"disk_bytes": -1}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("RAMP_VERBOSE", None)
    res = subprocess.run([sys.executable, "-m", "stages.embed"], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.splitlines()[-1] == "stage embed: ParamsError: params.yaml: cache.disk_bytes = -1: must be >= 0"
    assert [p.name for p in tmp_path.iterdir()] == ["params.yaml"]
