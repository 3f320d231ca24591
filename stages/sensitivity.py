"""DVC stage sensitivity (params ``sensitivity``): :func:`ramp.pipeline.sensitivity.sensitivity`, its per-block
measurement in this process or, with params ``distributed.engine: dask`` (no stage params: it changes no result), as
Prefect tasks on a Dask cluster (:mod:`flows.fanout`)."""

from ramp.params import SensitivityParams, load_distributed_params, load_params
from ramp.pipeline.sensitivity import sensitivity
from stages._common import WORKSPACE, stage_main


def main() -> None:
    params = load_params("sensitivity", SensitivityParams)
    dist = load_distributed_params()
    mapper = None
    if dist.engine == "dask":
        from flows.fanout import prefect_mapper  # Prefect and Dask only when asked for

        mapper = prefect_mapper(dist)
    sensitivity(params, WORKSPACE, mapper=mapper)


if __name__ == "__main__":
    stage_main("sensitivity", main)
