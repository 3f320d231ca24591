"""DVC stage sensitivity (params ``sensitivity``): :func:`ramp.pipeline.sensitivity.sensitivity`."""

from ramp.params import SensitivityParams, load_params
from ramp.pipeline.sensitivity import sensitivity
from stages._common import WORKSPACE, stage_main


def main() -> None:
    sensitivity(load_params("sensitivity", SensitivityParams), WORKSPACE)


if __name__ == "__main__":
    stage_main("sensitivity", main)
