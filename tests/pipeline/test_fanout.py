"""The sensitivity fan-out (issue 19): the per-block task list is exactly the measurement, in-process it gives the old
code path's numbers to the bit, on a 2-worker Dask cluster (Prefect tasks) the same bytes, a worker killed mid-run
changes nothing, an unreachable scheduler is one error naming it with no output, and params ``distributed``."""

from __future__ import annotations

import os
import re
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_HOME", tempfile.mkdtemp(prefix="prefect-home-"))

from ramp.params import (  # noqa: E402
    OPTIONAL_SECTIONS,
    STAGE_SECTIONS,
    DistributedParams,
    ParamsError,
    load_distributed_params,
    load_pipeline,
    merge,
)
from ramp.pipeline import sensitivity as stage  # noqa: E402
from ramp.pipeline.workspace import Workspace  # noqa: E402
from tests.pipeline.harness import REPO, TINY  # noqa: E402

# four blocks: four tasks, so that two workers share them and one can be killed while the other works
OVERLAY = merge(TINY, {"model": {"tiny": {"layers": 4}}})


def hexed(measured: dict) -> dict:
    return {k: float(v).hex() for k, v in measured.items()}


@pytest.fixture(scope="module")
def tiny_ws(tmp_path_factory) -> tuple[Workspace, object]:
    """A workspace with the tiny model's calibrate, embed and fold outputs (what the sensitivity stage reads)."""
    from ramp.pipeline.run import run_pipeline

    root = tmp_path_factory.mktemp("fanout")
    params = load_pipeline(REPO / "params.yaml", OVERLAY)
    ws = Workspace(root / "ws", quant_cache=root / "quant")
    run_pipeline(params, ws, ("calibrate", "embed", "fold"))
    return ws, params.sensitivity


@pytest.fixture(scope="module")
def in_process(tiny_ws) -> tuple[bytes, dict]:
    """The stage run in this process: the bytes of costs.parquet and the measured table (float.hex)."""
    ws, params = tiny_ws
    stage.sensitivity(params, ws)
    return (ws.stage("sensitivity") / stage.COSTS).read_bytes(), hexed(measured_of(ws))


def measured_of(ws: Workspace) -> dict:
    import pandas as pd

    frame = pd.read_parquet(ws.stage("sensitivity") / stage.COSTS).dropna(subset=["measured"])
    return dict(zip(zip(frame["gguf_name"], frame["format"], strict=True), frame["measured"], strict=True))


# ------------------------------------------------------------------------------------------------ in-process


def test_block_tasks_are_the_measurement_and_match_the_old_code_path(tiny_ws):
    """One task per block, together exactly measure_kld's keys; the in-process mapper gives its values to the bit."""
    from safetensors.torch import load_file

    from ramp.evaluate.kld import fp_reference
    from ramp.pipeline.fold import action_space, folded_imatrix_of
    from ramp.sensitivity import BlockRunner, measure_kld

    ws, params = tiny_ws
    # the old code path, as the stage ran it before the fan-out
    lm = ws.folded_model()
    slots, _ = action_space(ws, lm)
    tokens = load_file(str(ws.stage("calibrate") / "tokens.safetensors"))["tokens"][: params.windows]
    runner = BlockRunner(lm, fp_reference(lm, tokens, top_k=params.top_k))
    old = measure_kld(lm, runner, slots, params.probes, ws.quant_cache_store(), folded_imatrix_of(ws), progress=False)

    tasks = stage.block_tasks(ws, params, slots, stage.inputs_digest(ws))
    assert [t.block for t in tasks] == sorted({s.block for s in slots}) == [0, 1, 2, 3]
    keys = [k for t in tasks for k in t.jobs]
    assert len(keys) == len(set(keys)) and set(keys) == set(old)
    block_of = {s.gguf_name: s.block for s in slots}
    assert all(block_of[name] == t.block for t in tasks for name, _ in t.jobs)
    assert all(t.workspace.root.is_absolute() and t.workspace.cache.is_absolute() for t in tasks)
    seen = []
    try:
        new = stage.measure_tasks(tasks, lambda fn, ts: [seen.append(t.block) or fn(t) for t in ts])
    finally:
        stage.forget_loaded()
    assert seen == [0, 1, 2, 3]
    assert list(new) == keys  # task order, each task in its jobs' order
    assert hexed(new) == hexed(old)


def test_in_process_stage_writes_the_old_table_and_releases_the_model(tiny_ws, in_process):
    """The stage's own run (mapper None) measured what the old code path measures, to the bit, and does not keep
    the model for the stages after it in the same process."""
    from ramp.sensitivity import BlockRunner, measure_kld

    ws, params = tiny_ws
    state = stage._Loaded(ws, params)  # the same loading, outside the memo
    old = measure_kld(state.lm, BlockRunner(state.lm, state.ref), state.slots, params.probes, state.cache,
                      state.imatrix, progress=False)  # fmt: skip
    assert in_process[1] == hexed(old) and len(old) == 28
    assert stage._MEMO == {}


