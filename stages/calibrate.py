"""DVC stage calibrate (params ``seed``, ``model``, ``calibrate``): :func:`ramp.pipeline.calibrate.calibrate`."""

from ramp.params import CalibrateParams, ModelParams, load_params, load_value
from ramp.pipeline.calibrate import calibrate
from stages._common import WORKSPACE, stage_main


def main() -> None:
    model = load_params("model", ModelParams)
    params = load_params("calibrate", CalibrateParams)
    calibrate(model, params, load_value("seed", int), WORKSPACE)


if __name__ == "__main__":
    stage_main("calibrate", main)
