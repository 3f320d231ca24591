"""DVC stage allocate (params ``allocate``): :func:`ramp.pipeline.allocate.allocate`.

``allocate.policy: champion`` reads the registry's champion from ``policies/champion/`` (written by
``python -m flows.registry pull-champion``, which the Prefect flows run first; DVC cannot see the registry, so
rerun with ``dvc repro -f -s allocate`` after a promotion).
"""

from pathlib import Path

from ramp.params import AllocateParams, SensitivityParams, load_params
from ramp.pipeline.allocate import allocate
from stages._common import WORKSPACE, stage_main

CHAMPION_DIR = Path("policies") / "champion"


def main() -> None:
    params = load_params("allocate", AllocateParams)
    formats = load_params("sensitivity", SensitivityParams).embedding_formats  # embedding_type: predicted's choices
    if params.policy == "champion":
        version_file = CHAMPION_DIR / "version.txt"
        if not version_file.exists():
            raise FileNotFoundError(
                f"allocate.policy is 'champion' but {CHAMPION_DIR} holds no pulled policy: run "
                "`python -m flows.registry pull-champion` first"
            )
        allocate(params, WORKSPACE, CHAMPION_DIR / "policy", version_file.read_text().strip(), formats)
    else:
        allocate(params, WORKSPACE, embedding_formats=formats)


if __name__ == "__main__":
    stage_main("allocate", main)
