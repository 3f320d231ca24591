"""DVC stage train (params ``seed``, ``train``): :func:`ramp.pipeline.train.train`."""

from ramp.params import TrainParams, load_params, load_value
from ramp.pipeline.train import train
from stages._common import WORKSPACE, stage_main


def main() -> None:
    train(load_params("train", TrainParams), load_value("seed", int), WORKSPACE)


if __name__ == "__main__":
    stage_main("train", main)
