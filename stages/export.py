"""DVC stage export (params: every section, which its report prints): :func:`ramp.pipeline.export.export`."""

from ramp.params import load_pipeline
from ramp.pipeline.export import export
from ramp.report import pipeline_sections
from stages._common import WORKSPACE, stage_main


def main() -> None:
    params = load_pipeline()
    export(params.export, WORKSPACE, pipeline_params=pipeline_sections(params))


if __name__ == "__main__":
    stage_main("export", main)
