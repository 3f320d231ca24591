"""DVC stage quantize (params ``quantize``): :func:`ramp.pipeline.quantize.quantize`."""

from ramp.params import QuantizeParams, load_params
from ramp.pipeline.quantize import quantize
from stages._common import WORKSPACE, stage_main


def main() -> None:
    quantize(load_params("quantize", QuantizeParams), WORKSPACE)


if __name__ == "__main__":
    stage_main("quantize", main)
