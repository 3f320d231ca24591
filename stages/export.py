"""DVC stage export (params ``export``): :func:`ramp.pipeline.export.export`."""

from ramp.params import ExportParams, load_params
from ramp.pipeline.export import export
from stages._common import WORKSPACE, stage_main


def main() -> None:
    export(load_params("export", ExportParams), WORKSPACE)


if __name__ == "__main__":
    stage_main("export", main)
