"""DVC stage fold (params ``fold``): :func:`ramp.pipeline.fold.fold`."""

from ramp.params import FoldParams, load_params
from ramp.pipeline.fold import fold
from stages._common import WORKSPACE, stage_main


def main() -> None:
    fold(load_params("fold", FoldParams), WORKSPACE)


if __name__ == "__main__":
    stage_main("fold", main)
