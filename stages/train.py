"""DVC stage train (params ``seed``, ``model``, ``calibrate``, ``embed``, ``fold``, ``sensitivity``, ``train``: the
sections before ``train`` prepare ``train.sources``; ``allocate.embedding_type``: the budget's fixed bytes):
:func:`ramp.pipeline.train.train`."""

from ramp.params import load_pipeline
from ramp.pipeline.train import train
from stages._common import WORKSPACE, stage_main


def main() -> None:
    params = load_pipeline()
    train(params.train, params.seed, WORKSPACE, pipeline=params)


if __name__ == "__main__":
    stage_main("train", main)
