"""DVC stage embed (params ``embed``): :func:`ramp.pipeline.embed.embed`."""

from ramp.params import EmbedParams, load_params
from ramp.pipeline.embed import embed
from stages._common import WORKSPACE, stage_main


def main() -> None:
    embed(load_params("embed", EmbedParams), WORKSPACE)


if __name__ == "__main__":
    stage_main("embed", main)
