"""Interrupted stages: a killed run's temporaries are removed by the next run of its stage (never those of a
running writer or another stage), and stage outputs are byte-deterministic, so a rerun after kill -9 gives the
same bytes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from ramp.io import remove_stale_temporaries, sort_safetensors_metadata
from ramp.pipeline.workspace import Workspace
from tests.pipeline.harness import REPO, make_pipeline_copy, pipeline_env

PYTHON = sys.executable


def dead_pid() -> int:
    """The pid of a process that has exited."""
    proc = subprocess.Popen([PYTHON, "-c", "pass"])
    proc.wait()
    return proc.pid


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def temporaries(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob(".*.tmp"))


def test_only_temporaries_of_gone_writers_are_removed(tmp_path):
    gone, me = dead_pid(), os.getpid()
    for name in (f".fold.{gone}.abc123.tmp", f".fold.{me}.def456.tmp", f".embed.{gone}.x1.tmp", ".fold.legacy1.tmp"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "part").write_text("partial")
    (tmp_path / f".fold.{gone}.abc123-old.tmp").mkdir()  # a folder atomic_dir was replacing
    (tmp_path / "fold").mkdir()
    old = time.time() - 3600
    os.utime(tmp_path / ".fold.legacy1.tmp", (old, old))  # no pid in the name: older than this process

    removed = remove_stale_temporaries(tmp_path, "fold")

    assert sorted(p.name for p in removed) == sorted(
        [f".fold.{gone}.abc123.tmp", f".fold.{gone}.abc123-old.tmp", ".fold.legacy1.tmp"]
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["fold", f".fold.{me}.def456.tmp", f".embed.{gone}.x1.tmp"]
    )
    assert [p.name for p in remove_stale_temporaries(tmp_path)] == [f".embed.{gone}.x1.tmp"]  # any name
    assert (tmp_path / f".fold.{me}.def456.tmp" / "part").exists()  # a running writer's (this process) stays


def test_stage_begin_cleans_its_own_leftovers_and_its_done_marker(tmp_path):
    ws = Workspace(tmp_path, quant_cache=tmp_path / "quant")
    gone, me = dead_pid(), os.getpid()
    leftovers = [
        ws.data / f".fold.{gone}.a1.tmp",
        ws.metrics / f".fold.json.{gone}.b2.tmp",
        ws.stamps / f".fold.json.{gone}.c3.tmp",
        ws.plots / f".pareto.png.{gone}.d4.tmp",
        ws.cache / "ab" / f".abcd.safetensors.{gone}.e5.tmp",
    ]
    kept = [
        ws.data / f".embed.{gone}.f6.tmp",  # another stage's: its own next run removes it
        ws.data / f".fold.{me}.g7.tmp",  # a running writer's
        ws.cache / "ab" / f".abcd.safetensors.{me}.h8.tmp",
        ws.cache / "ab" / "abcd.safetensors",
    ]
    for p in leftovers + kept:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("x")
    ws.write_metrics("fold", {"seconds": 1.0})
    ws.write_metrics("embed", {"seconds": 1.0})

    assert sorted(ws.begin("fold")) == sorted(leftovers)

    assert not any(p.exists() for p in leftovers) and all(p.exists() for p in kept)
    assert not (ws.metrics / "fold.json").exists()  # fold is not done until it writes its metrics again
    assert (ws.metrics / "embed.json").exists()


def test_sorted_safetensors_metadata_is_the_same_bytes_in_every_process(tmp_path):
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[2])\n"
        "from safetensors.numpy import save_file; from ramp.io import sort_safetensors_metadata\n"
        "meta = {f'key{i}': f'value {i}\\n\"' for i in range(8)}\n"
        "save_file({'w': np.arange(6, dtype=np.float32).reshape(2, 3)}, sys.argv[1], metadata=meta)\n"
        "sort_safetensors_metadata(sys.argv[1])\n"
    )
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for p in paths:  # the writer's key order follows a hash seeded per process
        subprocess.run([PYTHON, "-c", code, str(p), str(REPO)], check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    with safe_open(str(paths[0]), framework="np") as f:
        assert f.metadata() == {f"key{i}": f'value {i}\n"' for i in range(8)}
    assert np.array_equal(load_file(str(paths[0]))["w"], np.arange(6, dtype=np.float32).reshape(2, 3))
    header = paths[0].read_bytes()[8:]
    assert header.index(b'"key0"') < header.index(b'"key1"') < header.index(b'"key7"')

    one = tmp_path / "one.safetensors"
    save_file({"w": np.zeros(2, np.float32)}, str(one))  # no metadata: left as written
    before = one.read_bytes()
    sort_safetensors_metadata(one)
    assert one.read_bytes() == before


RUN_STAGES = (
    "import sys; sys.path.insert(0, sys.argv[1])\n"
    "from pathlib import Path\n"
    "from ramp.params import load_pipeline\n"
    "from ramp.pipeline.run import run_stage\n"
    "from ramp.pipeline.workspace import Workspace\n"
    "from tests.pipeline.harness import TINY\n"
    "params = load_pipeline(Path(sys.argv[1]) / 'params.yaml', TINY)\n"
    "ws = Workspace(Path(sys.argv[2]), quant_cache=Path(sys.argv[2]) / 'quant')\n"
    "for stage in sys.argv[3:]:\n"
    "    run_stage(stage, params, ws)\n"
)


@pytest.mark.slow  # calibrate and fold of the tiny model in two processes side by side: about 30 s
def test_calibrate_and_fold_outputs_are_the_same_bytes_in_another_workspace(tmp_path):
    roots = [tmp_path / "first", tmp_path / "elsewhere" / "second"]
    # separate processes (side by side): a per-process hash seed or a temporary path would show
    procs = [subprocess.Popen([PYTHON, "-c", RUN_STAGES, str(REPO), str(r), "calibrate", "fold"]) for r in roots]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    for stage in ("calibrate", "fold"):
        first, second = (files_of(root / "data" / stage) for root in roots)
        assert sorted(first) == sorted(second)
        differ = [name for name in first if first[name] != second[name]]
        assert differ == [], f"{stage}: files differ between workspaces: {differ}"
    assert temporaries(roots[0]) == [] and temporaries(roots[1]) == []
    stats = (roots[0] / "data" / "calibrate" / "stats" / "stats.parquet").read_bytes()
    folded = (roots[0] / "data" / "fold" / "model.json").read_bytes()  # fold disabled: names the calibrated model
    for blob in (stats, folded):  # the model is named relative to the workspace, never by a temporary folder
        assert b"data/calibrate/model" in blob and b".tmp" not in blob and str(tmp_path).encode() not in blob


@pytest.mark.slow  # three runs of the calibrate stage script: about 40 s
def test_calibrate_killed_mid_run_is_cleaned_and_recomputed_to_the_same_bytes(tmp_path):
    root = make_pipeline_copy(tmp_path / "repo")
    env = pipeline_env(root)
    stage = [PYTHON, "-m", "stages.calibrate"]
    subprocess.run(stage, cwd=root, env=env, check=True, capture_output=True)
    out, metrics = root / "data" / "calibrate", root / "data" / "metrics" / "calibrate.json"
    complete = files_of(out)
    assert {"model.json", "stats/stats.parquet", "tokens.safetensors", "imatrix.dat"} <= set(complete)

    proc = subprocess.Popen(stage, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    partial = root / "data" / f".calibrate.{proc.pid}"
    deadline = time.monotonic() + 120
    while not list(root.glob(f"data/.calibrate.{proc.pid}.*.tmp/model/config.json")):  # the model is being built
        assert proc.poll() is None and time.monotonic() < deadline, "the stage ended before it could be killed"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = temporaries(root)
    assert len(left) == 1 and left[0].startswith(str(partial.relative_to(root)))
    assert files_of(out) == complete  # the output in place is the last complete one, never a partial one
    assert not metrics.exists()  # and the stage no longer reads as done

    rerun = subprocess.run(stage, cwd=root, env=env, check=True, capture_output=True, text=True)
    assert "removed 1 stale temporaries" in rerun.stderr
    assert temporaries(root) == []
    assert files_of(out) == complete  # recomputed, byte for byte
    assert json.loads(metrics.read_text())["matrices"] > 0
