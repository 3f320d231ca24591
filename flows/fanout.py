"""The sensitivity measurement fanned out as Prefect tasks on Dask (``params.yaml`` section ``distributed``).

:func:`prefect_mapper` returns a mapper for :func:`ramp.pipeline.sensitivity.sensitivity`: the Prefect flow
``sensitivity-fanout`` maps the task ``measure-block`` (one run per decoder block, named ``block-<n>``, retried
twice) over the stage's :class:`~ramp.pipeline.sensitivity.BlockTask` list with :class:`prefect_dask.DaskTaskRunner`:

* ``engine: dask``, ``address: null``: a ``distributed.LocalCluster`` of ``workers`` processes, each with
  ``threads_per_worker`` Dask threads and as many torch threads, started for the run and closed after it;
* ``engine: dask``, ``address: tcp://host:8786``: an existing scheduler (``dask scheduler`` + ``dask worker``); its
  workers need this checkout importable (same code) and the workspace at the same absolute path (a shared folder).

Why Dask: pure-Python wheels pinned with the stack, a local cluster of processes needs no service, and
``DaskTaskRunner(address=...)`` points the same flow at a real cluster. Each worker loads the folded model, the FP
reference and the block runner once (per workspace and inputs digest) and returns a few floats per task; results
are merged in task order, so the table is the in-process one to the bit. A worker killed mid-task is replaced by
its nanny and the task rescheduled (Dask), an exception in a task is retried (Prefect). A scheduler that cannot be
reached, or a cluster lost during the run, is one :class:`ClusterError` naming it; the stage then writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence

from prefect import flow, task, unmapped
from prefect.cache_policies import NO_CACHE

from ramp.errors import RampError
from ramp.params import DistributedParams
from ramp.pipeline.sensitivity import BlockTask, Mapper, Measured

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10.0  # seconds to reach a scheduler (``address``) before giving up


class ClusterError(RampError, OSError):
    """The Dask cluster of params ``distributed`` could not be reached, started, or was lost during the run."""


@task(name="measure-block", retries=2, task_run_name="block-{block}", cache_policy=NO_CACHE)
def measure_block(fn: Callable[[BlockTask], Measured], block: int, args: BlockTask) -> Measured:
    """One fan-out task: ``fn(args)`` on a worker (``block``: the task run's name)."""
    return fn(args)


@flow(name="sensitivity-fanout", validate_parameters=False)
def sensitivity_fanout(fn: Callable[[BlockTask], Measured], tasks: list[BlockTask]) -> list[Measured]:
    """``measure-block`` mapped over ``tasks`` on the flow's task runner; results in task order."""
    futures = measure_block.map(unmapped(fn), [t.block for t in tasks], tasks)
    return [f.result() for f in futures]


def _threads_env(threads: int) -> dict[str, str]:
    return {name: str(threads) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """``os.environ`` with ``values`` set, restored on exit (variables that were unset are unset again)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def scheduler(dist: DistributedParams, connect_timeout: float = CONNECT_TIMEOUT_S) -> Iterator[str]:
    """The address of the scheduler to run on: ``dist.address`` once it answered, else a LocalCluster's, started here
    (``workers`` processes, ``threads_per_worker`` Dask and torch threads each) and closed on exit."""
    import dask
    import distributed

    if dist.address is not None:
        try:
            with distributed.Client(dist.address, timeout=connect_timeout, set_as_default=False):
                pass
        except (OSError, TimeoutError) as e:
            raise ClusterError(
                f"distributed.address {dist.address}: no Dask scheduler answered within {connect_timeout:g} s "
                f"({type(e).__name__}: {e})"
            ) from e
        yield dist.address
        return
    # set before each worker process starts (before it imports torch). The nanny's defaults pin them to 1 and it
    # prefers this process's environment to its config (which an earlier cluster's nanny has set), so set both here
    threads = _threads_env(dist.threads_per_worker)
    env = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **threads}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}), _environ(threads):
        try:
            cluster = distributed.LocalCluster(
                n_workers=dist.workers,
                threads_per_worker=dist.threads_per_worker,
                processes=True,
                dashboard_address=None,
                scheduler_port=0,
            )
        except Exception as e:
            raise ClusterError(f"could not start a local Dask cluster of {dist.workers} workers: {e}") from e
    with cluster:
        log.info("local Dask cluster at %s: %d workers", cluster.scheduler_address, dist.workers)
        yield cluster.scheduler_address


def _where(dist: DistributedParams) -> str:
    return f"the Dask cluster at {dist.address}" if dist.address else f"a local Dask cluster of {dist.workers} workers"


def run_fanout(
    fn: Callable[[BlockTask], Measured],
    tasks: Sequence[BlockTask],
    address: str,
    connect_timeout: float = CONNECT_TIMEOUT_S,
) -> list[Measured]:
    """The flow ``sensitivity-fanout`` on the scheduler at ``address``."""
    from prefect_dask import DaskTaskRunner

    runner = DaskTaskRunner(address=address, client_kwargs={"timeout": connect_timeout})
    return sensitivity_fanout.with_options(task_runner=runner)(fn, list(tasks))


def prefect_mapper(dist: DistributedParams, connect_timeout: float | None = None) -> Mapper:
    """A mapper for :func:`ramp.pipeline.sensitivity.sensitivity` that runs its tasks on the cluster of ``dist``
    (``engine: dask``). A task's own error (bad input: a :class:`RampError`) is raised as it is; anything else that
    stops the run (unreachable scheduler, lost cluster, a task failing on every try) is one :class:`ClusterError`.
    ``connect_timeout``: seconds to reach the scheduler (None: :data:`CONNECT_TIMEOUT_S`)."""
    if dist.engine != "dask":
        raise ValueError(f"distributed.engine is {dist.engine!r}: the Prefect mapper runs on Dask (engine: dask)")

    def mapper(fn: Callable[[BlockTask], Measured], tasks: Sequence[BlockTask]) -> list[Measured]:
        timeout = CONNECT_TIMEOUT_S if connect_timeout is None else connect_timeout
        with scheduler(dist, timeout) as address:
            try:
                return run_fanout(fn, tasks, address, timeout)
            except RampError:
                raise
            except Exception as e:
                raise ClusterError(f"sensitivity fan-out on {_where(dist)} failed: {type(e).__name__}: {e}") from e

    return mapper