def test_results_are_merged_in_task_order_whatever_order_they_finish(tiny_ws):
    ws, params = tiny_ws
    tasks = [stage.BlockTask(ws, b, ((f"blk.{b}.x", "Q2_K"), (f"blk.{b}.y", "Q2_K")), params, "d") for b in range(3)]

    def backwards(fn, ts):  # computed last to first, handed back in task order as a mapper must
        out = {t.block: {k: float(t.block) for k in reversed(t.jobs)} for t in reversed(ts)}
        return [out[t.block] for t in ts]

    merged = stage.measure_tasks(tasks, backwards)
    assert list(merged) == [k for t in tasks for k in t.jobs]
    assert [merged[k] for k in merged] == [0.0, 0.0, 1.0, 1.0, 2.0, 2.0]

    def loses_one(fn, ts):
        return [{} if t.block == 1 else dict.fromkeys(t.jobs, 0.0) for t in ts]

    with pytest.raises(RuntimeError, match="block task 1: results for"):
        stage.measure_tasks(tasks, loses_one)


# ------------------------------------------------------------------------------------------------ Dask cluster


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.mark.slow
def test_two_worker_local_cluster_gives_the_same_bytes(tiny_ws, in_process, prefect_server):
    from flows.fanout import prefect_mapper

    ws, params = tiny_ws
    data, measured = in_process
    metrics = stage.sensitivity(params, ws, mapper=prefect_mapper(DistributedParams(engine="dask", workers=2)))
    assert metrics["tasks"] == 4 and metrics["evaluations"] == 28
    assert hexed(measured_of(ws)) == measured
    assert (ws.stage("sensitivity") / stage.COSTS).read_bytes() == data
    runs = fanout_task_runs()  # one Prefect task run per block, named after it
    assert sorted(runs) == ["block-0", "block-1", "block-2", "block-3"] and set(runs.values()) == {"COMPLETED"}


@pytest.mark.slow
def test_a_worker_killed_mid_run_is_replaced_and_the_run_completes(tiny_ws, in_process, prefect_server):
    """SIGKILL one worker while it measures: the nanny restarts it, Dask reschedules its task, same table."""
    import distributed

    from flows.fanout import prefect_mapper

    ws, params = tiny_ws
    _, measured = in_process
    with (
        distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster,
        distributed.Client(cluster, set_as_default=False) as client,
    ):
        pids = client.run(os.getpid)
        killed: list[int] = []

        def kill_a_busy_worker() -> None:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not killed:
                busy = [w for w, keys in client.processing().items() if keys and w in pids]
                if busy:
                    time.sleep(0.5)  # inside the task: importing torch, loading the model or measuring
                    os.kill(pids[busy[0]], signal.SIGKILL)
                    killed.append(pids[busy[0]])
                time.sleep(0.05)

        killer = threading.Thread(target=kill_a_busy_worker, daemon=True)
        killer.start()
        dist = DistributedParams(engine="dask", address=cluster.scheduler_address)
        stage.sensitivity(params, ws, mapper=prefect_mapper(dist))
        killer.join(timeout=5)
        assert killed, "no worker was busy to kill"
        assert killed[0] not in client.run(os.getpid).values()  # the killed process was replaced
    assert hexed(measured_of(ws)) == measured
    runs = fanout_task_runs()
    assert sorted(runs) == ["block-0", "block-1", "block-2", "block-3"] and set(runs.values()) == {"COMPLETED"}


