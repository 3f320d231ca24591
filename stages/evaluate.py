"""DVC stage evaluate (params ``evaluate``): :func:`ramp.pipeline.evaluate.evaluate`."""

from ramp.params import EvaluateParams, load_params
from ramp.pipeline.evaluate import evaluate
from stages._common import WORKSPACE, stage_main


def main() -> None:
    evaluate(load_params("evaluate", EvaluateParams), WORKSPACE)


if __name__ == "__main__":
    stage_main("evaluate", main)
