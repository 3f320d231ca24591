"""A throw-away copy of the pipeline with the tiny profile, so that no test touches the working tree's data/."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

VENV_BIN = Path(sys.executable).parent
from ramp.pipeline import STAGES  # noqa: E402, F401 (re-exported for the tests)

# The tiny profile: the whole DAG on a 2-block random Llama in well under a minute per stage.
TINY = {
    "model": {"source": "tiny"},
    "calibrate": {"n_tokens": 1024, "n_ctx": 128, "batch_size": 4},
    "train": {
        "budget_file_bytes": None,
        "budget_bpw": 4.5,
        "reward_windows": 2,
        "rescore_top": 2,  # of 8 calibration windows: 2 for the reward, 4 to rescore on
        "rescore_windows": 4,
        "top_k": 16,
        "sac": {
            "episodes": 6,
            "random_episodes": 2,
            "batch_size": 16,
            "hidden": 16,
            "checkpoint_every": 3,
            "bc_steps": 20,
        },
    },
    "allocate": {"budget_file_bytes": None, "budget_bpw": 4.5},
    "evaluate": {
        "n_ctx": 128,
        "n_chunks": 2,
        "top_k": 16,
        "knapsack": ["greedy", "uniform", "sensitivity", "gradient", "fisher"],
        "evolution_evaluations": 6,
        "presets": ["Q3_K_M"],
        "uniform": ["Q4_0", "Q8_0"],
        "commonsense_tasks": ["piqa"],
        "commonsense_n": 4,
    },
    "export": {"llama_check": False},
}
COPIED = ("ramp", "stages", "flows", "dvc.yaml", ".dvcignore")


def tiny_params() -> dict:
    """params.yaml with the tiny profile laid over it (nested sections merged key by key, as benchmarks do)."""
    from ramp.params import merge

    return merge(yaml.safe_load((REPO / "params.yaml").read_text()), TINY)


def pipeline_env(root: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # dvc.yaml runs `python -m stages.<name>`
    env["RAMP_ASSETS"] = str(root / "data" / "assets")
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
    env.pop("PYTHONPATH", None)
    return env


def make_pipeline_copy(root: Path) -> Path:
    """A git + DVC repository at ``root`` with the pipeline code, the tiny params and the assets manifest."""
    root.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(), sort_keys=False))
    (root / ".gitignore").write_text("/data/\n/cache/\n/mlflow.db\n/mlartifacts/\n__pycache__/\n")
    manifest = REPO / "data" / "assets" / "manifest.json"
    (root / "data" / "assets").mkdir(parents=True)
    shutil.copy2(manifest, root / "data" / "assets" / "manifest.json")  # paths inside are absolute
    env = pipeline_env(root)
    for cmd in (
        ["git", "init", "-q"],
        [str(VENV_BIN / "dvc"), "init", "-q"],
        [str(VENV_BIN / "dvc"), "config", "core.analytics", "false"],
        [str(VENV_BIN / "dvc"), "config", "core.autostage", "false"],
        [str(VENV_BIN / "dvc"), "config", "core.check_update", "false"],
    ):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return root


def dvc(root: Path, *args: str, check: bool = True, timeout: float = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(
        [str(VENV_BIN / "dvc"), *args],
        cwd=root,
        env=pipeline_env(root),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and out.returncode != 0:
        raise AssertionError(
            f"dvc {' '.join(args)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
        )
    return out