def fanout_task_runs(timeout: float = 30) -> dict[str, str]:
    """Task run name -> state type of the latest ``sensitivity-fanout`` flow run (task states arrive as events)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowRunFilter
    from prefect.client.schemas.sorting import FlowRunSort

    deadline = time.monotonic() + timeout
    with get_client(sync_client=True) as client:
        (run,) = client.read_flow_runs(
            flow_filter=FlowFilter(name={"any_": ["sensitivity-fanout"]}), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
        while True:
            tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.id]}))
            states = {t.name: t.state.type.value for t in tasks if t.state is not None}
            if set(states.values()) == {"COMPLETED"} or time.monotonic() > deadline:
                return states
            time.sleep(0.5)


@pytest.mark.slow
def test_local_cluster_workers_run_torch_with_threads_per_worker():
    import distributed

    from flows.fanout import scheduler

    def torch_threads() -> int:
        import torch

        return torch.get_num_threads()

    before = os.environ.get("OMP_NUM_THREADS")
    dist = DistributedParams(engine="dask", workers=1, threads_per_worker=2)
    with scheduler(dist) as address, distributed.Client(address, set_as_default=False) as client:
        assert list(client.run(torch_threads).values()) == [2]
        assert list(client.nthreads().values()) == [2]
    assert os.environ.get("OMP_NUM_THREADS") == before  # this process's environment is left as it was


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_scheduler_is_one_error_naming_it_and_writes_nothing(tiny_ws, in_process):
    from flows.fanout import ClusterError, prefect_mapper

    ws, params = tiny_ws
    address = f"tcp://127.0.0.1:{free_port()}"
    before = {p: p.stat().st_mtime_ns for p in ws.data.rglob("*") if p.is_file()}
    start = time.monotonic()
    dist = DistributedParams(engine="dask", address=address)
    with pytest.raises(ClusterError, match=re.escape(f"distributed.address {address}: no Dask scheduler answered")):
        stage.sensitivity(params, ws, mapper=prefect_mapper(dist, connect_timeout=2))
    assert time.monotonic() - start < 60
    after = {p: p.stat().st_mtime_ns for p in ws.data.rglob("*") if p.is_file()}
    metrics = ws.metrics / "sensitivity.json"
    assert metrics not in after  # the stage's metrics are gone: it reads as not done
    assert {p: t for p, t in after.items()} == {p: t for p, t in before.items() if p != metrics}  # nothing else moved
    assert stage._MEMO == {}


def test_stage_script_reports_the_unreachable_address_in_one_line(tiny_ws, in_process, monkeypatch, capsys):
    """The DVC stage, pointed at a scheduler that is not there: exit 1, one line naming the address, no output."""
    import flows.fanout
    import stages.sensitivity
    from stages._common import stage_main

    ws, _ = tiny_ws
    address = f"tcp://127.0.0.1:{free_port()}"
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = merge(merge(params, OVERLAY), {"distributed": {"engine": "dask", "address": address}})
    (ws.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(ws.root)  # the stage's workspace (Path(".")) and params.yaml are the current folder's
    monkeypatch.setattr(flows.fanout, "CONNECT_TIMEOUT_S", 2.0)
    costs = (ws.stage("sensitivity") / stage.COSTS).read_bytes()
    with pytest.raises(SystemExit) as e:
        stage_main("sensitivity", stages.sensitivity.main)
    assert e.value.code == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("stage ")]  # the rest: progress bars
    assert len(lines) == 1 and "Traceback" not in err
    assert lines[0].startswith(f"stage sensitivity: ClusterError: distributed.address {address}: no Dask scheduler")
    assert (Path("data/sensitivity") / stage.COSTS).read_bytes() == costs
    assert not list(Path("data").glob(".sensitivity.*")) and not Path("data/metrics/sensitivity.json").exists()


# ------------------------------------------------------------------------------------------------ params


def test_distributed_section_is_optional_and_no_stage_params(tmp_path):
    from ramp.pipeline.run import _stamp

    assert "distributed" in OPTIONAL_SECTIONS
    assert all("distributed" not in sections for sections in STAGE_SECTIONS.values())
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    assert all("distributed" not in spec.get("params", []) for spec in stages.values())
    repo_params = REPO / "params.yaml"
    assert load_distributed_params(repo_params) == DistributedParams() == load_pipeline(repo_params).distributed
    assert DistributedParams() == DistributedParams(engine="local", address=None, workers=2, threads_per_worker=1)
    data = yaml.safe_load((REPO / "params.yaml").read_text())
    del data["distributed"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data))
    assert load_distributed_params(path) == DistributedParams() == load_pipeline(path).distributed
    base = load_pipeline(REPO / "params.yaml")
    other = load_pipeline(REPO / "params.yaml", {"distributed": {"engine": "dask", "address": "tcp://10.0.0.1:8786"}})
    assert other.distributed.address == "tcp://10.0.0.1:8786"
    for name in STAGE_SECTIONS:  # the engine changes no stage's stamp: nothing reruns
        assert _stamp(name, other, [], "code", "") == _stamp(name, base, [], "code", ""), name


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"engine": "ray"}, "distributed.engine: 'ray' is not one of 'local', 'dask'"),
        ({"workers": 0}, "distributed.workers = 0: must be in [1, 1024]"),
        ({"threads_per_worker": 1.5}, "distributed.threads_per_worker: expected an integer, got 1.5"),
        ({"address": "localhost"}, "distributed.address = 'localhost': expected a Dask scheduler address"),
        ({"address": "tcp://h:8786"}, "distributed.address = 'tcp://h:8786': is set but engine is 'local'"),
        ({"nodes": 4}, "distributed: unknown key 'nodes' in params.yaml section 'distributed'"),
    ],
)
def test_bad_distributed_value_names_the_key(tmp_path, section, message):
    path = REPO / "params.yaml"
    with pytest.raises(ParamsError) as e:
        load_pipeline(path, {"distributed": section})
    assert str(e.value).startswith(f"{path}: {message}")
    data = yaml.safe_load(path.read_text())
    data["distributed"] = section
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(data))
    with pytest.raises(ParamsError, match=re.escape(f"{tmp_path / 'params.yaml'}: {message}")):
        load_distributed_params(tmp_path / "params.yaml")


def test_in_process_mapper_keeps_task_order_and_shows_its_progress(capsys):
    from types import SimpleNamespace

    from ramp.pipeline.sensitivity import in_process

    tasks = [SimpleNamespace(block=b, jobs=(("a", "Q4_0"),) * (b + 1)) for b in range(3)]
    assert in_process(lambda t: t.block, tasks) == [0, 1, 2]
    err = capsys.readouterr().err
    assert "measuring sensitivity" in err and "6/6" in err
